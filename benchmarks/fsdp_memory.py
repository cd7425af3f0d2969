"""Peak memory per rank: SEFT under FSDP2 (`seft.distributed.shard_for_seft`) vs DDP, 2 CPU ranks.

SmolLM2-135M, fp32, 50% magnitude-pruned per row in memory (train_speed.py's
`build_model("cpu")`), SEFT `lora_rank=8`, torch AdamW, batch 2 x 128 tokens
per rank, gloo, 1 thread per rank. `--steps` optimizer steps (default 5)
with `update_interval=2, stat_window=1`, so two of them are statistics-window
steps ending in a topology update (which gathers each layer's whole weight
and `values` under FSDP2). Step 1 is a warm-up and not measured.

Per rank, the script reports what it holds after setup (model loaded,
pruned, wrapped, sharded or DDP-wrapped, one step taken so the optimizer
state exists) counted from the tensors themselves — parameters (the local
shard of a DTensor), buffers (SEFT's integer topology), gradients and
optimizer state — and the resident set: after setup, and the peak sampled
every 2 ms during the measured steps (train_speed.py's `RssPeak`; glibc
runs with `MALLOC_MMAP_THRESHOLD_=65536` so freed tensors return to the OS
and RSS follows live memory). Not covered: the load peak. Every rank loads
the whole model before `fully_shard` keeps its shard; loading a larger model
on the meta device and materializing only the shards is the way around it.

    .venv/bin/python benchmarks/fsdp_memory.py       # ~3 min on 2 cores; writes benchmarks/results/fsdp_memory.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
MODES = ("ddp", "fsdp2")
BATCH, SEQ = 2, 128
MIB = 2**20


def _local_bytes(tensors) -> int:
    from seft.tuner.shards import local

    return sum(local(t).numel() * t.element_size() for t in tensors if t is not None)


def held_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds, by kind (a DTensor counts its local shard)."""
    params = list(model.parameters())
    states = [t for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]
    return {"params": _local_bytes(params), "buffers": _local_bytes(list(model.buffers())),
            "grads": _local_bytes([p.grad for p in params]), "optimizer": _local_bytes(states)}


def worker(mode: str, steps: int, out: Path) -> None:
    """One rank (launched by torch.distributed.run): train `steps` steps, write this rank's numbers."""
    import peft
    from train_speed import RssPeak, build_model, rss_gib

    import seft
    from seft.distributed import shard_for_seft

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    torch.manual_seed(0)
    model, vocab = build_model("cpu")
    model = peft.get_peft_model(model, seft.SeftConfig(lora_rank=8, update_interval=2, stat_window=1,
                                                       evolve_until=1.0))
    seft_model = model.base_model
    if mode == "fsdp2":
        shard_for_seft(model)
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(rank)
    data = [torch.randint(0, vocab, (BATCH, SEQ), generator=gen) for _ in range(steps)]
    sampler, setup = None, {}
    times, peaks, replaced = {"ordinary": [], "window": []}, {"ordinary": [], "window": []}, 0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        kind = "window" if seft_model.seft_begin_window(step, steps) else "ordinary"
        wrapped(input_ids=data[step - 1], labels=data[step - 1]).loss.backward()
        seft_model.seft_pre_optimizer_step(opt)
        opt.step()
        seft_model.seft_post_optimizer_step(opt)
        if step == 1:
            setup = held_bytes(model, opt)  # grads still there: the most a step holds between passes
        opt.zero_grad(set_to_none=True)
        stats = seft_model.seft_update(step, steps, opt)
        replaced += int(stats["seft/replaced"]) if stats else 0
        if step == 1:
            setup["rss_gib"] = rss_gib()
            sampler = RssPeak()
            continue
        times[kind].append(time.perf_counter() - t0)
        peaks[kind].append(sampler.reset())
    sampler.stop()
    with tempfile.TemporaryDirectory() as tmp:  # the adapter, saved the distributed way, on every rank
        seft.distributed.save_pretrained(model, tmp)
    row = {"mode": mode, "rank": rank, "world": torch.distributed.get_world_size(), **setup,
           **{f"peak_rss_gib_{k}": max(v) for k, v in peaks.items() if v},
           **{f"step_s_{k}": statistics.median(v) for k, v in times.items() if v},
           "measured_steps": sum(map(len, times.values())), "window_steps": len(times["window"]),
           "replaced": replaced, "threads": torch.get_num_threads()}
    (out / f"{mode}_rank{rank}.json").write_text(json.dumps(row))
    torch.distributed.destroy_process_group()


