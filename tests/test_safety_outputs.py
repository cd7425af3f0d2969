"""Outputs under faults and careless flags (issue 16, items 1-3 and 10).

--overwrite never replaces an input, a folder above one, or a folder seft did
not write; of two runs writing one output exactly one wins; every output
location is checked before the work; killed runs' temporary folders are
cleaned up; outputs get normal permissions.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from seft.cli import main
from seft.errors import SeftError

MAGNITUDE = ["--method", "magnitude", "--sparsity", "0.5", "--no-progress"]


@pytest.fixture
def model_dir(tmp_path, tiny_llama, tiny_tokenizer):
    path = tmp_path / "work" / "model"
    tiny_llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    (tmp_path / "work" / "notes.txt").write_text("keep me\n")
    return path


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message"
    return err[-1]


def test_overwrite_never_replaces_the_input_or_its_parent(model_dir, capsys):
    before = _files(model_dir.parent)
    for target in (model_dir, model_dir.parent):
        rc = main(["prune", "--model", str(model_dir), "--output", str(target), "--overwrite", *MAGNITUDE])
        assert rc == 2
        line = _one_line_error(capsys)
        assert f"--overwrite will not replace {target.resolve()}" in line
        assert ("is an input of this run" if target == model_dir else "contains") in line
    assert _files(model_dir.parent) == before  # the dense model and the sibling file are untouched


def test_overwrite_replaces_only_what_seft_wrote_and_validate_says_so(model_dir, tmp_path, capsys):
    mine = tmp_path / "unrelated"
    mine.mkdir()
    (mine / "data.txt").write_text("precious\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model_dir}\noutput: {mine}\noverwrite: true\nprune: {{method: magnitude, sparsity: 0.5}}\n")
    assert main(["validate", str(recipe)]) == 0
    warning = capsys.readouterr().err
    assert f"run will refuse to replace {mine}" in warning and "no .seft-output.json" in warning
    assert main(["prune", str(recipe), "--no-progress"]) == 2
    assert "it is not a folder seft wrote" in _one_line_error(capsys)
    assert (mine / "data.txt").read_text() == "precious\n"

    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--output", str(out), *MAGNITUDE]) == 0
    marker = json.loads((out / ".seft-output.json").read_text())
    assert marker["command"] == "seft prune"
    recipe.write_text(f"model: {model_dir}\noutput: {out}\noverwrite: true\nprune: {{method: magnitude, sparsity: 0.25}}\n")
    capsys.readouterr()
    assert main(["validate", str(recipe)]) == 0
    assert f"overwrite: true will replace {out.resolve()} (a `seft prune` output written" in capsys.readouterr().err
    assert main(["prune", str(recipe), "--no-progress"]) == 0
    assert json.loads((out / "sparsity_report.json").read_text())["target_sparsity"] == 0.25
    # ... but not once it has become an input: a seft output used as the model is still the model
    assert main(["prune", "--model", str(out), "--output", str(out), "--overwrite", *MAGNITUDE]) == 2


@pytest.mark.parametrize("when", ["pruning", "saving"])
def test_two_concurrent_writers_exactly_one_wins(when, model_dir, tmp_path, tiny_text_file, capsys, monkeypatch):
    """Run B starts and finishes while run A prunes its first layer, or while A writes its checkpoint
    (after any check at entry): A must not replace B's output, and must say so in one line."""
    import seft.models

    out = tmp_path / "race"
    flags = ["--model", str(model_dir), "--output", str(out), "--method", "wanda", "--calibration",
             str(tiny_text_file), "--num-samples", "2", "--seq-len", "32", "--no-progress"]
    state = {"inside": False, "rc_b": None}

    def run_b():
        if not state["inside"] and state["rc_b"] is None:
            state["inside"] = True
            state["rc_b"] = main(["prune", *flags, "--sparsity", "0.25"])
            state["inside"] = False

    def during_pruning(module, _args, _out):
        if type(module).__name__.endswith("DecoderLayer"):
            run_b()

    real_save = seft.models.save_checkpoint

    def during_saving(*args, **kwargs):  # the real save, with run B completing in the middle of A's
        if state["rc_b"] is None and not state["inside"]:
            run_b()
        return real_save(*args, **kwargs)

    if when == "saving":
        monkeypatch.setattr(seft.models, "save_checkpoint", during_saving)
        handle = None
    else:
        handle = torch.nn.modules.module.register_module_forward_hook(during_pruning)
    try:
        rc_a = main(["prune", *flags, "--sparsity", "0.5"])
    finally:
        if handle is not None:
            handle.remove()
    assert state["rc_b"] == 0 and rc_a == 2
    line = _one_line_error(capsys)
    assert f"output {out.resolve()} was written by another run while this one worked" in line
    assert json.loads((out / "sparsity_report.json").read_text())["target_sparsity"] == 0.25  # B's, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race", "work"]  # A's temporary folder is gone


