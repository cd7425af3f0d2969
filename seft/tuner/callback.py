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
`state.log_history`. Trainer puts its reporting callbacks (TensorBoard,
W&B, ...) before the user's `callbacks=[...]`, and each reporter writes the
log entry as it sees it; so at `on_init_end` (or `on_train_begin`, for a
callback added later) this callback moves itself to the front of the
Trainer's callback list, and every reporter then sees the `seft/*` stats.

Resume: `on_save` writes the open statistics window into the checkpoint
(window_state.py) and `on_train_begin` of a resumed run restores it, so a
run resumed from any checkpoint ends with the topology of an uninterrupted
run.

Launch: `on_train_begin` warns when the launcher asked for several
processes but training got world size 1 (seft/launch_check.py).
"""
from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from .. import distributed as D
from ..errors import SeftError
from ..launch_check import warn_if_single_process
from . import topology as T
from .window_state import WINDOW_FILE, load_window, save_window

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
        self._move_to_front()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._move_to_front()
        if check_fsdp_setup(args, model) and not D.check_fsdp(model):  # the prepared model: FSDP1, offload
            logger.warning("FSDP was asked for but the model is not sharded; accelerate enables FSDP on "
                           "accelerators only and runs a CPU job as DDP, under which SEFT trains as usual")
        warn_if_single_process(args.world_size)
        seft = find_seft_model(model)
        if optimizer is not None:
            seft.seft_check_optimizer(optimizer)
        if state.global_step > 0:  # a resumed run: bring back the statistics window the checkpoint holds
            self._restore_window(args, state, seft)

    def _move_to_front(self) -> None:
        """Put this callback first in the calling Trainer's CallbackHandler, so reporters see `seft/*`.

        A callback is not given the handler, so it is found on the stack: the
        handler's `call_event` is what called this event method. Moving the
        current element to the front while `call_event` iterates the list is
        safe: the callbacks before it were already called, the rest follow.
        """
        frame = inspect.currentframe()
        try:
            for _ in range(6):
                frame = frame.f_back if frame is not None else None
                if frame is None:
                    return
                handler = frame.f_locals.get("self")
                if isinstance(handler, CallbackHandler) and self in handler.callbacks:
                    if handler.callbacks[0] is not self:
                        handler.callbacks.remove(self)
                        handler.callbacks.insert(0, self)
                    return
        finally:
            del frame

    def _restore_window(self, args, state, seft) -> None:
        step = state.global_step
        candidates = [getattr(args, "resume_from_checkpoint", None),
                      os.path.join(args.output_dir, f"checkpoint-{step}")]
        for folder in candidates:
            if folder and isinstance(folder, str) and load_window(seft, folder, step):
                return
        cfg = seft.seft_config()
        window_open = (T.in_stat_window(step, state.max_steps, cfg.update_interval, cfg.evolve_until, cfg.stat_window)
                       and not T.is_update_step(step, state.max_steps, cfg.update_interval, cfg.evolve_until)) or (
            T.in_reselect_window(step, cfg.init, cfg.stat_window) and not T.is_reselect_step(step, cfg.init,
                                                                                              cfg.stat_window))
        if window_open:
            logger.warning("SEFT: resuming at step %d, inside a statistics window, but no %s was found in %s; "
                           "the window restarts shorter and the topology will differ from an uninterrupted run (a checkpoint "
                           "outside output_dir: give its path as TrainingArguments.resume_from_checkpoint too)",
                           step, WINDOW_FILE, " or ".join(str(c) for c in candidates if c))

    def on_save(self, args, state, control, model=None, **kwargs):
        """Write the open statistics window into the checkpoint the Trainer has just saved."""
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and folder.is_dir():
            save_window(find_seft_model(model), folder, state.global_step)

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
