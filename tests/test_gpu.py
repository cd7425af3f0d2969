"""CUDA checks (`make test-gpu`, i.e. pytest -m gpu): parity with CPU, bf16 bases, prune engine, a short SEFT run.

Skipped without CUDA; `make test` deselects them (-m "not gpu").
"""
from __future__ import annotations

import peft
import pytest
import torch
from conftest import TINY_VOCAB, build_tiny_model
from test_tuner_helpers import batches, prune_tiny

import seft
from seft.sparsity import row_topk_mask
from seft.tuner.layer import Linear as SeftLinear

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _layer(device: str, dtype: torch.dtype, out_f: int = 256, in_f: int = 512) -> SeftLinear:
    torch.manual_seed(0)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.mul_(row_topk_mask(lin.weight.abs(), 0.5))
    lin.requires_grad_(False)
    layer = SeftLinear(lin.to(device=device, dtype=dtype), "default", seft.SeftConfig(density=0.05), "l")
    with torch.no_grad():
        layer.seft_values["default"].copy_(torch.linspace(-0.1, 0.1, layer.seft_values["default"].numel()))
    return layer


def _run(layer: SeftLinear, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    layer.open_window("default", want_sensitivity=True)
    y = layer(x)
    (y.float() ** 2).sum().backward()
    window = layer.close_window("default")
    return y.float().cpu(), x.grad.float().cpu(), layer.seft_values["default"].grad.cpu(), window


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_forward_backward_parity_with_cpu(dtype):
    x = torch.randn(4, 32, 512)
    y_c, gx_c, gv_c, _ = _run(_layer("cpu", torch.float32), x)
    y_g, gx_g, gv_g, window = _run(_layer("cuda", dtype), x.to("cuda", dtype))
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    assert torch.allclose(y_g, y_c, rtol=tol, atol=tol * y_c.abs().max())
    assert torch.allclose(gx_g, gx_c, rtol=tol, atol=tol * gx_c.abs().max())
    assert torch.allclose(gv_g, gv_c, rtol=tol, atol=tol * gv_c.abs().max())
    assert window.grow_idx.device.type == "cuda"


def test_bf16_base_state_stays_fp32_and_integer():
    pm = peft.get_peft_model(prune_tiny(build_tiny_model("llama")).to("cuda", torch.bfloat16),
                             seft.SeftConfig(lora_rank=2))
    layer = next(iter(pm.seft_layers().values()))
    assert layer.seft_values["default"].dtype == torch.float32
    assert not layer.seft_indices["default"].is_floating_point()
    x = batches(TINY_VOCAB, 1)[0].cuda()
    loss = pm(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss) and layer.seft_values["default"].grad.dtype == torch.float32


def test_prune_engine_on_cuda_matches_cpu(tiny_tokenizer, tiny_text_file):
    from seft.prune import PruneConfig, prune_model

    masks = {}
    for device in ("cpu", "cuda"):
        model = build_tiny_model("llama")
        cfg = PruneConfig(method="wanda", sparsity=0.5, calibration=str(tiny_text_file), num_samples=4,
                          seq_len=32, seed=0, device=device).validate()
        prune_model(model, tiny_tokenizer, cfg, progress=False)
        masks[device] = [(p != 0).cpu() for n, p in model.named_parameters() if n.endswith("proj.weight")]
    agree = sum(int((a == b).sum()) for a, b in zip(masks["cpu"], masks["cuda"]))
    total = sum(a.numel() for a in masks["cpu"])
    assert agree / total > 0.999  # ties may break differently across devices


def test_short_seft_run_on_cuda():
    pm = peft.get_peft_model(prune_tiny(build_tiny_model("llama")).cuda(), seft.SeftConfig(
        lora_rank=2, update_interval=3, stat_window=2, evolve_until=1.0, revive_fraction=0.5, regrow_warmup=2))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, fused=True)
    stats = _cuda_train(pm, opt, 9)
    assert len(stats) == 2 and stats[0]["seft/replaced"] > 0  # after steps 3 and 6 (9 = T: no update)
    report = pm.seft_sparsity_report()
    assert report["active"] == report["n"]


def _cuda_train(pm, opt, total: int) -> list[dict]:
    pm.train()
    out = []
    for step, x in enumerate(batches(TINY_VOCAB, total), start=1):
        x = x.cuda()
        pm.seft_begin_window(step, total)
        pm(input_ids=x, labels=x).loss.backward()
        pm.seft_pre_optimizer_step(opt)
        opt.step()
        pm.seft_post_optimizer_step(opt)
        opt.zero_grad()
        stats = pm.seft_update(step, total, opt)
        if stats:
            out.append(stats)
    return out
