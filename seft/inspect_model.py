"""Sparsity of any checkpoint folder, read tensor by tensor from its safetensors files.

`seft inspect` shows three kinds of folder:
  - a `seft prune` output: its sparsity_report.json (written at prune time);
  - any Hugging Face model folder (dense, pruned elsewhere, a merged SEFT
    model): per-layer sparsity of the decoder's linear weights, counted here;
  - a SEFT adapter folder: per layer the slots `k`, the base weights SEFT
    removed, the slots it revived (at positions the pruned base had zeroed)
    and the active count of the effective weight, which needs the base
    checkpoint (`adapter_config.json`'s base_model_name_or_path, or --base).
Only one tensor is in memory at a time, so a model larger than RAM works.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import SeftError

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_ADAPTER_KEY = re.compile(r"^(.*)\.seft_(values|indices|removed|age)(?:\.[^.]+)?$")  # (adapter name, if kept)
ADAPTER_FILE = "adapter_model.safetensors"


def folder_kind(folder: Path) -> str:
    """'prune', 'adapter' or 'model' (SeftError for anything else, naming what was expected)."""
    if not folder.is_dir():
        raise SeftError(f"no folder {folder}")
    if (folder / "sparsity_report.json").is_file():
        return "prune"
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return "model"
    raise SeftError(f"{folder} is neither a model folder (config.json + *.safetensors), a `seft prune` output "
                    "(sparsity_report.json) nor an adapter folder (adapter_config.json)")


def tensor_reader(folder: Path) -> tuple[list[str], Callable]:
    """(every tensor name, read(name) -> tensor) over the safetensors files of `folder`."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), file))

    def read(key: str):
        with safe_open(str(where[key]), framework="pt") as f:
            return f.get_tensor(key)

    return list(where), read


def _linear_weights(names: list[str]) -> Iterator[tuple[int, str, str]]:
    """(layer index, module path inside the layer, tensor name) of the decoder's linear weights.

    The standard projections (q/k/v/o, gate/up/down) when the checkpoint has them, else every
    `layers.N.*.weight` (norms are 1-D and skipped by the caller)."""
    found = []
    for name in names:
        m = _LAYER.search(name)
        if m and name.endswith(".weight"):
            found.append((int(m.group(1)), m.group(2).removesuffix(".weight"), name))
    targeted = [f for f in found if f[1].rsplit(".", 1)[-1] in TARGETS]
    yield from sorted(targeted or found)


def _overall(layers: list[dict], count: str = "zeros") -> dict:
    params = sum(layer["params"] for layer in layers)
    value = sum(layer[count] for layer in layers)
    return {"params": params, count: value, "sparsity": (value if count == "zeros" else params - value)
            / max(params, 1)}


def model_sparsity(folder: Path) -> dict:
    """Per-layer and per-module zeros of a model folder's decoder linears (same shape as a prune report)."""
    names, read = tensor_reader(folder)
    layers: dict[int, dict] = {}
    for index, module, key in _linear_weights(names):
        weight = read(key)
        if weight.dim() != 2:
            continue
        zeros = int((weight == 0).sum())
        layer = layers.setdefault(index, {"index": index, "params": 0, "zeros": 0, "modules": {}})
        layer["modules"][module] = {"shape": list(weight.shape), "zeros": zeros, "sparsity": zeros / weight.numel()}
        layer["params"] += weight.numel()
        layer["zeros"] += zeros
    if not layers:
        raise SeftError(f"{folder} has no decoder linear weights (layers.N.*.weight) in its safetensors files")
    ordered = [layers[i] | {"sparsity": layers[i]["zeros"] / layers[i]["params"]} for i in sorted(layers)]
    return {"model": str(folder), "layers": ordered, "overall": _overall(ordered)}


def _adapter_base(folder: Path, base: str | None) -> Path | None:
    from .models import local_model_folder

    if base is not None:
        found = local_model_folder(base)
        if found is None:
            raise SeftError(f"--base {base}: no such model folder (or alias not yet cached)")
        return found
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    name = config.get("base_model_name_or_path")
    candidates = [name, str((folder / name).resolve())] if name else []
    for candidate in candidates:
        found = local_model_folder(candidate)
        if found is not None and (found / "config.json").is_file():
            return found
    return None


