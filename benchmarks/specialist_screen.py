"""Which BIG-bench tasks can SmolLM2-135M learn by fine-tuning? A screen for the specialist benchmark's task set.

The specialist benchmark (benchmarks/specialist.py) is only informative on tasks the model can learn at its
training budget: a task that stays at chance after any fine-tuning cannot rank repair methods. Its first
rows learned one task of five (hyperbaton). This screen asks the question directly, for candidate tasks
from the `bigbench==1.0.0` sdist, before any of them is vendored:

  1. items per task exactly as eval/specialist/make_splits.py builds them (same converter, same seeded
     split): the screen's test items are the first `--test-items` of the task's would-be test split and its
     training items the first `--train-items` of the would-be train split, so a task promoted later keeps
     its screen items on the same sides;
  2. the dense model scored 0-shot by lm-eval (`acc`, local task YAMLs written to a temporary folder with
     the template of eval/tasks/spec_*.yaml);
  3. the dense model + LoRA r=8 (`seft finetune`'s code path, as specialist.py's ceiling row) trained once
     on all candidates' training items shuffled together (prompt -> " answer", loss on the answer only),
     merged, and scored the same way.

A task counts as learnable when the tuned accuracy beats the 0-shot accuracy, chance and the best constant
answer (one answer string, or one choice position, always) by more than two binomial standard errors (of
the tuned accuracy against those fixed bars; of the difference against the measured 0-shot accuracy); a
task the model already solves 0-shot (>= 0.9) is marked saturated. Rows are appended to
benchmarks/results/specialist_screen.jsonl as each task is scored (resumable: a finished (phase, task) is
skipped; the merged model is kept under out/specialist-screen until the table is written). A 0-shot row is
keyed by its task's items alone and reused by any later screen; a tuned row belongs to its configuration
(every candidate trained together, the training settings).

    pip download bigbench==1.0.0 --no-deps --no-binary :all: -d /tmp/bb
    tar -xzf /tmp/bb/bigbench-1.0.0.tar.gz -C /tmp/bb --wildcards '*/benchmark_tasks/*/task.json' \\
        '*/benchmark_tasks/*/*/task.json'
    OMP_NUM_THREADS=1 python benchmarks/specialist_screen.py /tmp/bb/bigbench-1.0.0/bigbench/benchmark_tasks
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import math
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repair_study import append_row  # noqa: E402 (a locked append of one JSON line)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ROWS = RESULTS / "specialist_screen.jsonl"
WORK = ROOT / "out" / "specialist-screen"
SPLITS = ROOT / "eval" / "specialist" / "make_splits.py"
TEMPLATE = ROOT / "eval" / "tasks" / "spec_navigate.yaml"
LOADERS = ROOT / "eval" / "tasks" / "loaders.py"

# short name -> task folder under bigbench/benchmark_tasks (>= 500 multiple-choice items each)
CANDIDATES = {
    "intent": "intent_recognition",
    "unit_ident": "unit_conversion/unit_identification",
    "bbq_race": "bbq_lite_json/race_ethnicity_disambig",
    "addition2": "arithmetic/2_digit_addition",
    "color_hex": "color/hex",
    "social_iqa": "social_iqa",
    "fallacy": "logical_fallacy_detection",
    "fever": "fact_checker/fever",
}


@functools.lru_cache(maxsize=1)
def make_splits():
    """eval/specialist/make_splits.py as a module (loaded once): its `items` and `split` define the benchmark's
    splits, `training_row` and `write_jsonl` its files."""
    spec = importlib.util.spec_from_file_location("make_splits", SPLITS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def screen_items(root: Path, tasks: dict[str, str], n_test: int, n_train: int) -> dict[str, dict]:
    """Per task: its screen test and train items and where they came from."""
    ms = make_splits()
    out = {}
    for name, folder in tasks.items():
        source = root / folder / "task.json"
        if not source.exists():
            raise SystemExit(f"{source} not found: pass the sdist's bigbench/benchmark_tasks folder")
        rows = ms.items(json.loads(source.read_text(encoding="utf-8")))
        test, train = ms.split(rows)
        out[name] = {"folder": folder, "usable": len(rows), "sha256": ms.sha256(source),
                     "test": test[:n_test], "train": train[:n_train]}
    return out


def write_task_yamls(items: dict[str, dict], folder: Path) -> None:
    """lm-eval task YAMLs (scr_NAME) + their JSONL test items in `folder`, from spec_navigate.yaml's template."""
    template = "\n".join(line for line in TEMPLATE.read_text(encoding="utf-8").splitlines()
                         if not line.startswith("#"))
    shutil.copy(LOADERS, folder / "loaders.py")
    for name, task in items.items():
        make_splits().write_jsonl(folder / f"scr_{name}.jsonl", task["test"])
        text = (template.replace("task: spec_navigate", f"task: scr_{name}")
                .replace("jsonl: spec_navigate.jsonl", f"jsonl: scr_{name}.jsonl")
                .replace("tag: [seft_specialist]", "tag: [seft_specialist_screen]"))
        (folder / f"scr_{name}.yaml").write_text(text + "\n", encoding="utf-8")


