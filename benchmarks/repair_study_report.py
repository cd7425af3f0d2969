"""The report of benchmarks/repair_study.py: markdown tables, a JSON summary and a plot from its JSON lines.

Kept apart from the runner so the tables can be rebuilt (`repair_study.py table`) without touching runs.
"""
from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

# the final configuration (SeftConfig's defaults since this study): seft-new + p0 0.1 + density lr + row balance
FINAL = "new-combo"
HEADLINE = [FINAL, "seft-old", "static", "masked-lora", "lora-reprune", "seft-new"]
SETTING_ORDER = ["wanda70", "wanda50", "sparsegpt50", "wanda2of4"]


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), None
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(values: list[float]) -> str:
    mean, std = _mean_std(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _grid(rows: list[dict]) -> dict[tuple[str, str], dict[float, dict]]:
    """{(setting, method): {lr: seed-0 row}} — the learning-rate search."""
    grid: dict[tuple[str, str], dict[float, dict]] = defaultdict(dict)
    for r in rows:
        if r["seed"] == 0:
            grid[(r["setting"], r["method"])][r["lr"]] = r
    return grid


def best_lrs(rows: list[dict]) -> dict[tuple[str, str], float]:
    return {key: min(by_lr, key=lambda lr: by_lr[lr]["wiki_ppl"]) for key, by_lr in _grid(rows).items()}


def _at_best(rows: list[dict], setting: str, method: str, lr: float) -> list[dict]:
    return [r for r in rows if r["setting"] == setting and r["method"] == method and r["lr"] == lr]


def lr_table(rows: list[dict]) -> list[str]:
    """Seed-0 grid, wiki / news per cell. The best lr is chosen on wiki (the training corpus's held-out text);
    news is shown beside it because a near-tie on wiki can hide a large difference out of domain."""
    grid = _grid(rows)
    lrs = sorted({lr for by_lr in grid.values() for lr in by_lr})
    lines = ["| setting | method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best (wiki) | interior? "
             "| best on news |",
             "|---|---|" + "---:|" * len(lrs) + "---|---|---|"]
    for (setting, method), by_lr in sorted(grid.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1])):
        if len(by_lr) < 2:
            continue
        best = min(by_lr, key=lambda lr: by_lr[lr]["wiki_ppl"])
        best_news = min(by_lr, key=lambda lr: by_lr[lr]["news_ppl"])
        tried = sorted(by_lr)
        interior = "yes" if tried[0] < best < tried[-1] else "no (edge)"
        cells = []
        for lr in lrs:
            if lr not in by_lr:
                cells.append("")
                continue
            cell = f"{by_lr[lr]['wiki_ppl']:.1f} / {by_lr[lr]['news_ppl']:.1f}"
            cells.append(f"**{cell}**" if lr == best else cell)
        picked, other = by_lr[best], by_lr[best_news]
        news_note = "same" if best_news == best else (
            f"{best_news:g} ({other['news_ppl'] / picked['news_ppl'] - 1:+.1%} news, "
            f"{other['wiki_ppl'] / picked['wiki_ppl'] - 1:+.1%} wiki)")
        lines.append(f"| {setting} | {method} | " + " | ".join(cells) + f" | {best:g} | {interior} | {news_note} |")
    return lines


def _order(setting: str) -> int:
    return SETTING_ORDER.index(setting) if setting in SETTING_ORDER else 99


