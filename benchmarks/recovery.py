"""Repair benchmark: SEFT vs its ablations and baselines on pruned SmolLM2-135M.

    python benchmarks/recovery.py                       # full grid (see --help), ~1 h on 2 CPU cores
    python benchmarks/recovery.py --settings wanda70 --seeds 0 --steps 10   # a quick look

For every pruning setting (Wanda 50% / 70%, SparseGPT 50%, Wanda 2:4) the
pruned checkpoint is made once (wiki calibration, seed 0). Then every repair
method trains with the same data (`wiki` train blocks), the same number of
steps, batch, schedule and trainable budget (a LoRA r=8's parameter count),
each in its own subprocess so peak memory is per run. Each run is judged on
held-out `wiki` and `news` perplexity (SparseGPT protocol, seq_len 256) and
on the offline BIG-bench tasks of eval/offline.yaml; step time, peak RSS,
adapter size and final sparsity are recorded. Seeds change the training data
order and SEFT's initial slots; the pruned checkpoint is shared.

Learning rates come from one small search per method family on the first
setting and seed (`--lr-search`), judged on held-out wiki perplexity; news
perplexity and the tasks were not used to pick them.

Writes benchmarks/results/recovery.md (+ recovery.json, recovery.png), or NAME.* with --name.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "out" / "bench-recovery"

SETTINGS = {
    "wanda50": dict(method="wanda", sparsity=0.5, pattern="unstructured"),
    "wanda70": dict(method="wanda", sparsity=0.7, pattern="unstructured"),
    "sparsegpt50": dict(method="sparsegpt", sparsity=0.5, pattern="unstructured"),
    "wanda2of4": dict(method="wanda", sparsity=None, pattern="2:4"),
}
METHODS = ["seft", "seft-norevive", "static", "masked-lora", "lora-reprune", "full-masked"]
# SEFT configurations that are not finetune methods of their own: name -> (method, SeftConfig overrides)
VARIANTS = {"seft-normalized": ("seft", {"growth": "normalized"})}
LR_GRID = {"adapter": [1e-3, 3e-3], "full-masked": [3e-5, 1e-4]}  # the last is the default without --lr-search


def family(method: str) -> str:
    return "full-masked" if method == "full-masked" else "adapter"


def prune_setting(name: str, args) -> Path:
    """The pruned checkpoint of `name` (made once, reused across runs of the benchmark)."""
    from seft.prune import PruneConfig, prune_checkpoint

    out = WORK / f"pruned-{name}-calib{args.calib_samples}"
    if not (out / "config.json").exists():
        cfg = PruneConfig(calibration="wiki", num_samples=args.calib_samples, seq_len=256, seed=0,
                          **SETTINGS[name]).validate()
        prune_checkpoint("smollm2-135m", out, cfg, overwrite=True, progress=False)
    return out


def one_run(spec: dict) -> dict:
    """Train + merge + evaluate one (setting, method, seed, lr); runs inside a subprocess."""
    from seft.eval_tasks import PerplexitySpec, Suite, load_suite
    from seft.evaluate import evaluate
    from seft.finetune import job_from_recipe, run_finetune

    out = Path(spec["output"])
    method, overrides = VARIANTS.get(spec["method"], (spec["method"], {}))
    recipe = {
        "model": spec["model"], "output": str(out), "overwrite": True,
        "finetune": {"data": "wiki", "method": method, "seq_len": spec["seq_len"], "merge": True,
                     "eval_data": None, "calibration": "wiki", "calibration_samples": spec["calib_samples"],
                     "calibration_seq_len": 256},
        "adapter": {"lora_rank": 8, "update_interval": spec["update_interval"], "stat_window": spec["stat_window"],
                    "seed": spec["seed"], **overrides},
        "train": {"max_steps": spec["steps"], "per_device_train_batch_size": spec["batch"],
                  "learning_rate": spec["lr"], "seed": spec["seed"], "data_seed": spec["seed"],
                  "warmup_steps": max(1, spec["steps"] // 10), "logging_steps": 5, "save_strategy": "no",
                  "disable_tqdm": True},
    }
    report = run_finetune(job_from_recipe(recipe), progress=False)
    offline = load_suite(str(ROOT / "eval" / "offline.yaml"))
    suite = Suite(name="recovery", tasks=offline.tasks if spec["tasks"] else [], path=offline.path,
                  max_length=offline.max_length, num_fewshot=0,
                  perplexity=[PerplexitySpec(src, 256, "heldout", spec["eval_windows"]) for src in ("wiki", "news")])
    ev = evaluate(str(out / "merged"), suite=suite, limit=spec["task_limit"], batch_size=8, device="cpu")
    ppl = {p["source"]: p["perplexity"] for p in ev["perplexity"]}
    accs = {t: m.get("acc,none") for t, m in ((ev.get("lm_eval") or {}).get("results") or {}).items()}
    return {
        **{k: spec[k] for k in ("setting", "method", "seed", "lr")},
        "wiki_ppl": ppl["wiki"], "news_ppl": ppl["news"],
        "task_acc": statistics.mean(v for v in accs.values() if v is not None) if accs else None, "tasks": accs,
        "s_per_step": report["seconds_per_step"], "peak_rss_gib": report["memory"]["peak_rss_gib"],
        "adapter_mib": (report["adapter_bytes"] or 0) / 2**20, "trainable": report["trainable_params"],
        "sparsity": report["sparsity_after_merge"]["mean"], "sparsity_preserved": report["sparsity_preserved"],
        "topology": report["topology_updates"], "train_loss": report["train_loss"],
    }


def launch(spec: dict) -> dict:
    """Run `one_run` in a fresh interpreter (clean peak-memory numbers, no state leaks)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"run {spec['setting']}/{spec['method']}/seed{spec['seed']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def base_row(setting: str, model: Path | str, args, tasks: bool) -> dict:
    """The pruned model itself (no repair) on the same evaluation."""
    from seft.eval_tasks import PerplexitySpec, Suite, load_suite
    from seft.evaluate import evaluate

    offline = load_suite(str(ROOT / "eval" / "offline.yaml"))
    suite = Suite(name="recovery", tasks=offline.tasks if tasks else [], path=offline.path,
                  max_length=offline.max_length, num_fewshot=0,
                  perplexity=[PerplexitySpec(src, 256, "heldout", args.eval_windows) for src in ("wiki", "news")])
    ev = evaluate(str(model), suite=suite, limit=args.task_limit, batch_size=8, device="cpu")
    ppl = {p["source"]: p["perplexity"] for p in ev["perplexity"]}
    accs = [m.get("acc,none") for m in ((ev.get("lm_eval") or {}).get("results") or {}).values()]
    return {"setting": setting, "method": "(no repair)" if setting != "dense" else "(dense)", "seed": 0,
            "wiki_ppl": ppl["wiki"], "news_ppl": ppl["news"],
            "task_acc": statistics.mean(a for a in accs if a is not None) if accs else None}


