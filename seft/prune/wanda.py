"""Wanda (Sun et al., arXiv 2306.11695): prune by |W_ij| * ||X_j||_2, per output row.

The statistic is the mean squared L2 norm of every input column over the
calibration tokens; its square root weights each weight's magnitude by how
strongly its input feature fires. Comparison groups are output rows (or N:M
groups within a row), which is what makes per-row sparsity exact.
"""
from __future__ import annotations

import torch

from ..sparsity import Pattern, make_mask


def wanda_scores(weight: torch.Tensor, sq_col_norms: torch.Tensor) -> torch.Tensor:
    """|W| [out, in] * sqrt(sq_col_norms) [in], in fp32."""
    if sq_col_norms.shape != (weight.shape[1],):
        raise ValueError(f"statistic shape {tuple(sq_col_norms.shape)} does not match in_features {weight.shape[1]}")
    return weight.detach().abs().float() * sq_col_norms.float().sqrt().unsqueeze(0)


def wanda_prune(
    weight: torch.Tensor, sq_col_norms: torch.Tensor, sparsity: float, pattern: Pattern = None
) -> torch.Tensor:
    """`weight` with the lowest Wanda scores of every row (or N:M group) zeroed."""
    mask = make_mask(wanda_scores(weight, sq_col_norms.to(weight.device)), sparsity, pattern)
    return weight * mask
