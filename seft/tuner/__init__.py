"""The SEFT adapter (DESIGN.md §1), laid out like a peft tuner.

Importing this package registers the PEFT type "SEFT" with upstream peft, so
`peft.get_peft_model(model, SeftConfig(...))`, `save_pretrained`,
`PeftModel.from_pretrained`, `merge_and_unload` and `disable_adapter` work as
for built-in methods. It is imported for the user right after peft's own
import (seft/_peft_hook.py: by the installed .pth in any interpreter, or once
`import seft` ran).
"""
from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .callback import SeftCallback
from .config import SEFT_PEFT_TYPE, SeftConfig
from .layer import Linear, SeftLayer
from .model import SeftModel

__all__ = ["SEFT_PEFT_TYPE", "Linear", "SeftCallback", "SeftConfig", "SeftLayer", "SeftModel"]

if SEFT_PEFT_TYPE not in PEFT_TYPE_TO_TUNER_MAPPING:
    register_peft_method(name="seft", config_cls=SeftConfig, model_cls=SeftModel, prefix="seft_")
