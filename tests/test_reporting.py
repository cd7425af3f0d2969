"""SEFT's topology stats reach the user's reporting tools (issue 14, items 3 and 10).

A stock Trainer with `report_to=["tensorboard"]` and `callbacks=[SeftCallback()]`,
as the README shows: the event files must hold the `seft/*` scalars;
`seft finetune` must keep the event files in its output.
"""
from __future__ import annotations

import logging
from pathlib import Path

import peft
import pytest
import torch
from conftest import TINY_VOCAB, build_tiny_model
from test_tuner_helpers import prune_tiny
from test_tuner_trainer import _Blocks

import seft

pytest.importorskip("tensorboard", reason="tensorboard is in the dev extra (pip install -e .[dev])")

BLOCKS = torch.randint(3, TINY_VOCAB, (32, 24), generator=torch.Generator().manual_seed(0))


def scalar_tags(folder: Path) -> dict[str, list[int]]:
    """{tag: [steps]} of every scalar in the TensorBoard event files under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, list[int]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return found


def _trainer(tmp_path, steps: int, callbacks, **cfg):
    from transformers import Trainer, TrainingArguments

    pm = peft.get_peft_model(prune_tiny(build_tiny_model()), seft.SeftConfig(
        lora_rank=2, update_interval=3, stat_window=2, evolve_until=1.0, revive_fraction=0.5, **cfg))
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1000, save_strategy="no",
        report_to=["tensorboard"], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    return Trainer(model=pm, args=args, train_dataset=_Blocks(BLOCKS), callbacks=callbacks)


def test_seft_scalars_reach_tensorboard(tmp_path):
    callback = seft.SeftCallback()
    trainer = _trainer(tmp_path, 7, [callback])
    assert trainer.callback_handler.callbacks[0] is callback  # moved before the reporters at init
    trainer.train()
    tags = scalar_tags(tmp_path / "out" / "runs")
    assert tags.get("train/seft/replaced") == [3, 6], sorted(tags)
    for name in ("revived", "repruned", "sparsity", "replace_fraction", "layers_skipped"):
        assert f"train/seft/{name}" in tags, sorted(tags)
    assert "train/loss" in tags  # the Trainer's own entry of the same steps


def test_callback_added_after_init_also_reports(tmp_path):
    trainer = _trainer(tmp_path, 4, [])
    callback = seft.SeftCallback()
    trainer.add_callback(callback)  # after the reporters, and after on_init_end
    trainer.train()
    assert trainer.callback_handler.callbacks[0] is callback
    assert scalar_tags(tmp_path / "out" / "runs").get("train/seft/replaced") == [3]


def test_no_op_update_at_evolve_until_is_not_logged(tmp_path, caplog):
    """At step T = evolve_until * total the replace fraction is 0: nothing to update, nothing to log."""
    callback = seft.SeftCallback()
    trainer = _trainer(tmp_path, 6, [callback])  # T = 6, a multiple of update_interval 3
    with caplog.at_level(logging.INFO, logger="seft.tuner.model"):
        trainer.train()
    assert [h["step"] for h in callback.history] == [3]
    assert "SEFT update at step 6" not in caplog.text
    assert [h["step"] for h in trainer.state.log_history if "seft/replaced" in h] == [3]
    assert scalar_tags(tmp_path / "out" / "runs").get("train/seft/replaced") == [3]


def test_seft_finetune_keeps_the_event_files(tmp_path, tiny_tokenizer, tiny_text_file):
    from test_finetune import save_pruned_tiny, tiny_job

    from seft.finetune import run_finetune

    base = save_pruned_tiny(tmp_path / "pruned", tiny_tokenizer)
    report = run_finetune(tiny_job(base, tmp_path / "repaired", tiny_text_file, report_to=["tensorboard"]),
                          progress=False)
    tags = scalar_tags(tmp_path / "repaired" / "runs")
    assert tags.get("train/seft/replaced") == [u["step"] for u in report["topology_updates"]] == [2, 4]
