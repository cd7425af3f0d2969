"""Pruning on the embedded SmolLM2-135M: real-activation reconstruction order and the shared pruned fixture."""
from __future__ import annotations

import json

import pytest
import torch
from test_prune import _layer_inputs, reconstruction_errors

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["q_proj", "down_proj"])
@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_reconstruction_error_orders_methods_smollm2(smollm2, name, pattern):
    model, tok = smollm2
    w, x = _layer_inputs(model, tok, "wiki", name=name, n=8, seq_len=128)
    err = reconstruction_errors(w, x, 0.5, pattern)
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


def test_smollm2_wanda50_fixture(smollm2_wanda50):
    from transformers import AutoModelForCausalLM

    report = json.loads((smollm2_wanda50 / "sparsity_report.json").read_text())
    assert report["method"] == "wanda" and report["overall"]["sparsity"] == 0.5
    assert report["calibration"] == {"source": "wiki", "num_samples": 16, "seq_len": 256, "seed": 0}
    model = AutoModelForCausalLM.from_pretrained(smollm2_wanda50)
    for layer in model.model.layers:
        w = layer.mlp.down_proj.weight
        assert ((w == 0).sum(dim=1) == w.shape[1] // 2).all()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
