"""Invariants a training run must keep, checked where breaking them would otherwise go unseen.

  - Finite numbers. At a learning rate that diverges every SEFT value
    becomes NaN, the Trainer's default `logging_nan_inf_filter` hides the NaN
    loss, and the merged checkpoint is written full of NaN weights.
    `FiniteGuard` stops training when the logged loss or a trainable
    parameter is not finite; `check_finite` refuses to save or merge such
    numbers.
  - Sparsity. The merged model must be exactly as sparse as the pruned
    base, in every target layer and in its N:M pattern; `sparsity_change`
    says where it is not, and `seft finetune` then fails.

Trainable parameters are checked on logging, saving and topology-update steps
(and at the last step): for adapters that is k numbers per layer, for
`full-masked` the whole target weights, so not every step.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from .errors import SeftError


def nonfinite_parameters(model: nn.Module, trainable_only: bool = True) -> list[str]:
    """Names of the (trainable) parameters holding NaN or inf."""
    return [name for name, p in model.named_parameters()
            if (p.requires_grad or not trainable_only) and p.is_floating_point() and not bool(torch.isfinite(p).all())]


def check_finite(model: nn.Module, what: str, trainable_only: bool = True, after: str = "") -> None:
    """SeftError naming the first non-finite parameters of `model` (`what` says what is being done,
    `after` is appended)."""
    bad = nonfinite_parameters(model, trainable_only)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise SeftError(f"{what}: NaN/inf values in {', '.join(bad[:3])}{more} (training diverged; "
                        f"lower the learning rate){after}")


def finite_guard(after: Callable[[], str] = str):
    """A TrainerCallback that stops training with a SeftError once the loss or the trainable values go non-finite.

    `after()` is appended to the message (e.g. where the earlier checkpoints are kept)."""
    from transformers import TrainerCallback

    class FiniteGuard(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None and (control.should_log or control.should_save or state.global_step >= state.max_steps):
                check_finite(model, f"training stopped at step {state.global_step}", after=after())

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if isinstance(loss, (int, float)) and not math.isfinite(loss):
                raise SeftError(f"training stopped at step {state.global_step}: the training loss is {loss} "
                                f"(learning rate {logs.get('learning_rate', '?')}; lower it){after()}")

    return FiniteGuard()


def sparsity_change(before: dict[str, float], after: dict[str, float], pattern_before: str, pattern_after: str
                    ) -> str | None:
    """None if the merged model keeps every layer's sparsity and the pattern, else what changed."""
    changed = [f"{name} {before[name]:.6f} -> {after.get(name, float('nan')):.6f}"
               for name in before if after.get(name) != before[name]]
    changed += [f"{name} (not in the base)" for name in after if name not in before]
    parts = []
    if changed:
        more = f" and {len(changed) - 3} more layers" if len(changed) > 3 else ""
        parts.append(f"sparsity changed in {', '.join(changed[:3])}{more}")
    if pattern_after != pattern_before:
        parts.append(f"pattern {pattern_before} -> {pattern_after}")
    return "; ".join(parts) or None
