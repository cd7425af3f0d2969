"""The powered repair study: SEFT vs masked LoRA, LoRA* and fixed slots on pruned SmolLM2-135M.

    # one block of runs (resumable: finished runs are skipped), two 1-thread runs side by side
    python benchmarks/repair_study.py run --setting wanda70 --methods seft-old,masked-lora \\
        --lrs 1e-3,3e-3,1e-2,3e-2 --seeds 0
    python benchmarks/repair_study.py run --setting wanda70 --methods masked-lora --lrs best --seeds 1,2
    python benchmarks/repair_study.py refs           # dense and pruned models before repair (same protocol)
    python benchmarks/repair_study.py table          # rewrite repair_study.md / .json / .png from the rows

Every run: prune once per setting (wiki calibration, 128 x 256 tokens, seed 0,
shared by all runs of the setting), train with `seft finetune`'s code path
(`run_finetune`, stock Trainer) for `--steps` optimizer steps of `--batch` x
`--seq-len` wiki train tokens (cosine lr, 10% warm-up, AdamW), merge, then score
held-out perplexity (SparseGPT protocol, seq_len 256) on the first 128 windows
of held-out wiki and of the whole news corpus (never trained on: every run
trains on wiki). Budget: a LoRA of rank 8's parameter count for every method.
Seeds change the data order, SEFT's initial slots and LoRA's init.

Each finished run is appended to benchmarks/results/repair_study.jsonl as one
JSON line (so a run can span sessions); `table` rebuilds the report from it.
Runs execute in subprocesses with OMP_NUM_THREADS=1, `--jobs` at a time (2 on
this 2-core machine: two 1-thread runs outpace one 2-thread run here).

Method names (`METHODS`) pin every SeftConfig field they depend on, so a
later change of the library's defaults cannot silently change an old row;
each row records its resolved config, and runs are keyed by a hash of it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ROWS = RESULTS / "repair_study.jsonl"
REFS = RESULTS / "repair_study_refs.json"  # dense and pruned models before repair, same protocol
WORK = ROOT / "out" / "repair-study"

SETTINGS = {
    "wanda70": dict(method="wanda", sparsity=0.7, pattern="unstructured"),
    "wanda50": dict(method="wanda", sparsity=0.5, pattern="unstructured"),
    "sparsegpt50": dict(method="sparsegpt", sparsity=0.5, pattern="unstructured"),
    "wanda2of4": dict(method="wanda", sparsity=None, pattern="2:4"),
}

# The SEFT configuration before this study (the SeftConfig defaults of stop 10), pinned field by field,
# except the schedule, which the study sets for every SEFT variant (15 updates that replace slots in 300 steps).
SCHEDULE = dict(update_interval=15, stat_window=4, evolve_until=0.8)  # updates at 15..225 replace slots (p > 0): 15
# Study options added after the first rows, at the values that change nothing: pinned in OLD, but left out of a
# run's key at these values, so rows run before the options existed keep their keys (and are not run again).
NEUTRAL = dict(drop_values="discard", drop_score="value", slot_lr="plain", slot_lr_power=-1.0, balance="none")
OLD = dict(initial_replace_fraction=0.3, schedule="cosine", revive_fraction=0.1, sensitivity="taylor",
           growth="gradient", regrow_warmup=10, init="random", protect_updates=0, regrow_moments="seeded",
           **SCHEDULE, **NEUTRAL)
# seft-new: no revival, regrown slots protected for one update (the `new-*` variants change it one field at a time)
NEW = dict(OLD, revive_fraction=0.0, protect_updates=1)
# new-combo, the final configuration: seft-new + 10% replaced at the first update + density-aware lr +
# row-balanced swaps (the three single changes that each gained ~1% at seed 0); SeftConfig's defaults since then
COMBO = dict(NEW, initial_replace_fraction=0.1, slot_lr="density", balance="row")

# name -> (seft finetune method, adapter overrides, train overrides)
METHODS: dict[str, tuple[str, dict, dict]] = {
    "masked-lora": ("masked-lora", {}, {}),
    "lora-reprune": ("lora-reprune", {}, {}),
    "static": ("static", dict(OLD), {}),
    "seft-old": ("seft", dict(OLD), {}),
    # the candidate: the single changes that helped at seed 0, lr 3e-3 (abl-norevive, abl-protect), together
    "seft-new": ("seft", dict(NEW), {}),
    # single-change ablations of seft-old (the hypotheses of the study)
    "abl-warmup0": ("seft", dict(OLD, regrow_warmup=0), {}),
    "abl-warmup2": ("seft", dict(OLD, regrow_warmup=2), {}),
    "abl-protect": ("seft", dict(OLD, protect_updates=1), {}),
    "abl-reselect": ("seft", dict(OLD, init="reselect"), {}),
    "abl-normalized": ("seft", dict(OLD, growth="normalized"), {}),
    "abl-norevive": ("seft", dict(OLD, revive_fraction=0.0), {}),
    "abl-revive30": ("seft", dict(OLD, revive_fraction=0.3), {}),
    "abl-window1": ("seft", dict(OLD, stat_window=1), {}),
    "abl-window8": ("seft", dict(OLD, stat_window=8), {}),
    "abl-zero-moments": ("seft", dict(OLD, regrow_moments="zero"), {}),
    "abl-eps1e-6": ("seft", dict(OLD), dict(adam_epsilon=1e-6)),
    "abl-wd0.1": ("seft", dict(OLD), dict(weight_decay=0.1)),
    "abl-interval30": ("seft", dict(OLD, update_interval=30), {}),
    "abl-p0.1": ("seft", dict(OLD, initial_replace_fraction=0.1), {}),
    "static-reselect": ("static", dict(OLD, init="reselect"), {}),
    # single changes to seft-new (stop 20): what a drop does with the learned value, and what it drops
    "new-fold": ("seft", dict(NEW, drop_values="fold"), {}),
    "new-fold-mom": ("seft", dict(NEW, drop_values="fold", drop_score="momentum"), {}),
    "new-chan": ("seft", dict(NEW, slot_lr="channel"), {}),
    "new-chan-norm": ("seft", dict(NEW, slot_lr="channel", growth="normalized"), {}),
    "new-rms": ("seft", dict(NEW, slot_lr="channel", slot_lr_power=1.0), {}),
    "new-density": ("seft", dict(NEW, slot_lr="density"), {}),
    "new-rowbal": ("seft", dict(NEW, balance="row"), {}),
    "new-p0.1": ("seft", dict(NEW, initial_replace_fraction=0.1), {}),
    # the three single changes that each gained ~1% at seed 0 (p0.1, density-aware lr, row balance), together:
    # SeftConfig's defaults since this study
    "new-combo": ("seft", dict(COMBO), {}),
    # does evolution pay once the lr is density-aware? fixed random slots with new-combo's lr rule
    "static-density": ("static", dict(OLD, slot_lr="density"), {}),
    "new-p0.05": ("seft", dict(NEW, initial_replace_fraction=0.05), {}),
    "new-p0.2": ("seft", dict(NEW, initial_replace_fraction=0.2), {}),
    # single changes to new-combo. At Wanda 50% fixed random slots beat it on news by 4% (wiki +0.6%): does
    # less evolution (fewer slots swapped per update, or half the updates) keep what evolution gains at 70%
    # without the out-of-domain cost of slots chosen by wiki gradients?
    "combo-p0.03": ("seft", dict(COMBO, initial_replace_fraction=0.03), {}),
    "combo-interval30": ("seft", dict(COMBO, update_interval=30), {}),
}


def resolved(method: str) -> tuple[str, dict, dict]:
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    return METHODS[method]


def run_key(spec: dict) -> str:
    fields = {k: spec[k] for k in ("setting", "method", "finetune_method", "train", "seed", "lr", "steps", "batch",
                                   "seq_len")}
    fields["adapter"] = {k: v for k, v in spec["adapter"].items() if NEUTRAL.get(k, object()) != v}
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def prune_setting(name: str, calib: int) -> Path:
    """The pruned checkpoint of `name`, made once (wiki calibration, seed 0)."""
    from seft.prune import PruneConfig, prune_checkpoint

    out = WORK / f"pruned-{name}-calib{calib}"
    if not (out / "config.json").exists():
        import torch

        torch.set_num_threads(1)  # the driver prunes while runs may be alive: one thread, as each run has
        cfg = PruneConfig(calibration="wiki", num_samples=calib, seq_len=256, seed=0, **SETTINGS[name]).validate()
        prune_checkpoint("smollm2-135m", out, cfg, overwrite=True, progress=False)
    return out


def held_out(model, tok, windows: int) -> dict[str, float]:
    from seft.perplexity import perplexity

    wiki = perplexity(model, tok, "wiki", 256, split="heldout", max_windows=windows, progress=False)
    news = perplexity(model, tok, "news", 256, split="all", max_windows=windows, progress=False)
    return {"wiki_ppl": wiki.perplexity, "news_ppl": news.perplexity, "wiki_windows": wiki.windows,
            "news_windows": news.windows}


def _spikes(log: list[dict], updates: list[int]) -> dict[str, float | None]:
    """Mean train loss / grad norm over the 3 steps after each update minus the 3 steps before (logged per step)."""
    loss = {e["step"]: e["loss"] for e in log if "loss" in e and "step" in e}
    gnorm = {e["step"]: e["grad_norm"] for e in log if "grad_norm" in e and "step" in e}

    def jump(series):
        vals = []
        for u in updates:
            before = [series[s] for s in range(u - 2, u + 1) if s in series]
            after = [series[s] for s in range(u + 1, u + 4) if s in series]
            if before and after:
                vals.append(statistics.mean(after) - statistics.mean(before))
        return statistics.mean(vals) if vals else None

    return {"loss_jump": jump(loss), "grad_norm_jump": jump(gnorm)}


def one_run(spec: dict) -> dict:
    """Train + merge + evaluate one spec (inside a subprocess)."""
    from seft.finetune import job_from_recipe, run_finetune
    from seft.models import load_model

    out = WORK / "runs" / spec["key"]
    recipe = {
        "model": spec["model"], "output": str(out), "overwrite": True,
        "finetune": {"data": "wiki", "method": spec["finetune_method"], "seq_len": spec["seq_len"], "merge": True,
                     "eval_data": None, "calibration": "wiki", "calibration_samples": spec["calib"],
                     "calibration_seq_len": 256},
        "adapter": {"lora_rank": 8, "seed": spec["seed"], **spec["adapter"]},
        "train": {"max_steps": spec["steps"], "per_device_train_batch_size": spec["batch"], "learning_rate": spec["lr"],
                  "seed": spec["seed"], "data_seed": spec["seed"], "warmup_steps": max(1, spec["steps"] // 10),
                  "lr_scheduler_type": "cosine", "logging_steps": 1, "save_strategy": "no", "disable_tqdm": True,
                  **spec["train"]},
    }
    if spec["finetune_method"] not in ("seft", "seft-norevive", "static"):
        recipe["adapter"] = {"lora_rank": 8}
    t0 = time.perf_counter()
    report = run_finetune(job_from_recipe(recipe), progress=False)
    model, tok = load_model(out / "merged")
    ppl = held_out(model, tok, spec["eval_windows"])
    topo = report["topology_updates"]
    replaced = sum(u.get("seft/replaced", 0) for u in topo)
    young = sum(u.get("seft/dropped_young", 0) for u in topo)
    row = {
        **{k: spec[k] for k in ("key", "setting", "method", "finetune_method", "adapter", "train", "seed", "lr",
                                "steps", "batch", "seq_len")},
        **ppl, "train_loss": report["train_loss"], "s_per_step": report["seconds_per_step"],
        "trainable": report["trainable_params"], "sparsity": report["sparsity_after_merge"]["mean"],
        "sparsity_preserved": report["sparsity_preserved"], "updates": len(topo), "replaced": replaced,
        "revived": sum(u.get("seft/revived", 0) for u in topo), "dropped_young": young,
        "young_share": young / replaced if replaced else None,
        **_spikes(report["log_history"], [u["step"] for u in topo]),
        "loss_curve": [[e["step"], round(e["loss"], 4)] for e in report["log_history"] if "loss" in e][::5],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    shutil.rmtree(out, ignore_errors=True)  # the merged model is ~0.5 GB; the row keeps what the table needs
    return row


def load_rows(path: Path = ROWS) -> list[dict]:
    """The result lines, one per run key (the first if a key was written twice)."""
    if not path.exists():
        return []
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows.setdefault(row["key"], row)
    return list(rows.values())


def best_lr(rows: list[dict], setting: str, method: str, steps: int) -> float | None:
    """The lr with the lowest mean held-out wiki ppl among seed-0 grid runs of (setting, method)."""
    by_lr: dict[float, list[float]] = {}
    for r in rows:
        if r["setting"] == setting and r["method"] == method and r["steps"] == steps and r["seed"] == 0:
            by_lr.setdefault(r["lr"], []).append(r["wiki_ppl"])
    if not by_lr:
        return None
    return min(by_lr, key=lambda lr: statistics.mean(by_lr[lr]))


def append_row(row: dict, path: Path = ROWS) -> None:
    """Append one result line under an exclusive lock (several runs finish side by side)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        fh.write(json.dumps(row) + "\n")
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_UN)


