"""`seft eval`: lm-eval-harness and SparseGPT-protocol perplexity for any stage.

One entry point, `evaluate`, judges a dense model, a pruned checkpoint, a base
model + peft adapter (unmerged: the adapter's own forward runs) or a merged
model. The model is loaded once, in memory, and handed to
`lm_eval.simple_evaluate` as an `HFLM` instance, so what lm-eval scores is
exactly the object the SEFT/LoRA code built, not a re-load of it.

Two perplexities are reported and named apart on purpose:
  - `sparsegpt_ppl_<source>_<split>_seq<N>` (`seft.perplexity`): the pruning
    papers' protocol — held-out documents joined into one token stream, cut
    into non-overlapping windows of an explicit N, token-level perplexity,
    token and window counts reported;
  - `wiki_heldout_rolling` (an lm-eval `loglikelihood_rolling` task in
    eval/tasks): the same documents scored one by one with lm-eval's rolling
    windows of the model's `max_length`, reported per word and per byte.

lm_eval is imported only inside the functions that evaluate.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SeftError
from .eval_tasks import Suite, check_tasks, include_paths, task_manager

logger = logging.getLogger(__name__)

ADAPTER_WEIGHT_FILE = "adapter_model.safetensors"
PICKLED_ADAPTER_FILE = "adapter_model.bin"


# --- loading ----------------------------------------------------------------------

def _adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, from safetensors only: a pickled `.bin` can run code when unpickled."""
    path = adapter_dir / ADAPTER_WEIGHT_FILE
    if not path.exists():
        if (adapter_dir / PICKLED_ADAPTER_FILE).exists():
            raise SeftError(f"{adapter_dir} holds {PICKLED_ADAPTER_FILE}, a pickle, which seft does not load; "
                            f"re-save the adapter as {ADAPTER_WEIGHT_FILE} (save_pretrained(..., "
                            "safe_serialization=True)) where it was made")
        raise SeftError(f"adapter folder {adapter_dir} holds no {ADAPTER_WEIGHT_FILE}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise SeftError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0][:200]}); "
                        "the file is corrupt or truncated") from None


