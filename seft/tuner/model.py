"""SeftModel: the peft tuner that injects SEFT layers and decides topology updates.

Usage (peft does the wrapping; `import seft` registered the type)::

    import seft, peft
    model = peft.get_peft_model(base, seft.SeftConfig(lora_rank=8))
    trainer = transformers.Trainer(model=model, ..., callbacks=[seft.SeftCallback()])

Training API — called by `SeftCallback`, or directly by a custom loop. All
methods are reachable on the `PeftModel` (peft forwards unknown attributes to
its `base_model`, this class). `step` is the 1-based index of an optimizer
step; `total_steps` the planned number of optimizer steps::

    for step in range(1, total_steps + 1):
        model.seft_begin_window(step, total_steps)    # before the step's first micro-batch
        for micro_batch in ...: loss.backward()        # windows see every micro-batch
        model.seft_pre_optimizer_step(optimizer)       # after clipping, before optimizer.step()
        optimizer.step()
        model.seft_post_optimizer_step(optimizer)      # regrow warm-up scaling + slot ages
        optimizer.zero_grad()
        stats = model.seft_update(step, total_steps, optimizer)  # dict on update steps, else None

  - `seft_begin_window(step, total_steps) -> bool`: opens the statistics
    window if `step` lies in the last `stat_window` steps before an update
    and none is open (so a run resumed mid-window still gets a shorter one).
  - `seft_pre_optimizer_step(optimizer=None)`: folds the step's window
    gradients into per-step sums; snapshots values of slots still warming up.
  - `seft_post_optimizer_step(optimizer=None)`: scales the applied update of
    warming-up slots by `(age + 1) / (regrow_warmup + 1)` and ages slots —
    unless the optimizer's step counter did not move (fp16 scaler skipped
    the step), in which case nothing happens.
  - `seft_update(step, total_steps, optimizer) -> dict | None`: on update
    steps, drop/grow/rebalance every layer, zero regrown values, re-seed
    their Adam moments; returns `{"seft/replaced", "seft/revived",
    "seft/repruned", "seft/restored", "seft/replace_fraction",
    "seft/sparsity", "seft/layers_skipped"}`.
  - `seft_sparsity_report() -> dict`: per layer `n`, `active`, `k`,
    `removed`, `revived_slots`, `sparsity`, and the totals.
  - `seft_check_optimizer(optimizer)`: SeftError for unsupported optimizers.

FSDP2 (`fully_shard`, seft/distributed.py): the same calls on every rank.
`seft_update`, `seft_sparsity_report` and `save_pretrained` gather each
layer's sharded weight / `values` (collectives), and every edit of `values`
or its moments goes to the rank holding that slot (shards.py).

Resume: the whole topology lives in the adapter state dict (values,
indices, removed, slot ages); `n` and the N:M pattern derive from the frozen
base; the schedule is a function of the step. Trainer's checkpoint holds
the adapter (save_pretrained) and the optimizer state (keyed by the same
`values` Parameter, whose size k never changes), and SeftCallback adds an
in-flight statistics window (window_state.py), so `resume_from_checkpoint`
restores everything (a custom loop saves the window with
`window_state.save_window`; without it the window restarts shorter). A dense (unpruned) base leaves revival nothing to revive:
it is disabled for those layers with a warning, not an error.
"""
from __future__ import annotations

import logging
import os
import warnings

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..errors import SeftError
from ..models import ALIASES, SUPPORTED_MODEL_TYPES, TARGET_MODULES, unwrap
from . import shards as S
from . import topology as T
from .config import SeftConfig
from .layer import Linear, SeftLayer
from .optim import check_optimizer, dequantized_moments, optimizer_step_count, reseed_moments
from .quant import is_4bit

logger = logging.getLogger(__name__)


def removed_sizes(state_dict: dict, adapter_name: str) -> dict[str, int]:
    """{layer name as injected (e.g. model.layers.0.self_attn.q_proj): len(seft_removed)} of a state dict."""
    suffix = f".seft_removed.{adapter_name}"
    out = {}
    for key, value in state_dict.items():
        if key.endswith(suffix):
            layer = key[: -len(suffix)].removeprefix("base_model.model.")
            out[layer] = int(value.numel())
    return dict(sorted(out.items()))


def absolute_base_path(name: str | None) -> str | None:
    """A base given as a relative local folder, made absolute, so the adapter finds it from any directory.

    A name that is no existing folder (a hub id, an alias) stays as it is; so does a folder that lives
    in the transformers/hub cache (absolute already), and seft's aliases (seft resolves those first)."""
    if not name or name in ALIASES or os.path.isabs(name) or not os.path.isdir(name):
        return name
    return os.path.abspath(name)