RUNNING = WORK / "running"


def running_keys(folder: Path = RUNNING) -> set[str]:
    """Keys of runs alive right now (a pid file per run in `folder`; files of dead processes are removed)."""
    alive = set()
    for pid_file in folder.glob("*.pid") if folder.is_dir() else []:
        try:
            os.kill(int(pid_file.read_text()), 0)
            alive.add(pid_file.stem)
        except (OSError, ValueError):
            pid_file.unlink(missing_ok=True)
    return alive


def launch(specs: list[dict] | Callable[[], list[dict]], jobs: int, rows_path: Path = ROWS) -> None:
    """Run `specs` so that at most `jobs` runs (of any driver) are alive, one 1-thread subprocess each.

    Each run appends its own result line and keeps a pid file while alive, so a driver can be stopped and
    restarted (with a new queue) without losing or duplicating runs in flight. `specs` may be a function
    returning the current ordered list (the `queue` command re-reads its plan file at every poll).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    current = specs if callable(specs) else (lambda: specs)
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started: dict[str, tuple[dict, float]] = {}
    failed: set[str] = set()  # not retried by this driver
    while True:
        alive = running_keys()
        done = {r["key"] for r in load_rows(rows_path)}
        for key in [k for k in started if k not in alive]:
            spec, t0 = started.pop(key)
            row = next((r for r in load_rows(rows_path) if r["key"] == key), None)
            if row is None:
                failed.add(key)
                print(f"FAILED {spec['method']} seed {spec['seed']} lr {spec['lr']:g}: see {logs / (key + '.log')}",
                      flush=True)
            else:
                print(f"done  {spec['setting']} {spec['method']} seed {spec['seed']} lr {spec['lr']:g}: wiki "
                      f"{row['wiki_ppl']:.2f} news {row['news_ppl']:.2f} ({(time.perf_counter() - t0) / 60:.1f} min)",
                      flush=True)
        pending = [s for s in current() if s["key"] not in done | alive | failed]
        if not pending and not started:
            return
        while pending and len(alive) < jobs:
            spec = pending.pop(0)
            log = open(logs / f"{spec['key']}.log", "w")  # noqa: SIM115 (the child owns it)
            subprocess.Popen([sys.executable, __file__, "one", json.dumps(spec), "--rows", str(rows_path)],
                             stdout=log, stderr=log, text=True, env=env, cwd=ROOT, start_new_session=True)
            log.close()
            started[spec["key"]] = (spec, time.perf_counter())
            alive.add(spec["key"])
            wait_for_pid_file(spec["key"])
            print(f"start {spec['setting']} {spec['method']} seed {spec['seed']} lr {spec['lr']:g}", flush=True)
        time.sleep(10)


def run_and_append(spec: dict, run: Callable[[dict], dict], running: Path, rows_path: Path) -> None:
    """Run one spec in this process and append its row; a pid file marks it alive meanwhile (see `launch`)."""
    running.mkdir(parents=True, exist_ok=True)
    pid_file = running / f"{spec['key']}.pid"
    pid_file.write_text(str(os.getpid()))
    try:
        row = run(spec)
        append_row(row, rows_path)
        print(json.dumps(row))
    finally:
        pid_file.unlink(missing_ok=True)


def wait_for_pid_file(key: str, folder: Path = RUNNING, timeout: float = 60.0) -> None:
    """Until a just-started run has written its pid file (so the next `running_keys` counts it)."""
    t0 = time.perf_counter()
    while not (folder / f"{key}.pid").exists() and time.perf_counter() - t0 < timeout:
        time.sleep(0.5)


def make_specs(args, setting: str, methods: str, lrs: str, seeds: str, rows: list[dict]) -> list[dict]:
    """The run specs of one block (setting x methods x lrs x seeds), finished ones included."""
    model = prune_setting(setting, args.calib)
    specs = []
    for method in methods.split(","):
        finetune_method, adapter, train = resolved(method)
        if lrs == "best":
            lr = best_lr(rows, getattr(args, "lr_from", None) or setting, method, args.steps)
            if lr is None:
                raise SystemExit(f"no seed-0 grid of {method} on {getattr(args, 'lr_from', None) or setting} "
                                 "to take the lr from")
            lr_list = [lr]
        else:
            lr_list = [float(x) for x in lrs.split(",")]
        for lr in lr_list:
            for seed in (int(s) for s in seeds.split(",")):
                spec = dict(setting=setting, method=method, finetune_method=finetune_method, adapter=adapter,
                            train=train, seed=seed, lr=lr, steps=args.steps, batch=args.batch, seq_len=args.seq_len,
                            model=str(model), eval_windows=args.eval_windows, calib=args.calib)
                spec["key"] = run_key(spec)
                specs.append(spec)
    return specs


def cmd_run(args) -> None:
    rows = load_rows(args.rows)
    done = {r["key"] for r in rows}
    specs = [s for s in make_specs(args, args.setting, args.methods, args.lrs, args.seeds, rows)
             if s["key"] not in done]
    print(f"{len(specs)} run(s) to do", flush=True)
    launch(specs, args.jobs, args.rows)


def plan_specs(args) -> list[dict]:
    """The plan file's blocks in file order; a line is `SETTING METHODS LRS SEEDS` (as `run` takes them),
    `#` starts a comment. Re-read at every poll, so lines can be added, reordered or removed while it runs."""
    rows = load_rows(args.rows)
    done = {r["key"] for r in rows}
    specs = []
    for line in args.plan.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 4 or parts[0] not in SETTINGS:
            print(f"skipping plan line {line!r}: want SETTING METHODS LRS SEEDS", flush=True)
            continue
        if parts[2] == "best" and (open_grid := grid_unfinished(specs, done, parts[0], parts[1].split(","))):
            print(f"plan line {line!r} not ready: its seed-0 grid has {open_grid} run(s) to finish", flush=True)
            continue
        try:
            specs += make_specs(args, *parts, rows)
        except SystemExit as exc:  # e.g. `best` before the grid is done: wait for it
            print(f"plan line {line!r} not ready: {exc}", flush=True)
    return specs


def grid_unfinished(specs: list[dict], done: set[str], setting: str, methods: list[str]) -> int:
    """How many of the plan's seed-0 runs of `methods` on `setting` (in `specs`, the earlier lines) are not done.

    A `best` line must wait for all of them: taken from a half-finished grid, the
    lr could be the best of the points run so far, not of the grid."""
    return sum(1 for s in specs if s["setting"] == setting and s["method"] in methods and s["seed"] == 0
               and s["key"] not in done)


def cmd_queue(args) -> None:
    launch(lambda: plan_specs(args), args.jobs, args.rows)


# --- report ---------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def cmd_table(args) -> None:
    # (the report writer lives in repair_study_report.py; this file is about running)
    from repair_study_report import write_report

    refs = json.loads(REFS.read_text()) if REFS.exists() else {}
    write_report(load_rows(args.rows), RESULTS / "repair_study", note=args.note, refs=refs)


def cmd_refs(args) -> None:
    """Score the dense model and each setting's pruned checkpoint, unrepaired, by the runs' protocol: what the
    repair starts from (pruned) and what it aims at (dense). Rewrites REFS; one thread, ~2 min per model."""
    from seft.models import load_model

    refs = json.loads(REFS.read_text()) if REFS.exists() else {}
    for name in args.settings.split(","):
        if name != "dense" and name not in SETTINGS:
            raise SystemExit(f"unknown setting {name!r}; valid: dense, {', '.join(SETTINGS)}")
        model, tok = load_model("smollm2-135m" if name == "dense" else str(prune_setting(name, args.calib)))
        refs[name] = {**held_out(model, tok, args.eval_windows), "calib": None if name == "dense" else args.calib}
        print(f"{name}: wiki {refs[name]['wiki_ppl']:.2f} news {refs[name]['news_ppl']:.2f}", flush=True)
        tmp = REFS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(refs, indent=1, sort_keys=True) + "\n")
        tmp.replace(REFS)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run one block of (method, lr, seed) on one setting; skips finished runs")
    run.add_argument("--setting", choices=sorted(SETTINGS), required=True)
    run.add_argument("--methods", required=True, help=f"comma list of: {', '.join(METHODS)}")
    run.add_argument("--lrs", required=True, help="comma list of learning rates, or 'best' (from the seed-0 grid)")
    run.add_argument("--lr-from", help="with --lrs best: take the lr from this setting's grid")
    run.add_argument("--seeds", default="0")
    run.add_argument("--steps", type=int, default=300)
    run.add_argument("--batch", type=int, default=2)
    run.add_argument("--seq-len", type=int, default=128)
    run.add_argument("--eval-windows", type=int, default=128)
    run.add_argument("--calib", type=int, default=128, help="calibration windows of the pruned checkpoint")
    run.add_argument("--jobs", type=int, default=2)
    run.add_argument("--rows", type=Path, default=ROWS, help="the results file (JSON lines) to append to")
    queue = sub.add_parser("queue", help="run the blocks of a plan file in order, re-reading it at every poll "
                                         "(lines: SETTING METHODS LRS SEEDS); ends when all are done")
    queue.add_argument("plan", type=Path)
    for flag, kind, default in (("--steps", int, 300), ("--batch", int, 2), ("--seq-len", int, 128),
                                ("--eval-windows", int, 128), ("--calib", int, 128), ("--jobs", int, 2)):
        queue.add_argument(flag, type=kind, default=default)
    queue.add_argument("--rows", type=Path, default=ROWS)
    one = sub.add_parser("one", help=argparse.SUPPRESS)
    one.add_argument("spec")
    one.add_argument("--rows", type=Path, default=ROWS)
    table = sub.add_parser("table", help="rewrite repair_study.md/.json/.png from repair_study.jsonl")
    table.add_argument("--note", default="", help="a status paragraph under the title")
    table.add_argument("--rows", type=Path, default=ROWS)
    refs = sub.add_parser("refs", help=f"score the dense and the pruned models before repair into {REFS.name}")
    refs.add_argument("--settings", default="dense," + ",".join(SETTINGS),
                      help="comma list of: dense, " + ", ".join(SETTINGS))
    refs.add_argument("--eval-windows", type=int, default=128)
    refs.add_argument("--calib", type=int, default=128)
    args = p.parse_args()
    if args.cmd == "refs":
        cmd_refs(args)
    elif args.cmd == "one":
        run_and_append(json.loads(args.spec), one_run, RUNNING, args.rows)
    elif args.cmd == "run":
        cmd_run(args)
    elif args.cmd == "queue":
        cmd_queue(args)
    else:
        cmd_table(args)


if __name__ == "__main__":
    main()
