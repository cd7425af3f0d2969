"""A SEFT adapter is validated on load; corrupt, foreign and pickled adapters are refused (issue 16, items 5, 9).

Every corruption here used to load silently (and, e.g., a negative `removed`
index zeroed the layer's last weight). Each is now a one-line SeftError
naming the layer and the problem.
"""
from __future__ import annotations

import peft
import pytest
import torch
from conftest import TINY_VOCAB, build_tiny_model
from test_tuner_helpers import prune_tiny, train_loop

import seft
from seft.errors import SeftError

LAYER = "model.layers.0.self_attn.q_proj"


def _key(sd: dict, name: str) -> str:
    return next(k for k in sd if f"{LAYER}.{name}" in k)


@pytest.fixture(scope="module")
def trained():
    """A SEFT adapter after two topology updates with revival (so `removed` is non-empty), and its state dict."""
    pm = peft.get_peft_model(prune_tiny(build_tiny_model()), seft.SeftConfig(
        lora_rank=2, update_interval=3, stat_window=2, evolve_until=1.0, revive_fraction=0.5, regrow_warmup=2))
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    train_loop(pm, optimizer, 6, TINY_VOCAB)
    sd = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(pm).items()}
    assert sd[_key(sd, "seft_removed")].numel() > 0
    return pm, sd


def _fresh():
    return peft.get_peft_model(prune_tiny(build_tiny_model()), seft.SeftConfig(lora_rank=2, revive_fraction=0.5))


def _weight():
    return prune_tiny(build_tiny_model()).model.layers[0].self_attn.q_proj.weight.reshape(-1)


def _corrupt(sd: dict, case: str) -> dict:
    sd = dict(sd)
    ki, kr, ka, kv = (_key(sd, n) for n in ("seft_indices", "seft_removed", "seft_age", "seft_values"))
    idx, rem = sd[ki], sd[kr]
    w = _weight()
    zero = (w == 0).nonzero().flatten()
    if case == "negative removed":
        sd[kr] = torch.cat([rem[:-1], torch.tensor([-1], dtype=rem.dtype)])
    elif case == "index past int32":
        sd[ki] = torch.cat([idx[:-1].long(), torch.tensor([2**32 + int(idx[-1])])])
    elif case == "duplicate slots":
        sd[ki] = torch.cat([idx[:-1], idx[:1]])
    elif case == "slots on pruned positions":
        free = zero[~torch.isin(zero, idx.long()) & ~torch.isin(zero, rem.long())]
        moved = idx.clone()
        moved[:8] = free[:8].to(idx.dtype)
        sd[ki] = moved
    elif case == "removed covers the layer":
        sd[kr] = torch.arange(w.numel(), dtype=rem.dtype)
    elif case == "removed covers every weight":
        sd[kr] = (w != 0).nonzero().flatten().to(rem.dtype)
    elif case in ("float indices", "uint8 indices", "bool indices"):
        sd[ki] = idx.to({"float indices": torch.float32, "uint8 indices": torch.uint8, "bool indices": torch.bool}[case])
    elif case == "age of the wrong length":
        sd[ka] = sd[ka][:-3]
    elif case == "nan values":
        sd[kv] = sd[kv].clone()
        sd[kv][0] = float("nan")
    elif case == "values for another budget":
        sd[kv] = torch.zeros(sd[kv].numel() + 64)
    return sd


CASES = {
    "negative removed": "seft_removed holds position -1, outside 0..4095",
    "index past int32": "seft_indices holds position 4294",
    "duplicate slots": "seft_indices holds 1 duplicate position",
    "slots on pruned positions": r"\d+ weights would be active, more than the base's 2048",
    "removed covers the layer": "seft_removed names .* where the base weight is already zero",
    "removed covers every weight": "only 256 of the base's 2048 weights would be active while .* hold no slot",
    "float indices": "seft_indices must be int32 or int64, got float32",
    "uint8 indices": "seft_indices must be int32 or int64, got uint8",
    "bool indices": "seft_indices must be int32 or int64, got bool",
    "age of the wrong length": "seft_age has shape",
    "nan values": "seft_values holds 1 NaN/inf",
    "values for another budget": "seft_values has shape .* takes k=",
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_state_is_refused(trained, case):
    _, sd = trained
    pm = _fresh()
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    before = {n: getattr(layer, n)["default"].clone() for n in ("seft_indices", "seft_removed")}
    with pytest.raises(SeftError, match=f"does not fit layer {LAYER}: {CASES[case]}"):
        peft.set_peft_model_state_dict(pm, _corrupt(sd, case))
    if case not in ("values for another budget", "nan values", "age of the wrong length"):
        for n, t in before.items():  # nothing of the bad state was copied into this layer
            assert torch.equal(getattr(layer, n)["default"], t), n


def test_valid_state_loads(trained):
    pm, sd = trained
    fresh = _fresh()
    peft.set_peft_model_state_dict(fresh, sd)
    x = torch.randint(3, TINY_VOCAB, (2, 12))
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, pm(x).logits)


