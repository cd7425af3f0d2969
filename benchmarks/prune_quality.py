"""Held-out perplexity of SmolLM2-135M pruned by magnitude / Wanda / SparseGPT, 50% unstructured and 2:4.

Every pruned model starts from a fresh copy of the dense model and uses the
same calibration windows (wiki train split, seed 0); perplexity is the
SparseGPT protocol on the held-out wiki split (non-overlapping windows of
--seq-len, all of them unless --eval-windows). The table is rewritten after
every row, so an interrupted run keeps what it measured.

    .venv/bin/python benchmarks/prune_quality.py            # ~10 min on 2 idle cores
    .venv/bin/python benchmarks/prune_quality.py --calib-samples 16 --eval-windows 32   # a quick look
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from seft.models import load_model
from seft.perplexity import perplexity
from seft.prune import PruneConfig, prune_model

RESULTS = Path(__file__).parent / "results" / "prune_quality.md"
PATTERNS = {"50% unstructured": dict(sparsity=0.5, pattern="unstructured"), "2:4": dict(sparsity=None, pattern="2:4")}
METHODS = ("magnitude", "wanda", "sparsegpt")


def write_table(rows: list[dict], dense: dict, args, done: bool) -> None:
    """Method x pattern table; ratio = perplexity / magnitude's (the issue's bar: Wanda, SparseGPT < 0.5)."""
    by = {(r["method"], r["pattern"]): r for r in rows}
    lines = [
        "# Pruning quality: SmolLM2-135M, held-out wiki perplexity" + ("" if done else " (PARTIAL)"),
        "",
        f"Calibration: {args.calib_samples} x {args.seq_len}-token windows of the wiki train split (seed 0). "
        f"Evaluation: {dense['windows']} non-overlapping {args.seq_len}-token windows of the held-out wiki split "
        f"({dense['tokens']:,} predicted tokens). Dense: **{dense['perplexity']:.2f}**. "
        "In brackets: ratio to magnitude at the same pattern. Prune time: the whole model on the CPU.",
        "",
        f"Command: `python benchmarks/prune_quality.py --calib-samples {args.calib_samples} --seq-len {args.seq_len}"
        + (f" --eval-windows {args.eval_windows}" if args.eval_windows else "") + "`",
        "",
        "| method | " + " | ".join(f"{p} ppl | {p} prune s" for p in PATTERNS) + " |",
        "|---|" + "---:|---:|" * len(PATTERNS),
        "| dense | " + " | ".join(f"{dense['perplexity']:.2f} | " for _ in PATTERNS) + " |",
    ]
    for method in METHODS:
        cells = []
        for pattern in PATTERNS:
            r, mag = by.get((method, pattern)), by.get(("magnitude", pattern))
            if r is None:
                cells.append("not run | ")
                continue
            ratio = f" ({r['perplexity'] / mag['perplexity']:.2f}x)" if mag and method != "magnitude" else ""
            cells.append(f"{r['perplexity']:.2f}{ratio} | {r['prune_seconds']:.0f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(args.output)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=None, help="first N held-out windows (default: all)")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.manual_seed(0)
    dense_model, tok = load_model("smollm2-135m")
    ppl = lambda m: perplexity(m, tok, "wiki", args.seq_len, "heldout", args.eval_windows, batch_size=8,  # noqa: E731
                               progress=False).as_dict()
    dense = ppl(dense_model)
    print(f"dense: {dense['perplexity']:.2f} over {dense['windows']} windows", flush=True)
    rows: list[dict] = []
    for pattern, kw in PATTERNS.items():
        for method in METHODS:
            model = copy.deepcopy(dense_model)
            config = PruneConfig(method=method, calibration="wiki", num_samples=args.calib_samples,
                                 seq_len=args.seq_len, seed=0, **kw).validate()
            t0 = time.perf_counter()
            prune_model(model, tok, config, progress=False)
            seconds = time.perf_counter() - t0
            rows.append({**ppl(model), "method": method, "pattern": pattern, "prune_seconds": seconds})
            print(f"{method:10s} {pattern:18s} ppl {rows[-1]['perplexity']:9.2f}  prune {seconds:6.1f} s", flush=True)
            write_table(rows, dense, args, done=False)
            del model
    write_table(rows, dense, args, done=True)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