def main_table(rows: list[dict], methods: list[str]) -> tuple[list[str], list[dict]]:
    best = best_lrs(rows)
    lines = ["| setting | method | lr | seeds | wiki ppl | news ppl | sparsity after merge | s/step |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    summary = []
    for setting in sorted({r["setting"] for r in rows}, key=_order):
        for method in methods:
            lr = best.get((setting, method))
            if lr is None:
                continue
            rs = _at_best(rows, setting, method, lr)
            preserved = all(r["sparsity_preserved"] for r in rs)
            lines.append(f"| {setting} | {method} | {lr:g} | {len(rs)} | {_fmt([r['wiki_ppl'] for r in rs])} | "
                         f"{_fmt([r['news_ppl'] for r in rs])} | {statistics.mean(r['sparsity'] for r in rs):.4f}"
                         f"{'' if preserved else ' (changed!)'} | {statistics.median(r['s_per_step'] for r in rs):.2f} |")
            wiki, wiki_sd = _mean_std([r["wiki_ppl"] for r in rs])
            news, news_sd = _mean_std([r["news_ppl"] for r in rs])
            summary.append(dict(setting=setting, method=method, lr=lr, seeds=sorted(r["seed"] for r in rs),
                                wiki=wiki, wiki_std=wiki_sd, news=news, news_std=news_sd))
    return lines, summary


def verdict(summary: list[dict], seft: str = FINAL, rival: str = "masked-lora") -> list[str]:
    """Where one method (`seft`) stands against another: the gap, and whether it exceeds the seed spread."""
    lines = [f"| setting | corpus | {seft} | {rival} | {seft} vs {rival} | beyond the seed spread? |",
             "|---|---|---:|---:|---:|---|"]
    by = {(s["setting"], s["method"]): s for s in summary}
    for setting in sorted({s["setting"] for s in summary}, key=_order):
        a, b = by.get((setting, seft)), by.get((setting, rival))
        if not a or not b:
            continue
        for corpus in ("wiki", "news"):
            gap = a[corpus] / b[corpus] - 1
            spread = max(a[f"{corpus}_std"] or 0, b[f"{corpus}_std"] or 0)
            beyond = abs(a[corpus] - b[corpus]) > spread if (a[f"{corpus}_std"] and b[f"{corpus}_std"]) else None
            word = "n/a (1 seed)" if beyond is None else ("yes" if beyond else "no")
            lines.append(f"| {setting} | {corpus} | {a[corpus]:.2f} | {b[corpus]:.2f} | {gap:+.1%} | {word} |")
    return lines


def _is_variant_of(method: str, reference: str) -> bool:
    """Ablation rows: `abl-*` (and seft-new, static) change seft-old; `new-*` change seft-new; `combo-*` (and
    static: no evolution at all) change new-combo, the final configuration."""
    if reference == "seft-new":
        return method.startswith("new-")
    if reference == FINAL:
        return method.startswith("combo-") or method == "static"
    return method.startswith("abl-") or method in ("seft-new", "static", "static-reselect", "static-density")


def ablation_table(rows: list[dict], reference: str = "seft-old") -> list[str]:
    """Single-change variants of `reference` on each setting, at its best lr, every seed run."""
    best = best_lrs(rows)
    lines = [f"| setting | variant | lr | seeds | wiki ppl | Δ wiki vs {reference} | news ppl | updates | replaced | "
             "dropped young (share) | revived | loss jump after update | grad-norm jump |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for setting in sorted({r["setting"] for r in rows}, key=_order):
        lr = best.get((setting, reference))
        if lr is None:
            continue
        ref_by_seed = {r["seed"]: r["wiki_ppl"] for r in _at_best(rows, setting, reference, lr)}
        variants = [reference] + sorted({r["method"] for r in rows if r["setting"] == setting and
                                         _is_variant_of(r["method"], reference)})
        for method in variants:
            rs = [r for r in rows if r["setting"] == setting and r["method"] == method and r["lr"] == lr]
            if not rs:
                continue
            paired = [r["wiki_ppl"] / ref_by_seed[r["seed"]] - 1 for r in rs if r["seed"] in ref_by_seed]
            young = [r["young_share"] for r in rs if r.get("young_share") is not None]
            jumps = [r["loss_jump"] for r in rs if r.get("loss_jump") is not None]
            gjumps = [r["grad_norm_jump"] for r in rs if r.get("grad_norm_jump") is not None]
            churn = (f"{statistics.mean(r['dropped_young'] for r in rs):,.0f} ({statistics.mean(young):.1%})"
                     if young else "-")
            cells = [setting, method, f"{lr:g}", str(len(rs)), _fmt([r["wiki_ppl"] for r in rs]),
                     f"{statistics.mean(paired):+.1%}" if paired else "-", _fmt([r["news_ppl"] for r in rs]),
                     f"{statistics.mean(r['updates'] for r in rs):.0f}",
                     f"{statistics.mean(r['replaced'] for r in rs):,.0f}", churn,
                     f"{statistics.mean(r['revived'] for r in rs):,.0f}",
                     f"{statistics.mean(jumps):+.3f}" if jumps else "-",
                     f"{statistics.mean(gjumps):+.3f}" if gjumps else "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(rows: list[dict], summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({s["setting"] for s in summary}, key=_order)
    grid = _grid(rows)
    fig, axes = plt.subplots(3, max(len(settings), 1), figsize=(4.3 * max(len(settings), 1), 11), squeeze=False)
    for col, setting in enumerate(settings):
        items = [s for s in summary if s["setting"] == setting and s["method"] in HEADLINE]
        items.sort(key=lambda s: HEADLINE.index(s["method"]))
        colors = ["#d62728" if s["method"] == FINAL else "#ff9896" if s["method"].startswith("seft")
                  else "#1f77b4" for s in items]
        for row, corpus in enumerate(("wiki", "news")):  # news: never trained on, the out-of-domain check
            ax = axes[row][col]
            ax.bar(range(len(items)), [s[corpus] for s in items], yerr=[s[f"{corpus}_std"] or 0 for s in items],
                   color=colors, capsize=3)
            ax.set_xticks(range(len(items)), [s["method"] for s in items], rotation=40, ha="right", fontsize=8)
            ax.set_title(f"{setting}: held-out {corpus} ppl (best lr, mean ± std)")
            lo = min((s[corpus] for s in items), default=1)
            ax.set_ylim(lo * 0.9, max((s[corpus] + (s[f"{corpus}_std"] or 0) for s in items), default=2) * 1.03)
        ax = axes[2][col]
        for method in HEADLINE:
            by_lr = grid.get((setting, method))
            if by_lr and len(by_lr) > 1:
                lrs = sorted(by_lr)
                ax.plot(lrs, [by_lr[lr]["wiki_ppl"] for lr in lrs], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("wiki ppl (seed 0)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_churn(rows: list[dict], path: Path, reference: str = "seft-old") -> None:
    """The churn figure: share of dropped slots that were young, and wiki ppl, per SEFT variant (seed 0, at
    seft-old's best lr) — before (seft-old) and after each change meant to stop young slots being dropped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_lrs(rows)
    settings = [s for s in sorted({r["setting"] for r in rows}, key=_order) if (s, reference) in best]
    if not settings:
        return
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.2), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        lr = best[(setting, reference)]
        rs = {r["method"]: r for r in rows if r["setting"] == setting and r["lr"] == lr and r["seed"] == 0
              and r.get("young_share") is not None}
        names = [reference] + sorted(m for m in rs if m != reference)
        names = [m for m in names if m in rs]
        ax.bar(range(len(names)), [100 * rs[m]["young_share"] for m in names], color="#ff7f0e")
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("dropped slots that were young (%)")
        twin = ax.twinx()
        twin.plot(range(len(names)), [rs[m]["wiki_ppl"] for m in names], "ko-", label="held-out wiki ppl")
        twin.set_ylabel("wiki ppl")
        twin.legend(fontsize=7, loc="upper right")
        ax.set_title(f"{setting}, lr {lr:g}, seed 0: churn of young slots")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def refs_table(refs: dict[str, dict]) -> list[str]:
    """Dense and pruned models before repair, by the runs' protocol (`repair_study.py refs`)."""
    if not refs:
        return ["(not scored yet: `python benchmarks/repair_study.py refs`)"]
    lines = ["| model | wiki ppl | news ppl |", "|---|---:|---:|"]
    for name in sorted(refs, key=lambda n: (n != "dense", _order(n))):
        lines.append(f"| {name if name == 'dense' else name + ', no repair'} | {refs[name]['wiki_ppl']:.2f} | "
                     f"{refs[name]['news_ppl']:.2f} |")
    return lines


def write_report(rows: list[dict], stem: Path, note: str = "", refs: dict[str, dict] | None = None) -> None:
    if not rows:
        raise SystemExit("no rows yet")
    methods = [m for m in HEADLINE if any(r["method"] == m for r in rows)]
    main, summary = main_table(rows, methods)
    spec = rows[0]
    lines = [
        "# Repair study: SEFT vs masked LoRA, LoRA* and fixed slots (SmolLM2-135M)", "",
        *([f"**Status:** {note}", ""] if note else []),
        "Written by `python benchmarks/repair_study.py table` from `repair_study.jsonl` (one line per run, "
        "appended as runs finish). Every run: budget = a rank-8 LoRA's parameter count (2,442,240 trainable), "
        f"{spec['steps']} optimizer steps x batch {spec['batch']} x {spec['seq_len']} wiki train tokens, AdamW, "
        "cosine lr with 10% warm-up, merged, then held-out perplexity (SparseGPT protocol, seq_len 256) on the "
        "first 128 windows of held-out wiki and of the news corpus (never trained on). Pruned checkpoints: "
        "Wanda / SparseGPT with 128 x 256-token wiki calibration windows. SEFT schedule for every SEFT "
        "variant: update_interval 15, stat_window 4, evolve_until 0.8 (15 topology updates that replace slots, at steps 15..225). Each method at "
        "its best learning rate on the seed-0 grid below (judged on wiki only; news is never used to choose); "
        "mean ± sample std over the seeds listed. Two runs at a time, one thread each, on 2 CPU cores; "
        "s/step (median over seeds) depends on what else ran beside a run (another run, sometimes tests): a load "
        "indicator, not a speed comparison (benchmarks/results/train_speed.md measures speed).", "",
        "## Main table", "", *main, "",
        "Before repair (same protocol): what each repair starts from, and the dense model it aims back at:", "",
        *refs_table(refs or {}), "",
        f"`{FINAL}` is SEFT with SeftConfig's defaults since this study (seft-old + no revival + regrown slots "
        "protected for one update + 10% replaced at the first update + density-aware lr + row-balanced swaps); "
        "`seft-old` pins the defaults before it (30%, revival 0.1, no protection, plain lr, free swaps); "
        "`seft-new` is the intermediate (seft-old + no revival + protection); `static` = fixed random slots with "
        "seft-old's optimizer; `lora-reprune` = dense LoRA merged and re-pruned by Wanda (LoRA*).", "",
        f"## SEFT ({FINAL}, the new defaults) vs masked LoRA", "", *verdict(summary), "",
        "## What evolution adds: SEFT vs the same budget on fixed random slots", "",
        *verdict(summary, rival="static"), "",
        "## Fixed random slots vs masked LoRA", "", *verdict(summary, seft="static"), "",
        "## Learning-rate search (seed 0, held-out wiki / news ppl; the best lr is chosen on wiki)", "", *lr_table(rows), "",
        "## Ablations (single changes to seft-old, seft-old's best lr)", "",
        "`Δ wiki` is paired by seed (the mean over the seeds both have of variant / reference - 1). "
        "`dropped young` = dropped slots that were grown at the previous update or later (churn); `loss jump` / "
        "`grad-norm jump` = mean over updates of (3 steps after) - (3 steps before).", "",
        *ablation_table(rows), "",
        "## Changes to seft-new (single changes, seft-new's best lr)", "",
        *ablation_table(rows, "seft-new"), "",
        *([f"## Changes to {FINAL} (single changes, {FINAL}'s best lr)", "", *ablation_table(rows, FINAL), ""]
          if any(r["method"].startswith("combo-") for r in rows) else []),
        f"Churn figure: `{stem.name}_churn.png` (share of dropped slots that were young, per variant, with wiki ppl).",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    stem.with_suffix(".json").write_text(json.dumps({"summary": summary, "best_lrs": {
        f"{s}/{m}": lr for (s, m), lr in best_lrs(rows).items()}, "runs": len(rows)}, indent=1))
    plot(rows, summary, stem.with_suffix(".png"))
    plot_churn(rows, stem.with_name(stem.name + "_churn.png"))
    print("\n".join(lines))