def test_nm_pattern_is_kept(tmp_path):
    base = prune_tiny(build_tiny_model(), nm=(2, 4))
    pm = peft.get_peft_model(base, seft.SeftConfig(lora_rank=2))
    sd = {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(pm).items()}
    ki, kr = _key(sd, "seft_indices"), _key(sd, "seft_removed")
    w = base.model.layers[0].self_attn.q_proj.weight.detach().reshape(64, 16, 4)
    # remove one weight of group (0, 0) and put a slot on a pruned position of the full group (0, 1):
    # the active count stays n, but group (0, 1) now holds 3 of 4
    slots = set(sd[ki].tolist())
    take = next(int(j) for j in (w[0, 0] != 0).nonzero().flatten() if int(j) not in slots)
    grow = 4 + int((w[0, 1] == 0).nonzero().flatten()[0])
    moved = sd[ki].clone()
    victim = next(i for i, p in enumerate(moved.tolist()) if p >= 64)  # a slot outside row 0
    moved[victim] = grow
    sd[ki], sd[kr] = moved, torch.tensor([take], dtype=moved.dtype)
    fresh = peft.get_peft_model(prune_tiny(build_tiny_model(), nm=(2, 4)), seft.SeftConfig(lora_rank=2))
    with pytest.raises(SeftError, match="break the base's 2:4 pattern"):
        peft.set_peft_model_state_dict(fresh, sd)


# --- through `seft eval --adapter` (load_for_eval), one line each -----------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory, trained, tiny_tokenizer):
    pm, _ = trained
    root = tmp_path_factory.mktemp("adapters")
    base = root / "base"
    prune_tiny(build_tiny_model()).save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    pm.save_pretrained(root / "good")
    return root


def _copy(saved, name):
    import shutil

    shutil.copytree(saved / "good", saved / name, dirs_exist_ok=True)
    return saved / name


def test_eval_refuses_bad_adapter_files(saved, capsys):
    from seft.cli import main
    from seft.evaluate import load_for_eval

    base = saved / "base"
    assert load_for_eval(base, saved / "good", device="cpu").meta["adapter"]["peft_type"] == "SEFT"

    corrupt = _copy(saved, "corrupt")
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SeftError, match="adapter_model.safetensors is not a readable safetensors file"):
        load_for_eval(base, corrupt, device="cpu")
    garbage = _copy(saved, "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00\xff" * 50)
    with pytest.raises(SeftError, match="not a readable safetensors file"):
        load_for_eval(base, garbage, device="cpu")

    pickled = _copy(saved, "pickled")
    from safetensors.torch import load_file

    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    with pytest.raises(SeftError, match=r"holds adapter_model.bin, a pickle, which seft does not load"):
        load_for_eval(base, pickled, device="cpu")

    suite = saved / "ppl.yaml"
    suite.write_text("perplexity:\n  - {source: pydoc, seq_len: 16, max_windows: 1}\n")
    capsys.readouterr()
    rc = main(["eval", "--model", str(base), "--adapter", str(corrupt), "--suite", str(suite), "--device", "cpu"])
    err = capsys.readouterr().err.strip()  # refused before the model loads: one line, nothing else
    assert rc == 2 and "\n" not in err and "not a readable safetensors file" in err


def test_eval_refuses_adapter_for_another_base(saved, tiny_tokenizer):
    """Same shapes, another pruning: the slots fall on weights this base does not have."""
    from seft.evaluate import load_for_eval

    other = saved / "other-base"
    prune_tiny(build_tiny_model(seed=7)).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    with pytest.raises(SeftError, match=r"SEFT adapter does not fit layer model\.layers\.\d+\.\S+: .*another base"):
        load_for_eval(other, saved / "good", device="cpu")
