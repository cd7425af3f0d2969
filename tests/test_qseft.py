"""QSEFT: SEFT on a bitsandbytes NF4 base (CPU) — mask from the fp checkpoint, gradients, merge onto fp."""
from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from conftest import TINY_VOCAB, build_tiny_model
from test_tuner_helpers import batches, prune_tiny, train_loop

import seft
from seft.errors import SeftError
from seft.models import load_model
from seft.tuner.layer import Linear as SeftLinear
from seft.tuner.quant import dequantize, is_4bit

pytest.importorskip("bitsandbytes")

CFG = dict(lora_rank=2, update_interval=3, stat_window=2, evolve_until=1.0, revive_fraction=0.5, regrow_warmup=2)
TINY = 1e-5  # far below NF4's smallest nonzero level (~0.08 * block absmax): quantizes to exactly 0


def _fp_counts(model) -> dict[str, int]:
    return {n.removesuffix(".weight"): int((p != 0).sum()) for n, p in model.named_parameters()
            if p.dim() == 2 and n.split(".")[-2].endswith("_proj")}


@pytest.fixture(scope="module")
def pruned_fp(tmp_path_factory, tiny_tokenizer) -> Path:
    """A pruned tiny llama where some surviving weights are tiny, so NF4 rounds them to 0."""
    model = prune_tiny(build_tiny_model("llama", seed=3))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and name.split(".")[-2].endswith("_proj"):
                survivors = (p != 0).nonzero()[::97]
                p[survivors[:, 0], survivors[:, 1]] = TINY
    folder = tmp_path_factory.mktemp("qseft") / "pruned"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _fp_model(folder: Path):
    return load_model(folder)[0]


def _adapted(folder: Path):
    model, _ = load_model(folder, load_in_4bit=True)
    return peft.get_peft_model(model, seft.SeftConfig(**CFG))


def test_mask_and_budget_come_from_unquantized_weights(pruned_fp):
    fp_counts = _fp_counts(_fp_model(pruned_fp))
    pm = _adapted(pruned_fp)
    layers = pm.seft_sparsity_report()["layers"]
    lost = 0
    for name, layer in pm.seft_layers().items():
        key = next(k for k in fp_counts if name.endswith(k))
        base = layer.get_base_layer()
        assert is_4bit(base)
        lost += fp_counts[key] - int((dequantize(base) != 0).sum())
        assert layer.seft_meta["default"].n == fp_counts[key], name
        assert layers[name]["active"] == fp_counts[key]
        slots = layer.seft_indices["default"].long()
        assert (layer.topology_weight().reshape(-1)[slots] != 0).all()  # initial slots on fp survivors
    assert lost > 0, "the fixture must have survivors that NF4 rounds to zero"


def test_4bit_layer_matches_dense_reference(pruned_fp):
    pm = _adapted(pruned_fp)
    layer: SeftLinear = next(iter(pm.seft_layers().values()))
    vals, idx, _ = layer.seft_state("default")
    base = layer.get_base_layer()
    w_q = dequantize(base).float()
    with torch.no_grad():
        vals.normal_(0, 0.05)
        survivors = (w_q.reshape(-1) != 0).nonzero().flatten()
        free = survivors[~torch.isin(survivors, idx.long())][:7]
        layer.seft_removed["default"] = free.to(idx.dtype)
        # hand-made state off the active-count invariant (kernel math only): known good, not refused on use
        layer.state_mark_good("default")
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    layer.open_window("default", want_sensitivity=True)
    y = layer(x)
    (y**2).sum().backward()
    ref_w = w_q.clone().reshape(-1)
    ref_w[free] = 0
    ref_w = ref_w.index_add(0, idx.long(), vals.detach()).view_as(w_q).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, ref_w, base.bias)
    (y2**2).sum().backward()
    assert torch.allclose(y, y2, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-4)
    assert torch.allclose(vals.grad, ref_w.grad.reshape(-1)[idx.long()], atol=1e-4)
    window = layer.close_window("default")
    assert window.grow_idx is not None and window.seen  # the window saw the dense gradient


