"""Dataset loaders for the offline lm-eval tasks in this folder.

lm-eval resolves `dataset_kwargs.data_files` against the current directory,
not the YAML's folder, so a plain `dataset_path: json` task would only work
when run from the repository root. These loaders (wired in with
`custom_dataset: !function loaders.NAME`) read files relative to this file,
so the tasks work from any directory, through `seft eval` or the stock
`lm_eval --include_path eval/tasks`.

lm-eval calls a custom loader with the task's `metadata` (and the run's
model arguments) as keyword arguments; only the keys named here are used.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


def bigbench(jsonl: str, **_: Any):
    """A vendored BIG-bench multiple-choice task: rows of {query, choices, gold}."""
    import datasets

    path = HERE / jsonl
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def specialist_val(task: str, **_: Any):
    """Validation items of a specialist task: its train-split items whose row in train_mix.jsonl is one
    `seft finetune` holds out (every 10th row, seft.data.HELDOUT_EVERY), so never trained on and never test.

    benchmarks/specialist.py picks each method's learning rate on these, not on the test split.
    """
    import datasets

    from seft.data import HELDOUT_EVERY

    folder = HERE.parent / "specialist"
    mix = [json.loads(line) for line in (folder / "train_mix.jsonl").read_text(encoding="utf-8").splitlines()
           if line.strip()]
    held = {r["prompt"] for i, r in enumerate(mix) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 and r["task"] == task}
    train = [json.loads(line) for line in (folder / "train" / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
             if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([r for r in train if r["query"] in held])})


def wiki_heldout(**_: Any):
    """seft's held-out `wiki` documents (every 10th article of gensim's Wikipedia excerpt).

    The same documents `seft.perplexity` scores, so the two perplexities differ
    only in windowing, never in text.
    """
    import datasets

    from seft.data import load_documents

    docs = load_documents("wiki", "heldout")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{"text": d} for d in docs])})
