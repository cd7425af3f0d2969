"""SEFT state sharded by FSDP2 (`fully_shard`): whole-tensor reads, local-shard writes.

Under FSDP2, between forward/backward passes every parameter of a sharded
module is a `DTensor` whose ranks each hold one dim-0 chunk (`values` [k]
and the frozen base weight [out, in] alike), and torch optimizers keep
`values`' moments as DTensors of the same layout. Inside forward/backward
FSDP2 swaps in the all-gathered plain tensors, so the autograd Functions see
whole tensors and need nothing from here. The integer buffers (`indices`,
`removed`, `age`) are not sharded: every rank holds them whole and keeps
them identical by taking the same decisions from the same (all-reduced)
statistics.

So the code outside forward/backward does two things differently:
  - reads that need whole tensors (topology updates, merge) call `full`, an
    all-gather: a collective, so every rank must make the same calls in the
    same order (they do: all ranks walk the same layers);
  - writes at slot positions (zeroing regrown values, the warm-up scaling,
    moment re-seeding) go to the rank holding each position:
    `local_positions` maps global flat positions to that rank's shard.
Plain tensors pass through unchanged, so one code path serves 1 process,
DDP and FSDP2.
"""
from __future__ import annotations

import math

import torch

from ..errors import SeftError


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (FSDP2-managed parameter or optimizer state)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached (an all-gather for a DTensor: call on every rank)."""
    t = t.detach()
    return t.full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard as a plain tensor sharing storage with `t` (`t.data` for a plain tensor)."""
    t = t.detach()
    return t.to_local() if is_sharded(t) else t


def _flat_range(t: torch.Tensor) -> tuple[int, int]:
    """(first flat position, count) of this rank's shard of a DTensor sharded along dim 0 only."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not (p.is_replicate() or (isinstance(p, Shard) and p.dim == 0)) for p in t.placements):
        raise SeftError(f"SEFT supports FSDP2 sharding along dim 0 only (fully_shard's default); got "
                        f"placements {t.placements}")
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    row = math.prod(t.shape[1:])
    return offset[0] * row if shape[0] else 0, math.prod(shape)


def local_range(t: torch.Tensor) -> slice:
    """The flat positions of `t` this rank holds, as a slice (all of them for a plain tensor)."""
    if not is_sharded(t):
        return slice(0, t.numel())
    start, count = _flat_range(t)
    return slice(start, start + count)


def local_positions(t: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over `positions` of those this rank holds, their flat positions in `local(t)`).

    `positions` are flat positions into the whole tensor (slot numbers for
    `values`, flat weight positions for a weight).
    """
    positions = positions.long()
    if not is_sharded(t):
        return torch.ones_like(positions, dtype=torch.bool), positions
    start, count = _flat_range(t)
    mine = (positions >= start) & (positions < start + count)
    return mine, positions[mine] - start


def write_full(t: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy this rank's part of `whole` (same shape as `t`) into `t` in place."""
    if not is_sharded(t):
        t.detach().copy_(whole)
        return
    start, count = _flat_range(t)
    local(t).view(-1).copy_(whole.reshape(-1)[start:start + count])
