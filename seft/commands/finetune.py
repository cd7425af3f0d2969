"""Repair a pruned model by fine-tuning it while it stays sparse (SEFT or a baseline).

Two ways to call it:
  seft finetune --model out/wanda50 --data wiki --output out/wanda50-seft --max-steps 100 --merge
  seft finetune recipes/smollm2_wanda50_seft.yaml [train.max_steps=40 finetune.merge=true ...]
KEY=VALUE overrides work without a recipe too, and every SEFT setting has a
flag (the "SEFT adapter" options below, one per SeftConfig field):
  seft finetune --model out/wanda50 --output out/x --update-interval 10 --stat-window 2 train.warmup_steps=0

--data: wiki, news, pydoc, a .txt file (packed blocks), a prompt/response
.jsonl (instruction tuning in the chat template, loss on the response only), a
prompt/completion .jsonl (plain text, loss on the completion only, tokenized as
lm-eval scores it: e.g. eval/specialist/train_mix.jsonl), or hf:DATASET.
--method: seft (default), seft-norevive, static, masked-lora, lora-reprune,
lora-mask, full-masked — all at the budget of a LoRA of rank --lora-rank — and
lora, plain dense LoRA for a dense model (no sparsity promise, not checked).

Output: OUTPUT/adapter_model.safetensors (+ adapter_config.json),
OUTPUT/merged/ with --merge (a plain sparse HF checkpoint), and
OUTPUT/train_report.json. Checkpoints go to .OUTPUT.work/ while training;
--resume continues an interrupted run from its newest complete checkpoint
(half-written ones, e.g. from a kill during a save, are skipped and named).
"""
from __future__ import annotations

import argparse
import json

from ..errors import SeftError
from ..finetune_config import METHODS, FinetuneConfig, FinetuneJob, job_from_recipe
from ..seft_options import OptionField, seft_fields

NAME = "finetune"
HELP = "repair a pruned model with SEFT (or a baseline), keeping it sparse"

