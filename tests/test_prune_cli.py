"""`seft prune` / `inspect` / `validate` end to end on a tiny saved model, and atomic output on Ctrl-C."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from seft.cli import main
from seft.errors import SeftError
from seft.prune import REPORT_NAME, PruneConfig, prune_checkpoint


@pytest.fixture
def tiny_dir(tmp_path, tiny_llama, tiny_tokenizer):
    path = tmp_path / "tiny"
    tiny_llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _flags(tiny_dir, out, text, *extra):
    return ["prune", "--model", str(tiny_dir), "--output", str(out), "--calibration", str(text),
            "--num-samples", "4", "--seq-len", "32", "--no-progress", *extra]


def test_cli_prune_inspect_and_reload(tiny_dir, tmp_path, tiny_text_file, capsys):
    out = tmp_path / "pruned"
    assert main(_flags(tiny_dir, out, tiny_text_file, "--method", "sparsegpt", "--sparsity", "0.6")) == 0
    model = AutoModelForCausalLM.from_pretrained(out)  # plain HF, no seft needed
    q = model.model.layers[1].self_attn.q_proj.weight
    assert (q == 0).float().mean().item() == pytest.approx(0.6, abs=0.01)
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["method"] == "sparsegpt" and report["calibration"]["num_samples"] == 4
    assert report["seconds"] > 0 and len(report["layers"]) == 2
    assert (out / "tokenizer.json").exists() and list(out.glob("*.safetensors"))
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "method: sparsegpt" in table and "  all " in table and "0.6000" in table
    assert main(["inspect", str(out), "--modules"]) == 0
    assert "mlp.down_proj" in capsys.readouterr().out


def test_cli_existing_output_refused_before_work(tiny_dir, tmp_path, tiny_text_file, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    assert main(_flags("does-not-matter", out, tiny_text_file, "--method", "wanda", "--sparsity", "0.5")) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(_flags(tiny_dir, out, tiny_text_file, "--method", "wanda", "--pattern", "2:4", "--overwrite")) == 0
    assert json.loads((out / REPORT_NAME).read_text())["pattern"] == "2:4"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "--model", "./no-such-model", "--method", "wanda", "--sparsity", "0.5", "--output", "OUT"],
         "no model folder './no-such-model'"),
        (["prune", "--method", "wanda", "--sparsity", "1.5", "--output", "OUT"], "sparsity must be in [0, 1)"),
        (["prune", "--method", "wanda", "--sparsity", "0.5"], "give --method and --output"),
        (["prune", "RECIPE.yaml", "--method", "wanda"], "use KEY=VALUE overrides instead of --method"),
        (["inspect", "./nowhere"], "no folder nowhere"),
    ],
)
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_cli_unknown_method_lists_choices(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--method", "wandaa", "--output", "x"])
    assert "invalid choice: 'wandaa'" in capsys.readouterr().err


def test_cli_recipe_with_overrides(tiny_dir, tmp_path, tiny_text_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"# Launch: seft prune {recipe}\nmodel: {tiny_dir}\noutput: {tmp_path / 'a'}\n"
        f"prune:\n  method: magnitude\n  sparsity: 0.5\n  calibration: {tiny_text_file}\n"
    )
    assert main(["prune", str(recipe), f"output={tmp_path / 'b'}", "prune.sparsity=0.25", "--no-progress"]) == 0
    assert not (tmp_path / "a").exists()
    assert json.loads((tmp_path / "b" / REPORT_NAME).read_text())["overall"]["sparsity"] == 0.25


def test_ctrl_c_mid_run_leaves_no_loadable_output(tiny_dir, tmp_path, tiny_text_file):
    """A KeyboardInterrupt from a hook in the middle of layer 1 must leave nothing under --output."""
    out = tmp_path / "interrupted"
    calls = {"n": 0}

    def interrupt(module, _args, _out):
        if type(module).__name__.endswith("DecoderLayer"):
            calls["n"] += 1
            if calls["n"] == 3:  # layer 0 observe + propagate, then layer 1
                raise KeyboardInterrupt

    handle = torch.nn.modules.module.register_module_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            prune_checkpoint(tiny_dir, out, PruneConfig(method="wanda", sparsity=0.5, calibration=str(tiny_text_file),
                                                        num_samples=2, seq_len=32), progress=False)
    finally:
        handle.remove()
    assert calls["n"] == 3
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temporary folder left behind either


def test_prune_checkpoint_checks_output_before_loading(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(SeftError, match="already exists"):
        prune_checkpoint("./not-a-model", tmp_path / "out", PruneConfig(method="magnitude", sparsity=0.5))
