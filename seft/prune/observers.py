"""Statistics accumulators fed by forward hooks on the unpruned layer.

One `InputStatistics` per distinct input tensor: q/k/v read the same
normalised hidden states and gate/up read the same post-attention states, so
they share one accumulator (one Hessian for SparseGPT) instead of three.
Everything accumulates in fp32 as a running mean, so the scale does not grow
with the number of calibration tokens (no fp32 overflow on long runs).
"""
from __future__ import annotations

import torch


class InputStatistics:
    """Running input statistics of a linear layer with `columns` input features.

    - `sq_col_norms` [in]: mean over tokens of x_j**2 (Wanda's ||X_j||^2 up to a
      constant factor, which per-row comparison ignores).
    - `hessian` [in, in]: 2/n * X^T X over the n tokens seen (SparseGPT).
    """

    def __init__(self, columns: int, hessian: bool, sq_norms: bool, device: torch.device | str = "cpu"):
        self.columns = columns
        self.tokens = 0
        self.hessian = torch.zeros(columns, columns, dtype=torch.float32, device=device) if hessian else None
        self.sq_col_norms = torch.zeros(columns, dtype=torch.float32, device=device) if sq_norms else None

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Fold in one batch of inputs [..., in]."""
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [t, in]
        t = x.shape[0]
        if t == 0:
            return
        total = self.tokens + t
        if self.hessian is not None:
            self.hessian.mul_(self.tokens / total).addmm_(x.T, x, alpha=2.0 / total)
        if self.sq_col_norms is not None:
            self.sq_col_norms.mul_(self.tokens / total).add_(x.pow(2).sum(dim=0), alpha=1.0 / total)
        self.tokens = total
