"""The specialist benchmark's data and suite: vendored splits, prompt/completion training rows, offline scoring."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from seft.eval_tasks import LOCAL_TASKS_DIR, REPO_EVAL_DIR, load_suite

SPECIALIST = REPO_EVAL_DIR / "specialist"
ROOT = REPO_EVAL_DIR.parent
MANIFEST = json.loads((SPECIALIST / "SOURCES.json").read_text())


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- vendored files ----------------------------------------------------------------------

def test_vendored_files_match_their_recorded_sha256():
    files = [MANIFEST["train_mix"]] + [t[s] for t in MANIFEST["tasks"].values() for s in ("test", "train")]
    for entry in files:
        data = (ROOT / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["file"]
        assert len(data.splitlines()) == entry["items"], entry["file"]
    written = {ROOT / MANIFEST["suite"]["file"]: MANIFEST["suite"]["sha256"]}
    for name, task in MANIFEST["tasks"].items():  # the lm-eval task files make_splits.py writes with the splits
        written |= {LOCAL_TASKS_DIR / f"spec_{name}.yaml": task["test"]["yaml"],
                    LOCAL_TASKS_DIR / f"spec_val_{name}.yaml": task["test"]["val_yaml"]}
    for path, digest in written.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, path
    vendored = {p.name for p in LOCAL_TASKS_DIR.glob("spec_*")}
    assert vendored == {f"spec_{n}.{e}" for n in MANIFEST["tasks"] for e in ("jsonl", "yaml")} | \
        {f"spec_val_{n}.yaml" for n in MANIFEST["tasks"]}, "a specialist file of a task not in SOURCES.json"


def test_splits_are_disjoint_and_the_mix_is_the_train_splits():
    suite = load_suite(REPO_EVAL_DIR / "specialist.yaml")
    assert suite.tasks == [f"spec_{name}" for name in MANIFEST["tasks"]] and 4 <= len(suite.tasks) <= 6
    mix = _rows(SPECIALIST / "train_mix.jsonl")
    for name, entry in MANIFEST["tasks"].items():
        test, train = _rows(LOCAL_TASKS_DIR / f"spec_{name}.jsonl"), _rows(SPECIALIST / "train" / f"{name}.jsonl")
        assert len(test) >= 200 and len(train) >= 200 and entry["usable_items"] >= 500, name
        assert not {r["query"] for r in test} & {r["query"] for r in train}, f"{name}: a test query is trained on"
        assert all(0 <= r["gold"] < len(r["choices"]) <= 5 for r in test + train), name
        mine = sorted((r["prompt"], r["completion"]) for r in mix if r["task"] == name)
        assert mine == sorted((r["query"], " " + r["choices"][r["gold"]]) for r in train), name
    assert len(mix) == MANIFEST["train_mix"]["items"]


# --- training rows: prompt -> completion, loss on the completion only ----------------------

def test_completion_rows_mask_the_prompt_as_lm_eval_scores_it(tmp_path, smollm2_tokenizer_or_tiny):
    """The trained tokens are lm-eval's continuation tokens; no chat template even when the tokenizer has one."""
    from conftest import build_tiny_model
    from lm_eval.models.huggingface import HFLM

    from seft.data import InstructionDataset, is_instruction_source, training_dataset

    tok = smollm2_tokenizer_or_tiny
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in _rows(SPECIALIST / "train_mix.jsonl")[:20]]
    rows[3]["prompt"] += "  "  # trailing spaces move to the completion, as lm-eval moves them
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert is_instruction_source(str(path))
    ds = training_dataset(tok, str(path), seq_len=512)
    assert isinstance(ds, InstructionDataset) and len(ds) == 18  # every 10th row is held out
    lm = HFLM(pretrained=build_tiny_model("llama"), tokenizer=tok, batch_size=1)
    kept = [r for i, r in enumerate(rows) if i % 10 != 9]
    for row, ex in zip(kept, ds, strict=True):
        context, continuation = lm._encode_pair(row["prompt"], row["completion"])
        assert ex["input_ids"] == context + continuation
        assert ex["labels"] == [-100] * len(context) + continuation
        assert tok.decode(continuation).strip() == row["completion"].strip()
    short = training_dataset(tok, str(path), seq_len=8)[0]  # too long: the left is cut, the answer kept
    assert len(short["input_ids"]) == 8 and short["labels"][-1] != -100


