"""`seft --help`, `seft CMD --help`, `--version` and model-free errors load no torch/peft/transformers (issue 14, item 9).

One fresh interpreter runs every case in turn and reports, per case, the
modules it added to those `import seft` itself loads, and its time.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "peft", "transformers")
# seft's modules that import one of HEAVY at module level
HEAVY_SEFT = ("seft.finetune", "seft.models", "seft.data", "seft.sparsity", "seft.prune.engine", "seft.tuner",
              "seft.evaluate", "seft.distributed")
CASES = [["--help"], ["--version"], ["prune", "--help"], ["finetune", "--help"], ["eval", "--help"],
         ["inspect", "--help"], ["validate", "--help"], ["finetune"], ["prune", "--output", "x"],
         ["finetune", "train.max_steps=3"], ["inspect", "/nonexistent-folder"]]

PROBE = """
import contextlib, io, json, sys, time
t0 = time.perf_counter()
import seft
package = {"modules": sorted(sys.modules), "seconds": time.perf_counter() - t0}
from seft.cli import main
cases = []
for argv in json.loads(sys.argv[1]):
    before, t = set(sys.modules), time.perf_counter()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
    cases.append({"argv": argv, "rc": rc, "seconds": time.perf_counter() - t, "stderr": err.getvalue(),
                  "added": sorted(set(sys.modules) - before)})
print(json.dumps({"package": package, "cases": cases}))
"""


@pytest.fixture(scope="module")
def probe() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(CASES)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_cli_without_a_model_adds_nothing_heavy(probe):
    for case in probe["cases"]:
        assert case["rc"] in (0, 2), case
        heavy = [m for m in case["added"] if m in HEAVY + HEAVY_SEFT or m.split(".")[0] in HEAVY]
        assert heavy == [], f"seft {' '.join(case['argv'])} imported {heavy}"
        if case["rc"] == 2:  # a user error: one line that says what is wrong
            lines = [line for line in case["stderr"].splitlines() if "error" in line]
            assert len(lines) == 1, case["stderr"]


def test_cli_help_imports_no_torch_peft_transformers(probe):
    if any(m in probe["package"]["modules"] for m in HEAVY):
        pytest.skip("`import seft` itself loads peft (seft/__init__.py registers the SEFT type eagerly); "
                    "the CLI adds nothing heavy on top (test above)")
    for case in probe["cases"]:
        assert case["seconds"] < 5, case  # generous: a loaded CI machine; about 0.1 s when idle


def test_prune_help_names_the_default_model():
    from seft.commands.prune import HELP_DEFAULT_MODEL
    from seft.models import DEFAULT_MODEL

    assert HELP_DEFAULT_MODEL == DEFAULT_MODEL
