"""`make demo`: the whole job on the embedded SmolLM2-135M, end to end, on a CPU.

    python -m seft.demo [--steps 40] [--output out/demo]

1. prune SmolLM2-135M with Wanda to 50% unstructured sparsity (wiki calibration);
2. repair it with SEFT at the budget of a LoRA r=8, merged back into a plain
   checkpoint that is exactly as sparse as the pruned one;
3. evaluate dense / pruned / repaired on the offline suite (held-out wiki
   perplexity + the vendored BIG-bench tasks) and print the table; the plot
   goes to OUTPUT/demo.png and every number to OUTPUT/results.json.

Sized to finish in about 10 minutes on 2 CPU cores; the folders it writes
under OUTPUT are replaced on every run.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

logger = logging.getLogger("seft.demo")


def _evaluate(model: str, limit: int, windows: int) -> dict:
    from .eval_tasks import PerplexitySpec, Suite, load_suite
    from .evaluate import evaluate

    offline = load_suite(str(Path(__file__).resolve().parent.parent / "eval" / "offline.yaml"))
    suite = Suite(name="demo", tasks=offline.tasks, path=offline.path, max_length=offline.max_length, num_fewshot=0,
                  perplexity=[PerplexitySpec("wiki", 256, "heldout", windows), PerplexitySpec("news", 256, "heldout", windows)])
    report = evaluate(model, suite=suite, limit=limit, batch_size=8, device="cpu")
    accs = {t: m.get("acc,none") for t, m in (report["lm_eval"]["results"] or {}).items()}
    return {"ppl": {p["source"]: p["perplexity"] for p in report["perplexity"]}, "acc": accs,
            "sparsity": report["seft"].get("base_sparsity"), "seconds": report["seft"]["seconds"]}


def _table(rows: dict[str, dict]) -> str:
    tasks = sorted(next(iter(rows.values()))["acc"])
    head = "| model | sparsity | wiki ppl | news ppl | " + " | ".join(t.removeprefix("bb_") for t in tasks) + " | mean acc |"
    lines = [head, "|" + "---|" * (5 + len(tasks))]
    for name, r in rows.items():
        accs = [r["acc"][t] for t in tasks]
        lines.append(f"| {name} | {r['sparsity']:.1%} | {r['ppl']['wiki']:.2f} | {r['ppl']['news']:.2f} | "
                     + " | ".join(f"{a:.3f}" for a in accs) + f" | {statistics.mean(accs):.3f} |")
    return "\n".join(lines)


def _plot(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    colors = ["#2ca02c", "#999999", "#d62728"]
    a.bar(names, [rows[n]["ppl"]["wiki"] for n in names], color=colors)
    a.set_ylabel("held-out wiki perplexity (lower is better)")
    b.bar(names, [statistics.mean(rows[n]["acc"].values()) for n in names], color=colors)
    b.set_ylabel("mean BIG-bench accuracy (higher is better)")
    fig.suptitle("SmolLM2-135M: dense -> Wanda 50% -> SEFT repair")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="out/demo")
    p.add_argument("--steps", type=int, default=40, help="SEFT optimizer steps")
    p.add_argument("--limit", type=int, default=40, help="items per BIG-bench task")
    p.add_argument("--windows", type=int, default=24, help="perplexity windows of 256 tokens per source")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from .finetune import job_from_recipe, run_finetune
    from .models import load_model
    from .prune import PruneConfig, prune_checkpoint

    t0 = time.perf_counter()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    load_model("smollm2-135m")  # builds the safetensors cache on first use
    logger.info("1/3 pruning SmolLM2-135M with Wanda to 50%")
    pruned = out / "wanda50"
    prune_checkpoint("smollm2-135m", pruned, PruneConfig(method="wanda", sparsity=0.5, calibration="wiki",
                                                         num_samples=16, seq_len=256).validate(), overwrite=True)
    logger.info("2/3 repairing with SEFT for %d steps", args.steps)
    repaired = out / "wanda50-seft"
    report = run_finetune(job_from_recipe({
        "model": str(pruned), "output": str(repaired), "overwrite": True,
        "finetune": {"data": "wiki", "method": "seft", "seq_len": 128, "merge": True, "eval_data": None},
        "adapter": {"lora_rank": 8, "update_interval": 8, "stat_window": 2},
        "train": {"max_steps": args.steps, "per_device_train_batch_size": 4, "learning_rate": 3e-3,
                  "warmup_steps": 4, "logging_steps": 10, "save_strategy": "no"},
    }))
    logger.info("3/3 evaluating dense, pruned and repaired")
    rows = {name: _evaluate(path, args.limit, args.windows)
            for name, path in (("dense", "smollm2-135m"), ("wanda 50%", str(pruned)),
                               ("+ SEFT", str(repaired / "merged")))}
    table = _table(rows)
    _plot(rows, out / "demo.png")
    topo = report["topology_updates"]
    (out / "results.json").write_text(json.dumps({"rows": rows, "topology": topo,
                                                  "train_seconds": report["train_seconds"]}, indent=1))
    print()
    print(table)
    print(f"\nSEFT: {report['steps']} steps, {report['seconds_per_step']:.2f} s/step, "
          f"{sum(u['seft/replaced'] for u in topo):.0f} slots replaced, {sum(u['seft/revived'] for u in topo):.0f} "
          f"revived, {sum(u['seft/repruned'] for u in topo):.0f} re-pruned over {len(topo)} updates; "
          f"sparsity preserved: {report['sparsity_preserved']}")
    print(f"plot: {out / 'demo.png'}   numbers: {out / 'results.json'}   total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
