"""`seft inspect` on any folder: a model (dense or pruned/merged), a SEFT adapter, a per-layer plot (issue 14, item 8)."""
from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import TINY_VOCAB, build_tiny_model
from test_finetune import save_pruned_tiny
from test_tuner_trainer import _Blocks

import seft
from seft.cli import main
from seft.inspect_model import adapter_sparsity, model_sparsity


def _zeros_by_layer(model) -> dict[int, float]:
    from seft.models import decoder_layers, target_linears

    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        ws = list(target_linears(layer).values())
        out[i] = sum(int((lin.weight == 0).sum()) for lin in ws) / sum(lin.weight.numel() for lin in ws)
    return out


def test_inspect_any_model_folder(tmp_path, tiny_tokenizer, capsys):
    from transformers import AutoModelForCausalLM

    pruned = save_pruned_tiny(tmp_path / "pruned", tiny_tokenizer)  # pruned elsewhere: no sparsity_report.json
    report = model_sparsity(pruned)
    expected = _zeros_by_layer(AutoModelForCausalLM.from_pretrained(pruned))
    assert {layer["index"]: layer["sparsity"] for layer in report["layers"]} == expected
    assert all(abs(s - 0.5) < 0.01 for s in expected.values())
    assert main(["inspect", str(pruned)]) == 0
    out = capsys.readouterr().out
    assert "zeros counted from the weights" in out and "0.5000" in out
    assert main(["inspect", str(pruned), "--modules"]) == 0
    assert "self_attn.q_proj" in capsys.readouterr().out

    dense = tmp_path / "dense"
    build_tiny_model().save_pretrained(dense)
    assert model_sparsity(dense)["overall"]["sparsity"] == 0.0


def test_inspect_seft_adapter_matches_the_models_own_report(tmp_path, tiny_tokenizer, capsys):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    pruned = save_pruned_tiny(tmp_path / "pruned", tiny_tokenizer)
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(pruned), seft.SeftConfig(
        lora_rank=2, update_interval=2, stat_window=1, evolve_until=1.0, revive_fraction=0.5))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=7, per_device_train_batch_size=4,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    blocks = torch.randint(3, TINY_VOCAB, (32, 24), generator=torch.Generator().manual_seed(0))
    Trainer(model=pm, args=args, train_dataset=_Blocks(blocks), callbacks=[seft.SeftCallback()]).train()
    pm.save_pretrained(tmp_path / "adapter")
    own = pm.seft_sparsity_report()

    report = adapter_sparsity(tmp_path / "adapter")
    assert report["base"] == str(pruned)
    rows = {f"model.layers.{layer['index']}.{name}": r for layer in report["layers"]
            for name, r in layer["modules"].items()}
    assert rows.keys() == own["layers"].keys()
    for name, r in rows.items():
        mine = own["layers"][name]
        assert (r["k"], r["removed"], r["revived"], r["active"], r["n"]) == (
            mine["k"], mine["removed"], mine["revived_slots"], mine["active"], mine["n"]), name
        assert r["sparsity"] == pytest.approx(mine["sparsity"])
    assert report["overall"]["revived"] > 0 and report["overall"]["removed"] > 0  # the test sees real evolution
    assert report["overall"]["active"] == own["active"]

    assert main(["inspect", str(tmp_path / "adapter"), "--plot", str(tmp_path / "adapter.png")]) == 0
    out = capsys.readouterr().out
    assert "SEFT adapter:" in out and "revived" in out and f"{report['overall']['revived']:,}" in out
    assert (tmp_path / "adapter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_adapter_without_its_base(tmp_path, tiny_tokenizer, capsys):
    pruned = save_pruned_tiny(tmp_path / "pruned", tiny_tokenizer)
    from transformers import AutoModelForCausalLM

    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(pruned), seft.SeftConfig(lora_rank=2))
    pm.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert main(["inspect", str(tmp_path / "adapter")]) == 0
    assert "base checkpoint not found" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "adapter"), "--base", str(pruned)]) == 0
    assert "revived" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "adapter"), "--plot", str(tmp_path / "a.png")]) == 2
    assert "needs its base checkpoint" in capsys.readouterr().err


def test_inspect_plot_of_a_model_and_errors(tmp_path, tiny_tokenizer, capsys):
    pruned = save_pruned_tiny(tmp_path / "pruned", tiny_tokenizer)
    assert main(["inspect", str(pruned), "--plot", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 1000
    (tmp_path / "empty").mkdir()
    capsys.readouterr()  # the save's progress bar
    assert main(["inspect", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "neither a model folder" in err and len(err.splitlines()) == 1
    assert main(["inspect", str(pruned), "--plot", str(tmp_path / "s.jpg")]) == 2
    assert "give a .png file name" in capsys.readouterr().err
