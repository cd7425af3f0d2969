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

FSDP: FSDP2 (`fsdp_config {"version": 2}`, accelerate `fsdp_version: 2`) is
supported; FSDP1, CPU offload and 4-bit bases under FSDP are refused at
`on_init_end` (before accelerate shards the model) and again at
`on_train_begin` (see seft/distributed.py).

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

from .. import distributed as D
from ..errors import SeftError

logger = logging.getLogger(__name__)


def find_seft_model(model):
    """The object exposing the `seft_*` API (a PeftModel forwards to its SeftModel)."""
    for candidate in (model, getattr(model, "module", None), getattr(model, "base_model", None)):
        if candidate is not None and callable(getattr(candidate, "seft_update", None)):
            return candidate
    raise SeftError("SeftCallback needs a model wrapped by peft.get_peft_model(model, seft.SeftConfig(...))")


def _truthy(value) -> bool:
    return str(value).lower() in ("1", "true", "yes")


def check_fsdp_setup(args=None, model=None) -> bool:
    """SeftError for an FSDP setup SEFT cannot train under (seft/distributed.py says why).

    FSDP2 is supported. Read from the Trainer args and accelerate's launcher
    environment (so a bad setup stops before accelerate shards anything) and
    from the model itself once it is prepared. True if FSDP was asked for.
    """
    fsdp_args = bool(args is not None and getattr(args, "fsdp", None))  # TrainingArguments.fsdp: falsy unless FSDP
    if fsdp_args:
        config = getattr(args, "fsdp_config", None) or {}
        version = int(config.get("version", config.get("fsdp_version", 2)))  # transformers' default is 2
        offload = _truthy(config.get("cpu_offload", False)) or "offload" in str(args.fsdp)
    elif _truthy(os.environ.get("ACCELERATE_USE_FSDP", "false")):  # accelerate launch --use_fsdp
        version = int(os.environ.get("FSDP_VERSION", "1"))  # accelerate's default is FSDP1
        offload = _truthy(os.environ.get("FSDP_OFFLOAD_PARAMS", "false"))
    else:
        version, offload = None, False
    if version is not None:
        if version != 2:
            raise SeftError(D.FSDP1_ERROR)
        if offload:
            raise SeftError(D.OFFLOAD_ERROR)
        if model is not None and D.has_4bit_base(model):
            raise SeftError(D.QUANT_ERROR)
    if model is not None:
        D.check_fsdp(model)
    return version is not None


class SeftCallback(TrainerCallback):
    """Calls the SEFT model API at the right Trainer events; keeps no training logic."""

    def __init__(self) -> None:
        self.pending: dict[str, float] | None = None
        self.last_stats: dict[str, float] | None = None
        self.history: list[dict[str, float]] = []

    def on_init_end(self, args, state, control, model=None, **kwargs):
        check_fsdp_setup(args, model)  # before accelerate prepares (shards) the model

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if check_fsdp_setup(args, model) and not D.check_fsdp(model):  # the prepared model: FSDP1, offload
            logger.warning("FSDP was asked for but the model is not sharded; accelerate enables FSDP on "
                           "accelerators only and runs a CPU job as DDP, under which SEFT trains as usual")
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
