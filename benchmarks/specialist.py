"""The specialist benchmark: prune SmolLM2-135M, fine-tune it for BIG-bench tasks, score the test splits.

    # 1. the learning-rate grid, seed 0 (base rows of every setting come with it)
    python benchmarks/specialist.py run --settings dense,wanda50,wanda70 \\
        --methods seft,masked-lora,lora-reprune,static,lora --lrs 3e-4,1e-3,3e-3 --seeds 0
    # 2. two more seeds at each method's best lr (picked on the validation items, never on test)
    python benchmarks/specialist.py run --settings dense,wanda50,wanda70 \\
        --methods seft,masked-lora,lora-reprune,static,lora --lrs best --seeds 1,2
    python benchmarks/specialist.py table   # benchmarks/results/specialist.md / .json / .png from the rows

Rows (one JSON line each in benchmarks/results/specialist.jsonl, appended as each run ends):
  base   dense SmolLM2-135M, and the model pruned by Wanda to 50% / 70% (wiki calibration, `--calib` x 256
         tokens, seed 0, made once per setting) -- scored as they are;
  tuned  a pruned model repaired by seft, masked-lora, lora-reprune or static, and the dense model tuned by
         plain LoRA (the ceiling): `seft finetune`'s code path (`run_finetune`, stock Trainer) on
         eval/specialist/train_mix.jsonl (prompt -> " answer", loss on the answer only, the 5 tasks' train
         splits shuffled together), `--steps` steps of `--batch` examples, cosine lr with 10% warm-up, merged,
         then scored. Every method trains the parameter count of a rank-8 LoRA.
Scores: lm-eval `acc` / `acc_norm` on the test splits (eval/specialist.yaml, 250 items per task, 0-shot);
seed-0 runs are also scored on the validation items (spec_val_*: train-split items `seft finetune` holds
out), and `--lrs best` / the table take each method's lr from those, never from the test split.
Seeds change the data order, SEFT's initial slots and LoRA's init.

Resumable: a run is keyed by a hash of everything that defines it; finished keys are skipped, each run
appends its own line under a file lock and keeps a pid file while alive, so drivers can be restarted.
Runs (and the pruning) are subprocesses with `--threads` threads (default 1), `--jobs` at a time; the
driver itself imports no torch.
SEFT's settings are pinned field by field: `seft` is the repair study's final configuration
(repair_study's `new-combo`, today's SeftConfig defaults), `static` its fixed-slot baseline, each with the
schedule scaled to `--steps`; a later change of the library's defaults cannot silently change a row.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repair_study import METHODS as STUDY  # noqa: E402 (the study's pinned configurations)
from repair_study import load_rows, run_and_append, running_keys, wait_for_pid_file  # noqa: E402 (locked appends, pid files)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ROWS = RESULTS / "specialist.jsonl"
WORK = ROOT / "out" / "specialist"
SUITE = ROOT / "eval" / "specialist.yaml"
MIX = ROOT / "eval" / "specialist" / "train_mix.jsonl"
SOURCES = ROOT / "eval" / "specialist" / "SOURCES.json"
DENSE_MODEL = "smollm2-135m"

SETTINGS: dict[str, dict | None] = {
    "dense": None,
    "wanda50": dict(method="wanda", sparsity=0.5, pattern="unstructured"),
    "wanda70": dict(method="wanda", sparsity=0.7, pattern="unstructured"),
}
# name -> (seft finetune method, pinned adapter fields)
METHODS: dict[str, tuple[str, dict]] = {
    "seft": ("seft", dict(STUDY["new-combo"][1])),  # the configuration the repair study set as the defaults
    "static": ("static", dict(STUDY["static"][1])),
    "masked-lora": ("masked-lora", {}),
    "lora-reprune": ("lora-reprune", {}),
    "lora": ("lora", {}),  # dense + LoRA: the ceiling, on the dense model only
}
DENSE_ONLY = ("lora",)
RANK = 8


def schedule(steps: int) -> dict:
    """SEFT's topology schedule for `steps`: 20 update intervals (300 steps: the repair study's 15 / 4)."""
    interval = max(1, round(steps / 20))
    return dict(update_interval=interval, stat_window=min(4, interval))


def suite() -> dict:
    """eval/specialist.yaml as plain YAML (the driver imports no seft, hence no torch)."""
    import yaml

    return yaml.safe_load(SUITE.read_text(encoding="utf-8"))


def suite_tasks(val: bool = False) -> list[str]:
    tasks = list(suite()["tasks"])
    return [t.replace("spec_", "spec_val_", 1) for t in tasks] if val else tasks


def task_set() -> str:
    """A short hash of the vendored task set: every test and train split's sha256 and the mixture's.

    Part of every run's key and row, so a rebuilt task set (eval/specialist/make_splits.py) starts a new
    table: rows scored on other items are never mixed in, nor taken as done."""
    manifest = json.loads(SOURCES.read_text(encoding="utf-8"))
    ident = {"mix": manifest["train_mix"]["sha256"],
             "tasks": {n: [t["test"]["sha256"], t["train"]["sha256"]] for n, t in manifest["tasks"].items()}}
    return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]


def run_key(spec: dict) -> str:
    fields = {k: spec[k] for k in ("kind", "setting", "method", "finetune_method", "adapter", "seed", "lr", "steps",
                                   "batch", "seq_len", "limit", "val_limit", "calib", "task_set")}
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def model_for(setting: str, calib: int, work: Path) -> str:
    """The checkpoint of `setting`: the dense alias, or the pruned folder (`prune` makes it)."""
    return DENSE_MODEL if SETTINGS[setting] is None else str(work / f"pruned-{setting}-calib{calib}")


def prune(setting: str, calib: int, work: Path) -> None:
    """Make the pruned checkpoint of `setting` once (Wanda, wiki calibration, `calib` x 256 tokens, seed 0)."""
    from seft.prune import PruneConfig, prune_checkpoint

    out = Path(model_for(setting, calib, work))
    if not (out / "config.json").exists():
        cfg = PruneConfig(calibration="wiki", num_samples=calib, seq_len=256, seed=0, **SETTINGS[setting]).validate()
        prune_checkpoint(DENSE_MODEL, out, cfg, overwrite=True, progress=False)


# --- one run (inside a subprocess) -------------------------------------------------------------


def score(model: str, tasks: list[str], limit: int | None, device: str, batch_size: int) -> dict:
    """lm-eval acc / acc_norm per task of the model at `model`, timed per task (one model load)."""
    from seft.eval_tasks import include_paths, task_manager
    from seft.evaluate import load_for_eval, run_lm_eval

    include = include_paths()
    manager = task_manager(include)
    loaded = load_for_eval(model, device=device)
    max_length = suite().get("max_length")
    out: dict = {"tasks": {}, "seconds": {}}
    for task in tasks:
        t0 = time.perf_counter()
        res = run_lm_eval(loaded, [task], include, manager, limit, batch_size, 0, max_length)
        metrics = res["results"][task]
        out["tasks"][task] = {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"],
                              "n": res["n-samples"][task]["effective"]}
        out["seconds"][task] = round(time.perf_counter() - t0, 2)
    accs = [m["acc"] for m in out["tasks"].values()]
    out["mean_acc"] = sum(accs) / len(accs)
    out["mean_acc_norm"] = sum(m["acc_norm"] for m in out["tasks"].values()) / len(accs)
    return out


def train(spec: dict, out: Path) -> dict:
    from seft.finetune import job_from_recipe, run_finetune

    adapter = {"lora_rank": RANK}
    if spec["finetune_method"] in ("seft", "seft-norevive", "static"):
        adapter |= {"seed": spec["seed"], **spec["adapter"]}
    recipe = {
        "model": spec["model"], "output": str(out), "overwrite": True,
        "finetune": {"data": str(MIX), "method": spec["finetune_method"], "seq_len": spec["seq_len"], "merge": True,
                     "eval_data": None, "calibration": "wiki", "calibration_samples": spec["calib"],
                     "calibration_seq_len": 256},
        "adapter": adapter,
        "train": {"max_steps": spec["steps"], "per_device_train_batch_size": spec["batch"], "learning_rate": spec["lr"],
                  "seed": spec["seed"], "data_seed": spec["seed"], "warmup_steps": max(1, spec["steps"] // 10),
                  "lr_scheduler_type": "cosine", "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True,
                  "use_cpu": spec["device"] == "cpu"},
    }
    return run_finetune(job_from_recipe(recipe), progress=False)


def one_run(spec: dict) -> dict:
    """Train (tuned rows) + score one spec; the merged model is deleted, the row keeps what the table needs."""
    t0 = time.perf_counter()
    row = {k: spec[k] for k in ("key", "kind", "setting", "method", "finetune_method", "adapter", "seed", "lr",
                                "steps", "batch", "seq_len", "limit", "val_limit", "calib", "task_set")}
    model, out = spec["model"], Path(spec["work"]) / "runs" / spec["key"]
    if spec["kind"] == "tuned":
        report = train(spec, out)
        model = str(out / "merged")
        after = report["sparsity_after_merge"]
        row |= {"train_loss": report["train_loss"], "s_per_step": report["seconds_per_step"],
                "train_seconds": report["train_seconds"], "trainable": report["trainable_params"],
                "sparsity": after["mean"] if after else None, "sparsity_preserved": report["sparsity_preserved"],
                "updates": len(report["topology_updates"]),
                "replaced": sum(u.get("seft/replaced", 0) for u in report["topology_updates"]),
                "loss_curve": [[e["step"], round(e["loss"], 4)] for e in report["log_history"] if "loss" in e][::5]}
    test = score(model, suite_tasks(), spec["limit"], spec["device"], spec["eval_batch"])
    row |= {"test": test["tasks"], "mean_acc": test["mean_acc"], "mean_acc_norm": test["mean_acc_norm"],
            "eval_seconds": test["seconds"]}
    if spec["val"]:
        val = score(model, suite_tasks(val=True), spec["val_limit"], spec["device"], spec["eval_batch"])
        row |= {"val": val["tasks"], "val_mean_acc": val["mean_acc"], "val_eval_seconds": val["seconds"]}
    shutil.rmtree(out, ignore_errors=True)  # a merged model is ~0.5 GB
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# --- driver ------------------------------------------------------------------------------------


def child_env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def launch(specs: list[dict], jobs: int, rows: Path, work: Path, threads: int) -> None:
    """Run `specs`, at most `jobs` alive (of any driver on `work`), each a `threads`-thread subprocess."""
    env = child_env(threads)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pending, started = list(specs), {}
    while pending or started:
        alive = running_keys(work / "running")
        done = {r["key"]: r for r in load_rows(rows)}
        pending = [s for s in pending if s["key"] not in done and s["key"] not in alive]
        for key in [k for k in started if k not in alive]:
            spec, t0 = started.pop(key)
            what = f"{spec['setting']} {spec['method']} seed {spec['seed']} lr {spec['lr']}"
            row = done.get(key)
            print(f"done  {what}: mean acc {row['mean_acc']:.3f} ({(time.perf_counter() - t0) / 60:.1f} min)"
                  if row else f"FAILED {what}: see {logs / (key + '.log')}", flush=True)
        while pending and len(alive) < jobs:
            spec = pending.pop(0)
            with open(logs / f"{spec['key']}.log", "w") as log:
                subprocess.Popen([sys.executable, __file__, "one", json.dumps(spec), "--rows", str(rows)],
                                 stdout=log, stderr=log, text=True, env=env, cwd=ROOT, start_new_session=True)
            started[spec["key"]] = (spec, time.perf_counter())
            alive.add(spec["key"])
            wait_for_pid_file(spec["key"], work / "running")
            print(f"start {spec['setting']} {spec['method']} seed {spec['seed']} lr {spec['lr']}", flush=True)
        if pending or started:
            time.sleep(5)


def best_lr(rows: list[dict], spec: dict) -> float | None:
    """The lr with the highest validation mean accuracy among seed-0 runs like `spec` (same steps, batch...)."""
    same = ("kind", "setting", "method", "finetune_method", "adapter", "steps", "batch", "seq_len", "limit",
            "val_limit", "calib", "task_set")
    grid = {r["lr"]: r["val_mean_acc"] for r in rows
            if r["seed"] == 0 and r.get("val_mean_acc") is not None and all(r.get(k) == spec[k] for k in same)}
    return max(grid, key=grid.get) if grid else None


def plan(args, rows: list[dict]) -> list[dict]:
    """The specs `args` ask for that are not finished yet (base rows of every setting included)."""
    work = args.work.resolve()
    specs = []
    common = dict(steps=args.steps, batch=args.batch, seq_len=args.seq_len, limit=args.limit,
                  val_limit=args.val_limit, calib=args.calib, device=args.device, eval_batch=args.eval_batch,
                  work=str(work), task_set=task_set())
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; valid: {', '.join(METHODS)}")
    for setting in args.settings.split(","):
        if setting not in SETTINGS:
            raise SystemExit(f"unknown setting {setting!r}; valid: {', '.join(SETTINGS)}")
        model = model_for(setting, args.calib, work)
        base = dict(kind="base", setting=setting, method="none", finetune_method=None, adapter={}, seed=0, lr=None,
                    model=model, val=True, **common)
        base |= dict(steps=None, batch=None, seq_len=None)  # a base row does not depend on training settings
        specs.append(base)
        for method in methods:
            if (method in DENSE_ONLY) != (SETTINGS[setting] is None):
                continue  # lora on the dense model only; the repairs on pruned models only
            finetune_method, adapter = METHODS[method]
            if finetune_method in ("seft", "static"):
                adapter = {**adapter, **schedule(args.steps)}
            for seed in (int(s) for s in args.seeds.split(",")):
                spec = dict(kind="tuned", setting=setting, method=method, finetune_method=finetune_method,
                            adapter=adapter, seed=seed, model=model, val=seed == 0, **common)
                if args.lrs == "best":
                    lr = best_lr(rows, {**spec, "lr": None})
                    if lr is None:
                        raise SystemExit(f"no seed-0 lr grid of {method} on {setting} with these settings")
                    lrs = [lr]
                else:
                    lrs = [float(x) for x in args.lrs.split(",")]
                specs += [{**spec, "lr": lr} for lr in lrs]
    for spec in specs:
        spec["key"] = run_key(spec)
    done = {r["key"] for r in rows}
    return [s for s in dict((s["key"], s) for s in specs).values() if s["key"] not in done]


def cmd_run(args) -> None:
    """Plan, prune what the plan needs (one subprocess per setting), then launch the runs."""
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be at least 1, got {args.jobs}")
    specs = plan(args, load_rows(args.rows))
    print(f"{len(specs)} run(s) to do", flush=True)
    if args.dry_run:
        for s in specs:
            print(f"  {s['kind']:5} {s['setting']:8} {s['method']:12} lr {s['lr']} seed {s['seed']} val {s['val']}")
        return
    work = args.work.resolve()
    for setting in dict.fromkeys(s["setting"] for s in specs):
        if SETTINGS[setting] is not None and not (Path(model_for(setting, args.calib, work)) / "config.json").exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, __file__, "prune", setting, "--calib", str(args.calib), "--work", str(work)],
                           env=child_env(args.threads), cwd=ROOT, check=True)
            print(f"pruned {setting} ({time.perf_counter() - t0:.0f} s)", flush=True)
    launch(specs, args.jobs, args.rows, work, args.threads)


def cmd_one(args) -> None:
    spec = json.loads(args.spec)
    run_and_append(spec, one_run, Path(spec["work"]) / "running", args.rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="base rows + tuned runs for settings x methods x lrs x seeds; skips finished")
    run.add_argument("--settings", default="dense,wanda50,wanda70", help=f"comma list of: {', '.join(SETTINGS)}")
    run.add_argument("--methods", default="seft,masked-lora,lora-reprune,static,lora",
                     help=f"comma list of: {', '.join(METHODS)} (lora: dense only; the rest: pruned only); "
                          "empty: base rows only")
    run.add_argument("--lrs", default="3e-4,1e-3,3e-3", help="comma list, or 'best' (from the seed-0 validation grid)")
    run.add_argument("--seeds", default="0")
    run.add_argument("--steps", type=int, default=300)
    run.add_argument("--batch", type=int, default=8)
    run.add_argument("--seq-len", type=int, default=256, help="training tokens per example (the longest mix row: 212)")
    run.add_argument("--limit", type=int, default=None, help="test items per task (default: all 250)")
    run.add_argument("--val-limit", type=int, default=None, help="validation items per task (default: all)")
    run.add_argument("--calib", type=int, default=128, help="Wanda calibration windows (x 256 tokens, wiki)")
    run.add_argument("--device", default="cpu")
    run.add_argument("--eval-batch", type=int, default=8)
    run.add_argument("--threads", type=int, default=1)
    run.add_argument("--jobs", type=int, default=1)
    run.add_argument("--dry-run", action="store_true", help="list the runs still to do, run nothing")
    run.add_argument("--rows", type=Path, default=ROWS, help="the results file (JSON lines) to append to")
    run.add_argument("--work", type=Path, default=WORK, help="pruned models, run folders, logs, pid files")
    pr = sub.add_parser("prune", help=argparse.SUPPRESS)
    pr.add_argument("setting", choices=[s for s in SETTINGS if SETTINGS[s]])
    pr.add_argument("--calib", type=int, default=128)
    pr.add_argument("--work", type=Path, default=WORK)
    one = sub.add_parser("one", help=argparse.SUPPRESS)
    one.add_argument("spec")
    one.add_argument("--rows", type=Path, default=ROWS)
    table = sub.add_parser("table", help="write specialist.md / .json / .png from the rows")
    table.add_argument("--rows", type=Path, default=ROWS)
    table.add_argument("--out", type=Path, default=RESULTS / "specialist", help="output path without suffix")
    table.add_argument("--note", default="", help="a status paragraph under the title")
    args = p.parse_args()
    if args.cmd == "run":
        cmd_run(args)
    elif args.cmd == "prune":
        prune(args.setting, args.calib, args.work.resolve())
    elif args.cmd == "one":
        cmd_one(args)
    else:
        from specialist_report import write_report

        current = task_set()
        rows = load_rows(args.rows)
        mine = [r for r in rows if r.get("task_set") == current]
        if len(mine) < len(rows):
            print(f"{len(rows) - len(mine)} row(s) of another task set left out (this set: {current})")
        write_report(mine, args.out, note=args.note)


if __name__ == "__main__":
    main()