def table(rows: list[dict]) -> str:
    lines = ["| mode | rank | params (MiB) | buffers (MiB) | grads (MiB) | optimizer state (MiB) | "
             "RSS after setup (GiB) | peak RSS, ordinary steps (GiB) | peak RSS, window + update steps (GiB) | "
             "median step, ordinary / window (s) | slots replaced |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['rank']} | {r['params'] / MIB:.1f} | {r['buffers'] / MIB:.1f} | "
                     f"{r['grads'] / MIB:.1f} | {r['optimizer'] / MIB:.1f} | {r['rss_gib']:.2f} | "
                     f"{r['peak_rss_gib_ordinary']:.2f} | {r['peak_rss_gib_window']:.2f} | "
                     f"{r['step_s_ordinary']:.1f} / {r['step_s_window']:.1f} | {r['replaced']:,} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=MODES, help="internal: run one rank of this mode")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dir", type=Path, help="internal: where ranks write their rows")
    ap.add_argument("--md", type=Path, default=ROOT / "benchmarks" / "results" / "fsdp_memory.md")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.dir)
        return
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536",
                       MALLOC_TRIM_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(29500 + os.getpid() % 1000), __file__, "--worker", mode,
                            "--steps", str(args.steps), "--dir", tmp], check=True, env=env)
            rows += [json.loads(p.read_text()) for p in sorted(Path(tmp).glob(f"{mode}_rank*.json"))]
    print(table(rows))
    by = {m: [r for r in rows if r["mode"] == m] for m in MODES}
    def ratio(key: str) -> float:
        return max(r[key] for r in by["fsdp2"]) / max(r[key] for r in by["ddp"])

    text = "\n".join([
        "# Peak memory per rank: SEFT under FSDP2 vs DDP", "",
        f"Written by `python benchmarks/fsdp_memory.py {' '.join(sys.argv[1:])}` in "
        f"{(time.perf_counter() - t0) / 60:.1f} min ({os.cpu_count()} CPU cores, 2 gloo ranks, "
        f"{rows[0]['threads']} torch thread each).", "",
        f"SmolLM2-135M fp32, 50% magnitude-pruned per row, SEFT `lora_rank=8`, AdamW, batch {BATCH} x {SEQ} "
        f"tokens per rank, {args.steps} steps (1 warm-up + {rows[0]['measured_steps']} measured, "
        f"{rows[0]['window_steps']} of them statistics-window steps ending in a topology update: "
        "`update_interval=2, stat_window=1`). DDP: `DistributedDataParallel(broadcast_buffers=False)`; FSDP2: "
        "`seft.distributed.shard_for_seft` (fully_shard per decoder layer + root). Tensor columns count what "
        "the rank holds after its first step (a DTensor counts its local shard; grads before zero_grad); RSS "
        "columns are the resident set after that step and its peak sampled every 2 ms during the measured "
        "steps (glibc `MALLOC_MMAP_THRESHOLD_=65536`, so freed tensors go back to the OS).", "",
        table(rows), "",
        f"FSDP2 / DDP per rank: parameters {ratio('params'):.2f}x, RSS after setup {ratio('rss_gib'):.2f}x, "
        f"peak RSS in ordinary steps **{ratio('peak_rss_gib_ordinary'):.2f}x**, in window + update steps "
        f"**{ratio('peak_rss_gib_window'):.2f}x**. Step times are not a speed result: 1 thread per rank on a "
        "machine shared with other jobs. Not measured here: the load peak (each rank loads the whole model "
        "before `fully_shard` keeps its shard).", "",
    ])
    args.md.write_text(text)
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