def test_overwriting_runs_do_not_replace_each_others_output(tmp_path):
    """Both planned to replace the same old output; the second to finish finds a different one and fails."""
    from seft.io import atomic_output_dir, check_output

    out = tmp_path / "o"
    with atomic_output_dir(out) as tmp:
        (tmp / "v").write_text("old")
    plan_a, plan_b = check_output(out, True), check_output(out, True)
    with atomic_output_dir(plan_a) as tmp:
        (tmp / "v").write_text("a")
    with pytest.raises(SeftError, match="was written by another run"):
        with atomic_output_dir(plan_b) as tmp:
            (tmp / "v").write_text("b")
    assert (out / "v").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def _unwritable(tmp_path):
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:  # root writes through permissions; /sys refuses even root
        os.rmdir(__import__("tempfile").mkdtemp(dir="/sys"))
    except OSError:
        return __import__("pathlib").Path("/sys")
    pytest.skip("no unwritable folder for this user")


def test_every_output_location_is_checked_before_the_work(tmp_path, capsys, tiny_text_file):
    ro = _unwritable(tmp_path)
    # an unknown model would fail at loading: the output must be refused first
    assert main(["prune", "--model", "./no-such-model", "--output", str(ro / "out"), *MAGNITUDE]) == 2
    assert f"cannot write output {ro / 'out'}: {ro} is not writable" in _one_line_error(capsys)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["prune", "--model", "./no-such-model", "--output", str(blocker / "sub" / "out"), *MAGNITUDE]) == 2
    assert f"{blocker} is a file, not a folder" in _one_line_error(capsys)
    assert main(["eval", "--model", "./no-such-model", "--tasks", "bb_general_knowledge",
                 "--output", str(ro / "r.json")]) == 2
    assert "is not writable" in _one_line_error(capsys)
    assert main(["finetune", "--model", "./no-such-model", "--output", str(ro / "ft"),
                 "--data", str(tiny_text_file), "--eval-data", "none"]) == 2
    assert "is not writable" in _one_line_error(capsys)


def test_disk_space_is_checked_where_the_size_is_known(tmp_path):
    import shutil

    from seft.io import check_location

    free = shutil.disk_usage(tmp_path).free
    check_location(tmp_path / "a" / "b", size=1024)
    with pytest.raises(SeftError, match=r"not enough disk space for .*needs about .* GiB are free"):
        check_location(tmp_path / "a" / "b", size=2 * free)


def test_eval_output_into_a_missing_folder(tmp_path, tiny_tokenizer, tiny_llama, tiny_text_file):
    base = tmp_path / "base"
    tiny_llama.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    suite = tmp_path / "s.yaml"
    suite.write_text(f"perplexity:\n  - {{source: {tiny_text_file}, seq_len: 32, max_windows: 2}}\n")
    out = tmp_path / "not" / "yet" / "r.json"
    assert main(["eval", "--model", str(base), "--suite", str(suite), "--device", "cpu", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["perplexity"][0]["windows"] == 2
    assert main(["eval", "--model", str(base), "--suite", str(suite), "--device", "cpu", "--output", str(out),
                 "--overwrite"]) == 0  # a seft results file may be replaced
    assert main(["eval", "--model", str(base), "--suite", str(suite), "--device", "cpu",
                 "--output", str(base / "config.json"), "--overwrite"]) == 2  # an input may not


def test_permissions_and_stale_temporary_folders(model_dir, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    out = tmp_path / "o"
    stale = tmp_path / f".o.tmp-{dead_pid}-00c0ffee"
    live = tmp_path / f".o.tmp-{os.getpid()}-0badcafe"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
        (folder / ".seft-output.json").write_text(json.dumps({"host": socket.gethostname()}))
    old_umask = os.umask(0o022)
    try:
        assert main(["prune", "--model", str(model_dir), "--output", str(out), *MAGNITUDE]) == 0
    finally:
        os.umask(old_umask)
    assert not stale.exists(), "the folder of a dead run must be removed"
    assert live.exists(), "a running process's folder must be left alone"
    assert (out.stat().st_mode & 0o777) == 0o755
    assert (os.stat(out / "sparsity_report.json").st_mode & 0o777) == 0o644


def test_outputs_of_earlier_versions_can_still_be_overwritten(model_dir, tmp_path):
    """Outputs written before the marker existed are recognised by their seft report."""
    out = tmp_path / "old"
    assert main(["prune", "--model", str(model_dir), "--output", str(out), *MAGNITUDE]) == 0
    (out / ".seft-output.json").unlink()
    assert main(["prune", "--model", str(model_dir), "--output", str(out), "--overwrite", *MAGNITUDE]) == 0
    assert (out / ".seft-output.json").is_file()
    (out / ".seft-output.json").unlink()
    (out / "sparsity_report.json").write_text('{"not": "a seft report"}')
    assert main(["prune", "--model", str(model_dir), "--output", str(out), "--overwrite", *MAGNITUDE]) == 2
