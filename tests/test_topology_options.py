"""SEFT topology options behind the repair study: initial reselection, young-slot drop exemption,
the churn statistic, zeroed regrow moments (tiny models and pure tensors)."""
from __future__ import annotations

import peft
import pytest
import torch
from conftest import TINY_VOCAB, build_tiny_model
from test_tuner_helpers import batches, prune_tiny

import seft
from seft.errors import SeftError
from seft.tuner import topology as T
from seft.tuner.optim import dequantized_moments


def _steps(pm, optimizer, steps, total):
    """Run optimizer steps `steps` (1-based) of a `total`-step schedule; returns update stats by step."""
    pm.train()
    data = batches(TINY_VOCAB, max(steps), seed=3)
    out = {}
    for step in steps:
        pm.seft_begin_window(step, total)
        x = data[step - 1]
        pm(input_ids=x, labels=x).loss.backward()
        pm.seft_pre_optimizer_step(optimizer)
        optimizer.step()
        pm.seft_post_optimizer_step(optimizer)
        optimizer.zero_grad()
        stats = pm.seft_update(step, total, optimizer)
        if stats:
            out[step] = stats
    return out


def _model(**cfg):
    pm = peft.get_peft_model(prune_tiny(build_tiny_model("llama", seed=2)), seft.SeftConfig(lora_rank=2, **cfg))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    return pm, opt


def test_drop_slots_takes_unprotected_first():
    values = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])
    protect = torch.tensor([True, True, False, False, False])
    assert sorted(T.drop_slots(values, 2, protect).tolist()) == [2, 3]
    assert sorted(T.drop_slots(values, 2).tolist()) == [0, 1]
    assert sorted(T.drop_slots(values, 4, protect).tolist()) == [0, 2, 3, 4]  # protected only when needed


def test_reselect_moves_slots_to_the_window_top_and_keeps_the_rest():
    pm, opt = _model(init="reselect", stat_window=2, update_interval=5, revive_fraction=0.0, evolve_until=1.0)
    layer = next(iter(pm.seft_layers().values()))
    _steps(pm, opt, [1], total=20)
    window = layer.seft_window["default"]
    assert window.reselect
    before_idx = layer.seft_indices["default"].clone()
    _steps(pm, opt, [2], total=20)  # window folded into per-step sums; the update runs at step 2
    # (re-run the window's bookkeeping on a copy to know its statistics)
    stats = window.stats()
    after_idx = layer.seft_indices["default"]
    weight = layer.topology_weight().reshape(-1)
    base = T.base_active_mask(weight, torch.empty(0, dtype=torch.long))
    cand = stats.grow_idx.long()
    chosen = cand[base[cand]]  # revival off: every base-active candidate is in the new slot set
    new_set = set(after_idx.long().tolist())
    assert set(chosen.tolist()) <= new_set
    assert len(new_set) == after_idx.numel()
    kept = after_idx == before_idx
    assert kept.any() and (~kept).any()
    moved_vals = layer.seft_values["default"][~kept]
    assert torch.all(moved_vals == 0) and torch.all(layer.seft_age["default"][~kept] == 0)
    # kept slots carry on: they were trained in steps 1-2 and are not reset
    assert (layer.seft_values["default"][kept] != 0).any()


def test_reselect_reported_and_regular_updates_follow():
    pm, opt = _model(init="reselect", stat_window=2, update_interval=4, evolve_until=1.0)
    stats = _steps(pm, opt, range(1, 10), total=9)
    assert sorted(stats) == [2, 4, 8]
    assert stats[2]["seft/reselect"] == 1.0 and stats[4]["seft/reselect"] == 0.0
    assert stats[2]["seft/replaced"] > stats[4]["seft/replaced"]


def test_static_with_reselect_keeps_gradient_slots_fixed():
    """evolve_until 0 (the static method) with init: reselect = slots chosen once by gradient, then fixed."""
    pm, opt = _model(init="reselect", stat_window=2, update_interval=3, evolve_until=0.0)
    stats = _steps(pm, opt, range(1, 10), total=9)
    assert sorted(stats) == [2]


def test_young_slots_exempt_and_churn_counted():
    cfg = dict(update_interval=3, stat_window=2, evolve_until=1.0, initial_replace_fraction=0.5, regrow_warmup=2)
    plain, opt = _model(**cfg)
    young = _steps(plain, opt, range(1, 7), total=12)[6]["seft/dropped_young"]
    assert young > 0  # slots regrown at step 3 are the smallest at step 6: dropped again (churn)
    protected, opt = _model(protect_updates=1, **cfg)
    assert _steps(protected, opt, range(1, 7), total=12)[6]["seft/dropped_young"] == 0


def test_age_cap_covers_an_interval():
    pm, opt = _model(update_interval=7, regrow_warmup=2, evolve_until=0.0)
    layer = next(iter(pm.seft_layers().values()))
    assert int(layer.seft_age["default"].max()) == 8
    _steps(pm, opt, range(1, 4), total=20)
    assert int(layer.seft_age["default"].max()) == 8  # saturates at the cap: one interval + 1


def test_zero_regrow_moments():
    pm, opt = _model(regrow_moments="zero", update_interval=3, stat_window=2, evolve_until=1.0)
    layer = next(iter(pm.seft_layers().values()))
    before = layer.seft_indices["default"].clone()
    _steps(pm, opt, range(1, 4), total=9)
    changed = layer.seft_indices["default"] != before
    m, v = dequantized_moments(opt, layer.seft_values["default"])
    assert changed.any() and torch.all(m[changed] == 0) and torch.all(v[changed] == 0)
    assert (v[~changed] > 0).any()


@pytest.mark.parametrize("field,value", [("init", "gradient"), ("regrow_moments", "seed"), ("protect_updates", -1)])
def test_bad_option_values(field, value):
    with pytest.raises(SeftError, match=field):
        seft.SeftConfig(**{field: value})
