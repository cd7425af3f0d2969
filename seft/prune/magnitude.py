"""Magnitude pruning: score |W|, data-free.

The baseline every calibration-based method has to beat; kept here as a pure
function so the engine treats all methods alike.
"""
from __future__ import annotations

import torch

from ..sparsity import Pattern, make_mask


def magnitude_prune(weight: torch.Tensor, sparsity: float, pattern: Pattern = None) -> torch.Tensor:
    """`weight` [out, in] with the smallest |W| of every row (or N:M group) set to zero."""
    mask = make_mask(weight.detach().abs().float(), sparsity, pattern)
    return weight * mask
