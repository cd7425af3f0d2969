"""Build the specialist benchmark's task files from the BIG-bench sdist (run once by a maintainer).

    pip download bigbench==1.0.0 --no-deps --no-binary :all: -d /tmp/bb
    cd /tmp/bb && tar -xzf bigbench-1.0.0.tar.gz --wildcards \\
        'bigbench-1.0.0/bigbench/benchmark_tasks/hyperbaton/task.json' \\
        'bigbench-1.0.0/bigbench/benchmark_tasks/goal_step_wikihow/*/task.json' \\
        'bigbench-1.0.0/bigbench/benchmark_tasks/sports_understanding/task.json' \\
        'bigbench-1.0.0/bigbench/benchmark_tasks/navigate/task.json'
    python eval/specialist/make_splits.py /tmp/bb/bigbench-1.0.0/bigbench/benchmark_tasks

Writes, for every task in TASKS:
  eval/tasks/spec_NAME.jsonl        the test split (TEST_ITEMS items), scored by eval/tasks/spec_NAME.yaml
  eval/specialist/train/NAME.jsonl  the train split (at most TRAIN_ITEMS items), never scored
and eval/specialist/train_mix.jsonl (every train split, shuffled together, as prompt/completion rows
for `seft finetune --data`) and eval/specialist/SOURCES.json (sha256 of each source task.json and of every
file written, so a rebuild can be checked byte for byte).

Items are converted exactly as eval/tasks/convert_bigbench.py does ({query, choices, gold}, BIG-bench's
JSON-task prompt defaults, ambiguous golds dropped). Then, per task: items whose BIG-bench `input` repeats
an earlier one are dropped (goal_step_wikihow asks about the same step with other candidates; keeping both
would put one question in both splits), the rest are shuffled with random.Random(SEED), the first
TEST_ITEMS are the test split and the next TRAIN_ITEMS the train split. The completion trained on is
" " + the gold choice: the continuation lm-eval scores after the query (target_delimiter " ").
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS_DIR = HERE.parent / "tasks"
SEED = 1234
TEST_ITEMS = 250
TRAIN_ITEMS = 1000

# short name -> path of the task folder under bigbench/benchmark_tasks
TASKS = {
    "hyperbaton": "hyperbaton",
    "wikihow_goal": "goal_step_wikihow/goal_inference",
    "wikihow_step": "goal_step_wikihow/step_inference",
    "sports": "sports_understanding",
    "navigate": "navigate",
}


def _converter():
    """eval/tasks/convert_bigbench.py as a module (it is a script, not a package member)."""
    spec = importlib.util.spec_from_file_location("convert_bigbench", TASKS_DIR / "convert_bigbench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def items(task: dict) -> list[dict]:
    """{query, choices, gold} per example, first occurrence of each `input` only, ambiguous golds dropped."""
    convert = _converter()
    seen: set[str] = set()
    rows = []
    for example in task["examples"]:
        if example["input"] in seen:
            continue
        seen.add(example["input"])
        scores = example["target_scores"]
        choices = list(scores)
        best = max(scores.values())
        if sum(v == best for v in scores.values()) != 1:
            continue
        rows.append({"query": convert._prompt(task, example, choices), "choices": choices,
                     "gold": [scores[c] for c in choices].index(best)})
    return rows


def split(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(test, train): a seeded shuffle, the first TEST_ITEMS for test, the next TRAIN_ITEMS for train."""
    rows = list(rows)
    random.Random(SEED).shuffle(rows)
    if len(rows) < TEST_ITEMS + 200:
        raise SystemExit(f"only {len(rows)} items; need {TEST_ITEMS} test + 200 train")
    return rows[:TEST_ITEMS], rows[TEST_ITEMS:TEST_ITEMS + TRAIN_ITEMS]


def training_row(item: dict, task: str) -> dict:
    """A `seft finetune --data` row: the query as prompt, " " + the gold choice as completion (what lm-eval
    scores after the query, target_delimiter " ")."""
    return {"prompt": item["query"], "completion": " " + item["choices"][item["gold"]], "task": task}


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return sha256(path)


def main(root: str) -> None:
    root_path = Path(root)
    manifest: dict = {"sdist": "bigbench==1.0.0",
                      "sdist_sha256": "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
                      "seed": SEED, "test_items": TEST_ITEMS, "train_items_max": TRAIN_ITEMS, "tasks": {}}
    mix = []
    for name, folder in TASKS.items():
        source = root_path / folder / "task.json"
        task = json.loads(source.read_text(encoding="utf-8"))
        rows = items(task)
        test, train = split(rows)
        test_path, train_path = TASKS_DIR / f"spec_{name}.jsonl", HERE / "train" / f"{name}.jsonl"
        manifest["tasks"][name] = {
            "source": f"bigbench/benchmark_tasks/{folder}/task.json", "source_sha256": sha256(source),
            "source_examples": len(task["examples"]), "usable_items": len(rows),
            "choices": sorted({len(r["choices"]) for r in rows}),
            "chance": sum(1 / len(r["choices"]) for r in test) / len(test),
            "test": {"file": f"eval/tasks/{test_path.name}", "items": len(test), "sha256": write_jsonl(test_path, test)},
            "train": {"file": f"eval/specialist/train/{train_path.name}", "items": len(train),
                      "sha256": write_jsonl(train_path, train)},
        }
        mix += [training_row(r, name) for r in train]
        print(f"{name}: {len(rows)} usable of {len(task['examples'])}; test {len(test)}, train {len(train)}")
    random.Random(SEED).shuffle(mix)
    manifest["train_mix"] = {"file": "eval/specialist/train_mix.jsonl", "items": len(mix),
                             "sha256": write_jsonl(HERE / "train_mix.jsonl", mix)}
    (HERE / "SOURCES.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(f"train_mix.jsonl: {len(mix)} rows; wrote {HERE / 'SOURCES.json'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
