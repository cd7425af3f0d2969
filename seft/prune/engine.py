"""The one sequential pruning loop, shared by every method.

1. Capture: run the calibration windows through the model until the first
   decoder layer's forward pre-hook fires, record its positional and keyword
   arguments verbatim (hidden states, `position_embeddings`, masks, whatever
   this transformers version passes) and abort the forward with a private
   exception. Nothing downstream of layer 0 runs.
2. Per decoder layer, with only that layer on `config.device`:
   observe  - hooks on the target linears feed `InputStatistics` while the
              unpruned layer runs on the current inputs;
   apply    - each method turns (weight, statistics) into a pruned weight;
   propagate- the pruned layer re-runs; its outputs are the next layer's
              inputs, so later layers calibrate on what they will really see.
Magnitude is data-free and skips capture and propagation.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data import calibration_windows
from ..errors import SeftError
from ..models import SHARED_INPUT_GROUPS, check_seq_len, decoder_layers, linear_names, target_linears, unwrap
from ..sparsity import sparsity_of
from .config import PruneConfig
from .magnitude import magnitude_prune
from .observers import InputStatistics
from .sparsegpt import sparsegpt_prune
from .wanda import wanda_prune

logger = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised from layer 0's pre-hook to stop the forward once its inputs are recorded."""

    def __init__(self, args: tuple, kwargs: dict):
        super().__init__()
        self.args, self.kwargs = args, kwargs


def _parent_of(model: nn.Module, child: nn.Module) -> nn.Module:
    for module in model.modules():
        if any(c is child for c in module.children()):
            return module
    raise SeftError("could not locate the decoder layer stack inside the model")


def _to(obj: Any, device: torch.device) -> Any:
    """Move tensors inside nested tuples/lists/dicts; leave everything else alone."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _hidden(output: Any) -> torch.Tensor:
    """Decoder layers return a tensor (transformers 5) or a tuple led by it (4.x)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device
) -> list[tuple[tuple, dict]]:
    """[(args, kwargs)] that the first decoder layer receives for each batch of `windows`.

    Only the modules outside the layer stack (embeddings, rotary) move to
    `device`, and only for the duration of the capture.
    """
    layers = decoder_layers(model)
    stack_owner = _parent_of(model, layers)
    outside = [m for m in stack_owner.children() if m is not layers]
    homes = [next(m.parameters(), torch.empty(0)).device for m in outside]
    for m in outside:
        m.to(device)

    def grab(_module: nn.Module, args: tuple, kwargs: dict):
        raise _Captured(args, kwargs)

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    captured: list[tuple[tuple, dict]] = []
    try:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(device)
            try:
                stack_owner(input_ids=batch, use_cache=False)
            except _Captured as got:
                captured.append((got.args, got.kwargs))
            else:
                raise SeftError("the first decoder layer was never called; unsupported model layout")
    finally:
        handle.remove()
        for m, home in zip(outside, homes):
            m.to(home)
    return captured


def _leaders(names: list[str]) -> dict[str, str]:
    """name -> the name whose input statistics it uses (first present member of its shared group)."""
    leader = {n: n for n in names}
    for group in SHARED_INPUT_GROUPS:
        present = [n for n in group if n in leader]
        for n in present:
            leader[n] = present[0]
    return leader


def _run_layer(layer: nn.Module, inputs: list[tuple[tuple, dict]], keep: bool) -> list[tuple[tuple, dict]]:
    """Run `layer` on every captured batch; with `keep`, return the outputs as next inputs."""
    out = []
    for args, kwargs in inputs:
        hidden = _hidden(layer(*args, **kwargs))
        if keep:
            out.append(((hidden, *args[1:]), kwargs))
    return out


DEAD_INPUTS = "magnitude (every calibration input of this linear was zero)"


def _prune_linear(name: str, weight: torch.Tensor, stats: InputStatistics | None, config: PruneConfig
                  ) -> tuple[torch.Tensor, str | None]:
    """(pruned weight, the fallback used or None)."""
    if config.method == "magnitude":
        return magnitude_prune(weight, config.sparsity, config.nm), None
    seen = stats.sq_col_norms if config.method == "wanda" else torch.diagonal(stats.hessian)
    if not bool(seen.any()):
        # No calibration signal at all. SparseGPT zeroes the weights of dead inputs (they cannot change the
        # output on this data), which here is the whole layer: far above the target, and dead on real data;
        # Wanda's scores would all tie. Without information, magnitude is the honest choice.
        return magnitude_prune(weight, config.sparsity, config.nm), DEAD_INPUTS
    if config.method == "wanda":
        return wanda_prune(weight, stats.sq_col_norms, config.sparsity, config.nm), None
    return sparsegpt_prune(weight, stats.hessian, config.sparsity, config.nm, config.blocksize, config.percdamp), None


