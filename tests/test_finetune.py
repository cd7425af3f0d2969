"""`seft finetune`: every method trains and keeps sparsity; recipes; resume; errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model
from safetensors.torch import load_file

from seft.errors import SeftError
from seft.finetune import (
    DENSE_METHODS,
    SPARSE_METHODS,
    FinetuneConfig,
    FinetuneJob,
    job_from_recipe,
    layer_sparsity,
    run_finetune,
)
from seft.models import decoder_layers, target_linears
from seft.sparsity import nm_mask, row_topk_mask


def save_pruned_tiny(folder: Path, tokenizer, pattern=None, sparsity=0.5) -> Path:
    model = build_tiny_model("llama", seed=1)
    with torch.no_grad():
        for layer in decoder_layers(model):
            for lin in target_linears(layer).values():
                w = lin.weight
                mask = nm_mask(w.abs(), *pattern) if pattern else row_topk_mask(w.abs(), sparsity)
                w.mul_(mask)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pruned_tiny(tmp_path_factory, tiny_tokenizer):
    return save_pruned_tiny(tmp_path_factory.mktemp("pruned"), tiny_tokenizer)


def tiny_job(model: Path, output: Path, data: Path, method: str = "seft", steps: int = 6, **train) -> FinetuneJob:
    return job_from_recipe({
        "model": str(model), "output": str(output),
        "finetune": {"data": str(data), "method": method, "seq_len": 32, "merge": True,
                     "eval_data": str(data), "eval_seq_len": 32, "eval_windows": 4,
                     "calibration": str(data), "calibration_samples": 4, "calibration_seq_len": 32},
        "adapter": {"lora_rank": 2, "update_interval": 2, "stat_window": 1, "revive_fraction": 0.5},
        "train": {"max_steps": steps, "per_device_train_batch_size": 2, "learning_rate": 1e-2,
                  "save_steps": 3, "logging_steps": 1, "disable_tqdm": True, **train},
    })


@pytest.mark.parametrize("method", SPARSE_METHODS)  # `lora` is dense by design: tested on its own below
def test_every_method_keeps_sparsity(method, pruned_tiny, tiny_text_file, tmp_path):
    report = run_finetune(tiny_job(pruned_tiny, tmp_path / "out", tiny_text_file, method), progress=False)
    assert report["steps"] == 6
    assert report["sparsity_preserved"], (report["sparsity_before"], report["sparsity_after_merge"])
    merged = tmp_path / "out" / "merged"
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert layer_sparsity(plain) == report["sparsity_before"]["per_layer"]
    saved = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert saved["method"] == method and saved["perplexity_after"]["perplexity"] > 0
    if method == "seft":
        assert report["topology_updates"], "SEFT should have updated its topology"
        assert sum(u["seft/replaced"] for u in report["topology_updates"]) > 0
    if method == "static":
        assert not report["topology_updates"]
    if method in ("seft", "static", "masked-lora", "seft-norevive"):
        # equal budgets: the SEFT delta and the masked LoRA train r*(in+out) numbers per linear
        assert report["trainable_params"] == sum(
            2 * (lin.in_features + lin.out_features) for layer in decoder_layers(plain)
            for lin in target_linears(layer).values())


def test_nm_base_keeps_pattern(tmp_path, tiny_tokenizer, tiny_text_file):
    base = save_pruned_tiny(tmp_path / "nm", tiny_tokenizer, pattern=(2, 4))
    report = run_finetune(tiny_job(base, tmp_path / "out", tiny_text_file, "seft"), progress=False)
    from transformers import AutoModelForCausalLM

    from seft.sparsity import is_nm

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    for layer in decoder_layers(merged):
        for lin in target_linears(layer).values():
            assert is_nm(lin.weight, 2, 4)
    assert report["sparsity_preserved"]
    assert report["pattern_before"] == report["pattern_after_merge"] == "2:4"


def test_model_pattern_sees_a_broken_nm(tmp_path, tiny_tokenizer):
    """Sparsity counts cannot tell a 2:4 model from one with a group at 3 and another at 1; the pattern can."""
    from transformers import AutoModelForCausalLM

    from seft.finetune import layer_sparsity, model_pattern

    model = AutoModelForCausalLM.from_pretrained(save_pruned_tiny(tmp_path / "nm", tiny_tokenizer, pattern=(2, 4)))
    assert model_pattern(model) == "2:4"
    before = layer_sparsity(model)
    w = decoder_layers(model)[-1].mlp.down_proj.weight.data
    zero, kept = (w[0, :4] == 0).nonzero().flatten()[0], (w[0, 4:8] != 0).nonzero().flatten()[0] + 4
    w[0, zero], w[0, kept] = 1.0, 0.0  # move one weight across a group boundary
    assert layer_sparsity(model) == before and model_pattern(model) == "unstructured"


class Interrupt(Exception):
    pass


def test_resume_matches_uninterrupted(pruned_tiny, tiny_text_file, tmp_path):
    """Kill a run after its step-3 checkpoint, resume it, compare with a run that was never stopped."""
    from transformers import TrainerCallback

    import seft.finetune as ft

    full = run_finetune(tiny_job(pruned_tiny, tmp_path / "full", tiny_text_file, steps=8), progress=False)

    class KillAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                raise Interrupt

    original = ft.prepare

    def prepare_with_kill(job, model):
        trained, callbacks = original(job, model)
        return trained, [*callbacks, KillAfter()]

    ft.prepare = prepare_with_kill
    try:
        with pytest.raises(Interrupt):
            run_finetune(tiny_job(pruned_tiny, tmp_path / "cut", tiny_text_file, steps=8), progress=False)
    finally:
        ft.prepare = original
    assert not (tmp_path / "cut").exists(), "an interrupted run must leave no output"
    work = ft.work_dir_for(tmp_path / "cut")
    assert (work / "checkpoint-3").is_dir()
    with pytest.raises(SeftError, match="interrupted run; pass --resume"):
        run_finetune(tiny_job(pruned_tiny, tmp_path / "cut", tiny_text_file, steps=8), progress=False)
    job = tiny_job(pruned_tiny, tmp_path / "cut", tiny_text_file, steps=8)
    job.config.resume = True
    resumed = run_finetune(job, progress=False)
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["steps"] == 8
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if a[key].dtype.is_floating_point:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key
    assert not work.exists()
    replaced = [[u["seft/replaced"] for u in r["topology_updates"]] for r in (full, resumed)]
    assert replaced[0] == replaced[1] and len(replaced[0]) >= 2


def test_recipe_errors(pruned_tiny, tmp_path, tiny_text_file):
    base = {"model": str(pruned_tiny), "output": str(tmp_path / "o"), "finetune": {"data": str(tiny_text_file)}}
    with pytest.raises(SeftError, match=r"unknown key 'learnig_rate' in section 'train' \(did you mean learning_rate"):
        job_from_recipe({**base, "train": {"learnig_rate": 1e-3}})
    with pytest.raises(SeftError, match=r"unknown key 'revive' in section 'adapter'.*valid keys:"):
        job_from_recipe({**base, "adapter": {"revive": True}})
    with pytest.raises(SeftError, match="unknown method 'sft'"):
        job_from_recipe({**base, "finetune": {"method": "sft"}})
    with pytest.raises(SeftError, match="density must be in"):
        job_from_recipe({**base, "adapter": {"density": 1.5, "lora_rank": None}})


def test_existing_output_refused(pruned_tiny, tmp_path, tiny_text_file):
    (tmp_path / "out").mkdir()
    with pytest.raises(SeftError, match="already exists; pass --overwrite"):
        run_finetune(tiny_job(pruned_tiny, tmp_path / "out", tiny_text_file), progress=False)


def test_cli_finetune(pruned_tiny, tmp_path, tiny_text_file, capsys):
    from seft.cli import main

    rc = main(["finetune", "--model", str(pruned_tiny), "--output", str(tmp_path / "o"), "--data", str(tiny_text_file),
               "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-data", "none", "--merge",
               "--lora-rank", "2", "--no-progress"])
    assert rc == 0 and (tmp_path / "o" / "merged" / "model.safetensors").exists()
    capsys.readouterr()
    rc = main(["finetune", "--model", str(pruned_tiny), "--output", str(tmp_path / "o"), "--data", str(tiny_text_file)])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    rc = main(["finetune", "--model", str(pruned_tiny), "--output", str(tmp_path / "o2"), "--data", "wikii"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown text source 'wikii'" in err and "did you mean wiki" in err and len(err.splitlines()) == 1


def test_default_config_is_valid():
    assert FinetuneConfig().validate().method == "seft"


def test_bnb_8bit_adamw_run(pruned_tiny, tiny_text_file, tmp_path):
    """bitsandbytes 8-bit AdamW trains through topology updates (its state is re-seeded at regrown slots)."""
    pytest.importorskip("bitsandbytes")
    report = run_finetune(tiny_job(pruned_tiny, tmp_path / "o", tiny_text_file, steps=6, optim="adamw_bnb_8bit"),
                          progress=False)
    assert report["steps"] == 6 and report["sparsity_preserved"]
    assert sum(u["seft/replaced"] for u in report["topology_updates"]) > 0
    assert math.isfinite(report["train_loss"])


def _save_dense_tiny(folder: Path, tokenizer) -> Path:
    build_tiny_model("llama", seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_lora_method_trains_a_dense_model(tmp_path, tiny_tokenizer, tiny_text_file):
    """`--method lora`: a plain peft LoRA adapter on a dense model; its merge is a dense model that differs."""
    from transformers import AutoModelForCausalLM

    from seft.evaluate import load_for_eval

    assert DENSE_METHODS == ("lora",)
    base = _save_dense_tiny(tmp_path / "dense", tiny_tokenizer)
    report = run_finetune(tiny_job(base, tmp_path / "out", tiny_text_file, "lora"), progress=False)
    assert report["steps"] == 6 and report["sparsity_preserved"] is None  # no promise made, none reported
    assert report["trainable_params"] == sum(  # rank 2 on every target linear: the shared budget
        2 * (lin.in_features + lin.out_features) for layer in decoder_layers(build_tiny_model("llama"))
        for lin in target_linears(layer).values())
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged")
    original = AutoModelForCausalLM.from_pretrained(base)
    assert max(layer_sparsity(merged).values()) == 0.0
    w, w0 = merged.model.layers[0].mlp.down_proj.weight, original.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(w, w0), "training changed nothing"
    unmerged = load_for_eval(base, tmp_path / "out", device="cpu").model  # the adapter is a plain peft one
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(unmerged(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_on_a_pruned_base_is_not_held_to_its_sparsity(pruned_tiny, tmp_path, tiny_text_file):
    """Every other method fails a merge that fills the base's zeros; `lora` reports the dense merge instead."""
    report = run_finetune(tiny_job(pruned_tiny, tmp_path / "out", tiny_text_file, "lora"), progress=False)
    before, after = report["sparsity_before"]["mean"], report["sparsity_after_merge"]["mean"]
    assert before == pytest.approx(0.5, abs=0.02) and after < 0.01
    assert report["sparsity_preserved"] is None