def test_trains_through_updates_and_merges_onto_fp(pruned_fp, tmp_path):
    pm = _adapted(pruned_fp)
    before = [p.detach().clone() for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = batches(TINY_VOCAB, 1)[0]
    with torch.no_grad():
        loss0 = pm(input_ids=x, labels=x).loss.item()
    stats = train_loop(pm, opt, 9, TINY_VOCAB)
    assert len(stats) == 2 and stats[0]["seft/replaced"] > 0 and stats[0]["seft/revived"] > 0  # steps 3, 6 (9 = T: none)
    assert any(not torch.equal(a, b) for a, b in zip(before, (p for p in pm.parameters() if p.requires_grad)))
    with torch.no_grad():
        assert torch.isfinite(pm(input_ids=x, labels=x).loss) and pm(input_ids=x, labels=x).loss.item() != loss0
    report = pm.seft_sparsity_report()
    assert report["active"] == report["n"]
    with pytest.raises(SeftError, match="unquantized checkpoint"):
        pm.merge_and_unload()
    pm.save_pretrained(tmp_path / "adapter")
    fp = _fp_model(pruned_fp)
    fp_counts = _fp_counts(fp)
    merged = peft.PeftModel.from_pretrained(fp, tmp_path / "adapter").merge_and_unload()
    assert _fp_counts(merged) == fp_counts  # exactly as sparse as the fp checkpoint, layer by layer


def test_bare_bitsandbytes_load_is_refused(pruned_fp):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(pruned_fp, quantization_config=quant)
    with pytest.raises(SeftError, match="load_in_4bit=True"):
        peft.get_peft_model(model, seft.SeftConfig(**CFG))


def test_eval_forward_keeps_trainable_layout(pruned_fp):
    """An eval no-grad forward before training must not repack the weights for CPU inference."""
    pm = _adapted(pruned_fp)
    x = batches(TINY_VOCAB, 1)[0]
    with torch.no_grad():
        pm.eval()(input_ids=x)
    layer = next(iter(pm.seft_layers().values()))
    assert not getattr(layer.get_base_layer().weight.quant_state, "packing_format_for_cpu", False)
    pm.train()
    pm(input_ids=x, labels=x).loss.backward()
    assert layer.seft_values["default"].grad is not None


def test_finetune_load_in_4bit_merges_onto_fp(pruned_fp, tiny_text_file, tmp_path):
    from test_finetune import tiny_job

    from seft.finetune import layer_sparsity, run_finetune

    job = tiny_job(pruned_fp, tmp_path / "out", tiny_text_file)
    job.config.load_in_4bit = True
    report = run_finetune(job, progress=False)
    assert report["sparsity_preserved"], (report["sparsity_before"], report["sparsity_after_merge"])
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    assert layer_sparsity(merged) == layer_sparsity(_fp_model(pruned_fp))
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # a plain fp checkpoint
    saved = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert saved["recipe"]["finetune"]["load_in_4bit"] is True


def test_load_in_4bit_rejects_non_seft_methods():
    from seft.finetune import FinetuneConfig

    with pytest.raises(SeftError, match="load_in_4bit supports the methods seft"):
        FinetuneConfig(method="masked-lora", load_in_4bit=True).validate()


@pytest.mark.slow
def test_smollm2_qseft_run(smollm2_wanda50, tmp_path):
    """A short QSEFT repair of the Wanda-50% SmolLM2; numbers go to the log (see benchmarks/qseft_smollm2.py)."""
    from seft.finetune import job_from_recipe, run_finetune

    job = job_from_recipe({
        "model": str(smollm2_wanda50), "output": str(tmp_path / "out"),
        "finetune": {"data": "wiki", "seq_len": 128, "merge": True, "load_in_4bit": True,
                     "eval_data": "wiki", "eval_seq_len": 128, "eval_windows": 4},
        "adapter": {"lora_rank": 8, "update_interval": 4, "stat_window": 2},
        "train": {"max_steps": 8, "per_device_train_batch_size": 2, "learning_rate": 2e-3,
                  "logging_steps": 4, "save_steps": 100, "disable_tqdm": True},
    })
    report = run_finetune(job, progress=False)
    assert report["sparsity_preserved"]
    assert report["topology_updates"] and report["adapter_sparsity"]["active"] == report["adapter_sparsity"]["n"]
    assert report["perplexity_after"]["perplexity"] < report["perplexity_before"]["perplexity"]
