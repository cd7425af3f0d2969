"""Training speed and memory: SEFT vs LoRA (equal trainable parameters) vs full fine-tuning with a mask.

Setups:
  cpu  SmolLM2-135M, magnitude-pruned 50% per row, fp32, batch 2 x 128.
  gpu  4 LLaMA-2-7B-shaped decoder layers from config (hidden 4096, inter 11008,
       32 heads, vocab 32000), 50% pruned, bf16, batch 2 x 2048 (CUDA only).

Every method runs in its own subprocess, so the peak memory belongs to it:
CUDA `max_memory_allocated` on GPU; on CPU the resident set sampled during
each step (`RssPeak`), per step kind, minus the RSS right after setup (model
loaded, pruned and wrapped) — the training overhead. Step times are medians over the
measured steps after warm-up; SEFT's statistics-window steps (dense weight
gradient kept for candidate statistics, and the topology update) are reported
apart from its ordinary steps. LoRA is peft LoRA with r=8 on q,k,v,o,gate,up,
down; SEFT's budget `lora_rank=8` gives it exactly as many trainable values.
Optimizer: torch AdamW for all. `frozen` trains nothing (forward and backward
to the input embeddings): the floor under any method whose gradient passes
through the frozen base. `seft` runs SeftConfig's default kernel
(`auto`: the sampled grad(values) on CPU), `seft-dense` the old path
(`kernel: dense`, dense `g^T x` + gather) in the same run. Each method runs
`--repeats` times, interleaved (A B C A B C ...), and the table shows medians
over repeats of each run's median step time and of its memory.

`--kernels` times the kernels behind the choice, per linear shape, medians of
repeats: grad(values) = (g^T x)[indices] by the dense product + gather, by
`torch.sparse.sampled_addmm` (CSR pattern of the slots), and by a chunked
index gather (and the transposed orientation used before); the in-place
patch of the base weight with positions in slot order vs sorted; the forward
with a transient dense W_eff vs the base product
plus a CSR correction; a 4-bit base's delta (forward + grad_x) dense vs CSR;
and the sampled/dense crossover over budget densities (`kernel: auto`).

    .venv/bin/python benchmarks/train_speed.py --setup cpu --kernels     # ~10 min on 2 idle cores
    .venv/bin/python benchmarks/train_speed.py --setup gpu --kernels --md benchmarks/results/train_speed_gpu.md
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
METHODS = ("seft", "seft-dense", "seft-sparse", "lora", "frozen", "full-masked")
DEFAULT_METHODS = {"cpu": "seft,seft-dense,lora,frozen,full-masked",  # auto = sparse on CPU
                   "gpu": "seft,seft-sparse,lora,full-masked"}  # auto = dense on CUDA: time sparse beside it
SETUPS = {
    "cpu": dict(batch=2, seq=128, warmup=2, steps=12, update_interval=6, stat_window=2, dtype="float32"),
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

    if method.startswith("seft"):
        cfg = SETUPS[setup]
        kernel = {"seft": "auto", "seft-dense": "dense", "seft-sparse": "sparse"}[method]
        return peft.get_peft_model(model, seft.SeftConfig(
            lora_rank=8, update_interval=cfg["update_interval"], stat_window=cfg["stat_window"], evolve_until=1.0,
            kernel=kernel))
    if method == "lora":
        return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                           target_modules=list(TARGET_MODULES)))
    if method == "frozen":  # the floor: forward + backward to the inputs, nothing trained
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model
    masks = enable_full_masked(model)
    model._bench_masks = masks
    return model


def adapter_bytes(model, method: str) -> int:
    """Size of what the method must save: the adapter file, or the trained weights (full-masked)."""
    if method == "frozen":
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        if method.startswith("seft") or method == "lora":
            model.save_pretrained(tmp)
            return (Path(tmp) / "adapter_model.safetensors").stat().st_size
        from safetensors.torch import save_file

        state = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(state, Path(tmp) / "trained.safetensors")
        return (Path(tmp) / "trained.safetensors").stat().st_size


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


class RssPeak:
    """Peak resident memory between `reset()` calls, sampled by a thread every `interval` s.

    `ru_maxrss` only knows the whole process's peak; this splits it by step
    kind (ordinary vs statistics-window steps). torch releases the GIL in its
    kernels, so the sampler runs during them. With `MALLOC_MMAP_THRESHOLD_`
    set (the parent does), freed tensors go back to the OS and RSS follows
    the live allocations instead of glibc's high-water mark.
    """

    def __init__(self, interval: float = 0.002):
        import threading

        self.peak, self.interval = rss_gib(), interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_gib())

    def reset(self) -> float:
        """The peak since the last reset (including now), then start over."""
        peak, self.peak = max(self.peak, rss_gib()), rss_gib()
        return peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


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
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda or None) if params else None
    device = "cuda" if cuda else "cpu"
    gen = torch.Generator().manual_seed(0)
    total = cfg["warmup"] + cfg["steps"]
    data = [torch.randint(0, vocab, (cfg["batch"], cfg["seq"]), generator=gen).to(device) for _ in range(4)]
    setup_rss = rss_gib()
    sampler = RssPeak() if not cuda else None
    peaks = {"ordinary": [], "window": []}
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
        is_seft = method.startswith("seft")
        in_window = model.seft_begin_window(step, total) if is_seft else False
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        if is_seft:
            model.seft_pre_optimizer_step(opt)
        if opt is not None:
            opt.step()
        if is_seft:
            model.seft_post_optimizer_step(opt)
        elif method == "full-masked":
            apply_masks(model, model._bench_masks)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        if is_seft:
            model.seft_update(step, total, opt)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        peak = sampler.reset() if sampler else None
        if step > cfg["warmup"]:
            (window if in_window else ordinary).append(dt)
            if peak is not None:
                peaks["window" if in_window else "ordinary"].append(peak)
    if sampler:
        sampler.stop()
    out = {"setup": setup, "method": method, "trainable_params": trainable,
           "step_s_ordinary": statistics.median(ordinary), "ordinary_steps": len(ordinary),
           "step_s_window": statistics.median(window) if window else None, "window_steps": len(window),
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "setup_rss_gib": setup_rss,
           "step_peak_rss_gib_ordinary": max(peaks["ordinary"]) if peaks["ordinary"] else None,
           "step_peak_rss_gib_window": max(peaks["window"]) if peaks["window"] else None,
           "adapter_bytes": adapter_bytes(model, method), "device": torch.cuda.get_device_name() if cuda else "cpu"}
    if cuda:
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["setup_cuda_gib"] = setup_cuda
    return out


def grad_values_dense(g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(g^T x)[idx]: one dense [out, in] product, then a gather (the `kernel: dense` path)."""
    return (g.t() @ x).float().reshape(-1)[idx]


