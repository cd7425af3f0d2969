"""A SEFT adapter loads through transformers' own adapter loading, exactly, or raises (issue 14, items 1 and 4).

Before: `AutoModelForCausalLM.from_pretrained(adapter_dir)` and `model.load_adapter(adapter_dir)` stopped at
`size mismatch ... seft_removed` (transformers injects the adapter, compares each file tensor's shape with the
module's and sets it, never calling `load_state_dict`; `removed` was created empty), and with
`ignore_mismatched_sizes=True` `removed` stayed empty: the pruned-away weights came back, silently. Now
adapter_config.json records each layer's `removed` length, the injected layers are built at the saved shapes,
and state no loader filled (or filled wrongly) is refused on first use.
"""
from __future__ import annotations

import json
import shutil

import peft
import pytest
import torch
from conftest import TINY_VOCAB, build_tiny_model
from safetensors.torch import load_file, save_file
from test_tuner_helpers import batches, prune_tiny, train_loop
from transformers import AutoModelForCausalLM

import seft
from seft.errors import SeftError

LAYER = "model.layers.0.self_attn.q_proj"


def _logits(model, x) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A pruned tiny base saved locally, a SEFT adapter trained through topology updates (so `removed` is
    non-empty) saved next to it, and the logits PeftModel.from_pretrained gives for a fixed input."""
    root = tmp_path_factory.mktemp("stock")
    prune_tiny(build_tiny_model()).save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    # the spec's replacement (30% at the first update, free across rows): enough revivals for every layer to
    # have several removed positions
    pm = peft.get_peft_model(base, seft.SeftConfig(lora_rank=2, update_interval=3, stat_window=2,
                                                   evolve_until=1.0, revive_fraction=0.5, regrow_warmup=2,
                                                   initial_replace_fraction=0.3, balance="none"))
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    train_loop(pm, optimizer, 9, TINY_VOCAB)
    pm.save_pretrained(root / "adapter")
    x = batches(TINY_VOCAB, 1, seed=9)[0]
    ref = _logits(peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"),
                                                 root / "adapter"), x)
    torch.testing.assert_close(ref, _logits(pm, x), rtol=0, atol=0)
    return root, x, ref


def _removed_reset_logits(root, x) -> torch.Tensor:
    """What the adapter gives with `removed` emptied (the silent wrong answer of the old workaround)."""
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "adapter")
    for module in pm.modules():
        if hasattr(module, "seft_removed"):
            module.seft_removed["default"] = module.seft_removed["default"][:0].clone()
            module.state_mark_good("default")  # bypass validation: this is the state the bug produced
    return _logits(pm, x)


def test_removed_is_nonempty_and_recorded_in_the_config(saved):
    root, x, ref = saved
    state = load_file(root / "adapter" / "adapter_model.safetensors")
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    lengths = {k.removeprefix("base_model.model.").removesuffix(".seft_removed"): v.numel()
               for k, v in state.items() if k.endswith(".seft_removed")}
    assert sum(lengths.values()) > 0
    assert config["removed_sizes"] == lengths
    # the test has signal: resetting removed changes the logits
    assert not torch.allclose(_removed_reset_logits(root, x), ref, atol=1e-4)


def test_transformers_from_pretrained_adapter_dir(saved):
    root, x, ref = saved
    model = AutoModelForCausalLM.from_pretrained(root / "adapter")
    torch.testing.assert_close(_logits(model, x), ref, rtol=0, atol=0)


def test_transformers_load_adapter(saved):
    root, x, ref = saved
    model = AutoModelForCausalLM.from_pretrained(root / "base")
    model.load_adapter(str(root / "adapter"))
    torch.testing.assert_close(_logits(model, x), ref, rtol=0, atol=0)


def test_ignore_mismatched_sizes_is_exact(saved):
    root, x, ref = saved
    model = AutoModelForCausalLM.from_pretrained(root / "adapter", ignore_mismatched_sizes=True)
    torch.testing.assert_close(_logits(model, x), ref, rtol=0, atol=0)


@pytest.fixture
def old_adapter(saved, tmp_path):
    """The same adapter as saved before removed_sizes was recorded."""
    root, x, ref = saved
    old = tmp_path / "old"
    shutil.copytree(root / "adapter", old)
    config = json.loads((old / "adapter_config.json").read_text())
    del config["removed_sizes"]
    (old / "adapter_config.json").write_text(json.dumps(config))
    return old, x, ref


def test_old_adapter_mismatch_raises_never_runs_wrong(old_adapter):
    old, x, ref = old_adapter
    with pytest.raises(Exception, match="(?i)mismatch"):
        AutoModelForCausalLM.from_pretrained(old)
    model = AutoModelForCausalLM.from_pretrained(old, ignore_mismatched_sizes=True)
    with pytest.raises(SeftError, match=r"seft_removed still hold\(s\) the placeholder"):
        model(input_ids=x)


def test_old_adapter_still_loads_with_peft(old_adapter, saved):
    old, x, ref = old_adapter
    root = saved[0]
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), old)
    torch.testing.assert_close(_logits(pm, x), ref, rtol=0, atol=0)


def _edited_copy(root, tmp_path, edit) -> str:
    out = tmp_path / "edited"
    shutil.copytree(root / "adapter", out)
    state = load_file(out / "adapter_model.safetensors")
    edit(state)
    save_file(state, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return str(out)


def test_a_tensor_the_loader_skips_raises(saved, tmp_path):
    root, x, _ = saved
    key = f"base_model.model.{LAYER}.seft_removed"
    adapter = _edited_copy(root, tmp_path, lambda state: state.pop(key))
    model = AutoModelForCausalLM.from_pretrained(adapter)  # transformers only reports a missing key
    with pytest.raises(SeftError, match=f"not loaded into {LAYER}: seft_removed"):
        model(input_ids=x)


def test_a_corrupt_tensor_is_refused_through_transformers(saved, tmp_path):
    """The validation of tests/test_adapter_validation.py applies on this path too (here: a duplicate)."""
    root, x, _ = saved
    key = f"base_model.model.{LAYER}.seft_removed"

    def duplicate(state):
        removed = state[key].clone()
        removed[-1] = removed[0]
        state[key] = removed

    model = AutoModelForCausalLM.from_pretrained(_edited_copy(root, tmp_path, duplicate))
    with pytest.raises(SeftError, match=f"does not fit layer {LAYER}: seft_removed holds 1 duplicate"):
        model(input_ids=x)


def test_new_adapter_from_a_saved_config_is_refused_until_loaded(saved):
    """A saved config describes saved state: building an adapter from it without loading must not run."""
    root, x, _ = saved
    config = seft.SeftConfig.from_pretrained(root / "adapter")
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), config)
    with pytest.raises(SeftError, match="set removed_sizes=None and inference_mode=False"):
        pm(input_ids=x)
    config = seft.SeftConfig.from_pretrained(root / "adapter")
    config.removed_sizes, config.inference_mode = None, False
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(root / "base"), config)
    assert torch.isfinite(_logits(pm, x)).all()


def test_saving_leaves_the_live_config_reusable(tmp_path):
    """removed_sizes goes to the saved file only: the config object that built an adapter can build another."""
    config = seft.SeftConfig(lora_rank=2, update_interval=3, stat_window=2, evolve_until=1.0,
                             revive_fraction=0.5, regrow_warmup=2)
    pm = peft.get_peft_model(prune_tiny(build_tiny_model()), config)
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    train_loop(pm, optimizer, 6, TINY_VOCAB)
    pm.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["removed_sizes"]
    assert config.removed_sizes is None
    again = peft.get_peft_model(prune_tiny(build_tiny_model(seed=1)), config)
    assert torch.isfinite(_logits(again, batches(TINY_VOCAB, 1, seed=2)[0])).all()


def test_base_path_is_absolute_and_auto_peft_works_elsewhere(tmp_path, monkeypatch):
    """Item 4: a relative local base is recorded absolute, so AutoPeftModel finds it from another cwd."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    prune_tiny(build_tiny_model()).save_pretrained("base")
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained("base"), seft.SeftConfig(lora_rank=2))
    with torch.no_grad():
        for layer in pm.base_model.seft_layers().values():
            layer.seft_values["default"].normal_(0, 0.05)
    pm.save_pretrained("adapter")
    recorded = json.loads((work / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((work / "base").resolve())
    x = batches(TINY_VOCAB, 1, seed=3)[0]
    ref = _logits(pm, x)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = peft.AutoPeftModelForCausalLM.from_pretrained(str(work / "adapter"))
    torch.testing.assert_close(_logits(loaded, x), ref, rtol=0, atol=0)


def test_transformers_pipeline_on_the_adapter_dir(saved, tiny_tokenizer, tmp_path):
    """`pipeline(model=adapter_dir)` generates what the PeftModel generates (greedy)."""
    from transformers import pipeline

    root = saved[0]
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "adapter", adapter)
    tiny_tokenizer.save_pretrained(adapter)
    got = pipeline("text-generation", model=str(adapter), tokenizer=tiny_tokenizer, device="cpu")(
        "The function", max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), adapter).eval()
    ids = tiny_tokenizer("The function", return_tensors="pt").input_ids
    want = tiny_tokenizer.decode(pm.generate(input_ids=ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:],
                                 skip_special_tokens=True)
    assert got == want and len(want) > 0