def test_cli_accepts_method_lora(tmp_path, tiny_tokenizer, tiny_text_file):
    from seft.cli import main

    base = _save_dense_tiny(tmp_path / "dense", tiny_tokenizer)
    rc = main(["finetune", "--model", str(base), "--output", str(tmp_path / "o"), "--data", str(tiny_text_file),
               "--method", "lora", "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-data", "none",
               "--lora-rank", "2", "--no-progress"])
    report = json.loads((tmp_path / "o" / "train_report.json").read_text())
    assert rc == 0 and report["method"] == "lora" and report["steps"] == 2
    assert (tmp_path / "o" / "adapter_model.safetensors").exists() and not (tmp_path / "o" / "merged").exists()


def test_fold_runs_merged_only(pruned_tiny, tiny_text_file, tmp_path):
    """`drop_values: fold` edits the base in memory: finetune refuses it with an adapter or checkpoints as the
    product, runs it merged (no adapter file), and an adapter save after a fold is refused."""
    job = tiny_job(pruned_tiny, tmp_path / "a", tiny_text_file)
    job.adapter["drop_values"] = "fold"
    with pytest.raises(SeftError, match="drop_values: fold"):
        run_finetune(job, progress=False)  # save_strategy steps: checkpoints could not carry the folds
    job = tiny_job(pruned_tiny, tmp_path / "b", tiny_text_file, save_strategy="no")
    job.adapter.update(drop_values="fold", revive_fraction=0.0)
    report = run_finetune(job, progress=False)
    assert report["sparsity_preserved"] and report["adapter_bytes"] is None
    assert not (tmp_path / "b" / "adapter_model.safetensors").exists()
    assert (tmp_path / "b" / "merged" / "config.json").exists()


def test_adapter_save_after_a_fold_is_refused(tmp_path):
    import peft
    from test_topology_options import _steps
    from test_tuner_helpers import prune_tiny

    import seft

    pm = peft.get_peft_model(prune_tiny(build_tiny_model("llama", seed=2)), seft.SeftConfig(
        lora_rank=2, update_interval=3, stat_window=1, evolve_until=1.0, revive_fraction=0.0, drop_values="fold"))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.save_pretrained(tmp_path / "before")  # nothing folded yet: an ordinary adapter
    assert _steps(pm, opt, range(1, 4), total=12)[3]["seft/replaced"] > 0
    with pytest.raises(SeftError, match="cannot carry"):
        pm.save_pretrained(tmp_path / "after")
