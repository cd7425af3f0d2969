"""Check a recipe and print it fully resolved (defaults filled in, overrides applied).

  seft validate recipes/prune_wanda_50.yaml [KEY=VALUE ...]

The recipe's kind is known by its top-level keys (a prune recipe has
`prune:`). Nothing is loaded or run; unknown keys and bad values fail with
the valid choices.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

from ..errors import SeftError

NAME = "validate"
HELP = "check a recipe and print it resolved"


def _resolve_prune(recipe: dict) -> dict:
    from ..prune.config import job_from_recipe

    return job_from_recipe(recipe).as_recipe()


def _resolve_finetune(recipe: dict) -> dict:
    from ..finetune_config import job_from_recipe

    return job_from_recipe(recipe).as_recipe()


# kind -> (the top-level key that marks it, resolver returning the resolved recipe).
# To add a kind (e.g. finetune: `adapter:`/`train:`), add one resolver and one entry.
KINDS: dict[str, tuple[str, Callable[[dict], dict]]] = {
    "prune": ("prune", _resolve_prune),
    "finetune": ("finetune", _resolve_finetune),
}


def recipe_kind(recipe: dict) -> str:
    for kind, (marker, _) in KINDS.items():
        if marker in recipe:
            return kind
    markers = ", ".join(f"'{m}:' ({k})" for k, (m, _) in KINDS.items())
    raise SeftError(f"cannot tell what this recipe is for: it has none of the top-level sections {markers}; "
                    f"found {', '.join(map(str, recipe)) or 'nothing'}")


def resolve(recipe: dict) -> tuple[str, dict]:
    """(kind, resolved recipe) — raises SeftError on any problem."""
    kind = recipe_kind(recipe)
    return kind, KINDS[kind][1](recipe)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides, e.g. prune.sparsity=0.6")


def overwrite_warning(resolved: dict) -> str | None:
    """What `overwrite: true` would do to the recipe's existing output (None when it does nothing)."""
    from pathlib import Path

    from ..io import describe_output, replacement_problem

    output = Path(str(resolved.get("output", ""))).expanduser()
    if not resolved.get("overwrite") or not (output.exists() or output.is_symlink()):
        return None
    problem = replacement_problem(output, _recipe_inputs(resolved))
    if problem:
        return f"overwrite: true, but the run will refuse to replace {output}: {problem}"
    return f"overwrite: true will replace {output.resolve()} ({describe_output(output)}) at the end of the run"


def _recipe_inputs(resolved: dict):
    from ..io import input_paths
    from ..models import local_model_folder

    sections = [resolved.get("prune") or {}, resolved.get("finetune") or {}]
    data = [s.get(k) for s in sections for k in ("calibration", "data", "eval_data")]
    return input_paths(local_model_folder(str(resolved.get("model", ""))), *[d for d in data if isinstance(d, str)])


def run(args: argparse.Namespace) -> int:
    import sys

    from ..recipe import dump_recipe, load_recipe

    kind, resolved = resolve(load_recipe(args.recipe, args.overrides))
    print(f"# {args.recipe}: valid {kind} recipe (resolved)")
    print(dump_recipe(resolved), end="")
    warning = overwrite_warning(resolved)
    if warning:
        print(f"seft validate: warning: {warning}", file=sys.stderr)
    return 0