D = FinetuneConfig()
# flag -> (section, key)
FLAGS = {
    "data": ("finetune", "data"), "method": ("finetune", "method"), "seq_len": ("finetune", "seq_len"),
    "dtype": ("finetune", "dtype"), "merge": ("finetune", "merge"), "resume": ("finetune", "resume"),
    "load_in_4bit": ("finetune", "load_in_4bit"), "eval_data": ("finetune", "eval_data"),
    "lora_rank": ("adapter", "lora_rank"), "max_steps": ("train", "max_steps"),
    "learning_rate": ("train", "learning_rate"), "batch_size": ("train", "per_device_train_batch_size"),
    "grad_accum": ("train", "gradient_accumulation_steps"), "optim": ("train", "optim"),
    "bf16": ("train", "bf16"), "fp16": ("train", "fp16"), "gradient_checkpointing": ("train", "gradient_checkpointing"),
    "save_steps": ("train", "save_steps"), "seed": ("train", "seed"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="a finetune recipe (YAML), optional")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="overrides of the recipe (or of the flags' defaults), e.g. train.max_steps=40")
    p.add_argument("--model", help="the pruned model: a folder from `seft prune`, an alias or a hub id")
    p.add_argument("--output", help="output folder (adapter, merged/, train_report.json)")
    p.add_argument("--data", help=f"training text source (default: {D.data})")
    p.add_argument("--method", choices=METHODS, help="repair method (default: seft)")
    p.add_argument("--lora-rank", type=int, help="trainable budget as a LoRA rank: k = r*(in+out) per layer (default: 8)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: 100)")
    p.add_argument("--learning-rate", "--lr", type=float, help="peak learning rate (default: 2e-3; full-masked 5e-5)")
    p.add_argument("--batch-size", type=int, help="sequences per device per micro-batch (default: 4)")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default: 1)")
    p.add_argument("--seq-len", type=int, help=f"tokens per training sequence (default: {D.seq_len})")
    p.add_argument("--optim", help="Trainer optimizer, e.g. adamw_torch (default), adamw_bnb_8bit")
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 mixed precision")
    p.add_argument("--fp16", action="store_true", default=None, help="fp16 mixed precision (GPU)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None, help="recompute activations")
    p.add_argument("--dtype", help="dtype to load the base in (default: as stored)")
    p.add_argument("--load-in-4bit", action="store_true", default=None, help="QSEFT: NF4 base via bitsandbytes")
    p.add_argument("--eval-data", help="held-out perplexity source before/after (default: wiki; 'none' to skip)")
    p.add_argument("--save-steps", type=int, help="checkpoint every N steps (default: 50)")
    p.add_argument("--seed", type=int, help="training seed (default: 0)")
    p.add_argument("--merge", action="store_true", default=None, help="also write OUTPUT/merged (plain sparse model)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the newest complete checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_seft_arguments(p)


# SeftConfig fields whose flag exists above under a finetune-wide name, or would clash with one
_SEFT_FLAG_NAMES = {"lora_rank": None, "seed": "slot-seed"}


def _seft_flag(field: OptionField) -> str | None:
    name = _SEFT_FLAG_NAMES.get(field.name, field.name.replace("_", "-"))
    return None if name is None else f"--{name}"


def _converter(field: OptionField):
    """argparse `type` for one SeftConfig field: its kind, 'none' for an optional one, lists comma-separated."""
    def convert(text: str):
        if field.optional and text.strip().lower() in ("none", "null"):
            return None
        if field.kind == "list":
            return [t.strip() for t in text.split(",") if t.strip()]
        if field.kind == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
            return text.lower() in ("true", "1", "yes")
        return {"int": int, "float": float}.get(field.kind, str)(text)

    convert.__name__ = field.kind  # argparse names the type in its error message
    return convert


def add_seft_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per SeftConfig field (read from the dataclass: seft/seft_options.py), into `adapter:`."""
    group = p.add_argument_group("SEFT adapter (the recipe's adapter: section; SEFT methods)")
    for field in seft_fields():
        flag = _seft_flag(field)
        if flag is None:
            continue
        default = ",".join(field.default) if isinstance(field.default, list) else field.default
        metavar = {"list": "A,B", "int": "N", "float": "X"}.get(field.kind, "VALUE")
        group.add_argument(flag, dest=f"seft_{field.name}", type=_converter(field), metavar=metavar,
                           help=f"{field.help} (default: {default})".replace("%", "%%"))


def _seft_given(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f"seft_{f.name}") for f in seft_fields()
            if getattr(args, f"seft_{f.name}", None) is not None}


def _is_override(text: str | None) -> bool:
    """A KEY=VALUE in the recipe's place (no recipe file given)."""
    from pathlib import Path

    return bool(text) and "=" in text and not text.endswith((".yaml", ".yml")) and not Path(text).is_file()


def job_from_args(args: argparse.Namespace) -> FinetuneJob:
    """Recipe file (optional) -> KEY=VALUE overrides -> flags, each on top of the one before."""
    from ..recipe import apply_override, load_recipe

    given = {flag: getattr(args, flag) for flag in FLAGS if getattr(args, flag) is not None}
    overrides = list(args.overrides)
    recipe_file = args.recipe
    if _is_override(recipe_file):
        overrides.insert(0, recipe_file)
        recipe_file = None
    if recipe_file is not None:
        recipe = load_recipe(recipe_file, overrides)
    else:
        recipe = {}
        for text in overrides:
            apply_override(recipe, text)
    recipe.update({k: getattr(args, k) for k in ("model", "output") if getattr(args, k)})
    if recipe_file is None and (not recipe.get("model") or not recipe.get("output")):
        raise SeftError("give --model and --output (or model=... output=..., or a recipe file)")
    adapter = _seft_given(args)
    if adapter:
        if not isinstance(recipe.get("adapter") or {}, dict):
            raise SeftError(f"section 'adapter' must be a mapping of key: value, got {recipe['adapter']!r}")
        recipe["adapter"] = {**(recipe.get("adapter") or {}), **adapter}
    for flag, value in given.items():
        section, key = FLAGS[flag]
        if flag == "eval_data" and str(value).lower() == "none":
            value = None
        recipe.setdefault(section, {})
        if recipe[section] is None:
            recipe[section] = {}
        recipe[section][key] = value
    if args.overwrite:
        recipe["overwrite"] = True
    return job_from_recipe(recipe)


def run(args: argparse.Namespace) -> int:
    import sys

    job = job_from_args(args)  # before the heavy imports: a bad command line fails in a blink

    from ..checkpoints import checkpoints
    from ..finetune import ppl_table, run_finetune, work_dir_for

    try:
        report = run_finetune(job, progress=not args.no_progress)
    except KeyboardInterrupt:  # the work folder is left on purpose: say so, and how to continue
        work = work_dir_for(job.output)
        kept = (f"; the checkpoints of this run are in {work}: continue it with --resume"
                if checkpoints(work) else "")
        print(f"seft finetune: interrupted; nothing was written to {job.output}{kept}", file=sys.stderr)
        return 130
    print(ppl_table(report))
    summary = {k: report[k] for k in ("steps", "train_seconds", "seconds_per_step", "trainable_params",
                                       "adapter_bytes", "memory", "sparsity_preserved")}
    print(json.dumps(summary, indent=1))
    print(f"wrote {job.output}")
    return 0
