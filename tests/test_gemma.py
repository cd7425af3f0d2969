"""Gemma prunes and trains with SEFT; unknown architectures get errors that say what is wrong
(issue 14, item 10).

Before: a Gemma model got "SEFT target_modules None match no linear layer" although its linears have the
LLaMA names (peft had no default target list for the model type), and `seft` refused it as unsupported;
the unsupported-architecture error of a config without `architectures` ended in a stray "(?)".
"""
from __future__ import annotations

import peft
import pytest
import torch
from conftest import TINY_VOCAB
from test_prune import _record_layer_outputs
from test_tuner_helpers import PROJ, batches, train_loop
from transformers import AutoModelForCausalLM, GemmaConfig, Phi3Config

import seft
from seft.errors import SeftError
from seft.models import check_supported, decoder_layers, target_linears
from seft.prune import PruneConfig, prune_model

COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=2)


def _tiny(config_cls, **extra):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config_cls(**COMMON, **extra), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def test_gemma_prunes_trains_and_merges(tiny_tokenizer, tiny_text_file):
    model = _tiny(GemmaConfig)
    assert model.config.model_type == "gemma"
    check_supported(model.config)
    assert set(target_linears(decoder_layers(model)[0])) == set(PROJ)
    config = PruneConfig(method="wanda", sparsity=0.5, calibration=str(tiny_text_file), num_samples=4,
                         seq_len=48, batch_size=4)
    report = prune_model(model, tiny_tokenizer, config, progress=False)
    assert report["overall"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    pm = peft.get_peft_model(model, seft.SeftConfig(lora_rank=2, update_interval=3, stat_window=2,
                                                    evolve_until=1.0, revive_fraction=0.5, regrow_warmup=2))
    assert len(pm.base_model.seft_layers()) == 7 * 2  # default targets: every projection of both layers
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    stats = train_loop(pm, optimizer, 6, TINY_VOCAB)
    assert stats and sum(s["seft/replaced"] for s in stats) > 0
    x = batches(TINY_VOCAB, 1, seed=5)[0]
    with torch.no_grad():
        ref = pm(input_ids=x).logits
        merged = pm.merge_and_unload()(input_ids=x).logits
    torch.testing.assert_close(merged, ref, rtol=1e-4, atol=1e-4)


def test_unsupported_architecture_message_has_no_stray_marker():
    config = Phi3Config(**{k: v for k, v in COMMON.items() if k != "head_dim"})
    with pytest.raises(SeftError) as err:
        check_supported(config)
    assert str(err.value) == ("unsupported architecture 'phi3'; supported: "
                              "llama, mistral, qwen2, qwen3, gemma")
    config.architectures = ["Phi3ForCausalLM"]
    with pytest.raises(SeftError, match=r"unsupported architecture 'phi3' \(Phi3ForCausalLM\); supported"):
        check_supported(config)


def test_no_default_targets_names_the_model_type_and_its_linears():
    model = _tiny(Phi3Config)
    with pytest.raises(SeftError, match=r"no default target_modules for model type 'phi3' .*pass target_modules"
                                        r".*gate_up_proj.*qkv_proj"):
        peft.get_peft_model(model, seft.SeftConfig(lora_rank=2))
    pm = peft.get_peft_model(model, seft.SeftConfig(lora_rank=2, target_modules=["qkv_proj", "o_proj"]))
    assert len(pm.base_model.seft_layers()) == 2 * 2


def test_engine_drives_gemma_layers_exactly(tiny_tokenizer, tiny_text_file):
    """The pruning engine replays captured layer inputs: at sparsity 0 each layer's output must equal the
    model's own forward (this is what rules out layer-type-specific inputs, e.g. Gemma 2's masks)."""
    from seft.data import calibration_windows

    model = _tiny(GemmaConfig)
    config = PruneConfig(method="wanda", sparsity=0.0, calibration=str(tiny_text_file), num_samples=4,
                         seq_len=48, batch_size=4)
    windows = calibration_windows(tiny_tokenizer, config.calibration, 4, 48, seed=0)
    latest, handles = _record_layer_outputs(model)
    with torch.no_grad():
        model(windows, use_cache=False)
    reference = dict(latest)
    replayed = {}
    prune_model(model, tiny_tokenizer, config, progress=False,
                on_layer=lambda i, _layer: replayed.__setitem__(i, latest[i]))
    for h in handles:
        h.remove()
    assert sorted(replayed) == sorted(reference) == [0, 1]
    for i in reference:
        torch.testing.assert_close(replayed[i], reference[i], rtol=1e-5, atol=1e-5)
