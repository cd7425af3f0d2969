"""Recipe values of the wrong type, and recipe files that are not UTF-8: one line each (issue 16, item 9)."""
from __future__ import annotations

import pytest

from seft.cli import main

PRUNE = "model: m\noutput: o\nprune:\n  method: wanda\n  sparsity: 0.5\n"
FINETUNE = "model: m\noutput: o\nfinetune:\n  data: wiki\ntrain:\n  max_steps: 10\n"


@pytest.mark.parametrize(("recipe", "override", "message"), [
    (PRUNE, "prune.sparsity=half", "section 'prune': sparsity must be a number or null, got the string 'half'"),
    (PRUNE, "prune.targets=q_proj", "section 'prune': targets must be a list of strings, got the string 'q_proj'"),
    (PRUNE, "prune.num_samples=2.5", "section 'prune': num_samples must be an integer, got 2.5"),
    (PRUNE, 'overwrite="yes"', "top level: overwrite must be true or false, got 'yes'"),
    (FINETUNE, "adapter.lora_rank=eight", "section 'adapter': lora_rank must be an integer or null, got the string 'eight'"),
    (FINETUNE, 'train.learning_rate="fast"', "section 'train': learning_rate must be a number, got the string 'fast'"),
    (FINETUNE, "finetune.merge=[1]", "section 'finetune': merge must be true or false, got [1]"),
    (FINETUNE, "train.bf16=1", "section 'train': bf16 must be true or false, got 1"),
])
def test_wrong_types_fail_validate_in_one_line(recipe, override, message, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    assert main(["validate", str(path), override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_right_types_pass_and_are_normalised(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(FINETUNE)
    assert main(["validate", str(path), "train.max_steps=1e3", "adapter.target_modules=q_proj",
                 "train.report_to=[none]", "train.lr_scheduler_type=linear"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 1000\n" in out  # an integral float for an int field
    assert "target_modules: q_proj" in out  # peft's target_modules may be one regex string


def test_non_utf8_recipe(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(PRUNE.encode() + "# caf\xe9\n".encode("latin-1"))
    for command in ("validate", "prune", "finetune"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert f"recipe {path} is not UTF-8 text (byte 0xe9 at offset" in err and "\n" not in err