def adapter_sparsity(folder: Path, base: str | None = None) -> dict:
    """Per layer and module of a SEFT adapter: k, removed and, with the base, n, revived, active, sparsity."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") != "SEFT":
        raise SeftError(f"{folder} is a {config.get('peft_type')} adapter; `seft inspect` reads SEFT adapters")
    if not (folder / ADAPTER_FILE).is_file():
        raise SeftError(f"{folder} holds no {ADAPTER_FILE}")
    names, read = tensor_reader(folder)
    modules: dict[str, dict] = {}
    for name in names:
        m = _ADAPTER_KEY.match(name)
        if m:
            modules.setdefault(m.group(1), {})[m.group(2)] = name
    base_folder = _adapter_base(folder, base)
    base_names, base_read = tensor_reader(base_folder) if base_folder else ([], None)
    by_place = {(i, module): key for i, module, key in _linear_weights(base_names)}
    layers: dict[int, dict] = {}
    for path, keys in sorted(modules.items()):
        m = _LAYER.search(path)
        if not m or "indices" not in keys:
            continue
        index, module = int(m.group(1)), m.group(2)
        indices = read(keys["indices"]).long()
        removed = read(keys["removed"]).long() if "removed" in keys else indices[:0]
        row = {"k": int(indices.numel()), "removed": int(removed.numel())}
        key = by_place.get((index, module))
        if key is not None:
            weight = base_read(key).reshape(-1)
            active = weight != 0
            row["n"] = int(active.sum())
            active[removed] = False
            row["revived"] = int((~active[indices]).sum())
            active[indices] = True
            row.update(active=int(active.sum()), params=int(weight.numel()))
            row["sparsity"] = 1.0 - row["active"] / row["params"]
            row["base_sparsity"] = 1.0 - row["n"] / row["params"]
        layer = layers.setdefault(index, {"index": index, "modules": {}})
        layer["modules"][module] = row
    if not layers:
        raise SeftError(f"{folder}/{ADAPTER_FILE} holds no SEFT layer state (seft_indices)")
    with_base = all("active" in r for layer in layers.values() for r in layer["modules"].values())
    ordered = []
    for i in sorted(layers):
        rows = layers[i]["modules"].values()
        layer = {"index": i, "modules": layers[i]["modules"],
                 **{c: sum(r[c] for r in rows) for c in ("k", "removed")}}
        if with_base:
            layer.update({c: sum(r[c] for r in rows) for c in ("n", "revived", "active", "params")})
            layer["sparsity"] = 1.0 - layer["active"] / layer["params"]
            layer["base_sparsity"] = 1.0 - layer["n"] / layer["params"]
        ordered.append(layer)
    overall = {c: sum(layer[c] for layer in ordered) for c in ("k", "removed")}
    if with_base:
        overall.update({c: sum(layer[c] for layer in ordered) for c in ("n", "revived", "active", "params")})
        overall["sparsity"] = 1.0 - overall["active"] / overall["params"]
        overall["base_sparsity"] = 1.0 - overall["n"] / overall["params"]
    return {"adapter": str(folder), "base": str(base_folder) if base_folder else None,
            "base_name": config.get("base_model_name_or_path"), "layers": ordered, "overall": overall}


def plot_sparsity(layers: list[dict], path: Path, title: str, base: list[float] | None = None) -> None:
    """A PNG with one bar per layer (sparsity), and the base's bars beside them when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = [layer["index"] for layer in layers]
    values = [layer["sparsity"] for layer in layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(index) + 2), 3.5))
    width = 0.4 if base else 0.8
    if base:
        ax.bar([i - width / 2 for i in index], base, width, label="base", color="#9aa5b1")
        ax.bar([i + width / 2 for i in index], values, width, label="with adapter", color="#2f6db5")
        ax.legend(loc="upper right")
    else:
        ax.bar(index, values, width, color="#2f6db5")
    ax.set_xticks(index if len(index) <= 40 else index[:: max(1, len(index) // 20)])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("sparsity (fraction of zeros)")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
