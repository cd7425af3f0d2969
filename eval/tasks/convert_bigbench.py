"""Convert BIG-bench JSON multiple-choice tasks into the small JSONL files here.

Run once by a maintainer, never at evaluation time:

    pip download --no-deps --no-binary :all: bigbench==1.0.0   # or fetch the sdist from PyPI
    tar -xzf bigbench-1.0.0.tar.gz 'bigbench-1.0.0/bigbench/benchmark_tasks/*/task.json'
    python eval/tasks/convert_bigbench.py bigbench-1.0.0/bigbench/benchmark_tasks general_knowledge ...

The prompt follows BIG-bench's own JSON-task defaults (`task_prefix`, then
"Q: " input, the choices listed as "  choice: ...", then "A:"), so scores are
comparable in spirit with BIG-bench's multiple-choice metric. Items whose
top score is shared by several choices are dropped (ambiguous gold); tasks
larger than MAX_ITEMS are subsampled with a fixed seed to keep CPU runs short.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

MAX_ITEMS = 250
SEED = 1234
HERE = Path(__file__).parent


def _prompt(task: dict, example: dict, choices: list[str]) -> str:
    inp_prefix = task.get("example_input_prefix", "\nQ: ").lstrip("\n")
    out_prefix = task.get("example_output_prefix", "\nA: ").rstrip(" ")
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    prefix = task.get("task_prefix", "")
    if prefix and not prefix.endswith("\n"):  # e.g. navigate's question: on its own line, not glued to "Q:"
        prefix += "\n"
    text = prefix + inp_prefix + example["input"]
    if task.get("append_choices_to_input", True):
        text += "".join(choice_prefix + c for c in choices)
    return text + out_prefix


def convert(task_dir: Path) -> list[dict]:
    task = json.loads((task_dir / "task.json").read_text(encoding="utf-8"))
    rows = []
    for example in task["examples"]:
        scores = example["target_scores"]
        choices = list(scores)
        best = max(scores.values())
        if sum(v == best for v in scores.values()) != 1:
            continue  # ambiguous gold
        rows.append({"query": _prompt(task, example, choices), "choices": choices,
                     "gold": [scores[c] for c in choices].index(best)})
    if len(rows) > MAX_ITEMS:
        rows = random.Random(SEED).sample(rows, MAX_ITEMS)
    return rows


def main(root: str, names: list[str]) -> None:
    for name in names:
        rows = convert(Path(root) / name)
        out = HERE / f"bb_{name}.jsonl"
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        print(f"{out.name}: {len(rows)} items")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
