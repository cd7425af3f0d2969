"""DDP: every rank takes the same topology decisions, equal to a 1-process run.

Two CPU processes (gloo) train a tiny SEFT model through several topology
updates. The statistics-window gradient is all-reduced before selection, so
`indices`, `removed` and `values` must be identical on both ranks, and must
match one process that sees the whole global batch (up to float tolerance:
the all-reduce sums in another order).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import ddp_worker  # noqa: E402
from ranks import free_port, run_ranks  # noqa: E402


@pytest.mark.parametrize("growth", ["gradient", "normalized"])
def test_ddp_two_ranks_identical_topology(tmp_path, growth):
    """`normalized` also all-reduces the per-channel activation statistics."""
    run_ranks(ddp_worker.train, (2, str(tmp_path), free_port(), 13, growth))
    ddp_worker.train(0, 1, str(tmp_path), 0, 13, growth)
    r0 = torch.load(tmp_path / "rank0_of2.pt")
    r1 = torch.load(tmp_path / "rank1_of2.pt")
    single = torch.load(tmp_path / "rank0_of1.pt")
    assert len(r0["history"]) >= 3, "the run should pass through several topology updates"
    assert sum(h["seft/replaced"] for h in r0["history"]) > 0
    assert sum(h["seft/revived"] for h in r0["history"]) > 0
    for key, value in r0["state"].items():
        other = r1["state"][key]
        assert torch.equal(value, other), f"ranks differ at {key}"
    for key, value in r0["state"].items():
        ref = single["state"][key]
        if value.is_floating_point():
            torch.testing.assert_close(value, ref, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(value, ref), f"DDP topology differs from the 1-process run at {key}"
