"""Pruning without calibration signal, and sequence lengths the model was not built for (issue 16, item 7)."""
from __future__ import annotations

import logging

import pytest
import torch
from conftest import build_tiny_model

from seft.errors import SeftError
from seft.prune import PruneConfig, prune_model


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_layer_with_all_zero_inputs_is_not_zeroed(method, tiny_tokenizer, tiny_text_file, caplog):
    """Layer 0's up_proj is all zero, so its down_proj sees only zero inputs during calibration."""
    model = build_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.zero_()
    config = PruneConfig(method=method, sparsity=0.5, calibration=str(tiny_text_file), num_samples=2, seq_len=32)
    with caplog.at_level(logging.WARNING, logger="seft.prune.engine"):
        report = prune_model(model, tiny_tokenizer, config, progress=False)
    down = report["layers"][0]["modules"]["mlp.down_proj"]
    assert down["sparsity"] == pytest.approx(0.5), "a dead-input layer must be pruned to the target, not zeroed"
    assert down["fallback"].startswith("magnitude")
    assert "layer 0 mlp.down_proj: pruned by magnitude" in caplog.text
    assert "fallback" not in report["layers"][1]["modules"]["mlp.down_proj"]
    w = model.model.layers[0].mlp.down_proj.weight
    assert (w != 0).sum(1).eq(w.shape[1] // 2).all()  # per row, like every other layer


def test_seq_len_above_max_positions(tiny_tokenizer, tiny_text_file, tmp_path, capsys):
    from seft.cli import main

    model = build_tiny_model("llama")  # max_position_embeddings 256
    config = PruneConfig(method="wanda", sparsity=0.5, calibration=str(tiny_text_file), num_samples=2, seq_len=512)
    with pytest.raises(SeftError, match=r"seq_len 512 exceeds the model's maximum of 256 positions"):
        prune_model(model, tiny_tokenizer, config, progress=False)
    base = tmp_path / "base"
    model.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    assert main(["prune", "--model", str(base), "--output", str(tmp_path / "o"), "--method", "wanda",
                 "--sparsity", "0.5", "--calibration", str(tiny_text_file), "--seq-len", "512", "--no-progress"]) == 2
    assert "seq_len 512 exceeds the model's maximum of 256" in capsys.readouterr().err
    assert main(["finetune", "--model", str(base), "--output", str(tmp_path / "f"), "--data", str(tiny_text_file),
                 "--seq-len", "300", "--eval-data", "none", "--no-progress"]) == 2
    assert "seq_len 300 exceeds the model's maximum of 256" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "f").exists()
