"""An open statistics window, saved with a Trainer checkpoint and restored on resume.

A topology update ranks grow (and re-prune) candidates by gradient sums over
the `stat_window` optimizer steps before it. A checkpoint taken inside that
window holds the adapter and the optimizer but, without this file, not the
sums: a resumed run would open a shorter window at the resume step, pick
other candidates and end with another topology than an uninterrupted run.
So `SeftCallback.on_save` writes what each layer's window has accumulated
(candidate positions, gradient sums, channel statistics, step counts) to
`WINDOW_FILE` in the checkpoint folder, and `on_train_begin` of a resumed
run loads it back, after which the run is the uninterrupted one.

The window is identical on every rank (gradients are averaged before they
are accumulated), so the main process writes it and every rank reads it.
A checkpoint without the file inside a window (written by an older seft, or
resumed from a folder this callback cannot find) is resumed with a warning
that names the consequence.

Custom loops: `save_window(seft_model, folder, step)` after saving a
checkpoint, `load_window(seft_model, folder, step)` after loading it.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from ..errors import SeftError

logger = logging.getLogger(__name__)

WINDOW_FILE = "seft_window.safetensors"
_TENSORS = ("grow_idx", "sens_idx", "grow_sum", "grow_sq", "sens_sum", "x_sq")
_FORMAT = "1"


def window_state(seft_model) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of every open window of the active adapter; no tensors if none is open."""
    adapter = seft_model._adapter()
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, dict] = {}
    for name, layer in seft_model.seft_layers(adapter).items():
        window = layer.seft_window.get(adapter)
        if window is None:
            continue
        layers[name] = {"want_sensitivity": window.want_sensitivity, "normalized": window.normalized,
                        "reselect": window.reselect, "steps": window.steps, "tokens": window.tokens}
        for field in _TENSORS:
            value = getattr(window, field, None)
            if value is not None:
                tensors[f"{name}|{field}"] = value.detach().to("cpu").contiguous()
    return tensors, {"adapter": adapter, "layers": layers}


def save_window(seft_model, folder: str | os.PathLike, step: int) -> Path | None:
    """Write the open windows to `folder/WINDOW_FILE` (atomically); None when no window is open."""
    from safetensors.torch import save_file

    tensors, meta = window_state(seft_model)
    if not meta["layers"]:
        return None
    path = Path(folder) / WINDOW_FILE
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": _FORMAT, "step": str(int(step)), "seft": json.dumps(meta)})
    os.replace(tmp, path)
    return path


def load_window(seft_model, folder: str | os.PathLike, step: int) -> bool:
    """Restore the windows saved in `folder` for optimizer step `step`; False if it holds none."""
    from safetensors import safe_open

    path = Path(folder) / WINDOW_FILE
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if header.get("format") != _FORMAT or "seft" not in header:
        raise SeftError(f"{path} is not a seft window file (format {header.get('format')!r}); "
                        f"delete it to resume with a restarted window")
    if int(header.get("step", -1)) != int(step):
        raise SeftError(f"{path} holds the statistics window of step {header.get('step')}, but the run resumes at "
                        f"step {step}; resume from the checkpoint folder it came with")
    meta = json.loads(header["seft"])
    adapter = seft_model._adapter()
    layers = seft_model.seft_layers(adapter)
    missing = sorted(set(meta["layers"]) - set(layers))
    if missing:
        raise SeftError(f"{path} has windows for layers this model lacks (e.g. {missing[0]}); "
                        "was the checkpoint written for another model or target_modules?")
    for name, layer in layers.items():
        layer.close_window(adapter)
        entry = meta["layers"].get(name)
        if entry is None:
            continue
        layer.open_window(adapter, entry["want_sensitivity"], normalized=entry["normalized"],
                          reselect=entry["reselect"])
        window = layer.seft_window[adapter]
        window.steps, window.tokens = int(entry["steps"]), int(entry["tokens"])
        device = layer.seft_values[adapter].device
        for field in _TENSORS:
            value = tensors.get(f"{name}|{field}")
            if value is not None:
                setattr(window, field, value.to(device))
        if window.grow_idx is not None:  # the per-step buffers are empty between optimizer steps
            window.grow_buf = torch.zeros_like(window.grow_sum)
            window.sens_buf = torch.zeros_like(window.sens_sum)
            window.seen = False
    logger.info("SEFT: restored the statistics window of %d layer(s) from %s", len(meta["layers"]), path)
    return True
