"""Tell a user when a multi-process launch ended up training as one process.

`accelerate launch --num_processes 2 --cpu script.py` runs accelerate's
*simple* launcher: one process, no WORLD_SIZE, only MASTER_ADDR/MASTER_PORT
set because more processes were asked for. Training then runs on one
process, without an error, at half the intended batch. On CPU the working
commands are `accelerate launch --multi_gpu --num_processes N` (torch's
launcher with gloo, despite the flag's name) or `torchrun --nproc_per_node N`.

`launch_problem` compares what the launcher's environment asked for with the
world size training actually got. Light on purpose (no torch import): the
CLI may call it before anything heavy is loaded.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping

logger = logging.getLogger(__name__)

# environment variables in which launchers state the number of processes
_SIZE_VARS = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
FIX = ("on CPU launch with `accelerate launch --multi_gpu --num_processes N ...` (gloo) or "
       "`torchrun --nproc_per_node N ...`; `accelerate launch --cpu --num_processes N` starts one process")
_warned: set[str] = set()


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None


def requested_processes(env: Mapping[str, str] | None = None) -> tuple[int | None, str]:
    """(processes the launcher asked for, where that was read); (None, '') when nothing says more than one."""
    env = os.environ if env is None else env
    for name in _SIZE_VARS:
        size = _int(env.get(name))
        if size is not None and size > 1:
            return size, f"{name}={size}"
    # accelerate's simple launcher sets MASTER_ADDR/MASTER_PORT only when more than one process was asked for
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and "MASTER_PORT" in env and "RANK" not in env:
        return 2, "accelerate launch set MASTER_ADDR/MASTER_PORT (more than one process asked for)"
    return None, ""


def launch_problem(world_size: int, env: Mapping[str, str] | None = None) -> str | None:
    """A one-line warning when the launch asked for several processes but training runs with `world_size` 1."""
    asked, where = requested_processes(env)
    if asked is None or int(world_size) > 1:
        return None
    return (f"a multi-process launch ({where}) is training as a single process (world size 1): "
            f"the run is not distributed; {FIX}")


def warn_if_single_process(world_size: int, env: Mapping[str, str] | None = None) -> str | None:
    """Log `launch_problem` once per process; returns the message (None when the launch is fine)."""
    message = launch_problem(world_size, env)
    if message and message not in _warned:
        _warned.add(message)
        logger.warning(message)
    return message
