"""Training speed and memory: SEFT vs LoRA (equal trainable parameters) vs full fine-tuning with a mask.

Setups:
  cpu  SmolLM2-135M, magnitude-pruned 50% per row, fp32, batch 2 x 128.
  gpu  4 LLaMA-2-7B-shaped decoder layers from config (hidden 4096, inter 11008,
       32 heads, vocab 32000), 50% pruned, bf16, batch 2 x 2048 (CUDA only).

Every method runs in its own subprocess, so the peak memory belongs to it:
CUDA `max_memory_allocated` on GPU; on CPU the process's peak RSS
(`ru_maxrss`), also shown minus the RSS right after setup (model loaded,
pruned and wrapped) — the training overhead. Step times are medians over the
measured steps after warm-up; SEFT's statistics-window steps (dense weight
gradient kept for candidate statistics, and the topology update) are reported
apart from its ordinary steps. LoRA is peft LoRA with r=8 on q,k,v,o,gate,up,
down; SEFT's budget `lora_rank=8` gives it exactly as many trainable values.
Optimizer: torch AdamW for all three.

`--backward` times the two ways to get `grad(values) = (g^T x)[indices]`:
the dense product then a gather (what seft/tuner/function.py does) and a
chunked gather/SDDMM `sum_t g[t, rows] * x[t, cols]`.

    .venv/bin/python benchmarks/train_speed.py --setup cpu            # ~5 min on 2 cores
    .venv/bin/python benchmarks/train_speed.py --setup gpu --out benchmarks/results/train_speed_gpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("seft", "lora", "full-masked")
SETUPS = {
    "cpu": dict(batch=2, seq=128, warmup=1, steps=8, update_interval=4, stat_window=2, dtype="float32"),
    "gpu": dict(batch=2, seq=2048, warmup=3, steps=20, update_interval=5, stat_window=2, dtype="bfloat16"),
}


def build_model(setup: str):
    """The setup's model, 50% magnitude-pruned per row, on its device."""
    from seft.models import decoder_layers, target_linears
    from seft.sparsity import row_topk_mask

    if setup == "cpu":
        from seft.models import load_model

        model = load_model("smollm2-135m")[0]
        vocab = model.config.vocab_size
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                          num_hidden_layers=4, vocab_size=32000, max_position_embeddings=4096)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        vocab = cfg.vocab_size
    with torch.no_grad():
        for layer in decoder_layers(model):
            for lin in target_linears(layer).values():
                lin.weight.mul_(row_topk_mask(lin.weight.abs(), 0.5))
    return model, vocab


def wrap(model, method: str, setup: str):
    """(model to train, trainable parameters) for one method."""
    import peft

    import seft
    from seft.baselines import enable_full_masked
    from seft.models import TARGET_MODULES

    if method == "seft":
        cfg = SETUPS[setup]
        return peft.get_peft_model(model, seft.SeftConfig(
            lora_rank=8, update_interval=cfg["update_interval"], stat_window=cfg["stat_window"], evolve_until=1.0))
    if method == "lora":
        return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=list(TARGET_MODULES)))
    masks = enable_full_masked(model)
    model._bench_masks = masks
    return model


def adapter_bytes(model, method: str) -> int:
    """Size of what the method must save: the adapter file, or the trained weights (full-masked)."""
    with tempfile.TemporaryDirectory() as tmp:
        if method in ("seft", "lora"):
            model.save_pretrained(tmp)
            return (Path(tmp) / "adapter_model.safetensors").stat().st_size
        from safetensors.torch import save_file

        state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(state, Path(tmp) / "trained.safetensors")
        return (Path(tmp) / "trained.safetensors").stat().st_size


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_one(setup: str, method: str) -> dict:
    """One method in this process: median step times, peak memory, trainable parameters, adapter size."""
    from seft.baselines import apply_masks

    cfg = SETUPS[setup]
    cuda = setup == "gpu"
    torch.manual_seed(0)
    model, vocab = build_model(setup)
    model = wrap(model, method, setup)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda or None)
    device = "cuda" if cuda else "cpu"
    gen = torch.Generator().manual_seed(0)
    total = cfg["warmup"] + cfg["steps"]
    data = [torch.randint(0, vocab, (cfg["batch"], cfg["seq"]), generator=gen).to(device) for _ in range(4)]
    setup_rss = rss_gib()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        setup_cuda = torch.cuda.memory_allocated() / 2**30
    ordinary, window = [], []
    for step in range(1, total + 1):
        x = data[step % len(data)]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        in_window = model.seft_begin_window(step, total) if method == "seft" else False
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if method == "seft":
            model.seft_pre_optimizer_step(opt)
        opt.step()
        if method == "seft":
            model.seft_post_optimizer_step(opt)
        elif method == "full-masked":
            apply_masks(model, model._bench_masks)
        opt.zero_grad(set_to_none=True)
        if method == "seft":
            model.seft_update(step, total, opt)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step > cfg["warmup"]:
            (window if in_window else ordinary).append(dt)
    out = {"setup": setup, "method": method, "trainable_params": trainable,
           "step_s_ordinary": statistics.median(ordinary), "ordinary_steps": len(ordinary),
           "step_s_window": statistics.median(window) if window else None, "window_steps": len(window),
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "setup_rss_gib": setup_rss,
           "adapter_bytes": adapter_bytes(model, method), "device": torch.cuda.get_device_name() if cuda else "cpu"}
    if cuda:
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["setup_cuda_gib"] = setup_cuda
    return out


