"""FSDP is refused with a message that points to DDP (SEFT's flat slot indices need whole weights)."""
from __future__ import annotations

from types import SimpleNamespace

import peft
import pytest
from conftest import build_tiny_model
from test_tuner_helpers import prune_tiny

import seft
from seft.errors import SeftError
from seft.tuner.callback import fsdp_in_use


def _pm():
    return peft.get_peft_model(prune_tiny(build_tiny_model("llama")), seft.SeftConfig(lora_rank=2))


def test_trainer_fsdp_args_are_refused():
    with pytest.raises(SeftError, match="DDP"):
        seft.SeftCallback().on_train_begin(SimpleNamespace(fsdp=["full_shard"]), None, None, model=_pm())


def test_accelerate_fsdp_launch_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(SeftError, match="does not support FSDP"):
        seft.SeftCallback().on_train_begin(SimpleNamespace(fsdp=[]), None, None, model=_pm())


def test_plain_and_ddp_runs_pass(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not fsdp_in_use(SimpleNamespace(fsdp=[]), _pm())
    seft.SeftCallback().on_train_begin(SimpleNamespace(fsdp=[]), None, None, model=_pm())