def grad_values_gather(g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(g^T x)[idx] as sum_t g[t, row] * x[t, col], `chunk` slots at a time (never a dense [out, in])."""
    rows, cols = idx // x.shape[1], idx % x.shape[1]
    res = torch.empty(idx.numel(), device=g.device)
    for s in range(0, idx.numel(), chunk):
        res[s:s + chunk] = (g[:, rows[s:s + chunk]].float() * x[:, cols[s:s + chunk]].float()).sum(0)
    return res


def _median_ms(fn, repeats: int, cuda: bool, flush: torch.Tensor | None = None) -> float:
    """Median ms of `fn` over `repeats` calls after one untimed; with `flush`, that buffer is rewritten before
    every call, so the operands come from memory as in training, where other layers ran in between."""
    samples = []
    for _ in range(repeats + 1):
        if flush is not None:
            flush.add_(1)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples[1:])


def compare_kernels(device: str, shapes, tokens: int, repeats: int = 9) -> dict[str, list[dict]]:
    """Median ms of every kernel variant behind `SeftConfig.kernel`, per linear shape at a LoRA-r=8 budget."""
    from seft.tuner import sparse_ops as SO
    from seft.tuner.function import PatchPlan, delta_weight, effective_weight, patched_weight

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    out = {"backward": [], "patch": [], "forward": [], "qseft_delta": [], "density": []}
    cold = torch.zeros(16 * 2**20, device=device)  # 64 MiB, rewritten before each cold call (past the caches)
    for out_f, in_f in shapes:
        k = 8 * (in_f + out_f)
        g = torch.randn(tokens, out_f, device=device, dtype=dtype, generator=gen)
        x = torch.randn(tokens, in_f, device=device, dtype=dtype, generator=gen)
        w = torch.randn(out_f, in_f, device=device, dtype=dtype, generator=gen)
        idx = torch.randperm(out_f * in_f, device=device, generator=gen)[:k]
        removed = torch.randperm(out_f * in_f, device=device, generator=gen)[: k // 4]
        values = torch.randn(k, device=device, generator=gen) * 0.01
        csr = SO.slot_csr(idx, (out_f, in_f))
        ref = grad_values_dense(g, x, idx)
        err = (SO.sampled_weight_grad(g, x, csr) - ref).abs().max().item() / ref.abs().max().item()
        assert err < 5e-2, err
        shape = f"{out_f}x{in_f}"
        # the orientation used before: x^T g sampled on the pattern of the transposed weight (then slot order)
        csr_t = SO.slot_csr((idx % in_f) * out_f + idx // in_f, (in_f, out_f))
        out["backward"].append({
            "shape": shape, "k": k, "tokens": tokens, "sampled_rel_err": err,
            "dense_gather_ms": _median_ms(lambda: grad_values_dense(g, x, idx), repeats, cuda, cold),  # noqa: B023
            "sampled_ms": _median_ms(lambda: SO.sampled_weight_grad(g, x, csr), repeats, cuda, cold),  # noqa: B023
            "sampled_t_ms": _median_ms(lambda: SO.sampled_weight_grad(x, g, csr_t), repeats, cuda, cold),  # noqa: B023
            "index_gather_ms": _median_ms(lambda: grad_values_gather(g, x, idx), max(repeats // 3, 1), cuda),  # noqa: B023
        })
        w_patch = w.clone()
        unsorted = PatchPlan(idx, removed)  # positions in slot order, as before: undo the plan's sort
        unsorted.idx, unsorted.order = idx.long(), torch.arange(k, device=device)
        unsorted.rem = removed.long()
        unsorted.pos = torch.cat([unsorted.idx, unsorted.rem])

        def patch(plan, reuse, w_patch=w_patch, values=values, idx=idx, removed=removed):
            with patched_weight(w_patch, values, idx, removed, plan, reuse):
                pass

        sorted_plan = PatchPlan(idx, removed)
        out["patch"].append({
            "shape": shape, "k": k, "removed": removed.numel(),
            "slot_order_ms": _median_ms(lambda: patch(unsorted, False), repeats, cuda, cold),  # noqa: B023
            "sorted_ms": _median_ms(lambda: patch(sorted_plan, False), repeats, cuda, cold),  # noqa: B023
            "sorted_reuse_ms": _median_ms(lambda: patch(sorted_plan, True), repeats, cuda, cold),  # noqa: B023
        })
        assert torch.equal(w_patch, w)
        dcsr = SO.delta_csr(idx, removed, (out_f, in_f))
        d_mat, dt_mat = dcsr.matrices(values, w.reshape(-1)[removed].float())
        out["forward"].append({
            "shape": shape, "k": k, "tokens": tokens,
            "base_only_ms": _median_ms(lambda: x @ w.t(), repeats, cuda),  # noqa: B023
            "dense_w_eff_ms": _median_ms(  # noqa: B023
                lambda: x @ effective_weight(w, values, idx, removed).t(), repeats, cuda),  # noqa: B023
            "base_plus_csr_ms": _median_ms(  # noqa: B023
                lambda: x @ w.t() + SO.csr_linear(x, dcsr.matrices(values, w.reshape(-1)[removed].float())[0]),  # noqa: B023
                repeats, cuda),
        })
        base = w.reshape(-1)[removed].float()
        size = torch.Size((out_f, in_f))
        out["qseft_delta"].append({
            "shape": shape, "k": k, "tokens": tokens,
            "dense_delta_ms": _median_ms(lambda: (  # noqa: B023
                x @ delta_weight(size, values, idx, removed, base, dtype).t(),  # noqa: B023
                g @ delta_weight(size, values, idx, removed, base, dtype)), repeats, cuda),  # noqa: B023
            "csr_delta_ms": _median_ms(lambda: (  # noqa: B023
                SO.csr_linear(x, d_mat), SO.csr_linear(g, dt_mat)), repeats, cuda),  # noqa: B023
        })
    out_f, in_f = shapes[1] if len(shapes) > 1 else shapes[0]
    g = torch.randn(tokens, out_f, device=device, dtype=dtype, generator=gen)
    x = torch.randn(tokens, in_f, device=device, dtype=dtype, generator=gen)
    for dens in (0.005, 0.02, 0.05, 0.1, 0.2, 0.4):
        k = int(dens * out_f * in_f)
        idx = torch.randperm(out_f * in_f, device=device, generator=gen)[:k]
        csr = SO.slot_csr(idx, (out_f, in_f))
        out["density"].append({
            "shape": f"{out_f}x{in_f}", "density": dens, "k": k, "tokens": tokens,
            "dense_gather_ms": _median_ms(lambda: grad_values_dense(g, x, idx), repeats, cuda),  # noqa: B023
            "sampled_ms": _median_ms(lambda: SO.sampled_weight_grad(g, x, csr), repeats, cuda),  # noqa: B023
        })
    return out


MEMORY_KEYS = ("peak_rss_gib", "setup_rss_gib", "step_peak_rss_gib_ordinary", "step_peak_rss_gib_window")


def summarize(runs: list[dict]) -> list[dict]:
    """One row per method: medians over its repeated runs."""
    rows = []
    # each repeat's ratio to the LoRA run next to it in time: drift of a shared machine cancels
    lora = {r["repeat"]: r["step_s_ordinary"] for r in runs if r["method"] == "lora"}
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        row = dict(rs[0])
        for key in ("step_s_ordinary", "step_s_window", "peak_rss_gib", "setup_rss_gib", "peak_cuda_gib",
                    "setup_cuda_gib", "step_peak_rss_gib_ordinary", "step_peak_rss_gib_window"):
            vals = [r[key] for r in rs if r.get(key) is not None]
            row[key] = statistics.median(vals) if vals else None
        row["repeats"] = len(rs)
        row["step_s_ordinary_all"] = [round(r["step_s_ordinary"], 4) for r in rs]
        paired = [r["step_s_ordinary"] / lora[r["repeat"]] for r in rs if r.get("repeat") in lora]
        row["paired_vs_lora"] = statistics.median(paired) if paired else None
        row["paired_vs_lora_all"] = [round(x, 3) for x in paired]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """Step times and training memory (peak minus the memory after setup), each as a ratio to LoRA's."""
    lora = next((r for r in rows if r["method"] == "lora"), None)
    gpu = rows[0].get("peak_cuda_gib") is not None
    if gpu:
        mem = [("peak CUDA over setup (GiB)", lambda r: r["peak_cuda_gib"] - r["setup_cuda_gib"])]
    else:
        mem = [("ordinary-step peak over setup (GiB)", lambda r: r["step_peak_rss_gib_ordinary"] - r["setup_rss_gib"]),
               ("window-step peak over setup (GiB)",
                lambda r: None if r["step_peak_rss_gib_window"] is None else
                r["step_peak_rss_gib_window"] - r["setup_rss_gib"])]
    head = ["method", "trainable", "ordinary step (s)", "window step (s)", "vs LoRA step",
            "per-repeat vs LoRA (median; each)"]
    for name, _ in mem:
        head += [name, "vs LoRA"]
    head += ["setup RSS (GiB)" if not gpu else "setup CUDA (GiB)", "saved (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        window = f"{r['step_s_window']:.3f}" if r["step_s_window"] else "-"
        cells = [r["method"], f"{r['trainable_params']:,}",
                 f"{r['step_s_ordinary']:.3f} (n={r['ordinary_steps']} x {r['repeats']})", window,
                 f"{r['step_s_ordinary'] / lora['step_s_ordinary']:.2f}x" if lora else "-",
                 f"{r['paired_vs_lora']:.2f}x ({', '.join(f'{x:.2f}' for x in r['paired_vs_lora_all'])})"
                 if r.get("paired_vs_lora") is not None else "-"]
        for _, get in mem:
            value = get(r)
            # LoRA has no window steps: window-step memory is compared with LoRA's ordinary steps
            ref = (get(lora) if get(lora) is not None else mem[0][1](lora)) if lora else None
            cells += ["-", "-"] if value is None else [f"{value:.3f}", f"{value / ref:.2f}x" if ref else "-"]
        cells += [f"{r['setup_cuda_gib' if gpu else 'setup_rss_gib']:.2f}", f"{r['adapter_bytes'] / 1e6:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kernel_tables(k: dict[str, list[dict]]) -> str:
    def rows(items, cols):
        head = "| " + " | ".join(c for c, _ in cols) + " |"
        body = ["| " + " | ".join(fmt(r) for _, fmt in cols) + " |" for r in items]
        return "\n".join([head, "|" + "---|" * len(cols), *body])

    ms = lambda key: (lambda r: f"{r[key]:.2f}")  # noqa: E731
    ratio = lambda a, b: (lambda r: f"{r[a] / r[b]:.1f}x")  # noqa: E731
    return "\n\n".join([
        "### grad(values) outside statistics windows (ms per linear)",
        rows(k["backward"], [("shape", lambda r: r["shape"]), ("k", lambda r: f"{r['k']:,}"),
                             ("tokens", lambda r: str(r["tokens"])), ("dense g^T x + gather", ms("dense_gather_ms")),
                             ("sampled_addmm", ms("sampled_ms")),
                             ("sampled, transposed pattern (before)", ms("sampled_t_ms")),
                             ("index gather", ms("index_gather_ms")),
                             ("dense / sampled", ratio("dense_gather_ms", "sampled_ms")),
                             ("before / now", ratio("sampled_t_ms", "sampled_ms")),
                             ("sampled max rel. error", lambda r: f"{r['sampled_rel_err']:.1e}")]),
        "### in-place patch of the base weight + restore (ms per linear; done in forward and in backward)",
        rows(k["patch"], [("shape", lambda r: r["shape"]), ("k", lambda r: f"{r['k']:,}"),
                          ("removed", lambda r: f"{r['removed']:,}"), ("slot order (before)", ms("slot_order_ms")),
                          ("sorted positions", ms("sorted_ms")),
                          ("sorted, originals reused (backward)", ms("sorted_reuse_ms")),
                          ("before / sorted", ratio("slot_order_ms", "sorted_ms"))]),
        "### forward of a plain base (ms per linear; k slots, k/4 removed)",
        rows(k["forward"], [("shape", lambda r: r["shape"]), ("x W^T alone", ms("base_only_ms")),
                            ("x W_eff^T (transient dense W_eff)", ms("dense_w_eff_ms")),
                            ("x W^T + CSR correction", ms("base_plus_csr_ms"))]),
        "### 4-bit base (QSEFT): the delta's forward + grad_x (ms per linear)",
        rows(k["qseft_delta"], [("shape", lambda r: r["shape"]), ("dense D (2 GEMMs)", ms("dense_delta_ms")),
                                ("CSR D (2 SpMMs)", ms("csr_delta_ms")),
                                ("dense / CSR", ratio("dense_delta_ms", "csr_delta_ms"))]),
        "### crossover: grad(values) by budget density (`kernel: auto` threshold)",
        rows(k["density"], [("shape", lambda r: r["shape"]), ("density", lambda r: f"{r['density']:g}"),
                            ("k", lambda r: f"{r['k']:,}"), ("dense + gather", ms("dense_gather_ms")),
                            ("sampled", ms("sampled_ms")), ("dense / sampled", ratio("dense_gather_ms", "sampled_ms"))]),
    ])


def markdown(args, rows: list[dict], kernels: dict | None, seconds: float) -> str:
    cfg = SETUPS[args.setup]
    threads = torch.get_num_threads()
    lines = [
        f"# Training speed and memory ({args.setup}): SEFT vs LoRA vs full fine-tuning with a mask", "",
        f"Written by `python benchmarks/train_speed.py {' '.join(sys.argv[1:])}` in {seconds / 60:.1f} min "
        f"({os.cpu_count()} CPU cores, torch {threads} threads per process).", "",
        f"Equal trainable parameters (SEFT `lora_rank=8` = peft LoRA r=8 on q,k,v,o,gate,up,down), torch AdamW, "
        f"batch {cfg['batch']} x {cfg['seq']} tokens, {cfg['warmup']} warm-up + {cfg['steps']} measured steps per "
        f"run, SEFT `update_interval={cfg['update_interval']}, stat_window={cfg['stat_window']}` (so window steps, "
        f"with the dense weight gradient and the topology update, are reported apart). `seft` = the default "
        f"kernel (`auto`), `seft-dense` = `kernel: dense`, the path before the sampled product, `seft-sparse` = `kernel: sparse`, "
        f"`frozen` = nothing trained, forward + backward to the input embeddings: the floor under any adapter "
        f"that trains through the frozen base (its grad_x must be formed). Each method ran "
        f"{args.repeats} times in its own subprocess, interleaved; step times are medians over repeats of each "
        f"run's median; `per-repeat vs LoRA` divides each run by the LoRA run of the same repeat (next to it in "
        f"time, so a shared machine's drift cancels) and gives the median of those ratios. Memory: the resident set sampled every 2 ms by a thread, its peak per step kind "
        f"(ordinary steps, statistics-window steps) minus the RSS after setup (model loaded, pruned and wrapped): "
        f"the training overhead, median over repeats, from a second process per run in which glibc runs with `MALLOC_MMAP_THRESHOLD_=65536` (times come from the first, under glibc's defaults) so freed "
        f"tensors return to the OS and RSS follows live memory (without it, `ru_maxrss` mostly measures the "
        f"allocator's high-water mark).", "",
        table(rows), "",
    ]
    if kernels:
        lines += ["## Kernels", "",
                  f"Medians of repeats on random operands, {'bf16' if args.setup == 'gpu' else 'fp32'}, one "
                  "process. grad(values) (but the index gather) and the patch are timed cold: a 64 MiB buffer is "
                  "rewritten before each call, so operands come from memory as in a training step, where other "
                  "layers ran in between.", "", kernel_tables(kernels), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", choices=sorted(SETUPS), default="cpu")
    ap.add_argument("--method", choices=METHODS, help="internal: run one method in this process")
    ap.add_argument("--methods", help=f"comma list of {', '.join(METHODS)} (default: {DEFAULT_METHODS})")
    ap.add_argument("--repeats", type=int, default=3, help="runs per method, interleaved; medians are reported")
    ap.add_argument("--kernels", action="store_true", help="also time the kernel variants behind SeftConfig.kernel")
    ap.add_argument("--threads", type=int, help="torch threads per process (default: torch's, all cores)")
    ap.add_argument("--out", type=Path, help="JSON rows (default benchmarks/results/train_speed_SETUP.json)")
    ap.add_argument("--md", type=Path, help="markdown table (default benchmarks/results/train_speed.md on cpu)")
    args = ap.parse_args()
    if args.setup == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--setup gpu needs CUDA")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method:
        print(json.dumps(run_one(args.setup, args.method)))
        return
    results = ROOT / "benchmarks" / "results"
    out = args.out or results / f"train_speed_{args.setup}.json"
    md = args.md or results / ("train_speed.md" if args.setup == "cpu" else f"train_speed_{args.setup}.md")
    t0 = time.perf_counter()
    runs = []
    for rep in range(args.repeats):
        for method in (args.methods or DEFAULT_METHODS[args.setup]).split(","):
            # Two processes per run: times under glibc's defaults, memory with every allocation above 64 KiB
            # mmapped (so RSS follows live tensors). The latter slows steps 35-56% (SmolLM2, one thread: SEFT
            # 2.09 -> 3.26 s, LoRA 2.46 -> 3.33 s) and unevenly, so it must not time them.
            threads = ["--threads", str(args.threads)] if args.threads else []
            cmd = [sys.executable, __file__, "--setup", args.setup, "--method", method, *threads]
            timed = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
            mem_env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536")
            sized = subprocess.run(cmd, check=True, capture_output=True, text=True, env=mem_env)
            run = json.loads(timed.stdout.strip().splitlines()[-1])
            memory = json.loads(sized.stdout.strip().splitlines()[-1])
            run |= {k: memory[k] for k in MEMORY_KEYS if k in memory}
            runs.append({**run, "repeat": rep})
            print(json.dumps(runs[-1]), flush=True)
    rows = summarize(runs)
    print(table(rows))
    kernels = None
    if args.kernels:
        device = "cuda" if args.setup == "gpu" else "cpu"
        shapes = [(4096, 4096), (11008, 4096), (4096, 11008)] if device == "cuda" else [(576, 576), (1536, 576),
                                                                                           (576, 1536)]
        kernels = compare_kernels(device, shapes, SETUPS[args.setup]["batch"] * SETUPS[args.setup]["seq"])
        print(kernel_tables(kernels))
    text = markdown(args, rows, kernels, time.perf_counter() - t0)
    out.write_text(json.dumps({"runs": runs, "rows": rows, "kernels": kernels}, indent=1))
    md.write_text(text)
    print(f"wrote {md} and {out}")


if __name__ == "__main__":
    main()
