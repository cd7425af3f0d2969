"""NaN/inf never merged or saved, divergence stops training, a broken sparsity fails the run (issue 16, item 6)."""
from __future__ import annotations

import pytest
import torch
from test_finetune import save_pruned_tiny, tiny_job
from test_tuner import _sparse_linear

import seft
from seft.errors import SeftError
from seft.tuner.layer import Linear as SeftLinear


@pytest.fixture(scope="module")
def pruned_tiny(tmp_path_factory, tiny_tokenizer):
    return save_pruned_tiny(tmp_path_factory.mktemp("pruned"), tiny_tokenizer)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merge_refuses_nonfinite_values(bad):
    lin = _sparse_linear()
    layer = SeftLinear(lin, "default", seft.SeftConfig(density=0.1), "l")
    weight = lin.weight.detach().clone()
    with torch.no_grad():
        layer.seft_values["default"][3] = bad
    with pytest.raises(SeftError, match="NaNs/Infs in the merged SEFT weight"):
        layer.merge()  # without safe_merge too
    assert torch.equal(lin.weight, weight) and not layer.merged


def test_diverging_training_stops_and_writes_nothing(pruned_tiny, tiny_text_file, tmp_path):
    import seft.finetune as ft

    job = tiny_job(pruned_tiny, tmp_path / "out", tiny_text_file, steps=8, learning_rate=1e30, warmup_steps=0)
    with pytest.raises(SeftError, match=r"training stopped at step \d+: .*(NaN/inf values in .*seft_values|loss is nan)"):
        ft.run_finetune(job, progress=False)
    assert not (tmp_path / "out").exists()
    work = ft.work_dir_for(tmp_path / "out")
    # nothing else is left: no temporary output, and the work folder only if it holds checkpoints to resume
    assert sorted(tmp_path.iterdir()) == ([work] if work.exists() else [])
    if work.exists():
        from seft.checkpoints import checkpoints

        assert checkpoints(work)


def test_broken_sparsity_fails_the_run(pruned_tiny, tiny_text_file, tmp_path, monkeypatch, capsys):
    """A fault that makes the base denser (a pruned weight turned back on) must fail `seft finetune`."""
    from transformers import TrainerCallback

    import seft.finetune as ft
    from seft.cli import main

    class Densify(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            w = model.base_model.model.model.layers[0].mlp.down_proj.get_base_layer().weight
            with torch.no_grad():
                w.view(-1)[(w.view(-1) == 0).nonzero()[0]] = 1.0

    original = ft.prepare
    monkeypatch.setattr(ft, "prepare", lambda job, model: (lambda t, c: (t, [*c, Densify()]))(*original(job, model)))
    out = tmp_path / "out"
    rc = main(["finetune", "--model", str(pruned_tiny), "--output", str(out), "--data", str(tiny_text_file),
               "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-data", "none", "--merge",
               "--lora-rank", "2", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2
    assert "the merged model is not as sparse as the pruned base (sparsity changed in 0.down_proj 0.500000 -> 0.4" in err
    assert not out.exists()
