"""FSDP2: SEFT under `fully_shard` takes the same topology decisions on every rank, equal to 1 process.

Two CPU processes (gloo) train a tiny SEFT model sharded by
`seft.distributed.shard_for_seft` (fully_shard per decoder layer + root:
base weights, `values` and its Adam moments are DTensor shards) through
several topology updates with revivals. `indices`, `removed` and `values`
must be identical on both ranks and equal one unsharded process that sees
the whole global batch (values up to float tolerance: the reduce-scatter
sums in another order); the base weights must come out bit-identical (the
sparse kernel patches FSDP's all-gathered weight in place and restores it);
the adapter and the merged model saved under FSDP2 must equal the
1-process files, and the adapter loads in this (fresh) process.

The same through a stock Trainer + SeftCallback (accelerate's FSDP plugin
does not run on CPU, see fsdp_worker.train_trainer).

Also: FSDP setups SEFT cannot train under are refused with a line naming
what to use instead.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import peft
import pytest
import torch
from conftest import build_tiny_model
from safetensors.torch import load_file
from test_tuner_helpers import prune_tiny
from transformers import TrainerState

import seft
from seft import distributed as D
from seft.errors import SeftError
from seft.tuner.callback import check_fsdp_setup

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402
import fsdp_worker  # noqa: E402
from ranks import free_port, run_ranks  # noqa: E402


def _assert_files_match(sharded: Path, single: Path, weights: str) -> None:
    a, b = load_file(sharded / weights), load_file(single / weights)
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key
    config = next(p.name for p in single.glob("*config.json"))
    ca, cb = (json.loads((d / config).read_text()) for d in (sharded, single))
    for c in (ca, cb):  # a set, written in hash order: compare as a set
        if isinstance(c.get("target_modules"), list):
            c["target_modules"] = sorted(c["target_modules"])
    assert ca == cb


def test_fsdp2_two_ranks_identical_topology(tmp_path):
    fsdp_worker.train(0, 1, str(tmp_path), 0)  # the 1-process reference (also imports what the ranks need)
    run_ranks(fsdp_worker.train, (2, str(tmp_path), free_port()))
    r0, r1, single = (torch.load(tmp_path / f"{name}.pt") for name in ("rank0_of2", "rank1_of2", "rank0_of1"))
    assert len(r0["history"]) >= 3, "the run should pass through several topology updates"
    assert sum(h["seft/replaced"] for h in r0["history"]) > 0
    assert sum(h["seft/revived"] for h in r0["history"]) > 0
    assert r0["history"] == r1["history"]
    assert r0["state"].keys() == single["state"].keys()
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), f"ranks differ at {key}"
        ref = single["state"][key]
        if value.is_floating_point():
            torch.testing.assert_close(value, ref, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(value, ref), f"FSDP2 topology differs from the 1-process run at {key}"
    for key, value in r0["base"].items():  # in-place patching of the all-gathered weight left no trace
        assert torch.equal(value, single["base"][key]), key
    _assert_files_match(tmp_path / "adapter_of2", tmp_path / "adapter_of1", "adapter_model.safetensors")
    _assert_files_match(tmp_path / "merged_of2", tmp_path / "merged_of1", "model.safetensors")
    loaded = peft.PeftModel.from_pretrained(ddp_worker.make_model(), tmp_path / "adapter_of2")
    state = {k: v for k, v in loaded.state_dict().items() if "seft_" in k}
    assert state.keys() == r0["state"].keys()
    for key, value in state.items():
        assert torch.equal(value, r0["state"][key]), key


def test_fsdp2_trainer_matches_one_process(tmp_path):
    """The same through a stock Trainer + SeftCallback (model sharded by shard_for_seft; see fsdp_worker)."""
    fsdp_worker.train_trainer(0, 1, str(tmp_path), 0)
    run_ranks(fsdp_worker.train_trainer, (2, str(tmp_path), free_port()))
    r0, r1, single = (torch.load(tmp_path / f"trainer_rank{r}_of{w}.pt") for r, w in ((0, 2), (1, 2), (0, 1)))
    assert [h["step"] for h in r0["history"]] == [3, 6]  # 9 = T: no update
    assert sum(h["seft/revived"] for h in r0["history"]) > 0
    assert r0["history"] == r1["history"]
    for ours, ref in zip(r0["history"], single["history"]):
        assert ours.keys() == ref.keys()
        for key in ours:  # counts exactly; the schedule's fraction and the sparsity as floats
            assert ours[key] == pytest.approx(ref[key], rel=1e-9), key
    _assert_files_match(tmp_path / "trainer_adapter_of2", tmp_path / "trainer_adapter_of1",
                        "adapter_model.safetensors")


def _pm():
    return peft.get_peft_model(prune_tiny(build_tiny_model("llama")), seft.SeftConfig(lora_rank=2))


@pytest.fixture
def no_accelerate_env(monkeypatch):
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_OFFLOAD_PARAMS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_fsdp1_is_refused(no_accelerate_env):
    args = SimpleNamespace(fsdp=True, fsdp_config={"version": 1})
    with pytest.raises(SeftError, match="FSDP1.*use FSDP2"):
        seft.SeftCallback().on_init_end(args, None, None, model=_pm())
    no_accelerate_env.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch --use_fsdp: FSDP1 by default
    with pytest.raises(SeftError, match="FSDP1"):
        check_fsdp_setup(SimpleNamespace(fsdp=False), _pm())


def test_fsdp_cpu_offload_is_refused(no_accelerate_env):
    args = SimpleNamespace(fsdp=True, fsdp_config={"version": 2, "cpu_offload": True})
    with pytest.raises(SeftError, match="CPU offload"):
        seft.SeftCallback().on_init_end(args, None, None, model=_pm())
    no_accelerate_env.setenv("ACCELERATE_USE_FSDP", "true")
    no_accelerate_env.setenv("FSDP_VERSION", "2")
    no_accelerate_env.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(SeftError, match="CPU offload"):
        check_fsdp_setup(SimpleNamespace(fsdp=False), _pm())


def test_fsdp_with_a_4bit_base_is_refused(no_accelerate_env):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn import Linear4bit

    pm = _pm()
    pm.base_model.model.lm_head = Linear4bit(64, 384, bias=False)
    args = SimpleNamespace(fsdp=True, fsdp_config={"version": 2})
    with pytest.raises(SeftError, match="4-bit.*DDP"):
        seft.SeftCallback().on_init_end(args, None, None, model=pm)
    with pytest.raises(SeftError, match="4-bit"):
        D.shard_for_seft(pm)


def test_fsdp2_and_ddp_setups_pass(no_accelerate_env, caplog):
    assert not check_fsdp_setup(SimpleNamespace(fsdp=[]), _pm())
    with caplog.at_level("WARNING", logger="seft.tuner.callback"):  # FSDP asked for, model not sharded
        seft.SeftCallback().on_train_begin(SimpleNamespace(fsdp=True, fsdp_config={"version": 2}, world_size=1),
                                           TrainerState(), None, model=_pm())
    assert "runs a CPU job as DDP" in caplog.text
    seft.SeftCallback().on_init_end(SimpleNamespace(fsdp=True, fsdp_config={"version": 2}), None, None, model=_pm())
    no_accelerate_env.setenv("ACCELERATE_USE_FSDP", "true")
    no_accelerate_env.setenv("FSDP_VERSION", "2")
    check_fsdp_setup(SimpleNamespace(fsdp=False), _pm())
