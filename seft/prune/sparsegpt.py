"""SparseGPT (Frantar & Alistarh, arXiv 2301.00774): mask + OBS weight update.

Given the layer-input Hessian H = 2/n X^T X, columns are processed left to
right in blocks of 128. Within a block, each pruned weight's error is spread
over the not-yet-processed columns of its row with the optimal-brain-surgeon
update (the row of the upper Cholesky factor of H^-1), so the layer output
WX changes as little as possible. The mask is chosen per block (unstructured:
lowest w^2 / [H^-1]_jj^2 over the block) or per N:M group, just before the
group is processed, so it sees the weights as already updated.

Numerics: fp32 throughout; dead inputs (zero Hessian diagonal) are pinned
to 1 and their weights zeroed (as in the reference code; a layer whose inputs
are *all* dead never gets here: the engine prunes it by magnitude, with a
warning, rather than zero it whole); dampening starts at 1% of the mean diagonal
and grows tenfold on a failed Cholesky. If it still fails, a SeftError —
never NaN weights.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..errors import SeftError
from ..sparsity import Pattern, check_sparsity

DAMP_RETRIES = 4


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """The column loop is thousands of tiny ops; on CPU, OpenMP's fork/join per op
    costs more than the op, and under CPU contention it collapses (measured on
    SmolLM2's down_proj on a busy 2-core box: 37 s with 2 threads, 0.9 s with 1).
    The big per-block matmul runs outside this context with all threads."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp*I)^-1 (fp32), with dead columns handled by the caller."""
    h = hessian.float()
    cols = h.shape[0]
    mean_diag = torch.diagonal(h).mean().item()
    damp = percdamp * (mean_diag if mean_diag > 0 else 1.0)
    eye = torch.eye(cols, dtype=h.dtype, device=h.device)
    for _ in range(DAMP_RETRIES + 1):
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if info.item() == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info.item() == 0 and bool(torch.isfinite(upper).all()):
                return upper
        damp *= 10.0
    raise SeftError(
        f"SparseGPT: the Hessian is not positive definite even with dampening {damp / 10:.3g}; "
        "use more calibration samples or a longer --seq-len"
    )


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: Pattern = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """Pruned and OBS-updated copy of `weight` [out, in] (same dtype/device)."""
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match in_features {cols}")
    if pattern is not None:
        n, m = pattern
        if cols % m:
            raise SeftError(f"N:M pattern {n}:{m} needs in_features divisible by {m}; this layer has {cols}")
        blocksize = max(m, (blocksize // m) * m)  # N:M groups never straddle blocks
    else:
        check_sparsity(sparsity)
    w = weight.detach().float().clone()  # [out, in]
    h = hessian.detach().float().to(w.device).clone()  # [in, in]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    u = inverse_hessian_factor(h, percdamp)  # [in, in], upper

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()  # [out, b]
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]  # [b, b]
        d1 = torch.diagonal(u1)  # [b]
        prune1 = torch.zeros_like(w1, dtype=torch.bool)  # True = prune
        if pattern is None:
            n_prune = int(round(sparsity * w1.numel()))
            if n_prune:
                scores = (w1.pow(2) / d1.pow(2).unsqueeze(0)).flatten()
                prune1.view(-1)[torch.topk(scores, n_prune, largest=False).indices] = True
        with _one_cpu_thread(w.device):
            for i in range(count):
                col = w1[:, i]  # [out]
                if pattern is not None and i % pattern[1] == 0:
                    n, m = pattern
                    scores = w1[:, i : i + m].pow(2) / d1[i : i + m].pow(2).unsqueeze(0)  # [out, m]
                    idx = torch.topk(scores, m - n, dim=1, largest=False).indices
                    prune1[:, i : i + m].scatter_(1, idx, True)
                q = col.masked_fill(prune1[:, i], 0.0)
                q1[:, i] = q
                e = (col - q) / d1[i]  # [out]
                w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
                err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]

    if not bool(torch.isfinite(w).all()):
        raise SeftError("SparseGPT produced non-finite weights; check the model's weights and calibration data")
    return w.to(dtype=weight.dtype)
