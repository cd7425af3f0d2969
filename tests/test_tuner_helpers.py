"""Shared helpers for the SEFT tuner tests: sparse tiny models and a plain training loop."""
from __future__ import annotations

import torch

from seft.sparsity import nm_mask, row_topk_mask

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@torch.no_grad()
def prune_tiny(model, sparsity: float = 0.5, nm: tuple[int, int] | None = None):
    """Make every targeted linear sparse in place (magnitude, per row or N:M)."""
    for name, p in model.named_parameters():
        if p.dim() == 2 and name.split(".")[-2] in PROJ:
            mask = nm_mask(p.abs(), *nm) if nm else row_topk_mask(p.abs(), sparsity)
            p.mul_(mask)
    return model


def proj_weights(model) -> dict[str, torch.Tensor]:
    """{name: weight} of the targeted linears of a plain (merged or base) model."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2 and n.split(".")[-2] in PROJ}


def batches(vocab: int, n: int, bsz: int = 4, seq: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (bsz, seq), generator=g) for _ in range(n)]


def train_loop(pm, optimizer, total_steps: int, vocab: int, accum: int = 1, seed: int = 0) -> list[dict]:
    """The custom-loop protocol documented in seft/tuner/model.py; returns update stats."""
    pm.train()
    data = batches(vocab, total_steps * accum, seed=seed)
    out = []
    for step in range(1, total_steps + 1):
        pm.seft_begin_window(step, total_steps)
        for i in range(accum):
            x = data[(step - 1) * accum + i]
            loss = pm(input_ids=x, labels=x).loss / accum
            loss.backward()
        pm.seft_pre_optimizer_step(optimizer)
        optimizer.step()
        pm.seft_post_optimizer_step(optimizer)
        optimizer.zero_grad()
        stats = pm.seft_update(step, total_steps, optimizer)
        if stats:
            out.append(stats)
    pm.eval()
    return out