def config_key(args, items: dict[str, dict]) -> str:
    blob = {"tasks": {n: t["sha256"] for n, t in items.items()}, "test": args.test_items, "train": args.train_items,
            "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, "seq_len": args.seq_len}
    return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def base_key(task: dict, n_test: int) -> str:
    """The key of a task's 0-shot row: its source and test-item count. The dense model's score on a task does
    not depend on the other candidates or on any training, so a later screen reuses it (a 0-shot eval of a
    long-prompt task costs up to an hour here)."""
    return hashlib.sha1(json.dumps({"source": task["sha256"], "test": n_test}).encode()).hexdigest()[:12]


def phase_rows(rows: list[dict], items: dict[str, dict], key: str) -> dict[tuple[str, str], dict]:
    """(phase, task) -> row: tuned rows of this configuration, base rows of these tasks' items."""
    out = {}
    for name, task in items.items():
        zero_shot = base_key(task, len(task["test"]))
        for r in rows:
            if r["phase"] == "tuned" and r["key"] == key and r["task"] == name:
                out[("tuned", name)] = r
            elif r["phase"] == "base" and r.get("base_key") == zero_shot:
                out[("base", name)] = r
    return out


def load_rows(path: Path) -> list[dict]:
    """Every row (repair_study's `load_rows` keeps one per key; here a key has a row per phase and task)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def score_phase(phase: str, model: str, items: dict[str, dict], include: Path, key: str, rows_path: Path,
                batch_size: int) -> None:
    """Score `model` on every task not yet scored in `phase`; a row per task."""
    from seft.eval_tasks import include_paths, task_manager
    from seft.evaluate import load_for_eval, run_lm_eval

    done = phase_rows(load_rows(rows_path), items, key)
    todo = [n for n in items if (phase, n) not in done]
    if not todo:
        return
    paths = include_paths([str(include)])
    manager = task_manager(paths)
    loaded = load_for_eval(model)
    for name in todo:
        t0 = time.perf_counter()
        res = run_lm_eval(loaded, [f"scr_{name}"], paths, manager, None, batch_size, 0, 512)
        metrics = res["results"][f"scr_{name}"]
        extra = {"base_key": base_key(items[name], len(items[name]["test"]))} if phase == "base" else {}
        append_row({"key": key, **extra, "phase": phase, "task": name, "acc": metrics["acc,none"],
                    "acc_norm": metrics["acc_norm,none"], "n": res["n-samples"][f"scr_{name}"]["effective"],
                    "seconds": round(time.perf_counter() - t0, 1)}, rows_path)
        print(f"{phase} {name}: acc {metrics['acc,none']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)


def train(args, items: dict[str, dict], key: str) -> Path:
    """Dense + LoRA r=8 on every candidate's screen training items, merged; reused if already there."""
    from seft.finetune import job_from_recipe, run_finetune

    out = WORK / f"tuned-{key}"
    merged = out / "merged"
    if (merged / "config.json").exists() and (out / "screen-train.json").exists():
        return merged
    ms = make_splits()
    mix = [ms.training_row(r, n) for n, t in items.items() for r in t["train"]]
    random.Random(args.seed).shuffle(mix)
    data = WORK / f"mix-{key}.jsonl"
    ms.write_jsonl(data, mix)
    recipe = {
        "model": "smollm2-135m", "output": str(out), "overwrite": True,
        "finetune": {"data": str(data), "method": "lora", "seq_len": args.seq_len, "merge": True, "eval_data": None},
        "adapter": {"lora_rank": 8},
        "train": {"max_steps": args.steps, "per_device_train_batch_size": args.batch, "learning_rate": args.lr,
                  "seed": args.seed, "data_seed": args.seed, "warmup_steps": max(1, args.steps // 10),
                  "lr_scheduler_type": "cosine", "logging_steps": 10, "save_strategy": "no", "disable_tqdm": True,
                  "use_cpu": True},
    }
    t0 = time.perf_counter()
    report = run_finetune(job_from_recipe(recipe), progress=False)
    summary = {"train_loss": report["train_loss"], "seconds": round(time.perf_counter() - t0, 1),
               "rows": len(mix), "loss_curve": [[e["step"], round(e["loss"], 4)]
                                                for e in report["log_history"] if "loss" in e]}
    (out / "screen-train.json").write_text(json.dumps(summary, indent=1))
    return merged


SATURATED = 0.9  # a task the model already solves 0-shot has no room to rank repairs


def se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-9) / n)


