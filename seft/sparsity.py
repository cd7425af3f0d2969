"""Pure sparsity math: masks, N:M patterns, densities, flat-index helpers.

Imports torch only, so pruning methods and the SEFT topology can be tested
without a model. Masks are boolean tensors with True = keep (nonzero).

Convention: an N:M pattern keeps at most N nonzeros in every group of M
consecutive input columns of a row (NVIDIA's 2:4 = 2 kept of 4).
"""
from __future__ import annotations

import torch

from .errors import SeftError

Pattern = tuple[int, int] | None  # (n, m) or None for unstructured


def parse_pattern(pattern: str | None) -> Pattern:
    """'2:4' -> (2, 4); None / 'unstructured' -> None. Any N < M is allowed."""
    if pattern is None or str(pattern).lower() in ("", "none", "unstructured"):
        return None
    try:
        n_str, m_str = str(pattern).split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise SeftError(f"invalid pattern {pattern!r}; valid: 'unstructured' or N:M such as 2:4, 4:8") from None
    if not 0 < n < m:
        raise SeftError(f"invalid N:M pattern {pattern!r}: need 0 < N < M (e.g. 2:4, 4:8)")
    return n, m


def format_pattern(pattern: Pattern) -> str:
    return "unstructured" if pattern is None else f"{pattern[0]}:{pattern[1]}"


def check_sparsity(sparsity: float) -> float:
    """Unstructured sparsity must lie in [0, 1)."""
    sparsity = float(sparsity)
    if not 0.0 <= sparsity < 1.0:
        raise SeftError(f"sparsity must be in [0, 1), got {sparsity}")
    return sparsity


def row_topk_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask pruning the `round(sparsity * cols)` lowest scores of every row.

    Per-row comparison is what Wanda prescribes (and what keeps per-row
    sparsity exact); magnitude and SparseGPT use it too for uniformity.
    """
    rows, cols = scores.shape
    n_prune = int(round(check_sparsity(sparsity) * cols))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if n_prune == 0:
        return mask
    idx = torch.topk(scores, n_prune, dim=1, largest=False).indices  # [rows, n_prune]
    mask.scatter_(1, idx, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the top-`n` scores of every group of `m` consecutive columns."""
    rows, cols = scores.shape
    if cols % m:
        raise SeftError(f"N:M pattern {n}:{m} needs in_features divisible by {m}; this layer has {cols}")
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=2, largest=False).indices
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, idx, False)
    return mask.reshape(rows, cols)


def make_mask(scores: torch.Tensor, sparsity: float, pattern: Pattern = None) -> torch.Tensor:
    """Dispatch: N:M pattern if given, else per-row unstructured at `sparsity`."""
    if pattern is not None:
        return nm_mask(scores, *pattern)
    return row_topk_mask(scores, sparsity)


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of `m` consecutive columns has at most `n` nonzeros."""
    rows, cols = weight.shape
    if cols % m:
        return False
    nnz = (weight != 0).reshape(rows, cols // m, m).sum(dim=2)
    return bool((nnz <= n).all())


def detect_nm(weight: torch.Tensor, max_m: int = 16, min_full: float = 0.99) -> Pattern:
    """Find the N:M pattern `weight` follows: no group above N, (nearly) every group at N.

    Groups may hold fewer than N nonzeros because a kept weight can be an
    exact zero already (SmolLM2's dequantised GGUF weights have a few hundred),
    so "every group exactly N" would miss a real 2:4 checkpoint. Requiring at
    least `min_full` of the groups to be full still keeps an unstructured
    matrix that happens to be sparse from being called N:M. Smallest M wins.
    """
    rows, cols = weight.shape
    nz = weight != 0
    for m in range(2, max_m + 1):
        if cols % m:
            continue
        per_group = nz.reshape(rows, cols // m, m).sum(dim=2)
        n = int(per_group.max().item())
        if 0 < n < m and (per_group == n).float().mean().item() >= min_full:
            return n, m
    return None


def common_nm(weights) -> Pattern:
    """The N:M pattern that every matrix of the iterable `weights` follows, else None.

    Detected on the first matrix and checked on the rest with one `is_nm`
    pass each, so a 7B model costs seconds; sparsity counts alone cannot see
    a broken 2:4 (a group at 3 and another at 1).
    """
    weights = iter(weights)
    first = next(weights, None)
    nm = detect_nm(first.detach()) if first is not None else None
    if nm and all(is_nm(w.detach(), *nm) for w in weights):
        return nm
    return None


def density(t: torch.Tensor) -> float:
    return float((t != 0).sum().item()) / max(t.numel(), 1)


def sparsity_of(t: torch.Tensor) -> float:
    return 1.0 - density(t)


def index_dtype(numel: int) -> torch.dtype:
    """int32 flat indices while they fit (half the memory), else int64."""
    return torch.int32 if numel < 2**31 else torch.int64
