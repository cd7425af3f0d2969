"""The report of benchmarks/specialist.py: markdown tables, a JSON summary and a plot from its JSON lines.

Kept apart from the runner so the tables can be rebuilt (`specialist.py table`) without touching runs.
Each tuned row of the table is one (setting, method) at its best learning rate -- the highest validation mean
accuracy among its seed-0 runs -- with every seed run at that lr; mean ± sample std over seeds.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

SETTING_ORDER = ["dense", "wanda50", "wanda70"]
METHOD_ORDER = ["none", "lora", "seft", "masked-lora", "lora-reprune", "static"]
LABELS = {"none": "as is", "lora": "+ LoRA (dense ceiling)", "seft": "+ SEFT", "masked-lora": "+ masked LoRA",
          "lora-reprune": "+ LoRA* (re-pruned)", "static": "+ static slots"}
SOURCES = Path(__file__).resolve().parent.parent / "eval" / "specialist" / "SOURCES.json"


def chance() -> dict[str, float]:
    """Each vendored task's chance accuracy (mean of 1 / choices over its test items), in the suite's order,
    from eval/specialist/SOURCES.json: make_splits.py writes it with the split, so it cannot go stale."""
    tasks = json.loads(SOURCES.read_text(encoding="utf-8"))["tasks"]
    return {f"spec_{name}": t["chance"] for name, t in tasks.items()}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(values: list[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _group_key(r: dict) -> tuple:
    """Runs that differ only in lr and seed."""
    return (r["kind"], r["setting"], r["method"], json.dumps(r["adapter"], sort_keys=True), r["steps"], r["batch"],
            r["seq_len"], r["limit"], r["val_limit"], r["calib"])


def selected(rows: list[dict]) -> list[dict]:
    """One entry per (setting, method, training settings): its best lr (validation) and the runs at it."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[_group_key(r)].append(r)
    out = []
    for key, runs in groups.items():
        grid = {r["lr"]: r.get("val_mean_acc") for r in runs if r["seed"] == 0}
        scored = {lr: v for lr, v in grid.items() if v is not None}
        lr = max(scored, key=scored.get) if scored else runs[0]["lr"]
        at = sorted((r for r in runs if r["lr"] == lr), key=lambda r: r["seed"])
        out.append({"key": key, "setting": key[1], "method": key[2], "lr": lr, "runs": at, "grid": grid,
                    "steps": key[4]})
    return sorted(out, key=lambda e: (_order(SETTING_ORDER, e["setting"]), _order(METHOD_ORDER, e["method"]),
                                      str(e["steps"])))


def _order(order: list[str], name: str) -> int:
    return order.index(name) if name in order else len(order)


def summary(rows: list[dict]) -> list[dict]:
    tasks = sorted({t for r in rows for t in r["test"]}, key=lambda t: _order(list(chance()), t))
    out = []
    for e in selected(rows):
        runs = e["runs"]
        entry = {"setting": e["setting"], "method": e["method"], "lr": e["lr"], "steps": e["steps"],
                 "seeds": [r["seed"] for r in runs], "lr_grid_val_mean_acc": e["grid"],
                 "mean_acc": _mean_std([r["mean_acc"] for r in runs]),
                 "mean_acc_norm": _mean_std([r["mean_acc_norm"] for r in runs]),
                 "tasks": {t: _mean_std([r["test"][t]["acc"] for r in runs if t in r["test"]]) for t in tasks},
                 "n_per_task": {t: runs[0]["test"][t]["n"] for t in tasks if t in runs[0]["test"]},
                 "s_per_step": _mean_std([r.get("s_per_step") for r in runs])[0] if runs[0]["kind"] == "tuned" else None,
                 "eval_seconds": sum(runs[0]["eval_seconds"].values()),
                 "sparsity": runs[0].get("sparsity"), "sparsity_preserved": runs[0].get("sparsity_preserved")}
        entry["_runs"] = runs
        out.append(entry)
    return out


def main_table(entries: list[dict]) -> list[str]:
    levels = chance()
    tasks = list(levels)
    head = "| model | lr | seeds | " + " | ".join(t.removeprefix("spec_") for t in tasks) + " | mean acc | mean acc_norm |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(tasks) + "---:|---:|"]
    lines.append("| chance | | | " + " | ".join(f"{levels[t]:.3f}" for t in tasks)
                 + f" | {statistics.mean(levels.values()):.3f} | |")
    for e in entries:
        runs = e["_runs"]
        cells = [_fmt([r["test"][t]["acc"] for r in runs if t in r["test"]]) for t in tasks]
        lr = "" if e["lr"] is None else f"{e['lr']:g}"
        name = f"{e['setting']} {LABELS.get(e['method'], e['method'])}"
        lines.append(f"| {name} | {lr} | {len(runs)} | " + " | ".join(cells)
                     + f" | **{_fmt([r['mean_acc'] for r in runs])}** | {_fmt([r['mean_acc_norm'] for r in runs])} |")
    return lines


