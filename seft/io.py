"""Output folders and files: checked before the work, written atomically, replaced only when safe.

Every command that writes a model, adapter or report
  1. checks the output location before any work (`check_output`): the
     parent exists or can be created and is writable, the disk has room for
     what is known to be written, and an existing output is refused unless
     `--overwrite` -- and even then only an output seft itself wrote (a
     folder holding `MARKER`, a results JSON with a `seft` section) or an
     empty folder, and never an input of the run nor a folder above one;
  2. writes into a hidden temporary sibling `.NAME.tmp-PID-XXXX` (mode from
     the umask, like any folder the user creates), marked as a seft output
     from its first moment;
  3. renames it into place only when everything is written, and only if the
     output is still what step 1 saw: an output that appeared (or was
     rewritten) meanwhile -- a second run writing the same place -- is never
     replaced; this run fails instead and its result is discarded.
An interrupted run (Ctrl-C, exception) removes its temporary folder; one
killed outright leaves it behind, and the next run writing the same output
removes those whose process is gone.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SeftError

logger = logging.getLogger(__name__)

MARKER = ".seft-output.json"  # inside every output folder seft writes
EMPTY = "empty"  # OutputPlan.replaces for an empty folder (replacing it loses nothing)
_STALE = re.compile(r"(?:tmp|old)-(\d+)-[0-9a-f]+")  # after ".NAME."
_LEGACY = re.compile(r"(?:tmp|old)-[a-z0-9_]{8}")  # tempfile.mkdtemp names of earlier versions


@dataclass(frozen=True)
class OutputPlan:
    """What `check_output` found: where, and the output it may replace (None: nothing there)."""

    path: Path
    replaces: str | None  # the run id in the existing output's marker; "file" (a results JSON), EMPTY
    inputs: tuple[Path, ...] = ()


def input_paths(*candidates: str | os.PathLike | None) -> tuple[Path, ...]:
    """The candidates that name existing local files or folders, resolved (aliases, hub ids dropped)."""
    out = []
    for c in candidates:
        if c is None or str(c) == "":
            continue
        p = Path(c).expanduser()
        if p.exists():
            out.append(p.resolve())
    return tuple(out)


LEGACY_REPORTS = {"sparsity_report.json": "overall", "train_report.json": "sparsity_before"}  # report: its key


def _marker_run(folder: Path) -> str | None:
    """The run id of a seft output folder, or None if seft did not write it.

    Outputs of seft versions before the marker are known by their report
    (`seft prune`'s sparsity_report.json, `seft finetune`'s train_report.json),
    identified by the report's modification time.
    """
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        return str(data.get("run")) if isinstance(data, dict) and data.get("run") else None
    except (OSError, ValueError):
        pass
    for name, key in LEGACY_REPORTS.items():
        try:
            report = folder / name
            if key in json.loads(report.read_text(encoding="utf-8")):
                return f"legacy:{report.stat().st_mtime_ns}"
        except (OSError, ValueError, TypeError):
            continue
    return None


def _is_results_json(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "seft" in data


def replacement_problem(path: str | os.PathLike, inputs: Iterable[Path] = (), kind: str = "dir") -> str | None:
    """Why `--overwrite` must not replace the existing `path`, or None if it may."""
    p = Path(path).resolve()
    for inp in inputs:
        if p == inp:
            return "it is an input of this run"
        if p in inp.parents:
            return f"it contains {inp}, an input of this run"
    if kind == "file":
        if not p.is_file() or not _is_results_json(p):
            return "it is not a results file seft wrote (a JSON with a 'seft' section)"
        return None
    if not p.is_dir():
        return "it is not a folder"
    if _marker_run(p) is None and not _is_empty_dir(p):
        return f"it is not a folder seft wrote (it has no {MARKER})"
    return None


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def describe_output(path: Path) -> str:
    """'a seft prune output written 2024-05-01 12:00' (for messages about what would be replaced)."""
    try:
        data = json.loads((path / MARKER).read_text(encoding="utf-8"))
        return f"a `{data.get('command') or 'seft'}` output written {data.get('created', '?')}"
    except (OSError, ValueError):
        if path.is_dir() and _marker_run(path):
            return "a seft output written before output markers existed"
        return "a seft results file" if path.is_file() else ("an empty folder" if _is_empty_dir(path) else "a folder")


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    return p


def check_location(path: str | os.PathLike, size: int | None = None) -> None:
    """SeftError unless `path` could be created: an existing, writable ancestor folder with room for `size` bytes."""
    path = Path(path).absolute()
    anc = _nearest_existing(path.parent)
    if not anc.is_dir():
        raise SeftError(f"cannot write output {path}: {anc} is a file, not a folder")
    try:  # a real probe: os.access says yes to root and on read-only mounts
        os.rmdir(tempfile.mkdtemp(prefix=".seft-probe-", dir=anc))
    except OSError as exc:
        raise SeftError(f"cannot write output {path}: {anc} is not writable ({exc.strerror})") from None
    if size:
        free = shutil.disk_usage(anc).free
        need = int(size * 1.05) + 16 * 2**20
        if free < need:
            raise SeftError(f"not enough disk space for {path}: it needs about {need / 2**30:.2f} GiB, "
                            f"{free / 2**30:.2f} GiB are free on {anc}")


def check_output(
    path: str | os.PathLike,
    overwrite: bool,
    inputs: Iterable[Path] = (),
    size: int | None = None,
    kind: str = "dir",
) -> OutputPlan:
    """Fail early (before hours of work) if `path` may not be written or replaced; see the module docstring.

    `kind` is "dir" (an output folder) or "file" (a results JSON). Also removes
    temporary folders that killed runs left next to `path`.
    """
    path = Path(path).absolute()
    inputs = tuple(inputs)
    replaces = None
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise SeftError(f"output {path} already exists; pass --overwrite to replace it")
        problem = replacement_problem(path, inputs, kind)
        if problem:
            raise SeftError(f"--overwrite will not replace {path}: {problem}; choose another output")
        replaces = "file" if kind == "file" else (_marker_run(path) or EMPTY)
        logger.info("--overwrite: %s (%s) will be replaced at the end of the run", path, describe_output(path))
    check_location(path, size)
    if path.parent.is_dir():
        remove_stale_temporaries(path)
    return OutputPlan(path, replaces, inputs)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete `.NAME.tmp-PID-*` / `.NAME.old-PID-*` siblings of `path` whose process (on this host) is gone.

    Folders of the older `.NAME.tmp-XXXXXXXX` form carry no pid, so they are only named in a warning.
    """
    path = Path(path).absolute()
    removed = []
    host = socket.gethostname()
    prefix = f".{path.name}."
    for entry in path.parent.iterdir():
        if not entry.name.startswith(prefix) or not entry.is_dir():
            continue
        rest = entry.name[len(prefix):]
        m = _STALE.fullmatch(rest)
        if m is None:
            if _LEGACY.fullmatch(rest):
                logger.warning("%s looks like the temporary folder of an interrupted seft run (it records no "
                               "process id); remove it if no run is writing %s", entry, path)
            continue
        try:
            where = json.loads((entry / MARKER).read_text(encoding="utf-8")).get("host")
        except (OSError, ValueError, AttributeError):
            where = None
        if where not in (None, host) or _pid_alive(int(m.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        logger.warning("removed %s, left behind by a seft run (pid %s) that no longer exists", entry, m.group(1))
        removed.append(entry)
    return removed


def _new_sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def write_marker(folder: Path, command: str | None = None) -> str:
    """Mark `folder` as a seft output; returns its run id."""
    from . import __version__

    run = secrets.token_hex(8)
    info = {"seft": __version__, "command": command, "run": run, "pid": os.getpid(), "host": socket.gethostname(),
            "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    (folder / MARKER).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return run


def _appeared(path: Path) -> SeftError:
    return SeftError(f"output {path} was written by another run while this one worked (two runs with the same "
                     "output?); it was left as it is and this run's result was discarded")


def _commit(tmp: Path, plan: OutputPlan) -> None:
    """Rename `tmp` onto `plan.path`, replacing only the output the plan saw."""
    path = plan.path
    exists = path.exists() or path.is_symlink()
    if plan.replaces is None or not exists:
        if exists:
            raise _appeared(path)
        try:
            os.rename(tmp, path)  # refuses a non-empty folder or a file that appeared since the check
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise _appeared(path) from None
            raise
        return
    if plan.replaces == EMPTY:
        try:
            os.rename(tmp, path)  # onto an empty folder only: one that filled up meanwhile is refused
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise _appeared(path) from None
            raise
        return
    if _marker_run(path) != plan.replaces:
        raise _appeared(path)
    old = _new_sibling(path, "old")
    os.rename(path, old)  # moved aside first, so there is no moment with neither
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(old, path)
        raise _appeared(path) from None
    if old.is_symlink():  # a symlinked output: the link is replaced, its target is left alone
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_output_dir(
    path: str | os.PathLike | OutputPlan,
    overwrite: bool = False,
    inputs: Iterable[Path] = (),
    command: str | None = None,
) -> Iterator[Path]:
    """Yield a temporary folder that becomes the output when the block succeeds.

    Pass the `OutputPlan` from the `check_output` made before the work, so that
    an output written by someone else since then is never replaced.
    """
    plan = path if isinstance(path, OutputPlan) else check_output(path, overwrite, inputs)
    plan.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(plan.path, "tmp")
    os.mkdir(tmp)  # 0o777 & ~umask (tempfile.mkdtemp would make it 0o700)
    try:
        write_marker(tmp, command)
        yield tmp
        _commit(tmp, plan)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s", plan.path)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON via a temporary file + rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_output_json(plan: OutputPlan, obj: Any) -> None:
    """A results file: written whole, never onto a file that appeared since `check_output` (without overwrite)."""
    path = plan.path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
        if plan.replaces is None:
            try:
                os.link(tmp, path)  # fails if the name exists: never replaces what appeared meanwhile
            except FileExistsError:
                raise _appeared(path) from None
            except OSError:  # no hard links on this filesystem: check, then rename
                if path.exists():
                    raise _appeared(path) from None
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