def test_rows_need_exactly_one_answer_field(tmp_path, tiny_tokenizer):
    from seft.data import InstructionDataset
    from seft.errors import SeftError

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "completion": " a"}) + "\n"
                    + json.dumps({"prompt": "Q", "completion": " a", "response": "a"}) + "\n")
    with pytest.raises(SeftError, match=r"line 2 needs 'prompt' and exactly one of 'response', 'completion'"):
        InstructionDataset(tiny_tokenizer, str(path), 64)


def test_finetune_takes_the_mix(tmp_path, tiny_tokenizer):
    """`seft finetune --data eval/specialist/train_mix.jsonl` trains on the answers only (2 steps, tiny model)."""
    from conftest import build_tiny_model

    from seft.cli import main

    build_tiny_model("llama", seed=1).save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    rc = main(["finetune", "--model", str(tmp_path / "base"), "--output", str(tmp_path / "o"), "--method", "lora",
               "--data", str(SPECIALIST / "train_mix.jsonl"), "--max-steps", "2", "--seq-len", "256",
               "--batch-size", "2", "--eval-data", "none", "--lora-rank", "2", "--no-progress"])
    report = json.loads((tmp_path / "o" / "train_report.json").read_text())
    assert rc == 0 and report["steps"] == 2 and report["data"].endswith("train_mix.jsonl")
    assert torch.isfinite(torch.tensor(report["train_loss"]))


# --- the suite scores offline ----------------------------------------------------------------

