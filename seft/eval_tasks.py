"""Evaluation suites (eval/*.yaml) and lm-eval task-name resolution.

A suite is a small strict YAML file: which lm-eval tasks to run, at which
settings, plus SparseGPT-protocol perplexity entries that `seft.perplexity`
computes outside lm-eval. Task names are checked against lm-eval's index
before any model is loaded, so a typo costs seconds, not a model load; and a
task that needs the Hugging Face hub fails fast when the hub is off or out of
reach, instead of hanging in `datasets` retries.

lm_eval is imported lazily (only `task_manager` needs it).
"""
from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import SeftError, choices_hint

REPO_EVAL_DIR = Path(__file__).resolve().parent.parent / "eval"
LOCAL_TASKS_DIR = REPO_EVAL_DIR / "tasks"
HUB_HOST = ("huggingface.co", 443)
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class PerplexitySpec:
    """One SparseGPT/Wanda-protocol perplexity: non-overlapping `seq_len` windows of `source`/`split`."""

    source: str = "wiki"
    seq_len: int = 256
    split: str = "heldout"
    max_windows: int | None = None

    @property
    def name(self) -> str:
        # Named so nobody mistakes it for lm-eval's rolling (per-document) perplexity.
        return f"sparsegpt_ppl_{self.source}_{self.split}_seq{self.seq_len}"


@dataclass
class Suite:
    """A named set of lm-eval tasks and perplexity entries, with run settings."""

    name: str
    tasks: list[str] = field(default_factory=list)
    perplexity: list[PerplexitySpec] = field(default_factory=list)
    num_fewshot: int | None = None
    limit: int | None = None
    max_length: int | None = None  # lm-eval context / rolling-window length; None = the model's
    description: str = ""
    path: str | None = None


def _strict(section: str, raw: dict[str, Any], valid: set[str]) -> None:
    for key in raw:
        if key not in valid:
            raise SeftError(f"{section}: unknown key {key!r}; {choices_hint(key, valid)}")


SUITE_KEYS = {f.name for f in fields(Suite)} - {"path"}
PERPLEXITY_KEYS = {f.name for f in fields(PerplexitySpec)}


def load_suite(path: str | os.PathLike) -> Suite:
    """Read eval/NAME.yaml strictly: an unknown key is an error naming the valid keys."""
    path = Path(path)
    if not path.is_file():
        shipped = sorted(p.name for p in REPO_EVAL_DIR.glob("*.yaml"))
        raise SeftError(f"no suite file {str(path)!r}; shipped suites in {REPO_EVAL_DIR}: {', '.join(shipped) or 'none'}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SeftError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SeftError(f"{path}: a suite is a mapping with keys like 'tasks' and 'perplexity'")
    _strict(str(path), raw, SUITE_KEYS)
    ppl = []
    for i, entry in enumerate(raw.pop("perplexity", None) or []):
        if not isinstance(entry, dict):
            raise SeftError(f"{path}: perplexity[{i}] must be a mapping (source, seq_len, split, max_windows)")
        _strict(f"{path}: perplexity[{i}]", entry, PERPLEXITY_KEYS)
        if "seq_len" not in entry:
            raise SeftError(f"{path}: perplexity[{i}] needs an explicit seq_len (never the model's maximum)")
        ppl.append(PerplexitySpec(**entry))
    tasks = raw.pop("tasks", None) or []
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks and not ppl:
        raise SeftError(f"{path}: the suite has neither tasks nor perplexity entries")
    return Suite(name=str(raw.pop("name", path.stem)), tasks=[str(t) for t in tasks], perplexity=ppl,
                 path=str(path), **raw)


def include_paths(extra: list[str] | None = None) -> list[str]:
    """Folders lm-eval may read task YAMLs from: the repo's eval/tasks, then the folders the user named.

    Task YAMLs can run Python (`!function module.fn` imports `module.py` from
    the YAML's folder), so nothing is added implicitly -- in particular not the
    `tasks/` folder next to a suite file, which may come from anywhere.
    """
    paths = [str(LOCAL_TASKS_DIR)] if LOCAL_TASKS_DIR.is_dir() else []
    for p in check_include_paths(extra or []):
        if p not in paths:
            paths.append(p)
    return paths


def check_include_paths(folders: list[str]) -> list[str]:
    """The user's --include-path folders, resolved; SeftError for one that is not a folder."""
    out = []
    for folder in folders:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise SeftError(f"--include-path {folder!r} is not a folder")
        out.append(str(path.resolve()))
    return out


def task_manager(include: list[str]):
    """lm-eval's TaskManager over its own tasks plus `include`; cached, since indexing takes seconds."""
    return _task_manager(tuple(include))


@functools.lru_cache(maxsize=4)
def _task_manager(include: tuple[str, ...]):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None)


def _is_local(name: str, manager, include: list[str]) -> bool:
    roots = [Path(p).resolve() for p in include]
    entry = manager.task_index[name]
    if entry.yaml_path is not None:
        return any(Path(entry.yaml_path).resolve().is_relative_to(r) for r in roots)
    members = [e for e in manager.task_index.values() if name in e.tags]  # a tag: local iff all its tasks are
    return bool(members) and all(
        e.yaml_path is not None and any(Path(e.yaml_path).resolve().is_relative_to(r) for r in roots) for e in members
    )


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
        return True
    except OSError:
        return False


def check_tasks(names: list[str], manager, include: list[str]) -> list[str]:
    """Validate task names; return the hub-only ones. Fails fast on typos and an unreachable hub."""
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            local = sorted(t for t in known if _is_local(t, manager, include) and t in manager.all_subtasks)
            raise SeftError(
                f"unknown task {name!r}"
                + (f"; did you mean {', '.join(close)}?" if close else "")
                + f" Offline tasks here: {', '.join(local)}; list all with `lm_eval ls tasks`"
                + " (task folders other than eval/tasks are read only when named with --include-path)"
            )
    hub = [n for n in names if not _is_local(n, manager, include)]
    if hub and hub_offline():
        raise SeftError(
            f"task(s) {', '.join(hub)} need datasets from the Hugging Face hub, but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE "
            f"is set; run offline tasks instead (--suite {REPO_EVAL_DIR / 'offline.yaml'})"
        )
    if hub and not hub_reachable():
        raise SeftError(
            f"task(s) {', '.join(hub)} need the Hugging Face hub, which is unreachable from here "
            f"({HUB_HOST[0]}:{HUB_HOST[1]}); run offline tasks instead (--suite {REPO_EVAL_DIR / 'offline.yaml'})"
        )
    return hub
