"""seft — prune LLaMA/Mistral-family LMs and repair them with SEFT.

Light at import: heavy modules (transformers, peft, lm_eval) load on first
use of the names below. Accessing `SeftConfig` (or anything from the tuner)
registers the `SEFT` adapter type with peft.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "seft.models",
    "SeftError": "seft.errors",
    "load_documents": "seft.data",
    "calibration_windows": "seft.data",
    "perplexity": "seft.perplexity",
    "SeftConfig": "seft.tuner",
    "SeftModel": "seft.tuner",
    "SeftCallback": "seft.tuner",
    "PruneConfig": "seft.prune",
    "prune_model": "seft.prune",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'seft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def _register_with_peft() -> None:
    """peft must know the SEFT type before PeftModel.from_pretrained reads a config."""
    if importlib.util.find_spec("seft.tuner") is not None:
        importlib.import_module("seft.tuner")


import importlib.util  # noqa: E402
import logging  # noqa: E402

# bitsandbytes (imported by peft) warns on every CPU start that it cannot fetch an
# optional kernel from the hub; this project runs offline, so the line is only noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
_register_with_peft()
