"""Resume from a checkpoint inside a statistics window equals the uninterrupted run (issue 14, item 5).

Stock Trainer + SeftCallback on a tiny pruned model, a checkpoint after every
step; a fresh model resumed from each checkpoint must end with bit-identical
slots (indices), removed sets, slot ages and values.
"""
from __future__ import annotations

import logging
import shutil

import peft
import pytest
import torch
from conftest import TINY_VOCAB, build_tiny_model
from test_tuner_helpers import prune_tiny
from test_tuner_trainer import _Blocks

import seft

STEPS = 9  # update_interval 4, stat_window 3: windows at steps 2-4 and 6-8, updates after 4 and 8
BASE = dict(lora_rank=2, update_interval=4, stat_window=3, evolve_until=1.0, revive_fraction=0.5, regrow_warmup=2)
BLOCKS = torch.randint(3, TINY_VOCAB, (64, 24), generator=torch.Generator().manual_seed(0))


def _train(out_dir, cfg: dict, resume: str | None = None, save: bool = True, accum: int = 1) -> dict:
    from transformers import Trainer, TrainingArguments

    pm = peft.get_peft_model(prune_tiny(build_tiny_model()), seft.SeftConfig(**cfg))
    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=accum,
        learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1000,
        save_strategy="steps" if save else "no", save_steps=1, report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = Trainer(model=pm, args=args, train_dataset=_Blocks(BLOCKS), callbacks=[seft.SeftCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(pm).items()}


def _differences(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]


def _resume_copy(full_dir, step: int, tmp_path) -> str:
    """checkpoint-`step` of the full run, alone in a fresh output folder (the resumed run writes there)."""
    out = tmp_path / f"resume{step}"
    shutil.copytree(full_dir / f"checkpoint-{step}", out / f"checkpoint-{step}")
    return str(out / f"checkpoint-{step}")


@pytest.mark.parametrize("extra,steps", [
    ({}, range(1, STEPS)),  # every checkpoint of both update intervals
    ({"growth": "normalized", "protect_updates": 1}, (2, 3, 6, 7)),  # channel statistics in the window too
])
def test_resume_inside_a_window_is_exact(tmp_path, extra, steps):
    cfg = {**BASE, **extra}
    full = _train(tmp_path / "full", cfg)
    assert (tmp_path / "full" / "checkpoint-2" / "seft_window.safetensors").is_file()  # inside the window 2-4
    assert not (tmp_path / "full" / "checkpoint-4" / "seft_window.safetensors").exists()  # closed by the update
    for step in steps:
        resumed = _train(tmp_path / f"resume{step}", cfg, resume=_resume_copy(tmp_path / "full", step, tmp_path))
        assert _differences(full, resumed) == [], f"resumed from checkpoint-{step}"


def test_resume_with_accumulation_is_exact(tmp_path):
    full = _train(tmp_path / "full", BASE, accum=2)
    for step in (3, 7):
        resumed = _train(tmp_path / f"resume{step}", BASE, accum=2,
                         resume=_resume_copy(tmp_path / "full", step, tmp_path))
        assert _differences(full, resumed) == [], f"resumed from checkpoint-{step}"


def test_resume_without_the_window_file_warns(tmp_path, caplog):
    """What resume did before: a shorter window, another topology -- now never silently."""
    from seft.tuner.window_state import WINDOW_FILE

    full = _train(tmp_path / "full", BASE)
    ckpt = _resume_copy(tmp_path / "full", 7, tmp_path)
    (tmp_path / "resume7" / "checkpoint-7" / WINDOW_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="seft.tuner.callback"):
        resumed = _train(tmp_path / "resume7", BASE, resume=ckpt)
    assert "inside a statistics window, but no seft_window.safetensors" in caplog.text
    assert any("seft_indices" in k for k in _differences(full, resumed))  # the window restarted shorter


def test_window_file_of_another_step_is_refused(tmp_path):
    from seft.tuner.window_state import WINDOW_FILE

    _train(tmp_path / "full", BASE)
    ckpt = _resume_copy(tmp_path / "full", 6, tmp_path)
    shutil.copy(tmp_path / "full" / "checkpoint-7" / WINDOW_FILE, tmp_path / "resume6" / "checkpoint-6" / WINDOW_FILE)
    with pytest.raises(seft.SeftError, match="holds the statistics window of step 7, but the run resumes at step 6"):
        _train(tmp_path / "resume6", BASE, resume=ckpt)


def test_seft_finetune_resume_inside_a_window(tmp_path, tiny_tokenizer, tiny_text_file, monkeypatch):
    """`seft finetune --resume` from checkpoint-2, inside the window of the update at step 3."""
    from safetensors.torch import load_file
    from test_finetune import Interrupt, save_pruned_tiny, tiny_job
    from transformers import TrainerCallback

    import seft.finetune as ft

    base = save_pruned_tiny(tmp_path / "pruned", tiny_tokenizer)
    adapter = {"lora_rank": 2, "update_interval": 3, "stat_window": 2, "revive_fraction": 0.5}

    def job(out, **kw):
        j = tiny_job(base, out, tiny_text_file, steps=8, save_steps=2, **kw)
        j.adapter = adapter
        return j

    ft.run_finetune(job(tmp_path / "full"), progress=False)

    class KillAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Interrupt

    original = ft.prepare
    monkeypatch.setattr(ft, "prepare", lambda j, m: (lambda t, c: (t, [*c, KillAfter()]))(*original(j, m)))
    with pytest.raises(Interrupt):
        ft.run_finetune(job(tmp_path / "cut"), progress=False)
    monkeypatch.setattr(ft, "prepare", original)
    assert (ft.work_dir_for(tmp_path / "cut") / "checkpoint-2" / "seft_window.safetensors").is_file()
    resumed = job(tmp_path / "cut")
    resumed.config.resume = True
    assert ft.run_finetune(resumed, progress=False)["resumed_from"].endswith("checkpoint-2")
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])] == []
