"""Trainer checkpoints that can be told complete from half-written, and the resume choice.

`transformers.Trainer` writes `checkpoint-N/` file by file (adapter or model,
optimizer, scheduler, RNG, `trainer_state.json` last, then rotates old ones)
with no marker of its own, so Ctrl-C, SIGKILL or a full disk during a save
leaves a folder that looks like the newest checkpoint and crashes `--resume`.
`CheckpointMarker` writes `COMPLETE` into the folder after the Trainer's
`on_save` -- i.e. after every file of the checkpoint is written -- listing
each file with its size, so a later truncation is caught too. A checkpoint
without the marker (a run stopped between the save and the marker, or one
written before this existed) counts as complete only if its
`trainer_state.json` is whole and names its own step.

`resume_checkpoint` picks the newest complete checkpoint, says which broken
ones it skipped, and removes them (the resumed run saves those steps again).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from .errors import SeftError

logger = logging.getLogger(__name__)

COMPLETE = ".seft-complete.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoints(work: str | os.PathLike) -> list[tuple[int, Path]]:
    """[(step, folder)] of the `checkpoint-N` folders in `work`, newest first."""
    work = Path(work)
    if not work.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in work.iterdir() if p.is_dir() and (m := _CHECKPOINT.fullmatch(p.name))]
    return sorted(found, reverse=True)


def mark_complete(folder: str | os.PathLike) -> None:
    """Write `COMPLETE` (every file and its size) into a fully written checkpoint folder."""
    folder = Path(folder)
    files = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
             if f.is_file() and f.name != COMPLETE and not f.name.startswith(f"{COMPLETE}.")}
    tmp = folder / f"{COMPLETE}.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, folder / COMPLETE)


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete checkpoint, or None if it is."""
    folder = Path(folder)
    marker = folder / COMPLETE
    if marker.is_file():
        try:
            files = json.loads(marker.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"its {COMPLETE} is unreadable"
        for name, size in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            if path.stat().st_size != size:
                return f"{name} has {path.stat().st_size} of its {size} bytes"
        return None
    state = folder / "trainer_state.json"
    if not state.is_file():
        return "it has no trainer_state.json (the run stopped while saving it)"
    try:
        step = json.loads(state.read_text(encoding="utf-8"))["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its trainer_state.json is incomplete"
    m = _CHECKPOINT.fullmatch(folder.name)
    if m and int(step) != int(m.group(1)):
        return f"its trainer_state.json is for step {step}"
    return None


def resume_checkpoint(work: str | os.PathLike) -> str:
    """The newest complete checkpoint in `work` (newer broken ones are logged, skipped and removed)."""
    found = checkpoints(work)
    if not found:
        raise SeftError(f"--resume: no checkpoint in {work}; start without --resume")
    broken = []
    for _, folder in found:
        problem = checkpoint_problem(folder)
        if problem is None:
            for bad, why in broken:
                logger.warning("--resume: skipping %s, which is incomplete (%s); removed it, continuing from %s",
                               bad.name, why, folder.name)
                shutil.rmtree(bad, ignore_errors=True)
            return str(folder)
        broken.append((folder, problem))
    listed = "; ".join(f"{f.name}: {why}" for f, why in broken)
    raise SeftError(f"--resume: no complete checkpoint in {work} ({listed}); start over with --overwrite")


def checkpoint_marker():
    """A TrainerCallback that marks each checkpoint complete once the Trainer has saved it."""
    from transformers import TrainerCallback

    class CheckpointMarker(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if args.should_save and folder.is_dir():
                mark_complete(folder)

    return CheckpointMarker()
