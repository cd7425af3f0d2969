"""SEFT layer state: a peft tuner layer around a frozen (pruned) `nn.Linear`.

Per adapter the layer holds (all in the state dict, saved by `save_pretrained`):
  - `seft_values[a]`  : fp32 Parameter [k] — the trainable sparse delta;
  - `seft_indices[a]` : int32/int64 buffer [k] — flat slot positions;
  - `seft_removed[a]` : int buffer [variable] — base weights SEFT pruned away;
  - `seft_age[a]`     : int32 buffer [k] — optimizer steps since a slot was
    (re)grown, capped at `SeftConfig.age_cap()` (at least one update
    interval); drives the regrow warm-up, the drop exemption of young slots
    and the churn statistic, and lets a resumed run continue them exactly.
`n` (the layer's fixed active count) and the N:M pattern are *derived* from
the frozen base weight at creation, so they need no storage.

A bitsandbytes 4-bit base (QSEFT) is accepted too: topology reads
`topology_weight()` (dequantized, with the fp checkpoint's zero pattern) and
the forward adds a delta-only Function to bnb's matmul; see quant.py.

This module exposes state and a statistics accumulator; it decides nothing
about topology (that is `model.py`, with the math in `topology.py`).

Guards:
  - integer buffers are never cast: torch's `.to(dtype)` skips them, peft's
    device move is overridden to move devices only (it would also cast
    `values` to a bf16 base's dtype), and loading validates the incoming
    state (validate.py: float-stored or out-of-range integers are refused,
    never rounded or wrapped) and resizes `removed` (whose length changes
    with the topology) before `load_state_dict` copies into it.
  - unmerge after merge restores the base weights zeroed by `removed` from a
    backup kept in memory at merge time (not saved: a merged model is meant
    to be unloaded).

Loading by any loader (issue 14): peft's `PeftModel.from_pretrained` goes
through `load_state_dict` (the pre-hook above), but transformers'
`from_pretrained(adapter_dir)` / `load_adapter` / `pipeline` inject the
adapter, compare each file tensor's shape with the module's and `setattr`
it, never calling `load_state_dict`. So:
  - a config that describes saved state (`removed_sizes` recorded at save,
    or `inference_mode`, which both loaders set) builds *placeholders*:
    `removed` at its saved length, and NaN / -1 fillers everywhere, so the
    shapes match and anything a loader skips is recognisably not loaded;
  - state is validated (validate.py) on first use whenever it is not known
    good: `seft_state` compares the integer tensor objects with the last
    validated ones. Creation, our own updates and `load_state_dict`
    (pre-hook validates, post-hook records) leave it known good; a loader's
    `setattr` or a device move makes the next use validate once; a
    placeholder still in place is a SeftError naming the tensor.
  So a skipped or mismatched tensor (e.g. `ignore_mismatched_sizes=True` on
  an old adapter without `removed_sizes`) raises instead of running the base
  weights SEFT removed.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..errors import SeftError
from ..sparsity import Pattern, detect_nm, index_dtype
from . import shards as S
from . import sparse_ops as SO
from . import topology as T
from .function import PatchPlan, effective_weight, seft_linear, sparse_delta
from .quant import is_4bit
from .quant import topology_weight as quantized_topology_weight

logger = logging.getLogger(__name__)

INT_STATE = ("seft_indices", "seft_removed", "seft_age")


@dataclass
class LayerMeta:
    """Per-adapter facts derived from the base weight at creation."""

    n: int  # active count to keep (count(W != 0) at creation)
    k: int  # slots
    nm: Pattern  # detected N:M pattern, or None
    candidates: int  # window candidates per kind
    kernel: str = "auto"  # SeftConfig.kernel: sparse products (sampled grad, CSR delta) or dense
    slot_lr: str = "plain"  # SeftConfig.slot_lr: "channel" tracks the input channels' mean square


class WindowAccumulator:
    """Transient gradient statistics of one layer over one statistics window.

    Candidates are picked from the first micro-batch's dense `G`; after that,
    each micro-batch adds `G` at the candidates into a per-step buffer, and
    `end_step()` folds the buffer (the optimizer step's gradient) into the
    sums of `G` and `G**2`, so means are per optimizer step even with
    gradient accumulation. Under torch.distributed, `G` is averaged over
    ranks first so every rank takes identical decisions.
    """

    def __init__(self, layer: Linear, adapter: str, want_sensitivity: bool, normalized: bool = False,
                 reselect: bool = False):
        self.layer, self.adapter, self.want_sensitivity = layer, adapter, want_sensitivity
        self.normalized = normalized  # growth: normalized (score |g| / channel rms)
        self.reselect = reselect  # init: reselect — slot positions are grow candidates too
        self.grow_idx: torch.Tensor | None = None
        self.sens_idx: torch.Tensor | None = None
        self.x_sq: torch.Tensor | None = None  # sum of x**2 per input channel over the window
        self.tokens = 0
        self.steps = 0

    def __call__(self, grad: torch.Tensor, x: torch.Tensor) -> None:
        """Take one micro-batch's dense `G` [out, in] and the layer input `x` [tokens, in]."""
        if self.normalized:  # only this mode needs the channel statistics: no extra pass over x otherwise
            x_sq, tokens = x.float().pow(2).sum(0), x.shape[0]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                torch.distributed.all_reduce(grad)
                grad /= world
                if self.normalized:  # identical channel statistics on every rank too
                    count = torch.tensor([float(tokens)], device=x_sq.device)
                    torch.distributed.all_reduce(x_sq)
                    torch.distributed.all_reduce(count)
                    tokens = int(count.item())
        if self.normalized:
            self.x_sq = x_sq.clone() if self.x_sq is None else self.x_sq + x_sq
            self.tokens += tokens
        flat = grad.reshape(-1)
        if self.grow_idx is None:
            self._choose(grad)
        self.grow_buf += flat[self.grow_idx]
        self.sens_buf += flat[self.sens_idx]
        self.seen = True

    @torch.no_grad()
    def _choose(self, grad: torch.Tensor) -> None:
        layer, a = self.layer, self.adapter
        meta = layer.seft_meta[a]
        g = grad.reshape(-1)
        w = layer.topology_weight().reshape(-1)
        removed = layer.seft_removed[a]
        slot_mask = T.flat_mask(layer.seft_indices[a], w.numel())
        base = T.base_active_mask(w, removed)
        score = (grad / T.channel_scale(self.x_sq, self.tokens)).reshape(-1) if self.normalized else g
        grow_excluded = torch.zeros_like(slot_mask) if self.reselect else slot_mask
        self.grow_idx = T.grow_candidates(score, grow_excluded, base if meta.nm else None, meta.candidates)
        if self.want_sensitivity:
            self.sens_idx = T.sensitivity_candidates(w, g, base, slot_mask, meta.candidates)
        else:
            self.sens_idx = torch.empty(0, dtype=torch.long, device=g.device)
        z = torch.zeros
        self.grow_buf, self.grow_sum, self.grow_sq = (z(self.grow_idx.numel(), device=g.device) for _ in range(3))
        self.sens_buf, self.sens_sum = (z(self.sens_idx.numel(), device=g.device) for _ in range(2))
        self.seen = False

    def end_step(self) -> None:
        """Close one optimizer step of the window (no-op if it saw no gradient)."""
        if self.grow_idx is None or not self.seen:
            return
        self.grow_sum += self.grow_buf
        self.grow_sq += self.grow_buf**2
        self.sens_sum += self.sens_buf
        self.grow_buf.zero_()
        self.sens_buf.zero_()
        self.steps += 1
        self.seen = False

    def stats(self) -> T.WindowStats | None:
        if self.grow_idx is None or self.steps == 0:
            return None
        scale = None
        if self.normalized:
            scale = T.channel_scale(self.x_sq, self.tokens)[self.grow_idx % self.layer.in_features]
        return T.WindowStats(self.grow_idx, self.grow_sum, self.grow_sq, self.sens_idx, self.sens_sum, self.steps,
                             grow_scale=scale)


class SeftLayer(BaseTunerLayer):
    """Mixin holding SEFT state; `Linear` below is the concrete layer."""

    adapter_layer_names: tuple[str, ...] = ("seft_values",)
    other_param_names: tuple[str, ...] = INT_STATE

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.seft_values = nn.ParameterDict()
        self.seft_indices = BufferDict(persistent=True)
        self.seft_removed = BufferDict(persistent=True)
        self.seft_age = BufferDict(persistent=True)
        self.seft_meta: dict[str, LayerMeta] = {}
        self.seft_window: dict[str, WindowAccumulator] = {}
        self._seft_merge_backup: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._seft_removed_base: tuple[torch.Tensor, int, torch.Tensor] | None = None  # 4-bit: W_q[removed]
        self._seft_csr: dict[str, tuple] = {}  # adapter -> (key tensors + versions, SlotCSR, DeltaCSR | None)
        self._seft_plan: dict[str, tuple] = {}  # adapter -> (key tensors + versions, PatchPlan)
        self._seft_key = ""  # the module name, for messages
        self._seft_good: dict[str, tuple] = {}  # adapter -> integer state last known valid (see state_mark)
        self._seft_placeholders: dict[str, dict[str, torch.Tensor]] = {}  # adapter -> tensors awaiting a load
        self._seft_loading: set[str] = set()  # adapters the load pre-hook validated, for the post-hook
        self._disable_adapters = False
        self._seft_x_sq: tuple[torch.Tensor, int] | None = None  # (sum of x**2 per input channel, tokens)
        self._seft_folded = 0  # values folded into the base weight (`drop_values: fold`): no adapter file then
        self.merged_adapters = []
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear):
            raise SeftError(f"SEFT adapts nn.Linear layers only, got {type(base).__name__}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_load_state_dict_pre_hook(_fit_int_state_before_load)
        self.register_load_state_dict_post_hook(_mark_loaded_state_good)

    @torch.no_grad()
    def update_layer(self, adapter_name: str, config, layer_key: str = "") -> None:
        """Create adapter `adapter_name`: n from the base, k from the budget, seeded initial slots."""
        weight = self.topology_weight()
        flat = weight.reshape(-1)
        active = flat != 0
        n = int(active.sum().item())
        k = config.budget(self.out_features, self.in_features)
        if k > n:
            raise SeftError(
                f"SEFT budget k={k} exceeds the {n} nonzero weights of {layer_key or 'a layer'} "
                f"({self.out_features}x{self.in_features}); lower density/lora_rank"
            )
        nm = detect_nm(weight.detach()) if n < flat.numel() else None
        idx_dtype = index_dtype(flat.numel())
        device = weight.device
        self._seft_key = layer_key or self._seft_key
        cands = int(config.candidates) if config.candidates is not None else k
        self.seft_meta[adapter_name] = LayerMeta(n=n, k=k, nm=nm, candidates=cands,
                                                 kernel=getattr(config, "kernel", "auto"),
                                                 slot_lr=getattr(config, "slot_lr", "plain"))
        if describes_saved_state(config):
            self._make_placeholders(adapter_name, k, int((config.removed_sizes or {}).get(layer_key, 0)),
                                    idx_dtype, device)
        else:
            gen = torch.Generator().manual_seed(
                (int(config.seed) * 1_000_003 + zlib.crc32(layer_key.encode())) % 2**63)
            slots = T.initial_slots(active.cpu(), k, gen).to(idx_dtype)
            self.seft_values[adapter_name] = nn.Parameter(torch.zeros(k, dtype=torch.float32, device=device))
            self.seft_indices[adapter_name] = slots.to(device)
            self.seft_removed[adapter_name] = torch.empty(0, dtype=idx_dtype, device=device)
            self.seft_age[adapter_name] = torch.full((k,), config.age_cap(), dtype=torch.int32, device=device)
            self.state_mark_good(adapter_name)
        self.set_adapter(self.active_adapters)

    def _make_placeholders(self, adapter: str, k: int, removed: int, idx_dtype: torch.dtype,
                           device: torch.device) -> None:
        """State of the saved shapes, filled so that validation refuses it: a loader must replace all of it."""
        self.seft_values[adapter] = nn.Parameter(torch.full((k,), float("nan"), dtype=torch.float32, device=device))
        self.seft_indices[adapter] = torch.full((k,), -1, dtype=idx_dtype, device=device)
        self.seft_removed[adapter] = torch.full((removed,), -1, dtype=idx_dtype, device=device)
        self.seft_age[adapter] = torch.full((k,), -1, dtype=torch.int32, device=device)
        self._seft_placeholders[adapter] = {name: getattr(self, name)[adapter] for name in ("seft_values", *INT_STATE)}
        self._seft_good.pop(adapter, None)

    # --- known-good state (see the module docstring: loading by any loader) ----------------

    def _state_mark(self, adapter: str) -> tuple:
        """What must be unchanged for the state to stay known good: the integer tensor objects.

        Identity, not in-place versions: loaders that bypass `load_state_dict` put new tensors in (transformers'
        `setattr`), while in-place writes come from code that keeps the state valid (our updates; DDP's buffer
        broadcast, which rewrites every buffer at every forward with rank 0's identical copy, and would
        otherwise cost a validation per step). `values` is left out: FSDP2 swaps that Parameter at every
        forward, and any finite float vector of the right length is a valid delta; a loader that skipped it
        leaves the placeholder, caught below."""
        return tuple(getattr(self, name)[adapter] for name in INT_STATE)

    def state_mark_good(self, adapter: str) -> None:
        """Record the current state as valid (after creation, a topology update or a validated load)."""
        self._seft_good[adapter] = self._state_mark(adapter)
        self._seft_placeholders.pop(adapter, None)

    def _state_known_good(self, adapter: str) -> bool:
        mark = self._seft_good.get(adapter)
        return mark is not None and all(a is b for a, b in zip(mark, self._state_mark(adapter)))

    def pending_placeholders(self, adapter: str) -> list[str]:
        """State tensors of `adapter` still holding the placeholders built for a load."""
        held = self._seft_placeholders.get(adapter, {})
        return [name for name, t in held.items() if getattr(self, name)[adapter] is t]

    def check_state(self, adapter: str) -> None:
        """SeftError unless the state of `adapter` was loaded and is valid on this layer's base weight."""
        if self._state_known_good(adapter):
            return
        pending = self.pending_placeholders(adapter)
        if pending:
            raise SeftError(
                f"SEFT adapter {adapter!r} was not loaded into {self._seft_key or 'a layer'}: "
                f"{', '.join(pending)} still hold(s) the placeholder (the loader skipped or refused them, e.g. a "
                "size mismatch under ignore_mismatched_sizes, or an adapter saved before removed_sizes was "
                "recorded); load it with peft.PeftModel.from_pretrained, or for a new adapter from this config "
                "set removed_sizes=None and inference_mode=False")
        from .validate import check_layer_state

        meta = self.seft_meta[adapter]
        indices, removed, age = (getattr(self, name)[adapter] for name in INT_STATE)
        check_layer_state(self._seft_key or "?", self.topology_weight(), meta.n, meta.k, meta.nm,
                          S.full(self.seft_values[adapter]).detach(), indices, removed, age)
        self.state_mark_good(adapter)

    def topology_weight(self) -> torch.Tensor:
        """The dense base weight topology decisions read (detached; for a 4-bit base see quant.py).

        Under FSDP2 outside forward/backward the weight is a sharded DTensor and this is an all-gather
        (shards.py): every rank must call it, in the same order."""
        base = self.get_base_layer()
        return quantized_topology_weight(base) if is_4bit(base) else S.full(base.weight)

    def removed_base_values(self, removed: torch.Tensor) -> torch.Tensor:
        """4-bit base: the dequantized weights at `removed`, cached until `removed` changes."""
        cached = self._seft_removed_base
        if cached is None or cached[0] is not removed or cached[1] != removed._version:
            from .quant import dequantize

            with torch.no_grad():
                values = dequantize(self.get_base_layer()).reshape(-1)[removed.long()].float()
            self._seft_removed_base = cached = (removed, removed._version, values)
        return cached[2]

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move devices only: values stay fp32 and integer state stays integer."""
        target = device if device is not None else self.get_base_layer().weight.device
        good = adapter_name in self.seft_indices and self._state_known_good(adapter_name)
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name)
            if adapter_name in container and container[adapter_name].device != target:
                container[adapter_name] = container[adapter_name].to(target)
        if good:  # the same state on another device
            self.state_mark_good(adapter_name)

    def seft_state(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values, indices, removed), validated unless known good (see `check_state`), repairing integer
        buffers a foreign cast made float."""
        for name in INT_STATE:
            t = getattr(self, name)[adapter]
            if t.is_floating_point():
                want = torch.int32 if name == "seft_age" else index_dtype(self.in_features * self.out_features)
                logger.warning("%s was cast to %s; restoring integer dtype", name, t.dtype)
                getattr(self, name)[adapter] = t.round().to(want)
        self.check_state(adapter)
        return self.seft_values[adapter], self.seft_indices[adapter], self.seft_removed[adapter]

    def _topology_key(self, adapter: str, *extra) -> tuple:
        indices, removed = self.seft_indices[adapter], self.seft_removed[adapter]
        return (indices, indices._version, removed, removed._version, *extra)

    def _cached(self, cache: dict, adapter: str, key: tuple):
        """`cache[adapter]`'s value if it was built for `key` (tensors by identity, the rest by equality)."""
        held = cache.get(adapter)
        if held is not None and len(held[0]) == len(key) and all(
                a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(held[0], key)):
            return held[1]
        return None

    def slot_views(self, adapter: str, device: torch.device, with_delta: bool) -> tuple | None:
        """CSR views of the slots (and, for a 4-bit base, of the whole delta) if the sparse kernel is on.

        Rebuilt only when `indices` or `removed` changed (topology update,
        load, device move): the cache holds the tensors themselves and their
        in-place versions.
        """
        meta = self.seft_meta[adapter]
        if not SO.use_sparse_kernel(meta.kernel, meta.k, self.in_features * self.out_features, device):
            return None
        key = self._topology_key(adapter, with_delta)
        views = self._cached(self._seft_csr, adapter, key)
        if views is None:
            indices, removed = self.seft_indices[adapter], self.seft_removed[adapter]
            shape = (self.out_features, self.in_features)
            with torch.no_grad():
                slots = SO.slot_csr(indices, shape)
                views = (slots, SO.delta_csr(indices, removed, shape)) if with_delta else slots
            self._seft_csr[adapter] = (key, views)
        return views

    def patch_plan(self, adapter: str, slots: SO.SlotCSR | None) -> PatchPlan:
        """The in-place patch's sorted positions (function.py), rebuilt when the topology changes; it shares
        the sorting permutation of `slots` (this topology's CSR view) when given."""
        key = self._topology_key(adapter)
        plan = self._cached(self._seft_plan, adapter, key)
        if plan is None:
            plan = PatchPlan(self.seft_indices[adapter], self.seft_removed[adapter],
                             None if slots is None else slots.perm)
            self._seft_plan[adapter] = (key, plan)
        return plan

    @torch.no_grad()
    def observe_input(self, x: torch.Tensor) -> None:
        """Add a training batch's per-channel sum of x**2 (for `slot_lr: channel`)."""
        x2 = x.detach().reshape(-1, x.shape[-1])
        sq = x2.float().pow(2).sum(0)
        if self._seft_x_sq is None:
            self._seft_x_sq = (sq, x2.shape[0])
        else:
            self._seft_x_sq = (self._seft_x_sq[0] + sq, self._seft_x_sq[1] + x2.shape[0])

    def channel_lr_scale(self, power: float = -1.0) -> torch.Tensor:
        """`slot_lr: channel` factors per input channel from the inputs seen so far in training (1 before any)."""
        if self._seft_x_sq is None:
            return torch.ones(self.in_features)
        return T.channel_lr_scale(*self._seft_x_sq, power=power)

    # --- statistics window -------------------------------------------------------

    def open_window(self, adapter: str, want_sensitivity: bool, normalized: bool = False,
                    reselect: bool = False) -> None:
        self.seft_window[adapter] = WindowAccumulator(self, adapter, want_sensitivity, normalized, reselect)

    def close_window(self, adapter: str) -> WindowAccumulator | None:
        return self.seft_window.pop(adapter, None)


class Linear(nn.Module, SeftLayer):
    """A frozen `nn.Linear` plus a SEFT sparse delta."""

    def __init__(self, base_layer: nn.Linear, adapter_name: str, config, layer_key: str = "", **kwargs) -> None:
        super().__init__()
        SeftLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, layer_key)

    def _adapter_in_use(self) -> str | None:
        active = [a for a in self.active_adapters if a in self.seft_values]
        if len(active) > 1:
            raise SeftError(f"SEFT layers run one adapter at a time; active: {', '.join(active)}")
        return active[0] if active else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = None if (self.disable_adapters or self.merged) else self._adapter_in_use()
        if self.disable_adapters and self.merged:
            self.unmerge()
        base = self.get_base_layer()
        if adapter is None:
            return base(x, *args, **kwargs)
        values, indices, removed = self.seft_state(adapter)
        window = self.seft_window.get(adapter)
        sink = window if (window is not None and torch.is_grad_enabled()) else None
        if is_4bit(base):  # bnb's matmul (its own grad_x) + the delta's contribution
            shape = torch.Size((self.out_features, self.in_features))
            views = self.slot_views(adapter, x.device, with_delta=True)
            delta = sparse_delta(x, values, indices, removed, self.removed_base_values(removed), shape, sink, views)
            return base(x, *args, **kwargs) + delta.to(x.dtype)
        meta = self.seft_meta[adapter]
        if meta.slot_lr == "channel" and self.training and torch.is_grad_enabled():
            self.observe_input(x)
        sparse = SO.use_sparse_kernel(meta.kernel, meta.k, self.in_features * self.out_features, x.device)
        views = self.slot_views(adapter, x.device, with_delta=False) if sparse and torch.is_grad_enabled() else None
        plan = self.patch_plan(adapter, views) if sparse else None
        return seft_linear(x, base.weight, base.bias, values, indices, removed, sink, views, plan)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W <- W_eff (removed zeroed, delta added); keeps a backup of removed weights for unmerge."""
        base = self.get_base_layer()
        if is_4bit(base):
            raise SeftError("a 4-bit base cannot take the merge; merge onto the unquantized checkpoint: "
                            "PeftModel.from_pretrained(seft.load_model(path)[0], adapter).merge_and_unload()")
        for adapter in adapter_names or self.active_adapters:
            if adapter not in self.seft_values or adapter in self.merged_adapters:
                continue
            values, indices, removed = self.seft_state(adapter)
            weight = S.full(base.weight)  # FSDP2: gathered whole, one layer at a time
            merged = effective_weight(weight, S.full(values), indices, removed)
            if not torch.isfinite(merged).all():  # always, not only with safe_merge: NaN weights must not pass
                raise SeftError(f"NaNs/Infs in the merged SEFT weight of adapter {adapter!r} "
                                f"({self.out_features}x{self.in_features}); not merged")
            self._seft_merge_backup[adapter] = (removed.clone(), weight.reshape(-1)[removed.long()].clone())
            S.write_full(base.weight, merged)  # FSDP2: each rank keeps its own rows
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        base = self.get_base_layer()
        sharded = S.is_sharded(base.weight)  # FSDP2 outside forward: edit a gathered copy, keep own rows
        weight = S.full(base.weight).clone() if sharded else base.weight.data
        flat = weight.view(-1)
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            values, indices, _ = self.seft_state(adapter)
            flat.index_add_(0, indices.long(), -S.full(values).to(flat.dtype))
            removed, originals = self._seft_merge_backup.pop(adapter)
            flat[removed.long()] = originals
        if sharded:
            S.write_full(base.weight, weight)

    def __repr__(self) -> str:
        return "seft." + super().__repr__()


def _fit_int_state_before_load(module: SeftLayer, state_dict: dict, prefix: str, *args) -> None:
    """Before load_state_dict copies: validate the incoming state of each adapter (validate.py: a bad
    one is refused with the layer and the problem), then resize `removed` (its length follows the
    topology) and cast the integers to the buffer's dtype (safe once the range is checked)."""
    from .validate import check_layer_state

    layer = prefix.rstrip(".").removeprefix("base_model.model.")
    module._seft_loading.clear()
    for adapter, meta in module.seft_meta.items():
        incoming = {name: state_dict.get(f"{prefix}{name}.{adapter}") for name in ("seft_values", *INT_STATE)}
        if all(t is None for t in incoming.values()):
            continue
        missing = [name for name in module.pending_placeholders(adapter) if incoming[name] is None]
        if missing:
            raise SeftError(f"SEFT adapter {adapter!r} cannot load into {layer}: the adapter file has no "
                            f"{', '.join(missing)} for it; the adapter file is incomplete")
        current = {"seft_values": module.seft_values[adapter].detach(),
                   **{name: getattr(module, name)[adapter] for name in INT_STATE}}
        state = {name: incoming[name] if incoming[name] is not None else current[name] for name in current}
        check_layer_state(layer, module.topology_weight(), meta.n, meta.k, meta.nm, state["seft_values"],
                          state["seft_indices"], state["seft_removed"], state["seft_age"])
        module._seft_loading.add(adapter)
    for name in INT_STATE:
        container = getattr(module, name)
        for adapter in list(container.keys()):
            key = f"{prefix}{name}.{adapter}"
            if key not in state_dict:
                continue
            current = container[adapter]
            incoming = state_dict[key]
            state_dict[key] = incoming.to(current.dtype)
            if incoming.shape != current.shape:
                container[adapter] = torch.full(incoming.shape, -1, dtype=current.dtype, device=current.device)


def _mark_loaded_state_good(module: SeftLayer, incompatible_keys) -> None:
    """After load_state_dict copied the state the pre-hook validated: record it as known good."""
    for adapter in module._seft_loading:
        module.state_mark_good(adapter)
    module._seft_loading.clear()


def describes_saved_state(config) -> bool:
    """True if a config is for loading saved state (see the module docstring), not for a new adapter."""
    return getattr(config, "removed_sizes", None) is not None or bool(getattr(config, "inference_mode", False))
