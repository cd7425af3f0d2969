"""A multi-process launch that trains as one process is named, with the working command (issue 14, item 6).

`accelerate launch --num_processes 2 --cpu` starts one process (accelerate's
simple launcher) that sets MASTER_ADDR/MASTER_PORT and no WORLD_SIZE; the
environments below are what the launchers set, without launching.
"""
from __future__ import annotations

import logging

import peft
import pytest
import torch
from conftest import TINY_VOCAB, build_tiny_model
from test_tuner_helpers import prune_tiny
from test_tuner_trainer import _Blocks

import seft
from seft import launch_check as L

ACCELERATE_CPU_2 = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                    "ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}


def test_single_process_launch_is_fine():
    assert L.launch_problem(1, {}) is None
    assert L.launch_problem(1, {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no"}) is None


def test_accelerate_cpu_with_two_processes_is_named():
    message = L.launch_problem(1, ACCELERATE_CPU_2)
    assert message is not None and "world size 1" in message
    assert "accelerate launch --multi_gpu --num_processes N" in message and "torchrun --nproc_per_node N" in message


@pytest.mark.parametrize("var", ["WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"])
def test_world_size_env_above_one_but_one_process(var):
    assert f"{var}=2" in L.launch_problem(1, {var: "2"})


def test_real_multi_process_run_is_fine():
    # torchrun / accelerate --multi_gpu: RANK and WORLD_SIZE set, and the run sees them
    env = {**ACCELERATE_CPU_2, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    assert L.launch_problem(2, env) is None


def test_seft_callback_warns_under_the_accelerate_cpu_environment(tmp_path, monkeypatch, caplog):
    from transformers import Trainer, TrainingArguments

    monkeypatch.setattr(L, "_warned", set())
    for key, value in ACCELERATE_CPU_2.items():
        monkeypatch.setenv(key, value)
    pm = peft.get_peft_model(prune_tiny(build_tiny_model()), seft.SeftConfig(lora_rank=2))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    blocks = torch.randint(3, TINY_VOCAB, (4, 16))
    trainer = Trainer(model=pm, args=args, train_dataset=_Blocks(blocks), callbacks=[seft.SeftCallback()])
    with caplog.at_level(logging.WARNING, logger="seft.launch_check"):
        trainer.train()
    assert trainer.args.world_size == 1
    assert "is training as a single process" in caplog.text and "--multi_gpu" in caplog.text