def load_error_line(exc: BaseException) -> str:
    """The line of a torch/peft load error that names the tensor (not 'Error(s) in loading state_dict ...')."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if "size mismatch for" in ln or "Missing key" in ln or "Unexpected key" in ln]
    return (named or lines or [type(exc).__name__])[0][:400]


def _module_for_key(modules: dict[str, nn.Module], key: str) -> tuple[str, nn.Module] | None:
    """The deepest base-model module whose name prefixes an adapter key (peft prefixes stripped)."""
    key = key.removeprefix("base_model.model.")
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:cut])
        if name in modules:
            return name, modules[name]
    return None


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a peft adapter folder; SeftError for anything unreadable.

    Cheap next to a model load, so `load_for_eval` runs it first."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not adapter_dir.is_dir():
        raise SeftError(f"no adapter folder {str(adapter_dir)!r}")
    if not config_path.exists():
        raise SeftError(f"{adapter_dir} holds no adapter_config.json, so it is not a peft adapter folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise SeftError(f"{config_path} is not valid JSON ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(config, dict):
        raise SeftError(f"{config_path} is not a peft adapter config (a JSON object)")
    return config, _adapter_tensors(adapter_dir)


def check_adapter(base: nn.Module, adapter_dir: str | os.PathLike,
                  read: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None) -> dict[str, Any]:
    """Refuse an adapter made for another base model, before peft meets it.

    peft reports a shape clash as a long `size mismatch` traceback, and a
    sparse adapter's flat indices may not clash at load time at all. So
    compare every adapter tensor with the module it adapts: the module must
    exist, LoRA factors must match its in/out features, and flat indices must
    lie inside its weight. Returns the adapter config (for the results).
    """
    adapter_dir = Path(adapter_dir)
    config, tensors = read if read is not None else read_adapter(adapter_dir)
    modules = dict(base.named_modules())
    what = f"adapter {adapter_dir} (made for {config.get('base_model_name_or_path') or 'an unnamed base'})"
    for key, tensor in tensors.items():
        found = _module_for_key(modules, key)
        if found is None or next(found[1].children(), None) is not None:  # adapters hang off leaf modules
            raise SeftError(f"{what} does not fit this model: it adapts {key!r}, which this model lacks")
        name, module = found
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear) or weight is None:
            continue
        rest = key.removeprefix("base_model.model.")[len(name) + 1:]
        bad = (
            ("lora_A" in rest and tensor.dim() == 2 and tensor.shape[1] != module.in_features)
            or ("lora_B" in rest and tensor.dim() == 2 and tensor.shape[0] != module.out_features)
            or (("indices" in rest or "removed" in rest) and tensor.numel() and int(tensor.max()) >= weight.numel())
        )
        if bad:
            raise SeftError(
                f"{what} does not fit this model: {key} has shape {tuple(tensor.shape)} but {name} is "
                f"{module.out_features}x{module.in_features}"
            )
    return config


def sparsity_of(model: nn.Module) -> float | None:
    """Fraction of zeros over the target linears (what pruning touched); None if not a supported LM."""
    from .models import decoder_layers, target_linears

    try:
        layers = decoder_layers(model)
    except SeftError:
        return None
    zeros = total = 0
    for layer in layers:
        for linear in target_linears(layer).values():
            w = linear.weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / total if total else None


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    meta: dict[str, Any] = field(default_factory=dict)


def load_for_eval(
    model: str | os.PathLike,
    adapter: str | os.PathLike | None = None,
    dtype: str | None = None,
    device: str | None = None,
    merge: bool = False,
) -> LoadedModel:
    """Base model (+ adapter, unmerged unless `merge`) on `device`, ready for lm-eval."""
    from .models import load_model, resolve_model_path

    read = read_adapter(adapter) if adapter is not None else None  # a bad adapter fails before the model loads
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base, tokenizer = load_model(model, dtype=dtype)
    meta: dict[str, Any] = {
        "model": str(model), "model_path": resolve_model_path(model), "dtype": str(base.dtype).removeprefix("torch."),
        "device": device, "base_sparsity": sparsity_of(base), "adapter": None,
    }
    net: nn.Module = base
    if adapter is not None:
        config = check_adapter(base, adapter, read)
        from peft import PeftModel  # the SEFT type is registered: seft/__init__ ran before this module

        try:
            net = PeftModel.from_pretrained(base, str(adapter))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise SeftError(f"adapter {adapter} could not be applied to {model}: {load_error_line(exc)}") from None
        meta["adapter"] = {"path": str(adapter), "peft_type": config.get("peft_type"),
                           "base_model_name_or_path": config.get("base_model_name_or_path"), "merged": merge}
        if merge:
            net = net.merge_and_unload()
            meta["merged_sparsity"] = sparsity_of(net)
    net.to(device)
    net.eval()
    return LoadedModel(net, tokenizer, meta)


# --- evaluating -------------------------------------------------------------------

def _hub_error(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(s in text for s in ("connection", "offline", "couldn't reach", "name resolution", "max retries"))


def run_lm_eval(
    loaded: LoadedModel,
    tasks: list[str],
    include: list[str],
    manager=None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """lm_eval.simple_evaluate on the in-memory model; returns lm-eval's result dict (no samples)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(include)
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, max_length=max_length)
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
            log_samples=False, bootstrap_iters=1000,
        )
    except Exception as exc:
        if _hub_error(exc):
            raise SeftError(f"a task needed the Hugging Face hub and could not reach it: {str(exc).splitlines()[0][:200]}") from None
        raise
    out.pop("samples", None)
    out["lm_eval_version"] = lm_eval.__version__
    out["max_length"] = lm.max_length
    return out


