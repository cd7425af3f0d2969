"""Why masked LoRA beats a sparse delta in short repairs: how much of the weight gradient each can hold.

For every target linear of a pruned SmolLM2 the dense weight gradient G,
summed over a few batches of wiki train text, is compared with what a
trainable budget of the same size (LoRA r=8: k = 8 (in + out) numbers) can
represent:
  - sparse: the best k coordinates of G (its top-k |G_ij|), as a SEFT delta
    whose slots sat exactly at the best positions would hold;
  - sparse, random: k coordinates drawn at random (SEFT's fixed/static slots);
  - low rank: the best rank-8 approximation of G (its top 8 singular values),
    the subspace a LoRA of rank 8 can move in.
Each as the fraction of ||G||_F^2 captured: the first-order loss decrease an
update of the given shape can reach, relative to an unconstrained one.
Also reported: the share of the top-k coordinates lying in the 1% of input
channels with the largest activation RMS (where |G| growth puts its slots).

    .venv/bin/python benchmarks/gradient_structure.py --model out/bench-recovery/pruned-wanda70-calib32
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from seft.data import packed_blocks
from seft.models import decoder_layers, load_model, target_linears

RESULTS = Path(__file__).parent / "results" / "gradient_structure.md"


def captured(G: torch.Tensor, k: int, rank: int, gen: torch.Generator) -> dict:
    """Fractions of ||G||^2 held by top-k coordinates, k random coordinates, and the best rank-`rank` matrix."""
    energy = G.pow(2)
    total = energy.sum()
    top = energy.flatten().topk(k).values.sum()
    rand = energy.flatten()[torch.randperm(energy.numel(), generator=gen)[:k]].sum()
    s = torch.linalg.svdvals(G)
    return {"topk": (top / total).item(), "random": (rand / total).item(),
            "lowrank": (s[:rank].pow(2).sum() / s.pow(2).sum()).item()}


def row(label: str, m: dict) -> str:
    keys = ("topk", "random", "lowrank", "outlier_share", "gn_topk", "gn_random", "gn_lowrank")
    return f"| {label} | " + " | ".join(f"{m[k]:.3f}" for k in keys) + " |"


def channel_hook(acc: torch.Tensor):
    """Forward hook adding each input channel's sum of squares into `acc` (returns None: output untouched)."""
    def hook(module, inputs, output) -> None:
        acc.add_(inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().pow(2).sum(0))
    return hook


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="out/bench-recovery/pruned-wanda70-calib32")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()
    model, tok = load_model(args.model)
    model.train()
    for param in model.parameters():
        param.requires_grad_(False)
    linears = {f"{i}.{n}": lin for i, layer in enumerate(decoder_layers(model))
               for n, lin in target_linears(layer).items()}
    sq: dict[str, torch.Tensor] = {}
    for name, lin in linears.items():
        lin.weight.requires_grad_(True)
        sq[name] = torch.zeros(lin.in_features)
        lin.register_forward_hook(channel_hook(sq[name]))
    blocks = packed_blocks(tok, "wiki", args.seq_len, "train")
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(blocks), generator=gen)[: args.batches * args.batch]
    for b in range(args.batches):
        x = blocks[order[b * args.batch:(b + 1) * args.batch]]
        model(input_ids=x, labels=x).loss.backward()
    tokens = args.batches * args.batch * args.seq_len
    rows = []
    for name, lin in linears.items():
        G = lin.weight.grad.float()
        G = G * (lin.weight != 0)  # what a mask-keeping update may touch (no revival)
        k = args.rank * (lin.in_features + lin.out_features)
        r = captured(G, k, args.rank, gen)
        rms = (sq[name] / tokens).sqrt()
        # the same in the diagonal Gauss-Newton metric: G_ij / rms_j (loss decrease per unit of output change)
        r.update({f"gn_{key}": v for key, v in captured(G / rms.clamp_min(rms.mean() * 1e-3), k, args.rank, gen).items()})
        outliers = torch.zeros(lin.in_features, dtype=torch.bool)
        outliers[rms.topk(max(1, lin.in_features // 100)).indices] = True
        top_cols = G.pow(2).flatten().topk(k).indices % lin.in_features
        r["outlier_share"] = outliers[top_cols].float().mean().item()
        rows.append((name, r))
    kinds = sorted({n.split(".", 1)[1] for n, _ in rows}, key=lambda s: list(target_linears(decoder_layers(model)[0])).index(s))
    lines = [
        "# Gradient structure: what a budget of k = r (in + out) numbers can hold",
        "",
        f"`python benchmarks/gradient_structure.py --model {args.model}` — dense weight gradient of each target",
        f"linear, summed over {args.batches} batches of {args.batch} x {args.seq_len} wiki train tokens, restricted",
        "to the surviving (unpruned) weights; fraction of ||G||^2 captured by the best k coordinates (an ideally",
        f"placed sparse delta), k random coordinates (fixed random slots) and the best rank-{args.rank} matrix",
        "(LoRA's subspace). Median over the 30 layers per module. `outlier share`: fraction of the top-k",
        "coordinates that sit in the 1% of input channels with the largest activation RMS.",
        "",
        "The `GN` columns repeat the comparison for G_ij / rms_j, the diagonal Gauss-Newton metric: with",
        "curvature ~ rms_j^2 per input channel, (G_ij / rms_j)^2 is the loss decrease a coordinate can give.",
        "",
        "| module | top-k coordinates | random k coordinates | best rank-r | outlier share of top-k "
        "| GN: top-k | GN: random k | GN: best rank-r |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in kinds:
        rs = [r for n, r in rows if n.split(".", 1)[1] == kind]
        med = {key: statistics.median(r[key] for r in rs) for key in rs[0]}
        lines.append(row(kind, med))
    lines.append(row("all", {key: statistics.median(r[key] for _, r in rows) for key in rows[0][1]}))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