def lr_table(entries: list[dict]) -> list[str]:
    tuned = [e for e in entries if e["method"] != "none" and len(e["lr_grid_val_mean_acc"]) > 1]
    lrs = sorted({lr for e in tuned for lr in e["lr_grid_val_mean_acc"]})
    if not tuned:
        return ["(no learning-rate grid yet)"]
    lines = ["| model | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best | interior? |",
             "|---|" + "---:|" * len(lrs) + "---|---|"]
    for e in tuned:
        tried = sorted(e["lr_grid_val_mean_acc"])
        interior = "yes" if tried[0] < e["lr"] < tried[-1] else "no (edge)"
        cells = []
        for lr in lrs:
            v = e["lr_grid_val_mean_acc"].get(lr)
            cells.append("" if v is None else (f"**{v:.3f}**" if lr == e["lr"] else f"{v:.3f}"))
        lines.append(f"| {e['setting']} {LABELS.get(e['method'], e['method'])} | " + " | ".join(cells)
                     + f" | {e['lr']:g} | {interior} |")
    return lines


def timing_lines(rows: list[dict]) -> list[str]:
    tuned = [r for r in rows if r["kind"] == "tuned"]
    lines = []
    if tuned:
        by_method: dict[str, list[float]] = defaultdict(list)
        for r in tuned:
            by_method[r["method"]].append(r["s_per_step"])
        lines.append("Seconds per training step: " + ", ".join(
            f"{m} {statistics.mean(v):.2f}" for m, v in sorted(by_method.items())) + ".")
    per_task: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        for t, s in r["eval_seconds"].items():
            per_task[t].append(s / max(r["test"][t]["n"], 1))
    if per_task:
        lines.append("Eval seconds per test item: " + ", ".join(
            f"{t.removeprefix('spec_')} {statistics.mean(v):.3f}" for t, v in per_task.items()) + ".")
    return lines


def plot(entries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{e['setting']}\n{LABELS.get(e['method'], e['method']).removeprefix('+ ')}" for e in entries]
    means = [e["mean_acc"][0] for e in entries]
    errs = [e["mean_acc"][1] or 0.0 for e in entries]
    colors = [{"dense": "tab:green", "wanda50": "tab:blue", "wanda70": "tab:orange"}.get(e["setting"], "tab:gray")
              for e in entries]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(entries) + 2), 4.2))
    ax.bar(range(len(entries)), means, yerr=errs, color=colors, capsize=3)
    ax.axhline(statistics.mean(chance().values()), color="k", ls="--", lw=1, label="chance (mean of tasks)")
    ax.set_xticks(range(len(entries)), names, fontsize=7)
    ax.set_ylabel(f"mean test accuracy ({len(chance())} BIG-bench tasks)")
    ax.set_title("Specialist benchmark: SmolLM2-135M, pruned and repaired")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], out: Path, note: str = "") -> None:
    """out.md, out.json and out.png from the result rows."""
    if not rows:
        raise SystemExit("no result rows yet")
    entries = summary(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = ["# Specialist benchmark: repair a pruned model for held-out tasks", ""]
    if note:
        md += [note, ""]
    md += [f"Test accuracy (lm-eval `acc`, 0-shot) on the 250-item test splits of {len(chance())} BIG-bench tasks "
           "(eval/specialist.yaml); tuned rows at each method's best lr on the validation items, mean ± std over "
           "seeds. Every repair trains a rank-8 LoRA's parameter count on eval/specialist/train_mix.jsonl.", ""]
    md += main_table(entries) + ["", "## Learning-rate grid (validation mean accuracy, seed 0)", ""]
    md += lr_table(entries) + ["", "## Timing", ""] + timing_lines(rows) + [""]
    steps = sorted({str(e["steps"]) for e in entries if e["steps"] is not None})
    md += [f"Rows: {len(rows)} runs; training steps: {', '.join(steps) or 'n/a'}; test items per task: "
           + ", ".join(sorted({str(n) for e in entries for n in e["n_per_task"].values()})) + "."]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    public = [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries]
    out.with_suffix(".json").write_text(json.dumps(public, indent=1, default=str) + "\n")
    plot(entries, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.md')}, .json, .png")
