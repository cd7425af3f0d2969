"""seft — prune LLaMA/Mistral-family LMs and repair them with SEFT.

Light at import: `import seft` loads no torch, transformers or peft (the CLI's
`--help` and the .pth start-up hook depend on it; tests/test_import_hook.py
checks it). The names below load their module on first use. The SEFT adapter
type reaches peft through `seft._peft_hook`: registered at once if peft is
already imported, else the moment peft is (installed seft does this in every
interpreter, via seft_peft_hook.pth, without `import seft`).
"""
from __future__ import annotations

import importlib

from . import _peft_hook  # noqa: F401  (installs the peft import hook; imports nothing heavy)

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


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'seft' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