def mean_spread(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_table(runs: list[dict], bases: list[dict], lrs: dict, args, seconds: float) -> str:
    lines = [
        f"# Repair benchmark (SmolLM2-135M){'' if args.name == 'recovery' else f': {args.name}'}",
        "",
        *([f"**Status:** {args.note}", ""] if args.note else []),
        f"Written by `python benchmarks/recovery.py {' '.join(a for a in sys.argv[1:] if not a.startswith('--note'))}`"
        f" in {seconds / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores. Each method: {args.steps} steps x batch {args.batch} x {args.seq_len} tokens "
        f"of wiki train text, budget = LoRA r=8 parameters, seeds {args.seeds}; pruned checkpoints from "
        f"{args.calib_samples} x 256-token wiki calibration windows. SEFT: update_interval {args.update_interval}, "
        f"stat_window {args.stat_window}, other SeftConfig fields at their defaults.",
        "",
        "Perplexity: held-out split, SparseGPT protocol, seq_len 256, first "
        f"{args.eval_windows} windows (wiki: 10 held-out articles; news: 30 held-out articles). "
        + ("Task acc: mean accuracy over the BIG-bench tasks of eval/offline.yaml"
           + (f" (first {args.task_limit} items each). " if args.task_limit else ". ") if args.tasks else "")
        + "mean ± sample std over seeds. s/step and peak RSS were measured while other jobs shared the 2 cores: "
        "compare them within a row group only; benchmarks/train_speed.py measures speed and memory properly.",
        "",
        (f"Learning rates (searched on {args.settings[0]} seed {args.seeds[0]}, wiki ppl): "
         if args.lr_search else "Learning rates (fixed, no search in this run): ")
        + ", ".join(f"{m} {lr:g}" for m, lr in lrs.items())
        + f". Seeds: {args.seeds} on {args.settings[0]} for {', '.join(args.seed_methods)} (other methods seed "
        f"{args.seeds[0]}), {args.seeds[: args.other_seeds]} on the other settings; "
        + (f"tasks on {args.settings[0]} seed {args.seeds[0]} only" if args.tasks else "no task evaluation in this run")
        + f"; methods on the other settings: {', '.join(args.other_methods)} (CPU time).",
        "",
        "| setting | method | wiki ppl | news ppl | task acc | s/step | peak RSS GiB | adapter MiB | trainable | sparsity after merge |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in bases:
        acc = "n/a" if b["task_acc"] is None else f"{b['task_acc']:.3f}"
        lines.append(f"| {b['setting']} | {b['method']} | {b['wiki_ppl']:.2f} | {b['news_ppl']:.2f} | {acc} | | | | | |")
    for setting in args.settings:
        for method in args.methods:
            rs = [r for r in runs if r["setting"] == setting and r["method"] == method]
            if not rs:
                continue
            acc = [r["task_acc"] for r in rs if r["task_acc"] is not None]
            lines.append(
                f"| {setting} | {method} | {mean_spread([r['wiki_ppl'] for r in rs])} | "
                f"{mean_spread([r['news_ppl'] for r in rs])} | "
                f"{(f'{statistics.mean(acc):.3f}' if acc else 'n/a')} | "
                f"{statistics.median(r['s_per_step'] for r in rs):.2f} | "
                f"{max(r['peak_rss_gib'] for r in rs):.2f} | {rs[0]['adapter_mib']:.2f} | {rs[0]['trainable']:,} | "
                f"{statistics.mean(r['sparsity'] for r in rs):.4f}{'' if all(r['sparsity_preserved'] for r in rs) else ' (changed!)'} |")
    seft_runs = [r for r in runs if r["method"] in ("seft", *VARIANTS) and r["topology"]]
    if seft_runs:
        lines += ["", "SEFT topology per run (sum over updates): replaced / revived / re-pruned slots"]
        for r in seft_runs:
            t = r["topology"]
            lines.append(f"- {r['setting']} {r['method']} seed {r['seed']} lr {r['lr']:g}: {sum(u['seft/replaced'] for u in t):.0f} / "
                         f"{sum(u['seft/revived'] for u in t):.0f} / {sum(u['seft/repruned'] for u in t):.0f} "
                         f"over {len(t)} updates")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], bases: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.settings), figsize=(4.2 * len(args.settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], args.settings):
        names, means, errs = [], [], []
        for b in bases:
            if b["setting"] == setting:
                names.append("pruned"), means.append(b["wiki_ppl"]), errs.append(0)
        for method in args.methods:
            vals = [r["wiki_ppl"] for r in runs if r["setting"] == setting and r["method"] == method]
            if vals:
                names.append(method)
                means.append(statistics.mean(vals))
                errs.append(statistics.stdev(vals) if len(vals) > 1 else 0)
        colors = ["#999999"] + ["#d62728" if n.startswith("seft") else "#1f77b4" for n in names[1:]]
        ax.bar(range(len(names)), means, yerr=errs, color=colors[: len(names)], capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(setting)
        ax.set_ylabel("held-out wiki perplexity (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save(runs: list[dict], bases: list[dict], lrs: dict, args, t0: float, final: bool = False) -> None:
    """Rewrite the table after every run, so an interrupted benchmark still leaves its results."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = write_table(runs, bases, lrs, args, time.perf_counter() - t0)
    if not final:
        table = table.replace("(SmolLM2-135M)", "(SmolLM2-135M) — PARTIAL, still running", 1)
    (RESULTS / f"{args.name}.md").write_text(table)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"runs": runs, "pruned": bases, "lrs": lrs,
                                                       "seconds": time.perf_counter() - t0}, indent=1))
    if final:
        plot(runs, bases, args, RESULTS / f"{args.name}.png")
        print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--settings", default="wanda70,wanda50,sparsegpt50,wanda2of4")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--update-interval", type=int, default=6)
    p.add_argument("--stat-window", type=int, default=2)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=24)
    p.add_argument("--task-limit", type=int, default=40, help="BIG-bench items per task (tasks: first setting only)")
    p.add_argument("--no-tasks", dest="tasks", action="store_false")
    p.add_argument("--other-seeds", type=int, default=1,
                   help="settings after the first run only the first N of --seeds (CPU time); the first runs all")
    p.add_argument("--other-methods", default=None,
                   help="methods run on the settings after the first (default: all of --methods)")
    p.add_argument("--seed-methods", default=None,
                   help="methods that get the extra seeds on the first setting (default: all of --methods)")
    p.add_argument("--resume", action="store_true",
                   help="reuse runs (and pruned-model rows) already in NAME.json instead of re-running them")
    p.add_argument("--table-only", action="store_true",
                   help="rewrite NAME.md/png from NAME.json (same other arguments as the run)")
    p.add_argument("--note", default="", help="a status paragraph to put under the title (e.g. what did not run)")
    p.add_argument("--name", default="recovery",
                   help="results file stem under benchmarks/results/ (e.g. recovery_long for a second grid)")
    p.add_argument("--lr-search", action="store_true", help="pick each method's lr from LR_GRID on the first run")
    args = p.parse_args()
    if args.one:
        print(json.dumps(one_run(json.loads(args.one))))
        return
    args.settings = args.settings.split(",")
    args.methods = args.methods.split(",")
    unknown = [m for m in args.methods if m not in METHODS and m not in VARIANTS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(METHODS + list(VARIANTS))}")
    args.other_methods = args.other_methods.split(",") if args.other_methods else args.methods
    args.seed_methods = args.seed_methods.split(",") if args.seed_methods else args.methods
    args.seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    if args.table_only:
        saved = json.loads((RESULTS / f"{args.name}.json").read_text())
        save(saved["runs"], saved["pruned"], saved["lrs"], args, t0 - saved.get("seconds", 0), final=True)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    saved = json.loads((RESULTS / f"{args.name}.json").read_text()) if args.resume else {"runs": [], "pruned": []}
    pruned = {s: prune_setting(s, args) for s in args.settings}
    old_bases = {b["setting"]: b for b in saved["pruned"]}
    bases = [old_bases.get("dense") or base_row("dense", "smollm2-135m", args, args.tasks)]
    bases += [old_bases.get(s) or base_row(s, pruned[s], args, args.tasks and s == args.settings[0])
              for s in args.settings]
    done = {(r["setting"], r["method"], r["seed"], r["lr"]): r for r in saved["runs"]}

    def launch_or_reuse(run_spec: dict) -> dict:
        key = (run_spec["setting"], run_spec["method"], run_spec["seed"], run_spec["lr"])
        return done[key] if key in done else launch(run_spec)

    print(f"pruned + baselines evaluated in {time.perf_counter() - t0:.0f} s", flush=True)
    prefix = "" if args.name == "recovery" else f"{args.name}-"  # run folders of a second grid kept apart

    def spec(setting, method, seed, lr):
        return dict(setting=setting, method=method, seed=seed, lr=lr, model=str(pruned[setting]),
                    output=str(WORK / f"run-{prefix}{setting}-{method}-s{seed}-lr{lr:g}"), seq_len=args.seq_len,
                    steps=args.steps, batch=args.batch, update_interval=args.update_interval,
                    stat_window=args.stat_window, calib_samples=args.calib_samples,
                    eval_windows=args.eval_windows, task_limit=args.task_limit,
                    tasks=args.tasks and setting == first and seed == seed0)

    runs: list[dict] = []
    lrs: dict[str, float] = {}
    first, seed0 = args.settings[0], args.seeds[0]
    for method in args.methods:
        grid = LR_GRID[family(method)] if args.lr_search else LR_GRID[family(method)][-1:]
        trials = []
        for lr in grid:
            r = launch_or_reuse(spec(first, method, seed0, lr))
            print(f"{first} {method} seed {seed0} lr={lr:g}: wiki {r['wiki_ppl']:.2f} news {r['news_ppl']:.2f} "
                  f"acc {r['task_acc']}", flush=True)
            trials.append(r)
        best = min(trials, key=lambda r: r["wiki_ppl"])
        lrs[method] = best["lr"]
        runs.append(best)
        save(runs, bases, lrs, args, t0)
    for setting in args.settings:
        seeds = args.seeds if setting == first else args.seeds[: args.other_seeds]
        for method in args.methods if setting == first else args.other_methods:
            for seed in seeds:
                if setting == first and (seed == seed0 or method not in args.seed_methods):
                    continue  # seed 0 already ran in the search
                r = launch_or_reuse(spec(setting, method, seed, lrs[method]))
                print(f"{setting} {method} seed {seed}: wiki {r['wiki_ppl']:.2f} news {r['news_ppl']:.2f} "
                      f"acc {r['task_acc']}", flush=True)
                runs.append(r)
                save(runs, bases, lrs, args, t0)
    save(runs, bases, lrs, args, t0, final=True)


if __name__ == "__main__":
    main()
