"""Prune a causal LM with magnitude, Wanda or SparseGPT (unstructured or N:M).

Two ways to call it:
  seft prune --model smollm2-135m --method wanda --sparsity 0.5 --output out/wanda50
  seft prune --model smollm2-135m --method sparsegpt --pattern 2:4 --output out/sgpt24
  seft prune recipes/prune_wanda_50.yaml [prune.sparsity=0.6 output=out/x ...]

Calibration: `--num-samples` random windows of exactly `--seq-len` tokens
from the train split of `--calibration` (wiki, news, pydoc, a .txt/.jsonl
file, or hf:DATASET), seeded. Layers are pruned one at a time on `--device`;
the rest of the model stays on the CPU. The output folder is a plain HF
checkpoint (+ tokenizer + sparsity_report.json), written to a temporary
folder and renamed into place at the end, so Ctrl-C leaves nothing behind.
An existing output is refused unless --overwrite.
"""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from types import SimpleNamespace

from ..errors import SeftError
from ..prune.config import METHODS, PruneConfig, PruneJob, job_from_recipe

NAME = "prune"
HELP = "prune a model (magnitude, Wanda, SparseGPT; unstructured or N:M)"

# the defaults, read off the dataclass without instantiating it (its `targets` default imports seft.models)
D = SimpleNamespace(**{f.name: f.default for f in fields(PruneConfig) if f.default is not MISSING})
# seft.models.DEFAULT_MODEL, named here for the help text without importing torch (tests/test_cli_fast.py checks)
HELP_DEFAULT_MODEL = "smollm2-135m"
# flag -> PruneConfig field, for the flags that a recipe run must not mix with
CONFIG_FLAGS = {
    "method": "method", "sparsity": "sparsity", "pattern": "pattern", "calibration": "calibration",
    "num_samples": "num_samples", "seq_len": "seq_len", "seed": "seed", "device": "device",
    "dtype": "dtype", "batch_size": "batch_size",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="a prune recipe (YAML); then only KEY=VALUE overrides may follow")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. prune.sparsity=0.6")
    p.add_argument("--model", help=f"model folder, alias or hub id (default: {HELP_DEFAULT_MODEL})")
    p.add_argument("--method", choices=METHODS, help="pruning method (required without a recipe)")
    p.add_argument("--sparsity", type=float,
                   help="fraction of weights zeroed per target linear, in [0, 1); implied by --pattern N:M")
    p.add_argument("--pattern", help="'unstructured' (default) or N:M such as 2:4, 4:8 (N of every M inputs kept)")
    p.add_argument("--output", help="output folder (required without a recipe)")
    p.add_argument("--calibration", help=f"calibration text source (default: {D.calibration}); ignored by magnitude")
    p.add_argument("--num-samples", type=int, help=f"calibration windows (default: {D.num_samples})")
    p.add_argument("--seq-len", type=int,
                   help=f"tokens per calibration window (default: {D.seq_len}; 256 is plenty for a quick CPU run)")
    p.add_argument("--seed", type=int, help=f"calibration sampling seed (default: {D.seed})")
    p.add_argument("--device", help=f"where each layer is pruned: cpu, cuda, cuda:N (default: {D.device})")
    p.add_argument("--dtype", help="load/save dtype: float32, bfloat16, float16 (default: as stored)")
    p.add_argument("--batch-size", type=int, help=f"calibration windows per layer forward (default: {D.batch_size})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def job_from_args(args: argparse.Namespace) -> PruneJob:
    """Either a recipe (+ overrides) or flags, never a mix (a mix is ambiguous about who wins)."""
    given = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items() if getattr(args, flag) is not None}
    if args.recipe is not None:
        if "=" in args.recipe and not args.recipe.endswith((".yaml", ".yml")):
            raise SeftError(f"{args.recipe!r} looks like an override; give the recipe file first")
        mixed = [f"--{k.replace('_', '-')}" for k in given] + [f for f in ("model", "output") if getattr(args, f)]
        if mixed:
            raise SeftError(f"with a recipe use KEY=VALUE overrides instead of {', '.join(mixed)} "
                            "(e.g. prune.sparsity=0.6 output=out/x)")
        from ..recipe import load_recipe

        recipe = load_recipe(args.recipe, list(args.overrides) + (["overwrite=true"] if args.overwrite else []))
        return job_from_recipe(recipe)
    if args.overrides:
        raise SeftError(f"overrides {args.overrides} need a recipe file first: seft prune RECIPE.yaml KEY=VALUE")
    if args.method is None or args.output is None:
        raise SeftError("give --method and --output (or a recipe file); "
                        f"methods: {', '.join(METHODS)}")
    from ..models import DEFAULT_MODEL

    config = PruneConfig(**given).validate()
    return PruneJob(args.model or DEFAULT_MODEL, args.output, config, args.overwrite)


def run(args: argparse.Namespace) -> int:
    from ..prune import prune_checkpoint

    job = job_from_args(args)
    report = prune_checkpoint(job.model, job.output, job.config, overwrite=job.overwrite,
                              progress=not args.no_progress)
    print(f"pruned {job.model} with {report['method']} ({report['pattern']}): overall sparsity "
          f"{report['overall']['sparsity']:.4f} in {report['seconds']:.1f}s -> {job.output}")
    return 0
