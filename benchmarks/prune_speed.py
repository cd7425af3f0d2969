"""Seconds per decoder layer for magnitude / Wanda / SparseGPT, statistics and pruning timed apart.

Two subjects:
  - SmolLM2-135M layer 0 on real wiki calibration inputs (captured by the engine);
  - one LLaMA-2-7B-shaped layer (hidden 4096, intermediate 11008, 32 heads),
    synthetic weights, inputs from a one-layer model with random tokens.
"statistics" = one forward of the unpruned layer over all calibration inputs
with the observer hooks (what `observe_layer` does); "prune" = turning the
seven linears' weights + statistics into pruned weights (`apply_layer`).
Medians over --repeats. GPU defaults: 128 x 2048 tokens; CPU: 4 x 256.

  .venv/bin/python benchmarks/prune_speed.py                 # CPU, ~5 min on 2 cores
  python benchmarks/prune_speed.py --device cuda              # 128 x 2048 on the GPU
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from seft.data import calibration_windows
from seft.models import decoder_layers, load_model
from seft.prune.config import METHODS, PruneConfig
from seft.prune.engine import apply_layer, capture_layer_inputs, observe_layer

RESULTS = Path(__file__).parent / "results" / "prune_speed.md"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layer(layer, inputs, method: str, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median statistics seconds, median prune seconds) for `method` on `layer` (weights restored each time)."""
    config = PruneConfig(method=method, sparsity=0.5, device=str(device)).validate()
    original = {k: v.clone() for k, v in layer.state_dict().items()}
    stat_s, prune_s = [], []
    for _ in range(repeats):
        layer.load_state_dict(original)
        _sync(device)
        t0 = time.perf_counter()
        stats = observe_layer(layer, inputs, config, device)
        _sync(device)
        t1 = time.perf_counter()
        apply_layer(layer, stats, config)
        _sync(device)
        t2 = time.perf_counter()
        stat_s.append(t1 - t0)
        prune_s.append(t2 - t1)
        del stats
    layer.load_state_dict(original)
    return statistics.median(stat_s), statistics.median(prune_s)


@torch.no_grad()
def smollm2_subject(device: torch.device, samples: int, seq_len: int):
    model, tok = load_model("smollm2-135m")
    windows = calibration_windows(tok, "wiki", samples, seq_len, seed=0)
    inputs = capture_layer_inputs(model, windows, batch_size=8, device=device)
    return decoder_layers(model)[0].to(device), inputs


@torch.no_grad()
def llama7b_subject(device: torch.device, samples: int, seq_len: int, dtype: torch.dtype,
                    hidden: int = 4096, intermediate: int = 11008):
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = hidden // 128
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=heads, num_hidden_layers=1, vocab_size=256,
                         max_position_embeddings=max(4096, seq_len))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    windows = torch.randint(0, config.vocab_size, (samples, seq_len))
    inputs = capture_layer_inputs(model, windows, batch_size=8, device=device)
    return decoder_layers(model)[0], inputs


def write_table(rows: list[tuple], args, hw: str, done: bool) -> None:
    """(Re)write the markdown table; `done=False` marks it as partial."""
    lines = [
        "# Pruning speed: seconds per decoder layer" + ("" if done else " (PARTIAL: run in progress or interrupted)"),
        "",
        f"Device: {hw}; torch {torch.__version__}; median of {args.repeats} repeat(s); 50% unstructured.",
        "`statistics` = one forward of the unpruned layer over all calibration inputs with observer hooks;",
        "`prune` = computing the pruned weights of the 7 linears (SparseGPT: Cholesky + OBS updates, q/k/v and",
        "gate/up sharing a Hessian). Magnitude needs no statistics (data-free).",
        f"LLaMA-2-7B-shaped layer: synthetic weights in {args.llama_dtype}; statistics always fp32.",
        "",
        f"Command: `python benchmarks/prune_speed.py --device {args.device} --repeats {args.repeats} "
        f"--smollm2-samples {args.smollm2_samples} --smollm2-seq-len {args.smollm2_seq_len} "
        f"--llama-samples {args.llama_samples} --llama-seq-len {args.llama_seq_len}`",
        "",
        "| subject | calibration (samples x tokens) | method | statistics s | prune s | total s |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name, tokens, method, stat, prune in rows:
        lines.append(f"| {name} | {tokens} | {method} | {stat:.3f} | {prune:.3f} | {stat + prune:.3f} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(args.output)


def main() -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--repeats", type=int, default=3 if cuda else 1)
    p.add_argument("--smollm2-samples", type=int, default=128 if cuda else 8)
    p.add_argument("--smollm2-seq-len", type=int, default=2048 if cuda else 256)
    p.add_argument("--llama-samples", type=int, default=128 if cuda else 4)
    p.add_argument("--llama-seq-len", type=int, default=2048 if cuda else 256)
    p.add_argument("--llama-dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--llama-shape", type=int, nargs=2, default=(4096, 11008), metavar=("HIDDEN", "INTER"),
                   help="smaller shapes for a smoke test only")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.llama_dtype)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"

    rows = []
    subjects = [
        ("SmolLM2-135M layer 0", lambda: smollm2_subject(device, args.smollm2_samples, args.smollm2_seq_len),
         f"{args.smollm2_samples} x {args.smollm2_seq_len}"),
        ("LLaMA-2-7B-shaped layer", lambda: llama7b_subject(device, args.llama_samples, args.llama_seq_len, dtype, *args.llama_shape),
         f"{args.llama_samples} x {args.llama_seq_len}"),
    ]
    for name, build, tokens in subjects:
        layer, inputs = build()
        for method in METHODS:
            stat, prune = time_layer(layer, inputs, method, device, args.repeats)
            rows.append((name, tokens, method, stat, prune))
            print(f"{name:26s} {tokens:>10s} {method:10s} statistics {stat:8.3f}s  prune {prune:8.3f}s", flush=True)
            write_table(rows, args, hw, done=False)  # row by row: an interrupted run keeps what it measured
        del layer, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_table(rows, args, hw, done=True)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
