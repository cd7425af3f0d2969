"""QSEFT vs SEFT on the Wanda-50% SmolLM2 (CPU): peak RSS, held-out wiki perplexity before/after.

Each mode runs `seft finetune` (run_finetune) in its own subprocess, so each
peak RSS (`ru_maxrss`, read right after training: loading, the perplexity
before and training, not the merge) belongs to that mode alone. The 4-bit
mode merges onto the fp checkpoint; both report the merged model's ppl.

    .venv/bin/python benchmarks/qseft_smollm2.py --steps 16   # ~5 min on 2 cores
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRUNED = ROOT / "out" / "bench-qseft" / "smollm2-wanda50"


def ensure_pruned() -> Path:
    if not (PRUNED / "config.json").exists():
        from seft.prune import PruneConfig, prune_checkpoint

        cfg = PruneConfig(method="wanda", sparsity=0.5, pattern="unstructured", calibration="wiki",
                          num_samples=16, seq_len=256, seed=0)
        prune_checkpoint("smollm2-135m", PRUNED, cfg, progress=False)
    return PRUNED


def run_mode(load_in_4bit: bool, steps: int) -> dict:
    from seft.finetune import job_from_recipe, run_finetune

    out = PRUNED.parent / ("qseft" if load_in_4bit else "seft")
    job = job_from_recipe({
        "model": str(PRUNED), "output": str(out), "overwrite": True,
        "finetune": {"data": "wiki", "seq_len": 256, "merge": True, "load_in_4bit": load_in_4bit,
                     "eval_data": "wiki", "eval_seq_len": 256, "eval_windows": 16},
        "adapter": {"lora_rank": 8, "update_interval": 8, "stat_window": 2},
        "train": {"max_steps": steps, "per_device_train_batch_size": 2, "learning_rate": 2e-3,
                  "logging_steps": 4, "save_steps": 1000, "disable_tqdm": True},
    })
    r = run_finetune(job, progress=False)
    return {"mode": "QSEFT (NF4 base)" if load_in_4bit else "SEFT (fp32 base)", "steps": r["steps"],
            "peak_rss_gib": r["memory"]["peak_rss_gib"], "ppl_before": r["perplexity_before"]["perplexity"],
            "ppl_after_merged": r["perplexity_after"]["perplexity"], "s_per_step": r["seconds_per_step"],
            "sparsity_preserved": r["sparsity_preserved"], "train_loss": r["train_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--mode", choices=["fp", "4bit"], help="internal: run one mode in this process")
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode == "4bit", args.steps)))
        return
    ensure_pruned()
    rows = []
    for mode in ("fp", "4bit"):
        done = subprocess.run([sys.executable, __file__, "--mode", mode, "--steps", str(args.steps)],
                              capture_output=True, text=True)
        if done.returncode != 0:  # say how it died (a signal is a negative code, e.g. -9 = killed, often OOM)
            sys.exit(f"{mode} run failed with exit code {done.returncode}:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = ["| mode | steps | peak RSS (GiB) | ppl before | ppl after (merged fp) | s/step | sparsity kept |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['steps']} | {r['peak_rss_gib']:.2f} | {r['ppl_before']:.2f} | "
              f"{r['ppl_after_merged']:.2f} | {r['s_per_step']:.2f} | {r['sparsity_preserved']} |" for r in rows]
    text = "\n".join(lines)
    (ROOT / "benchmarks" / "results" / "qseft_smollm2.md").write_text(
        "# QSEFT vs SEFT, SmolLM2-135M Wanda 50% (CPU)\n\n`.venv/bin/python benchmarks/qseft_smollm2.py "
        f"--steps {args.steps}`; wiki held-out ppl, 16 windows x 256 tokens; batch 2 x 256, r=8 budget.\n\n"
        + text + "\n")
    print(text)


if __name__ == "__main__":
    main()