@torch.no_grad()
def _fold_dropped(layer, weight: torch.Tensor, indices: torch.Tensor, removed: torch.Tensor, values: torch.Tensor,
                  slots: torch.Tensor) -> None:
    """`drop_values: fold` (study option): add the dropped slots' values to the base weight in place.

    Only at base-active positions (a dropped revival leaves the active set, as the rebalance assumed), and
    never where the sum would be exactly 0 (that would change the active count). The base weight is edited,
    so only the merged model carries the folded deltas: saving the adapter is refused afterwards.
    """
    if slots.numel() == 0:
        return
    base = layer.get_base_layer().weight
    if S.is_sharded(base) or is_4bit(layer.get_base_layer()):
        raise SeftError("drop_values: fold is a study option for plain (unsharded, unquantized) bases")
    pos = indices.long()[slots]
    active = T.base_active_mask(weight, removed)[pos]
    new = weight[pos] + values[slots].to(weight.dtype)
    ok = active & (new != 0)
    base.data.view(-1)[pos[ok]] = new[ok]
    layer._seft_folded += int(ok.sum())


class SeftModel(BaseTuner):
    """peft tuner for SEFT (see the module docstring for the training API)."""

    prefix: str = "seft_"
    tuner_layer_cls = SeftLayer
    target_module_mapping = {model_type: list(TARGET_MODULES) for model_type in SUPPORTED_MODEL_TYPES}

    # --- injection ------------------------------------------------------------

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        config.base_model_name_or_path = absolute_base_path(config.base_model_name_or_path)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except ValueError as exc:
            msg = str(exc)
            if "not found in the base model" in msg or "specify `target_modules`" in msg:
                linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
                wanted = config.target_modules
                if wanted is None:  # peft has no default for this model type
                    model_type = getattr(getattr(model, "config", None), "model_type", None)
                    raise SeftError(
                        f"SEFT has no default target_modules for model type {model_type!r} (defaults for: "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}); pass target_modules, e.g. from its linears: "
                        f"{', '.join(linears)}") from None
                raise SeftError(
                    f"SEFT target_modules {sorted(wanted) if isinstance(wanted, set) else wanted!r} match no "
                    f"linear layer; valid: {', '.join(linears)}"
                ) from None
            raise

    def _create_and_replace(self, config: SeftConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **kwargs) -> None:
        if isinstance(target, Linear):
            target.update_layer(adapter_name, config, current_key)
            return
        if not isinstance(target, nn.Linear):
            raise SeftError(f"SEFT adapts nn.Linear only; {current_key} is {type(target).__name__}")
        new_module = Linear(target, adapter_name, config, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _post_injection_hook(self, model: nn.Module, config: SeftConfig, adapter_name: str) -> None:
        dense = [name for name, layer in self.seft_layers(adapter_name).items()
                 if layer.seft_meta[adapter_name].n == layer.in_features * layer.out_features]
        if dense and config.revive_fraction > 0:
            msg = (f"{len(dense)} SEFT layer(s) have a dense (unpruned) base weight, so revival has nothing to "
                   f"revive there and is off for them (e.g. {dense[0]})")
            logger.warning(msg)
            warnings.warn(msg, stacklevel=2)
        nm = {str(layer.seft_meta[adapter_name].nm) for layer in self.seft_layers(adapter_name).values()
              if layer.seft_meta[adapter_name].nm}
        if nm:
            logger.info("SEFT: N:M pattern(s) %s detected; growth stays inside active positions", ", ".join(nm))

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """peft's selection of the adapter entries, with FSDP2-sharded `values` gathered whole.

        So `save_pretrained` writes the same file as a 1-process run; under FSDP2 every rank must call it
        (the gathers are collectives) and only one write (`is_main_process`; seft.distributed.save_pretrained).
        """
        if getattr(config, "drop_values", "discard") == "fold" and any(
                m._seft_folded for m in model.modules() if isinstance(m, Linear)):
            raise SeftError("this SEFT adapter folded dropped values into the base weights (drop_values: fold, a "
                            "study option), which the adapter file cannot carry; save the merged model instead "
                            "(merge_and_unload)")
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        selected = {key: S.full(value) if S.is_sharded(value) else value for key, value in selected.items()}
        # the config is saved right after this (peft's and transformers' save_pretrained): the saved file
        # records the shapes of the state being written, so loaders that size buffers before copying get them
        # right (layer.py); the live config stays as it was (SeftConfig.save_pretrained)
        config.record_saved_state(removed_sizes(selected, adapter_name))
        base = config.base_model_name_or_path or getattr(unwrap(model), "name_or_path", None) or None
        config.base_model_name_or_path = absolute_base_path(base)
        return selected

    # --- helpers ---------------------------------------------------------------

    def _adapter(self) -> str:
        active = self.active_adapters
        if len(active) != 1:
            raise SeftError(f"SEFT trains one adapter at a time; active: {', '.join(active)}")
        return active[0]

    def seft_config(self) -> SeftConfig:
        return self.peft_config[self._adapter()]

    def seft_layers(self, adapter: str | None = None) -> dict[str, Linear]:
        """{module name: SEFT layer} holding `adapter` (default: the active one)."""
        adapter = adapter or self._adapter()
        return {name: m for name, m in self.model.named_modules() if isinstance(m, Linear) and adapter in m.seft_values}

    def seft_check_optimizer(self, optimizer) -> None:
        check_optimizer(optimizer)

    # --- training API ----------------------------------------------------------

    def seft_begin_window(self, step: int, total_steps: int) -> bool:
        """Open statistics windows if optimizer step `step` is observed; True if one is open."""
        cfg, adapter = self.seft_config(), self._adapter()
        reselect = T.in_reselect_window(step, cfg.init, cfg.stat_window)
        if not reselect and not T.in_stat_window(step, total_steps, cfg.update_interval, cfg.evolve_until,
                                                 cfg.stat_window):
            return False
        for layer in self.seft_layers(adapter).values():
            if adapter not in layer.seft_window:
                meta = layer.seft_meta[adapter]
                dense = meta.n == layer.in_features * layer.out_features
                want_sens = cfg.sensitivity == "taylor" and cfg.revive_fraction > 0 and not meta.nm and not dense
                layer.open_window(adapter, want_sens, normalized=cfg.growth == "normalized", reselect=reselect)
        return True

    @torch.no_grad()
    def seft_pre_optimizer_step(self, optimizer=None) -> None:
        """Fold window gradients of this step; snapshot warming-up slots (before optimizer.step())."""
        cfg, adapter = self.seft_config(), self._adapter()
        for layer in self.seft_layers(adapter).values():
            window = layer.seft_window.get(adapter)
            if window is not None:
                window.end_step()
            values = layer.seft_values[adapter]
            if cfg.slot_lr != "plain":  # every slot's applied update is rescaled: slices, no gathers
                warming = S.local_range(values)  # FSDP2: the slots this rank's shard holds
                pos = slice(0, warming.stop - warming.start)
            else:
                warming = (layer.seft_age[adapter] < cfg.regrow_warmup).nonzero().flatten()
                mine, pos = S.local_positions(values, warming)  # FSDP2: the warming slots this rank holds
                warming = warming[mine]
            layer._seft_snapshot = (
                warming, pos, S.local(values)[pos].clone(),
                optimizer_step_count(optimizer, values) if optimizer is not None else None,
            )

    @torch.no_grad()
    def seft_post_optimizer_step(self, optimizer=None) -> None:
        """Scale warming-up slots' applied update (and with `slot_lr: channel | density` every slot's, by its
        input channel's or its layer's factor) and age slots (after optimizer.step())."""
        cfg, adapter = self.seft_config(), self._adapter()
        layers = self.seft_layers(adapter)
        if cfg.slot_lr == "density":
            metas = [layer.seft_meta[adapter] for layer in layers.values()]
            layer_lr = dict(zip(layers, T.density_lr_scale([m.k for m in metas],
                                                           [layer.out_features for layer in layers.values()])))
        for name, layer in layers.items():
            snapshot = getattr(layer, "_seft_snapshot", None)
            if snapshot is None:
                continue
            layer._seft_snapshot = None
            warming, pos, before, step_before = snapshot
            values = layer.seft_values[adapter]
            if step_before is not None and optimizer_step_count(optimizer, values) == step_before:
                continue  # step skipped (fp16 scaler overflow): the optimizer's counter did not move
            age = layer.seft_age[adapter]
            if isinstance(warming, slice) or warming.numel():
                scale = T.warmup_scale(age[warming], cfg.regrow_warmup).to(values.dtype)
                if cfg.slot_lr == "channel":
                    columns = layer.seft_indices[adapter][warming].long() % layer.in_features
                    scale = scale * layer.channel_lr_scale(cfg.slot_lr_power)[columns].to(values.dtype)
                elif cfg.slot_lr == "density":
                    scale = scale * layer_lr[name]
                shard = S.local(values)
                shard[pos] = before + (shard[pos] - before) * scale
            age.clamp_(max=cfg.age_cap() - 1).add_(1)

    @torch.no_grad()
    def seft_update(self, step: int, total_steps: int, optimizer=None) -> dict[str, float] | None:
        """Topology update after optimizer step `step` if it is an update step; stats dict or None."""
        cfg, adapter = self.seft_config(), self._adapter()
        reselect = T.is_reselect_step(step, cfg.init, cfg.stat_window)
        if not reselect and not T.is_update_step(step, total_steps, cfg.update_interval, cfg.evolve_until):
            return None
        if optimizer is not None:
            check_optimizer(optimizer)
        p = 1.0 if reselect else T.replace_fraction(step, total_steps, cfg.initial_replace_fraction,
                                                    cfg.evolve_until, cfg.schedule)
        totals = dict(replaced=0, revived=0, repruned=0, restored=0, skipped=0, shortfall=0, dropped_young=0)
        for name, layer in self.seft_layers(adapter).items():
            window = layer.close_window(adapter)
            stats = window.stats() if window is not None else None
            if stats is None:
                totals["skipped"] += 1
                continue
            meta = layer.seft_meta[adapter]
            values, indices, removed = layer.seft_state(adapter)
            weight = layer.topology_weight().reshape(-1)
            age = layer.seft_age[adapter]
            protect = age <= cfg.protect_updates * cfg.update_interval if cfg.protect_updates > 0 else None
            drop_score = None
            if cfg.drop_score == "momentum" and optimizer is not None and optimizer_step_count(optimizer, values):
                drop_score = dequantized_moments(optimizer, values)[0].abs()
            res = T.evolve(weight, S.full(values), indices, removed, stats, T.replace_count(p, meta.k), meta.n,
                           cfg.revive_fraction, cfg.sensitivity, nm=bool(meta.nm), protect=protect,
                           reselect=reselect, drop_score=drop_score, balance=cfg.balance,
                           in_features=layer.in_features)
            if cfg.drop_values == "fold":
                _fold_dropped(layer, weight, indices, removed, S.full(values), res.replaced_slots)
            # churn: dropped slots grown at the previous update or later
            totals["dropped_young"] += int((age[res.replaced_slots] <= cfg.update_interval).sum().item())
            indices.copy_(res.indices)
            S.local(values)[S.local_positions(values, res.replaced_slots)[1]] = 0.0
            age[res.replaced_slots] = 0
            layer.seft_removed[adapter] = res.removed.to(removed.device)
            layer.state_mark_good(adapter)  # our own edit of a validated state
            if optimizer is not None:
                seed_m, seed_v = res.seed_g_mean, res.seed_g_sq
                if cfg.regrow_moments == "zero":
                    seed_m, seed_v = torch.zeros_like(seed_m), torch.zeros_like(seed_v)
                reseed_moments(optimizer, values, res.replaced_slots, seed_m, seed_v)
            if res.shortfall:
                logger.warning("SEFT %s: active count off budget by %d after rebalance", name, res.shortfall)
            totals["replaced"] += int(res.replaced_slots.numel())
            for key in ("revived", "repruned", "restored", "shortfall"):
                totals[key] += getattr(res, key)
        if totals["skipped"]:
            logger.warning("SEFT update at step %d: %d layer(s) had no window statistics; skipped",
                           step, totals["skipped"])
        report = self.seft_sparsity_report(adapter)
        stats_out = {f"seft/{key}": float(v) for key, v in totals.items() if key != "skipped"}
        stats_out.update({"seft/layers_skipped": float(totals["skipped"]), "seft/replace_fraction": p,
                          "seft/sparsity": report["sparsity"], "seft/reselect": float(reselect)})
        logger.info("SEFT update at step %d: %s", step, stats_out)
        return stats_out

    @torch.no_grad()
    def seft_sparsity_report(self, adapter: str | None = None) -> dict:
        """Per-layer and total active counts of the effective weights."""
        adapter = adapter or self._adapter()
        layers, tot_numel, tot_active, tot_n = {}, 0, 0, 0
        for name, layer in self.seft_layers(adapter).items():
            _, indices, removed = layer.seft_state(adapter)
            weight = layer.topology_weight().reshape(-1)
            base = T.base_active_mask(weight, removed)
            revived = int((~base[indices.long()]).sum().item())
            base[indices.long()] = True
            active = int(base.sum().item())
            meta = layer.seft_meta[adapter]
            layers[name] = dict(n=meta.n, active=active, k=meta.k, removed=int(removed.numel()),
                                revived_slots=revived, sparsity=1.0 - active / weight.numel())
            tot_numel += weight.numel()
            tot_active += active
            tot_n += meta.n
        return dict(layers=layers, n=tot_n, active=tot_active, numel=tot_numel,
                    sparsity=1.0 - tot_active / max(tot_numel, 1))
