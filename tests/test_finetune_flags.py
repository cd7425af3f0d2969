"""`seft finetune` exposes every SeftConfig field as a flag; KEY=VALUE without a recipe; `eval_data: none` (issue 14, item 7)."""
from __future__ import annotations

import pytest

from seft.cli import build_parser, main
from seft.commands.finetune import job_from_args
from seft.errors import SeftError
from seft.seft_options import _from_class, _from_source, seft_fields

# a valid, non-default value for every SeftConfig field, as typed on the command line
SAMPLES = {
    "target_modules": ("q_proj,v_proj", {"q_proj", "v_proj"}), "exclude_modules": ("down_proj", ["down_proj"]),
    "density": ("0.01", 0.01), "update_interval": ("10", 10), "stat_window": ("2", 2),
    "initial_replace_fraction": ("0.2", 0.2), "schedule": ("linear", "linear"), "evolve_until": ("0.5", 0.5),
    "revive_fraction": ("0.2", 0.2), "sensitivity": ("magnitude", "magnitude"), "growth": ("normalized", "normalized"),
    "regrow_warmup": ("3", 3), "protect_updates": ("2", 2), "init": ("reselect", "reselect"),
    "regrow_moments": ("zero", "zero"), "candidates": ("5", 5), "seed": ("3", 3), "kernel": ("dense", "dense"),
    "drop_values": ("fold", "fold"), "drop_score": ("momentum", "momentum"), "slot_lr": ("channel", "channel"),
    "slot_lr_power": ("0.5", 0.5), "balance": ("none", "none"),
}
FLAG = {"seed": "--slot-seed"}


def _job(*argv: str):
    return job_from_args(build_parser().parse_args(["finetune", *argv]))


def test_fields_read_without_peft_equal_the_dataclass():
    assert _from_source() == _from_class()


@pytest.mark.parametrize("field", [f for f in seft_fields() if f.name != "lora_rank"], ids=lambda f: f.name)
def test_every_seft_field_has_a_flag(field):
    assert field.name in SAMPLES, f"add a sample value for the new SeftConfig field {field.name}"
    text, expected = SAMPLES[field.name]
    flag = FLAG.get(field.name, "--" + field.name.replace("_", "-"))
    job = _job("--model", "m", "--output", "o", flag, text)
    assert list(job.adapter) == [field.name]  # into the recipe's adapter: section, nothing else
    assert getattr(job.seft_config(), field.name) == expected


def test_help_lists_the_seft_flags_with_their_help(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = capsys.readouterr().out
    assert "SEFT adapter" in out and "--update-interval N" in out and "--revive-fraction X" in out
    assert "Optimizer steps of gradient statistics per update. (default: 4)" in " ".join(out.split())


def test_lora_rank_and_optional_none():
    job = _job("--model", "m", "--output", "o", "--lora-rank", "4", "--candidates", "none")
    assert job.adapter == {"lora_rank": 4}  # `none` for an optional field is its default: nothing set


def test_overrides_without_a_recipe():
    job = _job("--model", "m", "--output", "o", "train.max_steps=7", "adapter.stat_window=2", "finetune.seq_len=64")
    assert job.train["max_steps"] == 7 and job.adapter["stat_window"] == 2 and job.config.seq_len == 64
    job = _job("model=m", "output=o", "--max-steps", "9")
    assert (job.model, job.output, job.train["max_steps"]) == ("m", "o", 9)
    with pytest.raises(SeftError, match="give --model and --output"):
        _job("train.max_steps=7")


def test_recipe_then_overrides_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\noutput: o\nadapter:\n  stat_window: 3\n  update_interval: 12\n")
    job = _job(str(recipe), "adapter.update_interval=8", "--stat-window", "2")
    assert job.adapter == {"stat_window": 2, "update_interval": 8}


def test_recipe_eval_data_none_like_the_flag(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\noutput: o\nfinetune:\n  eval_data: none\n")
    assert _job(str(recipe)).config.eval_data is None
    assert _job("--model", "m", "--output", "o", "--eval-data", "none").config.eval_data is None
    assert main(["validate", str(recipe)]) == 0
    assert "eval_data: null" in capsys.readouterr().out


def test_bad_seft_flag_values_are_one_line_errors(capsys):
    assert main(["finetune", "--model", "m", "--output", "o", "--growth", "gradiant"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown growth 'gradiant'" in err and "gradient" in err
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--model", "m", "--output", "o", "--stat-window", "two"])
    assert exc.value.code == 2
    assert "--stat-window: invalid int value: 'two'" in capsys.readouterr().err
