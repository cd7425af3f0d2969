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
  eval/tasks/spec_NAME.yaml, spec_val_NAME.yaml   the lm-eval tasks over the test / validation items
and eval/specialist/train_mix.jsonl (every train split, shuffled together, as prompt/completion rows
for `seft finetune --data`), eval/specialist.yaml (the suite: every task in TASKS), and
eval/specialist/SOURCES.json (sha256 of each source task.json and of every file written, so a rebuild can
be checked byte for byte). Specialist files of tasks no longer in TASKS are removed (and listed), so the
vendored set is always exactly TASKS. Token lengths are counted with SmolLM2's tokenizer (`seft` installed).

Items are converted exactly as eval/tasks/convert_bigbench.py does ({query, choices, gold}, BIG-bench's
JSON-task prompt defaults, ambiguous golds dropped). Then, per task: items whose BIG-bench `input` repeats
an earlier one are dropped (goal_step_wikihow asks about the same step with other candidates; keeping both
would put one question in both splits), the rest are shuffled with random.Random(SEED), the first
TEST_ITEMS are the test split and the next TRAIN_ITEMS the train split. The completion trained on is
" " + the gold choice: the continuation lm-eval scores after the query (target_delimiter " ").
"""
from __future__ import annotations

import functools
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

SUITE = HERE.parent / "specialist.yaml"
MAX_LENGTH = 512  # lm-eval's max_length for the suite; every query + choice must fit

_SCORED = """test_split: test
output_type: multiple_choice
doc_to_text: "{{query}}"
doc_to_choice: "{{choices}}"
doc_to_target: gold
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
TEST_YAML = """# BIG-bench "{folder}" (Apache-2.0), test split of the specialist benchmark, vendored as
# spec_{name}.jsonl by eval/specialist/make_splits.py (its train split is eval/specialist/train/{name}.jsonl);
# see eval/README.md and eval/specialist/SOURCES.json.
task: spec_{name}
tag: [seft_specialist]
custom_dataset: !function loaders.bigbench
dataset_kwargs:
  jsonl: spec_{name}.jsonl
"""
VAL_YAML = """# BIG-bench "{folder}" (Apache-2.0): validation items of the specialist benchmark -- the
# rows of eval/specialist/train/{name}.jsonl that `seft finetune` holds out of train_mix.jsonl (every
# 10th row). benchmarks/specialist.py picks learning rates on these; the test split is spec_{name}.
task: spec_val_{name}
tag: [seft_specialist_val]
custom_dataset: !function loaders.specialist_val
dataset_kwargs:
  task: {name}
"""


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


def write_text(path: Path, text: str) -> str:
    """Write `text` (UTF-8, creating the folder); its sha256 for SOURCES.json."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return sha256(path)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    from seft.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))


def token_lengths(rows: list[dict]) -> int:
    """The longest query + " " + choice of `rows` in SmolLM2 tokens (what lm-eval scores, what training sees)."""
    tok = _tokenizer()
    return max(len(tok(r["query"] + " " + c)["input_ids"]) for r in rows for c in r["choices"])


def suite_yaml(manifest: dict) -> str:
    """eval/specialist.yaml: every task of the manifest, with its chance level and the longest item."""
    tasks = manifest["tasks"]
    chance = "; ".join(f"{n} {t['chance']:.3f}" for n, t in tasks.items())
    mean_chance = sum(t["chance"] for t in tasks.values()) / len(tasks)
    longest = max(t["test"]["max_tokens"] for t in tasks.values())
    longest_train = max(t["train"]["max_tokens"] for t in tasks.values())
    return (f"# The specialist benchmark's test splits: {len(tasks)} BIG-bench multiple-choice tasks, {TEST_ITEMS} "
            "held-out items each,\n"
            "# vendored in eval/tasks/spec_*.jsonl (train splits: eval/specialist/train/, mixture: train_mix.jsonl).\n"
            "#   seft eval --model out/wanda50 --adapter out/specialist-seft --suite eval/specialist.yaml "
            "--output r.json\n"
            f"# Chance (mean over the test items' choice counts): {chance} (mean {mean_chance:.3f}).\n"
            "# benchmarks/specialist.py runs this suite for every row of its table. Written by "
            "eval/specialist/make_splits.py.\n"
            "name: specialist\n"
            f"description: BIG-bench MC test splits ({', '.join(t['source'].split('/', 2)[2].removesuffix('/task.json') for t in tasks.values())}), 0-shot\n"
            f"tasks: [{', '.join(f'spec_{n}' for n in tasks)}]\n"
            "num_fewshot: 0\n"
            f"max_length: {MAX_LENGTH}   # the longest query + choice is {longest} SmolLM2 tokens "
            f"(train rows: {longest_train})\n")


def remove_stale(names: list[str]) -> None:
    """Delete the specialist files of tasks not in `names` (a task dropped from TASKS leaves nothing behind)."""
    keep = {f"spec_{n}" for n in names} | {f"spec_val_{n}" for n in names}
    stale = [p for p in TASKS_DIR.glob("spec_*") if p.stem not in keep]
    stale += [p for p in (HERE / "train").glob("*.jsonl") if p.stem not in names]
    for path in sorted(stale):
        print(f"removing {path.relative_to(HERE.parent.parent)} (its task is not in TASKS)")
        path.unlink()


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
        longest = token_lengths(test)
        if longest > MAX_LENGTH:
            raise SystemExit(f"{name}: a test query + choice is {longest} tokens, over max_length {MAX_LENGTH}")
        manifest["tasks"][name] = {
            "source": f"bigbench/benchmark_tasks/{folder}/task.json", "source_sha256": sha256(source),
            "source_examples": len(task["examples"]), "usable_items": len(rows),
            "choices": sorted({len(r["choices"]) for r in rows}),
            "chance": sum(1 / len(r["choices"]) for r in test) / len(test),
            "test": {"file": f"eval/tasks/{test_path.name}", "items": len(test), "sha256": write_jsonl(test_path, test),
                     "max_tokens": longest,
                     "yaml": write_text(TASKS_DIR / f"spec_{name}.yaml", TEST_YAML.format(name=name, folder=folder)
                                        + _SCORED),
                     "val_yaml": write_text(TASKS_DIR / f"spec_val_{name}.yaml",
                                            VAL_YAML.format(name=name, folder=folder) + _SCORED)},
            "train": {"file": f"eval/specialist/train/{train_path.name}", "items": len(train),
                      "sha256": write_jsonl(train_path, train), "max_tokens": token_lengths(train)},
        }
        mix += [training_row(r, name) for r in train]
        print(f"{name}: {len(rows)} usable of {len(task['examples'])}; test {len(test)}, train {len(train)}")
    remove_stale(list(TASKS))
    random.Random(SEED).shuffle(mix)
    manifest["train_mix"] = {"file": "eval/specialist/train_mix.jsonl", "items": len(mix),
                             "sha256": write_jsonl(HERE / "train_mix.jsonl", mix)}
    manifest["suite"] = {"file": "eval/specialist.yaml", "sha256": write_text(SUITE, suite_yaml(manifest))}
    (HERE / "SOURCES.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    print(f"train_mix.jsonl: {len(mix)} rows; wrote {HERE / 'SOURCES.json'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