def observe_layer(
    layer: nn.Module, inputs: list[tuple[tuple, dict]], config: PruneConfig, device: torch.device
) -> dict[str, InputStatistics]:
    """Run the unpruned `layer` on `inputs` with hooks; statistics keyed by the leader of each input group."""
    if not config.needs_data:
        return {}
    linears = target_linears(layer, tuple(config.targets))
    stats: dict[str, InputStatistics] = {}
    handles = []
    for name in dict.fromkeys(_leaders(list(linears)).values()):
        stats[name] = InputStatistics(linears[name].in_features, hessian=config.method == "sparsegpt",
                                      sq_norms=config.method == "wanda", device=device)
        hook = (lambda s: lambda _m, args, _out: s.add_batch(args[0]))(stats[name])
        handles.append(linears[name].register_forward_hook(hook))
    try:
        _run_layer(layer, inputs, keep=False)
    finally:
        for h in handles:
            h.remove()
    return stats


def apply_layer(layer: nn.Module, stats: dict[str, InputStatistics], config: PruneConfig, where: str = ""
                ) -> dict[str, dict]:
    """Prune every target linear of `layer` in place; per-module report keyed by qualified name.

    A module pruned by a fallback method is logged as a warning and its report entry says so."""
    linears = target_linears(layer, tuple(config.targets))
    qualified = linear_names(layer, tuple(config.targets))
    leader = _leaders(list(linears))
    modules = {}
    for name, linear in linears.items():
        pruned, fallback = _prune_linear(name, linear.weight.data, stats.get(leader[name]), config)
        linear.weight.data.copy_(pruned)
        modules[qualified[name]] = {
            "shape": list(linear.weight.shape),
            "sparsity": sparsity_of(linear.weight.data),
            "zeros": int((linear.weight.data == 0).sum().item()),
            "params": linear.weight.numel(),
        }
        if fallback:
            modules[qualified[name]]["fallback"] = fallback
            logger.warning("%s%s: pruned by %s instead of %s", where, qualified[name], fallback, config.method)
    return modules


def check_pattern_fits(model: nn.Module, config: PruneConfig) -> None:
    """Fail before any work if an N:M pattern does not divide some layer's in_features."""
    nm = config.nm
    if nm is None:
        return
    for i, layer in enumerate(decoder_layers(model)):
        for name, linear in target_linears(layer, tuple(config.targets)).items():
            if linear.in_features % nm[1]:
                raise SeftError(
                    f"pattern {config.pattern} does not fit layer {i} {name}: in_features {linear.in_features} "
                    f"is not divisible by {nm[1]}; use unstructured or an M that divides it"
                )


@torch.no_grad()
def prune_model(
    model: nn.Module,
    tokenizer,
    config: PruneConfig,
    progress: bool = True,
    on_layer: Callable[[int, nn.Module], None] | None = None,
) -> dict:
    """Prune `model` in place layer by layer; return the sparsity report (a JSON-able dict).

    `on_layer(index, layer)` is called after each layer is pruned (tests and
    progress reporting); raising from it aborts the run.
    """
    config.validate()
    device = config.check_device()
    check_pattern_fits(model, config)
    layers = decoder_layers(model)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()

    inputs: list[tuple[tuple, dict]] = []
    if config.needs_data:
        check_seq_len(unwrap(model).config, seq_len=config.seq_len)
        windows = calibration_windows(tokenizer, config.calibration, config.num_samples, config.seq_len, config.seed)
        inputs = capture_layer_inputs(model, windows, config.batch_size, device)
        logger.info("captured layer-0 inputs: %d x %d tokens from %s", len(windows), config.seq_len, config.calibration)

    report_layers = []
    bar = tqdm(range(len(layers)), desc=f"prune {config.method}", unit="layer", disable=not progress)
    for index in bar:
        layer = layers[index]
        home = next(layer.parameters()).device
        layer.to(device)
        stats = observe_layer(layer, inputs, config, device)
        modules = apply_layer(layer, stats, config, where=f"layer {index} ")
        del stats
        if config.needs_data:  # the last layer too: cheap, and tests compare every layer's output
            inputs = _run_layer(layer, inputs, keep=True)
        layer.to(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        zeros = sum(m["zeros"] for m in modules.values())
        params = sum(m["params"] for m in modules.values())
        report_layers.append({"index": index, "sparsity": zeros / max(params, 1), "zeros": zeros,
                              "params": params, "modules": modules})
        if on_layer is not None:
            on_layer(index, layer)
    model.train(was_training)

    zeros = sum(r["zeros"] for r in report_layers)
    params = sum(r["params"] for r in report_layers)
    return {
        "method": config.method,
        "pattern": config.pattern,
        "target_sparsity": config.sparsity,
        "calibration": None if not config.needs_data else {
            "source": config.calibration, "num_samples": config.num_samples,
            "seq_len": config.seq_len, "seed": config.seed,
        },
        "config": config.as_dict(),
        "seconds": round(time.perf_counter() - t0, 3),
        "overall": {"sparsity": zeros / max(params, 1), "zeros": zeros, "params": params},
        "layers": report_layers,
    }
