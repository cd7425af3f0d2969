"""Evaluate a model with lm-eval-harness and SparseGPT-protocol perplexity.

Works on every stage: a dense model, a pruned checkpoint, a base model plus a
peft adapter (LoRA or SEFT, evaluated unmerged unless --merge) and a merged
model. Tasks are lm-eval task names (hub tasks need the Hugging Face hub) or
the offline tasks in eval/tasks; a suite (eval/NAME.yaml) bundles tasks,
perplexity entries and settings:

  seft eval --model smollm2-135m --suite eval/offline.yaml --output dense.json
  seft eval --model pruned/ --adapter adapter/ --tasks bb_general_knowledge --limit 50
  seft eval --model pruned/ --suite eval/paper.yaml --batch-size 16 --device cuda
  seft eval --model pruned/ --suite my/suite.yaml --include-path my/tasks

Task YAMLs can run Python (`!function`), so lm-eval only reads the shipped
eval/tasks and the folders given with --include-path, never a folder merely
because it sits next to a suite.

The JSON holds lm-eval's results plus model, adapter and sparsity metadata;
a markdown table is printed at the end.
"""
from __future__ import annotations

import argparse
import logging

from ..errors import SeftError

NAME = "eval"
HELP = "evaluate a model (+ adapter) with lm-eval-harness and perplexity"
logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder, alias (smollm2-135m) or hub id")
    parser.add_argument("--adapter", help="peft adapter folder (LoRA or SEFT) to apply to --model")
    parser.add_argument("--merge", action="store_true", help="merge the adapter before evaluating")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--tasks", help="comma-separated lm-eval task names, e.g. bb_general_knowledge,arc_easy")
    what.add_argument("--suite", help="suite YAML, e.g. eval/offline.yaml or eval/paper.yaml")
    parser.add_argument("--limit", type=int, help="at most N items per task (overrides the suite)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (overrides the suite)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", help="float32, bfloat16, float16 (default: as stored)")
    parser.add_argument("--include-path", action="append", default=[], metavar="FOLDER",
                        help="also load lm-eval task YAMLs from FOLDER (repeatable). Task files may run Python "
                             "(!function), so only the shipped eval/tasks and folders named here are read")
    parser.add_argument("--output", help="write the results JSON here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output (a seft results JSON)")


def run(args: argparse.Namespace) -> int:
    from ..eval_tasks import check_include_paths, load_suite
    from ..evaluate import evaluate, markdown_table
    from ..io import check_output, input_paths, write_output_json
    from ..models import local_model_folder

    plan = None
    if args.output:  # before the work: a results file that cannot be written loses the whole evaluation
        inputs = input_paths(local_model_folder(args.model), args.adapter, args.suite)
        plan = check_output(args.output, args.overwrite, inputs, kind="file")
    include = check_include_paths(args.include_path)
    if args.limit is not None and args.limit < 1:
        raise SeftError(f"--limit must be at least 1, got {args.limit}")
    if args.merge and not args.adapter:
        raise SeftError("--merge needs --adapter")
    suite = load_suite(args.suite) if args.suite else None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    report = evaluate(args.model, tasks=tasks, suite=suite, adapter=args.adapter, limit=args.limit,
                      batch_size=args.batch_size, num_fewshot=args.num_fewshot, device=args.device,
                      dtype=args.dtype, merge=args.merge, include=include)
    if plan is not None:
        write_output_json(plan, report)
        logger.info("results written to %s", args.output)
    print(markdown_table(report))
    return 0
