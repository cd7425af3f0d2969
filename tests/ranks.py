"""Start worker ranks for the distributed tests, in fresh interpreters, with a deadline.

Why spawn and not fork: a forked child inherits the parent's thread pools in
whatever state they were at fork time. After other tests have used the HF
tokenizers (Rayon) or OpenMP pools, a forked rank blocked forever in CI and
locally (test_foundation then test_fsdp: no progress in 400 s). Spawned ranks
start clean. Why a deadline: a rank that never reaches its collective must
fail the test, not hold CI for 90 minutes.
"""
from __future__ import annotations

import socket
import time
from collections.abc import Callable

import torch.multiprocessing as mp

RANK_TIMEOUT_S = 420.0


def free_port() -> int:
    """A loopback port nobody listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable, args: tuple, nprocs: int = 2, timeout_s: float = RANK_TIMEOUT_S) -> None:
    """Run `fn(rank, *args)` in `nprocs` spawned processes; raise if one fails or the deadline passes."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            raise TimeoutError(f"{getattr(fn, '__name__', fn)}: ranks still running after {timeout_s:.0f} s "
                               "(a rank is stuck before a collective)")
