"""The specialist task screen (benchmarks/specialist_screen.py): its items sit on the benchmark's split sides, its
task YAMLs load in lm-eval, and its verdict needs a gain over the 0-shot score, chance and every constant answer."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import specialist_screen as screen  # noqa: E402


def _fake_task(root: Path, name: str, n: int, choices: int = 3) -> None:
    """A BIG-bench-format multiple-choice task.json with `n` distinct inputs (gold: choice i % choices)."""
    examples = [{"input": f"Question {i}: which?",
                 "target_scores": {f"answer {c}": int(c == i % choices) for c in range(choices)}} for i in range(n)]
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"name": name, "examples": examples}))


def test_screen_items_sit_on_the_sides_make_splits_would_put_them(tmp_path):
    _fake_task(tmp_path, "toy", 600)
    items = screen.screen_items(tmp_path, {"toy": "toy"}, n_test=20, n_train=30)["toy"]
    ms = screen.make_splits()
    test, train = ms.split(ms.items(json.loads((tmp_path / "toy" / "task.json").read_text())))
    assert items["test"] == test[:20] and items["train"] == train[:30]
    assert not {r["query"] for r in items["test"]} & {r["query"] for r in items["train"]}
    assert items["usable"] == 600


def test_screen_task_yamls_load_in_lm_eval(tmp_path):
    from seft.eval_tasks import include_paths, task_manager

    _fake_task(tmp_path / "bb", "toy", 600)
    items = screen.screen_items(tmp_path / "bb", {"toy": "toy"}, n_test=12, n_train=10)
    folder = tmp_path / "yamls"
    folder.mkdir()
    screen.write_task_yamls(items, folder)
    manager = task_manager(include_paths([str(folder)]))
    task = manager.load_task_or_group(["scr_toy"])["scr_toy"]
    docs = list(task.test_docs())
    assert len(docs) == 12 and docs[0]["query"] == items["toy"]["test"][0]["query"]


def test_learnable_needs_a_gain_over_zero_shot_chance_and_every_constant_answer(tmp_path):
    _fake_task(tmp_path, "toy_a", 600)
    _fake_task(tmp_path, "toy_b", 601)
    items = screen.screen_items(tmp_path, {"a": "toy_a", "b": "toy_b"}, n_test=150, n_train=10)
    rows = tmp_path / "rows.jsonl"
    key = "k"
    for task, base, tuned in (("a", 0.30, 0.60), ("b", 0.30, 0.36)):  # chance 1/3: b's gain is inside 2 SE
        screen.append_row({"key": key, "base_key": screen.base_key(items[task], 150), "phase": "base", "task": task,
                           "acc": base, "acc_norm": base, "n": 150}, rows)
        screen.append_row({"key": key, "phase": "tuned", "task": task, "acc": tuned, "acc_norm": tuned, "n": 150},
                          rows)
    args = argparse.Namespace(steps=1, batch=1, lr=1e-3, seed=0, train_items=10, test_items=150)
    table = {line.split(" | ")[0].strip("| "): line for line in screen.report(args, items, key, rows).splitlines()
             if line.startswith("| a ") or line.startswith("| b ")}
    assert table["a"].endswith("**yes** |") and table["b"].endswith("no |")


def test_zero_shot_rows_are_reused_by_a_later_screen_but_tuned_rows_are_not(tmp_path):
    """A 0-shot score depends on the task's items only: another candidate set (a new key) finds it; a tuned score
    depends on everything trained together, so it is the configuration's own."""
    _fake_task(tmp_path, "toy_a", 600)
    _fake_task(tmp_path, "toy_b", 601)
    first = screen.screen_items(tmp_path, {"a": "toy_a"}, n_test=150, n_train=10)
    rows = [{"key": "k1", "base_key": screen.base_key(first["a"], 150), "phase": "base", "task": "a", "acc": 0.3},
            {"key": "k1", "phase": "tuned", "task": "a", "acc": 0.6}]
    later = screen.screen_items(tmp_path, {"renamed": "toy_a", "b": "toy_b"}, n_test=150, n_train=10)
    found = screen.phase_rows(rows, later, "k2")
    assert found == {("base", "renamed"): rows[0]}
    fewer = screen.screen_items(tmp_path, {"a": "toy_a"}, n_test=100, n_train=10)  # other test items: not reused
    assert screen.phase_rows(rows, fewer, "k1") == {("tuned", "a"): rows[1]}
