"""Atomic output folders.

Every command that writes a model, adapter or report writes into a hidden
temporary sibling and renames it into place only when everything is written.
An interrupted run (Ctrl-C, OOM kill, exception) therefore never leaves a
half-written checkpoint under the requested name, and an existing output is
never replaced unless the caller passes `overwrite=True`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import SeftError

logger = logging.getLogger(__name__)


def check_output_free(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before hours of work) if `path` exists and may not be replaced."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise SeftError(f"output {path} already exists; pass --overwrite to replace it")
    return path


@contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes `path` when the block succeeds."""
    path = check_output_free(path, overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        # Move the old output aside first so there is no moment with neither.
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / "x")
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    logger.info("wrote %s", path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON via a temporary file + rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
