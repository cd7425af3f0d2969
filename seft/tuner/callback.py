"""SeftCallback: drives SEFT inside a stock `transformers.Trainer`.

It only tells the model *when*: open a statistics window before a step's
first micro-batch, fold statistics and snapshot before `optimizer.step()`,
apply the regrow warm-up after it, and run the topology update at step end.
All logic lives on the model (`SeftModel.seft_*`, see seft/tuner/model.py),
so custom loops call the same methods.

Gradient accumulation: Trainer fires `on_step_begin` once per optimizer
step (at the first micro-batch) and the window sees every micro-batch.
fp16 steps skipped by the scaler leave the optimizer's step counter
unchanged, which the model detects (no warm-up ageing for that step).

Logging: after an update the callback asks the Trainer to log at that step
and merges the topology stats (`seft/replaced`, `seft/revived`,
`seft/repruned`, `seft/sparsity`, ...) into that log entry and into
`state.log_history`. Reporters that run before this callback in the
handler's list do not see them; insert the callback first
(`trainer.callback_handler.callbacks.insert(0, cb)`) if that matters.
"""
from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

from ..errors import SeftError

logger = logging.getLogger(__name__)


def find_seft_model(model):
    """The object exposing the `seft_*` API (a PeftModel forwards to its SeftModel)."""
    for candidate in (model, getattr(model, "module", None), getattr(model, "base_model", None)):
        if candidate is not None and callable(getattr(candidate, "seft_update", None)):
            return candidate
    raise SeftError("SeftCallback needs a model wrapped by peft.get_peft_model(model, seft.SeftConfig(...))")


FSDP_ERROR = ("SEFT does not support FSDP: its slots are flat indices into whole weight matrices, which FSDP "
              "shards; train with DDP instead (torchrun / accelerate launch without --fsdp / fsdp_config)")


def fsdp_in_use(args=None, model=None) -> bool:
    """True if the Trainer args, accelerate's launcher or the model itself use FSDP (1 or 2)."""
    if args is not None and getattr(args, "fsdp", None):  # TrainingArguments.fsdp: [] unless FSDP is on
        return True
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        return True
    if model is not None:
        names = {"FullyShardedDataParallel", "FSDPModule"}
        return any(any(c.__name__ in names for c in type(m).__mro__) for m in model.modules())
    return False


class SeftCallback(TrainerCallback):
    """Calls the SEFT model API at the right Trainer events; keeps no training logic."""

    def __init__(self) -> None:
        self.pending: dict[str, float] | None = None
        self.last_stats: dict[str, float] | None = None
        self.history: list[dict[str, float]] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if fsdp_in_use(args, model):
            raise SeftError(FSDP_ERROR)
        seft = find_seft_model(model)
        if optimizer is not None:
            seft.seft_check_optimizer(optimizer)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        find_seft_model(model).seft_begin_window(state.global_step + 1, state.max_steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        find_seft_model(model).seft_pre_optimizer_step(optimizer)

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        find_seft_model(model).seft_post_optimizer_step(optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        stats = find_seft_model(model).seft_update(state.global_step, state.max_steps, optimizer)
        if stats:
            self.pending = self.last_stats = stats
            self.history.append({"step": state.global_step, **stats})
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.pending and logs is not None:
            logs.update(self.pending)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self.pending)
            self.pending = None
