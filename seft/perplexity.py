"""Perplexity by the SparseGPT/Wanda protocol.

The held-out text is cut into non-overlapping windows of an explicit
`seq_len` (never `max_position_embeddings`); each window is scored
independently from its first token, and perplexity is exp(total NLL / total
predicted tokens). Token and window counts are reported with the number so
results at different lengths are never compared by accident.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import packed_blocks


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens scored
    windows: int
    seq_len: int
    source: str
    seconds: float

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> tuple[float, int]:
    """Summed next-token NLL (fp32) and the number of predicted tokens over `windows`."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum")
        total += nll.item()
        count += targets.numel()
    return total, count


def perplexity(
    model: nn.Module,
    tokenizer,
    source: str = "wiki",
    seq_len: int = 256,
    split: str = "heldout",
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Held-out perplexity of `model` on `source` in non-overlapping `seq_len` windows."""
    windows = packed_blocks(tokenizer, source, seq_len, split)
    if max_windows is not None:
        windows = windows[:max_windows]
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    total, count = window_nll(model, windows, batch_size, progress)
    model.train(was_training)
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, len(windows), seq_len, source, time.perf_counter() - t0)
