"""Half-written Trainer checkpoints are recognised and skipped by --resume (issue 16, item 8)."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import Interrupt, save_pruned_tiny, tiny_job
from transformers import TrainerCallback

import seft.finetune as ft
from seft.errors import SeftError


@pytest.fixture(scope="module")
def pruned_tiny(tmp_path_factory, tiny_tokenizer):
    return save_pruned_tiny(tmp_path_factory.mktemp("pruned"), tiny_tokenizer)


class KillAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt


def _with_callback(monkeypatch, callback):
    original = ft.prepare
    monkeypatch.setattr(ft, "prepare", lambda job, model: (lambda t, c: (t, [*c, callback]))(*original(job, model)))


def _half_write(folder):
    """What Ctrl-C / SIGKILL / a full disk during Trainer's save leaves: files missing or cut, no marker."""
    (folder / ".seft-complete.json").unlink(missing_ok=True)  # seft.checkpoints.COMPLETE (absent before issue 16)
    (folder / "trainer_state.json").unlink()
    opt = folder / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[: opt.stat().st_size // 3])


def test_resume_skips_a_half_written_checkpoint(pruned_tiny, tiny_text_file, tmp_path, monkeypatch, caplog):
    full = ft.run_finetune(tiny_job(pruned_tiny, tmp_path / "full", tiny_text_file, steps=8), progress=False)
    with monkeypatch.context() as m:
        _with_callback(m, KillAfter(7))
        with pytest.raises(Interrupt):
            ft.run_finetune(tiny_job(pruned_tiny, tmp_path / "cut", tiny_text_file, steps=8), progress=False)
    work = ft.work_dir_for(tmp_path / "cut")
    assert (work / "checkpoint-3").is_dir() and (work / "checkpoint-6").is_dir()
    _half_write(work / "checkpoint-6")

    job = tiny_job(pruned_tiny, tmp_path / "cut", tiny_text_file, steps=8)
    job.config.resume = True
    with caplog.at_level(logging.WARNING, logger="seft.checkpoints"):
        resumed = ft.run_finetune(job, progress=False)
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["steps"] == 8
    assert "skipping checkpoint-6, which is incomplete (it has no trainer_state.json" in caplog.text
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    for key in a:  # continuing from checkpoint-3 reproduces the uninterrupted run
        if a[key].dtype.is_floating_point:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key
    assert [u["seft/replaced"] for u in full["topology_updates"]] == \
        [u["seft/replaced"] for u in resumed["topology_updates"]]


def test_checkpoint_completeness(pruned_tiny, tiny_text_file, tmp_path, monkeypatch):
    from seft.checkpoints import COMPLETE, checkpoint_problem, resume_checkpoint

    with monkeypatch.context() as m:
        _with_callback(m, KillAfter(4))
        with pytest.raises(Interrupt):
            ft.run_finetune(tiny_job(pruned_tiny, tmp_path / "o", tiny_text_file, steps=8), progress=False)
    ckpt = ft.work_dir_for(tmp_path / "o") / "checkpoint-3"
    listed = json.loads((ckpt / COMPLETE).read_text())["files"]
    assert "adapter_model.safetensors" in listed and "trainer_state.json" in listed and "optimizer.pt" in listed
    assert checkpoint_problem(ckpt) is None

    cut = tmp_path / "cut" / "checkpoint-3"
    shutil.copytree(ckpt, cut)
    data = (cut / "adapter_model.safetensors").read_bytes()
    (cut / "adapter_model.safetensors").write_bytes(data[:-10])  # truncated after it was marked
    assert checkpoint_problem(cut) == f"adapter_model.safetensors has {len(data) - 10} of its {len(data)} bytes"
    with pytest.raises(SeftError, match=r"--resume: no complete checkpoint in .*checkpoint-3: adapter_model"):
        resume_checkpoint(cut.parent)

    legacy = tmp_path / "legacy" / "checkpoint-3"  # written before markers existed: trainer_state.json decides
    shutil.copytree(ckpt, legacy)
    (legacy / COMPLETE).unlink()
    assert checkpoint_problem(legacy) is None
    (legacy / "trainer_state.json").write_text('{"global_step": 3, "log_hi')
    assert checkpoint_problem(legacy) == "its trainer_state.json is incomplete"


def test_ctrl_c_names_the_work_folder_it_keeps(pruned_tiny, tiny_text_file, tmp_path, monkeypatch, capsys):
    from seft.cli import main

    class CtrlC(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    _with_callback(monkeypatch, CtrlC())
    out = tmp_path / "o"
    rc = main(["finetune", "--model", str(pruned_tiny), "--output", str(out), "--data", str(tiny_text_file),
               "--max-steps", "4", "--save-steps", "1", "--seq-len", "32", "--batch-size", "2", "--eval-data",
               "none", "--lora-rank", "2", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    work = ft.work_dir_for(out)
    assert rc == 130 and not out.exists() and (work / "checkpoint-1").is_dir()
    assert "no partial output was left" not in err
    assert f"interrupted; nothing was written to {out}; the checkpoints of this run are in {work}" in err
    assert "--resume" in err