def report(args, items: dict[str, dict], key: str, rows_path: Path) -> str:
    rows = phase_rows(load_rows(rows_path), items, key)
    train_info = WORK / f"tuned-{key}" / "screen-train.json"
    info = json.loads(train_info.read_text()) if train_info.exists() else {}
    lines = [
        "# Specialist task screen: which BIG-bench tasks SmolLM2-135M learns by fine-tuning", "",
        f"Written by `python benchmarks/specialist_screen.py` (key {key}). Dense SmolLM2-135M 0-shot vs the same "
        f"model + LoRA r=8 trained {args.steps} steps x {args.batch} examples (lr {args.lr:g}, cosine, seed "
        f"{args.seed}) on {args.train_items} training items of every candidate shuffled together, merged; "
        f"lm-eval `acc` on {args.test_items} test items per task (the first of each task's would-be test split; "
        "eval/specialist/make_splits.py's conversion and seed). Learnable: tuned acc above the 0-shot acc, "
        "chance and the best constant answer (`majority`: one answer string or one choice position always) by "
        "more than 2 binomial standard errors (against 0-shot: of the difference); `saturated`: 0-shot already "
        ">= 0.9, no room to rank repairs.", "",
    ]
    if info:
        lines += [f"Training: {info['rows']} rows, final logged loss {info['loss_curve'][-1][1]:.3f}, "
                  f"{info['seconds'] / 60:.1f} min on one thread.", ""]
    lines += ["| task | BIG-bench folder | usable items | choices | chance | majority | 0-shot | tuned | gain | "
              "learnable? |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, task in items.items():
        test = task["test"]
        n = len(test)
        chance = sum(1 / len(r["choices"]) for r in test) / n
        majority = max(Counter(r["choices"][r["gold"]] for r in test).most_common(1)[0][1],  # one answer always
                       Counter(r["gold"] for r in test).most_common(1)[0][1]) / n  # or one position always
        choices = sorted({len(r["choices"]) for r in test})
        base, tuned = rows.get(("base", name)), rows.get(("tuned", name))
        cells = [name, task["folder"], str(task["usable"]), "/".join(map(str, choices)), f"{chance:.3f}",
                 f"{majority:.3f}"]
        cells += [f"{base['acc']:.3f}" if base else "-", f"{tuned['acc']:.3f}" if tuned else "-"]
        if base and tuned:
            # the fixed bars (chance, a constant answer) are exact for these items: one-sample SE; the 0-shot
            # accuracy is itself measured: SE of the difference (unpaired, so conservative)
            fixed = max(majority, chance)
            learned = (tuned["acc"] - fixed > 2 * se(tuned["acc"], n)
                       and tuned["acc"] - base["acc"] > 2 * math.hypot(se(tuned["acc"], n), se(base["acc"], n)))
            verdict = "saturated 0-shot" if base["acc"] >= SATURATED else "**yes**" if learned else "no"
            cells += [f"{tuned['acc'] - base['acc']:+.3f}", verdict]
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tasks_root", type=Path, help="the sdist's bigbench/benchmark_tasks folder")
    p.add_argument("--tasks", default=",".join(CANDIDATES),
                   help=f"comma list of candidates ({', '.join(f'{k}={v}' for k, v in CANDIDATES.items())}) or "
                        "NAME=FOLDER pairs")
    p.add_argument("--test-items", type=int, default=150)
    p.add_argument("--train-items", type=int, default=300)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=320)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--rows", type=Path, default=ROWS)
    p.add_argument("--md", type=Path, default=RESULTS / "specialist_screen.md")
    args = p.parse_args()
    tasks = {}
    for entry in args.tasks.split(","):
        name, _, folder = entry.partition("=")
        if not folder and name not in CANDIDATES:
            raise SystemExit(f"unknown candidate {name!r}; valid: {', '.join(CANDIDATES)}, or NAME=FOLDER")
        tasks[name] = folder or CANDIDATES[name]
    items = screen_items(args.tasks_root, tasks, args.test_items, args.train_items)
    key = config_key(args, items)
    with tempfile.TemporaryDirectory() as tmp:
        write_task_yamls(items, Path(tmp))
        score_phase("base", "smollm2-135m", items, Path(tmp), key, args.rows, args.eval_batch)
        args.md.write_text(report(args, items, key, args.rows))
        merged = train(args, items, key)
        score_phase("tuned", str(merged), items, Path(tmp), key, args.rows, args.eval_batch)
    args.md.write_text(report(args, items, key, args.rows))
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
