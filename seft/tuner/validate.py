"""Validation of a SEFT layer's state as it is loaded (pure tensor math; torch only).

An adapter file is data from outside: a corrupt, hand-edited or foreign one
must be refused, not applied. Unchecked, a negative `removed` index wraps
and zeroes the last weights, an int64 index past the int32 range wraps on
the cast, duplicate slots double-count, slots moved onto pruned positions
make the model denser than the base, float indices round to someone else's
weights. `check_layer_state` checks every tensor of one layer against the
base weight it will sit on and raises a one-line SeftError naming the layer
and the problem. Runs once per layer per load (O(numel) boolean work).

Invariants (DESIGN.md §1; see topology.py for why they hold):
  - indices / removed / age are int32 or int64, one-dimensional;
  - values are floating point, finite, and there are exactly k of them, as
    many as indices and ages;
  - indices are distinct flat positions in [0, out*in);
  - removed are distinct positions in [0, out*in) where the base weight is
    nonzero (SEFT only removes weights that exist);
  - ages are >= 0;
  - the active count `count((W != 0) - removed + slots)` is at most the
    base's `n` (SEFT never makes a layer denser), and below `n` only if
    every removed position holds a slot (a rebalance restores removed
    weights first, and falls short only when none is left to restore);
  - where the base follows an N:M pattern, the active positions still do.
"""
from __future__ import annotations

import torch

from ..errors import SeftError

INDEX_DTYPES = (torch.int32, torch.int64)


def _fail(layer: str, problem: str) -> SeftError:
    return SeftError(f"SEFT adapter does not fit layer {layer}: {problem}; the adapter file is corrupt or was "
                     "made for another base model")


def _check_positions(layer: str, name: str, t: torch.Tensor, numel: int) -> None:
    if t.dtype not in INDEX_DTYPES:
        raise _fail(layer, f"{name} must be int32 or int64, got {str(t.dtype).removeprefix('torch.')}")
    if t.dim() != 1:
        raise _fail(layer, f"{name} must be one-dimensional, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= numel:
        raise _fail(layer, f"{name} holds position {lo if lo < 0 else hi}, outside 0..{numel - 1}")
    if torch.unique(t).numel() != t.numel():
        raise _fail(layer, f"{name} holds {t.numel() - torch.unique(t).numel()} duplicate position(s)")


@torch.no_grad()
def check_layer_state(
    layer: str,
    weight: torch.Tensor,
    n: int,
    k: int,
    nm: tuple[int, int] | None,
    values: torch.Tensor,
    indices: torch.Tensor,
    removed: torch.Tensor,
    age: torch.Tensor,
) -> None:
    """SeftError unless (values, indices, removed, age) is a valid state on the base `weight` [out, in]."""
    numel = weight.numel()
    if not values.is_floating_point():
        raise _fail(layer, f"seft_values must be floating point, got {str(values.dtype).removeprefix('torch.')}")
    if values.dim() != 1 or values.numel() != k:
        raise _fail(layer, f"seft_values has shape {tuple(values.shape)}, but this layer "
                           f"({weight.shape[0]}x{weight.shape[1]}) takes k={k} values")
    if not bool(torch.isfinite(values).all()):
        raise _fail(layer, f"seft_values holds {int((~torch.isfinite(values)).sum())} NaN/inf value(s)")
    _check_positions(layer, "seft_indices", indices, numel)
    if indices.numel() != k:
        raise _fail(layer, f"seft_indices has {indices.numel()} positions for k={k} values")
    _check_positions(layer, "seft_removed", removed, numel)
    if age.dtype not in INDEX_DTYPES:
        raise _fail(layer, f"seft_age must be int32 or int64, got {str(age.dtype).removeprefix('torch.')}")
    if age.dim() != 1 or age.numel() != k:
        raise _fail(layer, f"seft_age has shape {tuple(age.shape)}, but there are k={k} slots")
    if age.numel() and int(age.min()) < 0:
        raise _fail(layer, f"seft_age holds the negative age {int(age.min())}")

    flat = weight.reshape(-1).to(indices.device if indices.numel() else weight.device)
    nonzero = flat != 0
    removed_l = removed.long().to(flat.device)
    if removed_l.numel() and not bool(nonzero[removed_l].all()):
        raise _fail(layer, f"seft_removed names {int((~nonzero[removed_l]).sum())} position(s) where the base "
                           "weight is already zero")
    active = nonzero.clone()
    active[removed_l] = False
    active[indices.long().to(flat.device)] = True
    count = int(active.sum())
    if count > n:
        raise _fail(layer, f"{count} weights would be active, more than the base's {n} "
                           "(slots on pruned positions without matching removed weights)")
    if count < n and removed_l.numel():
        slot = torch.zeros_like(nonzero)
        slot[indices.long().to(flat.device)] = True
        restorable = int((~slot[removed_l]).sum())
        if restorable:
            raise _fail(layer, f"only {count} of the base's {n} weights would be active while {restorable} removed "
                               "weight(s) hold no slot (a SEFT update restores those first)")
    if nm is not None:
        keep, group = nm
        rows, cols = weight.shape
        per_group = active.reshape(rows, cols // group, group).sum(dim=2)
        if bool((per_group > keep).any()):
            raise _fail(layer, f"the active positions break the base's {keep}:{group} pattern "
                               f"({int((per_group > keep).sum())} group(s) hold more than {keep})")