def grad_values_dense(g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(g^T x)[idx]: one dense [out, in] product, then a gather (the layer's choice)."""
    return (g.t() @ x).float().reshape(-1)[idx]


def grad_values_sddmm(g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(g^T x)[idx] as sum_t g[t, row] * x[t, col], `chunk` slots at a time (never a dense [out, in])."""
    rows, cols = idx // x.shape[1], idx % x.shape[1]
    res = torch.empty(idx.numel(), device=g.device)
    for s in range(0, idx.numel(), chunk):
        res[s:s + chunk] = (g[:, rows[s:s + chunk]].float() * x[:, cols[s:s + chunk]].float()).sum(0)
    return res


def _median_ms(fn, repeats: int, cuda: bool) -> float:
    samples = []
    for _ in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples[1:])


def compare_backward(device: str, shapes, tokens: int, repeats: int = 5) -> list[dict]:
    """Median ms for grad(values) at LoRA-r=8 budgets: dense g^T x + gather vs chunked SDDMM."""
    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for out_f, in_f in shapes:
        k = 8 * (in_f + out_f)
        g = torch.randn(tokens, out_f, device=device, dtype=dtype)
        x = torch.randn(tokens, in_f, device=device, dtype=dtype)
        idx = torch.randperm(out_f * in_f, device=device)[:k]
        ref, alt = grad_values_dense(g, x, idx), grad_values_sddmm(g, x, idx)
        assert torch.allclose(ref, alt, rtol=5e-2, atol=5e-2 * tokens**0.5)
        cuda = device == "cuda"
        rows.append({"shape": f"{out_f}x{in_f}", "k": k, "tokens": tokens,
                     "dense_gather_ms": _median_ms(lambda: grad_values_dense(g, x, idx), repeats, cuda),  # noqa: B023
                     "sddmm_ms": _median_ms(lambda: grad_values_sddmm(g, x, idx), repeats, cuda)})  # noqa: B023
    return rows


def table(rows: list[dict]) -> str:
    lora = next((r for r in rows if r["method"] == "lora"), None)
    gpu = "peak_cuda_gib" in rows[0]
    mem_key = "peak_cuda_gib" if gpu else "peak_rss_gib"
    head = ("| method | trainable | ordinary step (s) | window step (s) | vs LoRA step | "
            + ("peak CUDA (GiB) |" if gpu else "peak RSS (GiB) | RSS over setup (GiB) |")
            + " vs LoRA mem | saved (MB) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        over = r[mem_key] - (r["setup_cuda_gib"] if gpu else r["setup_rss_gib"])
        mem_ratio = (over / (lora[mem_key] - (lora["setup_cuda_gib"] if gpu else lora["setup_rss_gib"]))
                     if lora else float("nan"))
        window = f"{r['step_s_window']:.3f} (n={r['window_steps']})" if r["step_s_window"] else "-"
        cells = [r["method"], f"{r['trainable_params']:,}", f"{r['step_s_ordinary']:.3f} (n={r['ordinary_steps']})",
                 window, f"{r['step_s_ordinary'] / lora['step_s_ordinary']:.2f}x" if lora else "-"]
        cells += [f"{r[mem_key]:.2f}"] if gpu else [f"{r[mem_key]:.2f}", f"{over:.2f}"]
        cells += [f"{mem_ratio:.2f}x", f"{r['adapter_bytes'] / 1e6:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", choices=sorted(SETUPS), default="cpu")
    ap.add_argument("--method", choices=METHODS, help="internal: run one method in this process")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--backward", action="store_true", help="also time dense+gather vs SDDMM grad(values)")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    if args.setup == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--setup gpu needs CUDA")
    if args.method:
        print(json.dumps(run_one(args.setup, args.method)))
        return
    rows = []
    for method in args.methods.split(","):
        done = subprocess.run([sys.executable, __file__, "--setup", args.setup, "--method", method],
                              check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    result = {"rows": rows, "table": table(rows)}
    if args.backward:
        device = "cuda" if args.setup == "gpu" else "cpu"
        shapes = [(4096, 4096), (11008, 4096), (4096, 11008)] if device == "cuda" else [(576, 576), (1536, 576),
                                                                                           (576, 1536)]
        tokens = SETUPS[args.setup]["batch"] * SETUPS[args.setup]["seq"]
        result["backward"] = compare_backward(device, shapes, tokens)
        for row in result["backward"]:
            print(row)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