def evaluate(
    model: str | os.PathLike,
    tasks: list[str] | None = None,
    suite: Suite | None = None,
    adapter: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    merge: bool = False,
    include: list[str] | None = None,
) -> dict[str, Any]:
    """Everything `seft eval` reports, as one JSON-able dict: {'seft': meta, 'lm_eval': ..., 'perplexity': [...]}."""
    from .perplexity import perplexity

    suite = suite or Suite(name="cli", tasks=list(tasks or []))
    if tasks:
        suite.tasks = list(tasks)
    if not suite.tasks and not suite.perplexity:
        raise SeftError("nothing to evaluate: pass --tasks a,b or --suite eval/NAME.yaml")
    limit = limit if limit is not None else suite.limit
    num_fewshot = num_fewshot if num_fewshot is not None else suite.num_fewshot
    include = include_paths(include)  # never the suite's own folder: task files can run code
    manager = None
    if suite.tasks:
        manager = task_manager(include)  # validate names before the model load
        check_tasks(suite.tasks, manager, include)
    t0 = time.perf_counter()
    loaded = load_for_eval(model, adapter, dtype=dtype, device=device, merge=merge)
    report: dict[str, Any] = {
        "seft": {**loaded.meta, "suite": suite.path or suite.name, "tasks": suite.tasks, "limit": limit,
                 "num_fewshot": num_fewshot, "batch_size": batch_size, "include_paths": include},
        "lm_eval": None, "perplexity": [],
    }
    if suite.tasks:
        t1 = time.perf_counter()
        report["lm_eval"] = run_lm_eval(loaded, suite.tasks, include, manager, limit, batch_size, num_fewshot,
                                        suite.max_length)
        report["seft"]["lm_eval_seconds"] = round(time.perf_counter() - t1, 2)
    for spec in suite.perplexity:
        res = perplexity(loaded.model, loaded.tokenizer, spec.source, spec.seq_len, spec.split, spec.max_windows,
                         batch_size=max(1, min(batch_size, 8)))
        report["perplexity"].append({"name": spec.name, "protocol": "sparsegpt", **res.as_dict()})
    report["seft"]["seconds"] = round(time.perf_counter() - t0, 2)
    return report


# --- reporting --------------------------------------------------------------------

def markdown_table(report: dict[str, Any]) -> str:
    """A compact table: one row per task metric and per perplexity entry."""
    lines = ["| task | metric | value | ± | n |", "|---|---|---:|---:|---:|"]
    lm = report.get("lm_eval") or {}
    n_samples = lm.get("n-samples", {})
    for task, metrics in sorted((lm.get("results") or {}).items()):
        n = n_samples.get(task, {}).get("effective", "")
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):  # skip alias, sample_len
                continue
            metric = key.split(",")[0]
            err = metrics.get(f"{metric}_stderr,{key.split(',', 1)[1]}") if "," in key else None
            err_s = f"{err:.4f}" if isinstance(err, (int, float)) else ""
            lines.append(f"| {task} | {metric} | {value:.4f} | {err_s} | {n} |")
    for p in report.get("perplexity", []):
        lines.append(f"| {p['name']} | perplexity | {p['perplexity']:.4f} |  | {p['tokens']} tok / {p['windows']} win |")
    meta = report.get("seft", {})
    adapter = meta.get("adapter") or {}
    sparsity = meta.get("base_sparsity")
    lines.append("")
    lines.append(
        f"model {meta.get('model')}"
        + (f" + adapter {adapter.get('path')} ({adapter.get('peft_type')}{', merged' if adapter.get('merged') else ''})" if adapter else "")
        + (f", base sparsity {sparsity:.1%}" if isinstance(sparsity, float) else "")
        + f", {meta.get('device')}/{meta.get('dtype')}, {meta.get('seconds')} s"
    )
    return "\n".join(lines)
