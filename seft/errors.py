"""User-facing errors.

Anything a user can cause (a bad path, a typo in a recipe, an invalid
sparsity) raises `SeftError` with a one-line message that names the problem
and the valid choices. The CLI prints it without a traceback; programming
errors stay ordinary exceptions so their tracebacks are not hidden.
"""
from __future__ import annotations

from collections.abc import Iterable


class SeftError(Exception):
    """An error the user can fix; its message is the whole story."""


def choices_hint(value: str, valid: Iterable[str]) -> str:
    """'unknown X; valid: a, b, c (did you mean b?)' — the standard wording."""
    import difflib

    valid = sorted(valid)
    close = difflib.get_close_matches(str(value), valid, n=3, cutoff=0.5)
    hint = f"valid: {', '.join(valid)}"
    if close:
        hint += f" (did you mean {' or '.join(close)}?)"
    return hint