def test_specialist_suite_scores_offline(tmp_path, tiny_tokenizer):
    """`seft eval --suite eval/specialist.yaml --limit 3` on a tiny model: acc and acc_norm for every task."""
    from conftest import build_tiny_model

    from seft.cli import main

    build_tiny_model("llama").save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    out = tmp_path / "r.json"
    rc = main(["eval", "--model", str(tmp_path / "base"), "--suite", str(REPO_EVAL_DIR / "specialist.yaml"),
               "--limit", "3", "--batch-size", "4", "--device", "cpu", "--output", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    results, counts = report["lm_eval"]["results"], report["lm_eval"]["n-samples"]
    suite = load_suite(REPO_EVAL_DIR / "specialist.yaml")
    for task in suite.tasks:
        assert counts[task]["effective"] == 3 and counts[task]["original"] == 250, task
        for metric in ("acc,none", "acc_norm,none"):
            assert min(abs(results[task][metric] - k / 3) for k in range(4)) < 1e-9, (task, metric)


# --- benchmarks/specialist.py: planning, resume, lr choice, report ------------------------------

def _bench():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import specialist

    return specialist


def _args(tmp_path, **kw):
    import argparse

    d = dict(settings="dense", methods="lora", lrs="1e-4,1e-3", seeds="0", steps=10, batch=2, seq_len=64, limit=4,
             val_limit=4, calib=8, device="cpu", eval_batch=4, work=tmp_path / "work", rows=tmp_path / "rows.jsonl")
    return argparse.Namespace(**(d | kw))


def _fake_row(spec: dict, val: float, acc: float) -> dict:
    tasks = {t: {"acc": acc, "acc_norm": acc, "n": 4} for t in _bench().suite_tasks()}
    return {**{k: spec[k] for k in ("key", "kind", "setting", "method", "finetune_method", "adapter", "seed", "lr",
                                    "steps", "batch", "seq_len", "limit", "val_limit", "calib", "task_set")},
            "test": tasks, "mean_acc": acc, "mean_acc_norm": acc, "eval_seconds": {t: 1.0 for t in tasks},
            "val_mean_acc": val if spec["seed"] == 0 else None, "s_per_step": 0.5 if spec["kind"] == "tuned" else None}


def test_benchmark_plan_skips_finished_runs_and_picks_lr_on_validation(tmp_path):
    bench = _bench()
    import repair_study  # on sys.path with the benchmarks
    specs = bench.plan(_args(tmp_path), [])
    assert [(s["kind"], s["method"], s["lr"]) for s in specs] == [("base", "none", None), ("tuned", "lora", 1e-4),
                                                                 ("tuned", "lora", 1e-3)]
    assert specs[0]["model"] == bench.DENSE_MODEL and all(s["val"] for s in specs)
    with pytest.raises(SystemExit, match="unknown method 'sft'"):
        bench.plan(_args(tmp_path, methods="sft"), [])
    assert not [s for s in bench.plan(_args(tmp_path, methods="seft"), []) if s["kind"] == "tuned"]  # repairs: pruned only
    # lr 1e-4 wins on validation although 1e-3 is better on test: the choice never looks at test
    rows = [_fake_row(specs[0], 0.4, 0.4), _fake_row(specs[1], 0.7, 0.5), _fake_row(specs[2], 0.6, 0.9)]
    for row in rows:
        repair_study.append_row(row, tmp_path / "rows.jsonl")  # the locked append specialist.py uses
    loaded = bench.load_rows(tmp_path / "rows.jsonl")
    assert bench.plan(_args(tmp_path), loaded) == []  # everything finished: nothing to redo
    more = bench.plan(_args(tmp_path, lrs="best", seeds="0,1,2"), loaded)
    assert [(s["lr"], s["seed"], s["val"]) for s in more] == [(1e-4, 1, False), (1e-4, 2, False)]
    seeds = [_fake_row(s, 0.0, acc) for s, acc in zip(more, (0.6, 0.7), strict=True)]
    from specialist_report import summary, write_report

    entries = summary(loaded + seeds)
    (lora,) = [e for e in entries if e["method"] == "lora"]
    assert lora["lr"] == 1e-4 and lora["seeds"] == [0, 1, 2]
    assert lora["mean_acc"][0] == pytest.approx(0.6) and lora["mean_acc"][1] == pytest.approx(0.1)
    write_report(loaded + seeds, tmp_path / "out" / "specialist")
    md = (tmp_path / "out" / "specialist.md").read_text()
    assert "| dense + LoRA (dense ceiling) | 0.0001 | 3 |" in md and "0.600 ± 0.100" in md
    assert (tmp_path / "out" / "specialist.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "specialist.json").read_text())[1]["method"] == "lora"


def test_rows_of_another_task_set_are_neither_done_nor_an_lr_grid(tmp_path, monkeypatch):
    """Rebuilding the task set (make_splits.py) starts a new table: the old rows do not count as finished runs,
    and `--lrs best` does not take an lr from a grid scored on other items."""
    bench = _bench()
    specs = bench.plan(_args(tmp_path), [])
    rows = [_fake_row(s, 0.5, 0.5) for s in specs]
    assert bench.plan(_args(tmp_path), rows) == []
    manifest = json.loads(bench.SOURCES.read_text())
    first = next(iter(manifest["tasks"].values()))
    first["train"]["sha256"] = "0" * 64  # a rebuilt train split
    rebuilt = tmp_path / "SOURCES.json"
    rebuilt.write_text(json.dumps(manifest))
    monkeypatch.setattr(bench, "SOURCES", rebuilt)
    assert bench.task_set() != rows[0]["task_set"]
    assert len(bench.plan(_args(tmp_path), rows)) == len(specs)
    with pytest.raises(SystemExit, match="no seed-0 lr grid of lora on dense"):
        bench.plan(_args(tmp_path, lrs="best", seeds="1"), rows)


def test_specialist_seft_is_the_repair_studys_final_configuration():
    """The specialist's `seft` rows run SEFT as the repair study left it (`new-combo`, which set SeftConfig's
    defaults), pinned field by field: not the pre-study defaults, and not whatever the library's defaults become."""
    from seft.tuner.config import SeftConfig

    bench = _bench()
    import repair_study

    _, adapter = bench.METHODS["seft"]
    assert adapter == repair_study.METHODS["new-combo"][1]
    schedule = set(repair_study.SCHEDULE)  # the study's schedule for 300 steps; the benchmark scales it to --steps
    defaults = SeftConfig()
    assert {f: getattr(defaults, f) for f in adapter if f not in schedule} == \
        {f: v for f, v in adapter.items() if f not in schedule}
    assert adapter != repair_study.OLD
