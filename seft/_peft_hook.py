"""Register the SEFT adapter type with peft the moment peft is imported, in any interpreter.

Why: peft reads `"peft_type": "SEFT"` from adapter_config.json and looks it up
in its own mapping; nothing in peft, transformers or lm-eval imports seft, so
a stock consumer (`PeftModel.from_pretrained`, `lm_eval --model hf
--model_args peft=ADAPTER`, transformers' `load_adapter`) stopped at
`KeyError: 'SEFT'` unless the user wrote `import seft` first.

Mechanism chosen (and why): installing seft drops `seft_peft_hook.pth` into
site-packages (setup.py). Python runs its single `import` line at start-up,
which imports this module and puts `PeftImportHook` first on `sys.meta_path`.
The finder does nothing until something imports the top-level `peft`
package; then it lets the normal finder locate peft, and after peft's
`__init__` has run it imports `seft.tuner`, which registers SEFT. So:
  - no torch/peft/transformers at interpreter start: the start-up cost is
    this file (a few class definitions, nothing imported beyond `sys`);
  - registration happens exactly when it is first needed, before any config
    is read, however peft gets imported (directly, by transformers, by
    lm-eval, by accelerate);
  - other options were weaker: peft has no plugin entry point for tuner
    types; `sitecustomize` is one file per environment that other packages
    also want; importing seft eagerly from the .pth would cost seconds at
    every start.
`import seft` installs the same hook (or registers at once when peft is
already imported), so a path-based checkout without the .pth works after
`import seft`.

Where it cannot work (seft not installed in that environment, `python -S`,
a .pth-less install) peft still raises `KeyError: 'SEFT'`; the fix is
`import seft` before loading, or `pip install -e .` of seft in that
environment. A failing registration never breaks the peft import: it logs a
warning naming the error and the fix.
"""
from __future__ import annotations

import sys

TARGET = "peft"
# bitsandbytes (imported by peft) warns on every CPU start that it cannot fetch an optional kernel from the
# hub; this project runs offline, so the line is only noise. Quietened before peft's import emits it.
QUIET_LOGGERS = ("bitsandbytes.backends.cpu.ops",)


def register() -> bool:
    """Import seft.tuner (which registers SEFT with peft); False, with a warning, if that fails."""
    try:
        import seft.tuner  # noqa: F401
    except Exception as exc:  # never break the peft import for the user's other adapters
        import logging

        logging.getLogger("seft").warning(
            "SEFT adapters will not load in this process: registering SEFT with peft failed (%s: %s); "
            "fix the seft install, then `import seft` before loading", type(exc).__name__, exc)
        return False
    return True


class _RegisterAfterExec:
    """Loader wrapper: run peft's own loader, then register SEFT (peft is complete by then)."""

    def __init__(self, loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = self._loader  # peft sees its own loader, as without the hook
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        uninstall()  # peft is imported now: the rest of the import system never sees the finder again
        register()

    def __getattr__(self, name: str):  # get_resource_reader, get_source, is_package, ...
        return getattr(self._loader, name)


class PeftImportHook:
    """A `sys.meta_path` finder that answers only for the top-level `peft` package, once.

    Recognised by the `seft_peft_hook` attribute, not by class: two copies of this module (an installed
    seft and a checkout on PYTHONPATH) must not install two finders."""

    seft_peft_hook = True

    def find_spec(self, fullname: str, path=None, target=None):
        """The spec the other finders give for peft, its loader wrapped; None for any other name.

        Stays installed until peft actually executes: `importlib.util.find_spec("peft")` (transformers'
        availability check) also lands here and must not use the hook up."""
        if fullname != TARGET:
            return None
        for finder in list(sys.meta_path):
            if getattr(finder, "seft_peft_hook", False):
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None  # peft is not installed: let the import fail as it would without us
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        import logging

        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "seft_peft_hook", False)]


def install() -> None:
    """Make SEFT known to peft: now if peft is already imported, else at peft's import."""
    if TARGET in sys.modules:
        register()
        return
    if not any(getattr(f, "seft_peft_hook", False) for f in sys.meta_path):
        sys.meta_path.insert(0, PeftImportHook())


install()
