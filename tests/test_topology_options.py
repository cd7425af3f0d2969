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
    plain, opt = _model(protect_updates=0, **cfg)  # (protection is the default since the repair study)
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


# --- drop_score, drop_values, slot_lr (stop 20) ------------------------------------------------


def _step_without_update(pm, opt, step, total, x):
    pm.seft_begin_window(step, total)
    pm.train()
    pm(input_ids=x, labels=x).loss.backward()
    pm.seft_pre_optimizer_step(opt)
    opt.step()
    pm.seft_post_optimizer_step(opt)
    opt.zero_grad()


def test_drop_score_momentum_drops_the_smallest_exp_avg():
    """`drop_score: momentum`: the dropped slots are those with the smallest |exp_avg| at the update."""
    for score in ("momentum", "value"):
        pm, opt = _model(update_interval=3, stat_window=1, evolve_until=1.0, revive_fraction=0.0, drop_score=score,
                         balance="none")  # row balance keeps some of a row's smallest: the plain rule here
        layer = next(iter(pm.seft_layers().values()))
        _steps(pm, opt, [1, 2], total=12)
        _step_without_update(pm, opt, 3, 12, batches(TINY_VOCAB, 3, seed=3)[2])
        values = layer.seft_values["default"]
        m = dequantized_moments(opt, values)[0].abs()
        v = values.detach().abs().clone()
        before = layer.seft_indices["default"].clone()
        assert pm.seft_update(3, 12, opt)["seft/replaced"] > 0
        dropped = layer.seft_indices["default"] != before
        by = m if score == "momentum" else v
        assert float(by[dropped].max()) <= float(by[~dropped].min())
        other = v if score == "momentum" else m
        assert float(other[dropped].max()) > float(other[~dropped].min())  # the two rules really differ


def test_drop_score_momentum_choice_matches_topology_math():
    values = torch.tensor([0.5, -0.4, 0.3, 0.2, 0.1])
    momentum = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.01])
    assert sorted(T.drop_slots(momentum, 2).tolist()) == [0, 4]  # by |exp_avg|
    assert sorted(T.drop_slots(values, 2).tolist()) == [3, 4]  # by |value|


def test_fold_keeps_the_function_across_an_update():
    """`drop_values: fold`: a topology update moves slots but the model computes the same function (the
    dropped values live on in the base weight, new slots start at 0); `discard` changes it."""
    x = batches(TINY_VOCAB, 1, seed=9)[0]
    jumps = {}
    for mode in ("discard", "fold"):
        pm, opt = _model(update_interval=3, stat_window=1, evolve_until=1.0, revive_fraction=0.0, drop_values=mode)
        _steps(pm, opt, [1, 2], total=12)
        _step_without_update(pm, opt, 3, 12, x)
        pm.eval()
        with torch.no_grad():
            before = pm(input_ids=x).logits
        assert pm.seft_update(3, 12, opt)["seft/replaced"] > 0
        with torch.no_grad():
            after = pm(input_ids=x).logits
        jumps[mode] = float((after - before).abs().max())
        report = pm.seft_sparsity_report()
        assert report["active"] == report["n"]
    assert jumps["fold"] < 1e-5 < jumps["discard"]


def _first_step(slot_lr: str):
    """The model after one optimizer step from zero deltas with `slot_lr` (no topology update, no warm-up):
    its slot values are the applied update itself."""
    pm, opt = _model(slot_lr=slot_lr, update_interval=50, evolve_until=0.0, regrow_warmup=0)
    _steps(pm, opt, [1], total=50)
    return pm


def test_slot_lr_channel_scales_each_slots_step_by_its_channel():
    """`slot_lr: channel`: the applied update of each slot is Adam's times mean RMS / RMS of its input channel."""
    plain, chan = _first_step("plain"), _first_step("channel")
    for (name, lp), lc in zip(plain.seft_layers().items(), chan.seft_layers().values()):
        vp, vc = lp.seft_values["default"].detach(), lc.seft_values["default"].detach()
        cols = lc.seft_indices["default"].long() % lc.in_features
        factor = lc.channel_lr_scale(-1.0)[cols]
        assert not torch.allclose(factor, torch.ones_like(factor)), name
        torch.testing.assert_close(vc, vp * factor, rtol=1e-5, atol=1e-8)  # step 1 from 0: the update itself


@pytest.mark.parametrize("field,value", [("drop_values", "keep"), ("drop_score", "grad"), ("slot_lr", "row")])
def test_bad_study_option_values(field, value):
    with pytest.raises(SeftError, match=field):
        seft.SeftConfig(**{field: value})


def test_channel_lr_scale_power_and_clip():
    rms = torch.tensor([1.0] * 8 + [2.0, 100.0, 1e-9])  # over one token: x**2 sums = rms**2
    down = T.channel_lr_scale(rms**2, 1, power=-1.0)
    up = T.channel_lr_scale(rms**2, 1, power=1.0)
    floored = T.channel_scale(rms**2, 1)
    torch.testing.assert_close(down, (floored.mean() / floored).clamp(1e-2, 4.0))
    torch.testing.assert_close(up, (floored / floored.mean()).clamp(1e-2, 4.0))
    assert float(down[-1]) == 4.0 and float(up[-2]) == 4.0  # a dead channel and a loud one hit the cap
    assert float(up[-1]) == pytest.approx(1e-2) and 0.01 < float(down[-2]) < 1


def test_density_lr_scale_follows_slots_per_row():
    factors = T.density_lr_scale([100, 400], [10, 10])  # 10 and 40 slots per row
    assert factors[0] == pytest.approx(4 * factors[1])
    assert (100 * factors[0] + 400 * factors[1]) / 500 == pytest.approx(1.0)


def test_slot_lr_density_scales_each_layers_step():
    plain, dens = _first_step("plain"), _first_step("density")
    layers = list(dens.seft_layers().values())
    factors = T.density_lr_scale([la.seft_meta["default"].k for la in layers], [la.out_features for la in layers])
    assert len(set(round(f, 6) for f in factors)) > 1  # the tiny model's layers differ in slots per row
    for lp, ld, f in zip(plain.seft_layers().values(), layers, factors):
        torch.testing.assert_close(ld.seft_values["default"].detach(), lp.seft_values["default"].detach() * f,
                                   rtol=1e-5, atol=1e-8)


def test_row_balanced_swap_keeps_row_counts_and_prefers_own_candidates():
    # 3 rows x 4 columns; slots 0..3 at rows 0,0,1,2; candidates in rows 0,1,1,2 (best first by `order`)
    slots = torch.tensor([0, 1, 4, 8])
    values = torch.tensor([0.01, 0.5, 0.02, 0.03])  # slots 0, 2, 3 are the smallest
    cand = torch.tensor([2, 5, 6, 3])
    order = torch.tensor([1, 2, 0, 3])  # candidate 1 (row 1) is best, then 2 (row 1), 0 (row 0), 3 (row 0)
    dropped, chosen = T.row_balanced_swap(values, None, slots // 4, cand // 4, order, r=3, n_rows=3)
    assert sorted(dropped.tolist()) == [0, 2]  # row 2 has no candidate: its dropped slot 3 stays
    assert sorted(cand[chosen].tolist()) == [2, 5]  # row 0's best and row 1's best
    new = slots.clone()
    new[dropped] = cand[chosen]
    assert torch.bincount(new // 4, minlength=3).tolist() == torch.bincount(slots // 4, minlength=3).tolist()


def test_balance_row_keeps_every_rows_slot_count_through_updates():
    pm, opt = _model(update_interval=3, stat_window=1, evolve_until=1.0, revive_fraction=0.0, balance="row",
                     initial_replace_fraction=0.5)
    layers = list(pm.seft_layers().values())
    counts = [torch.bincount(la.seft_indices["default"].long() // la.in_features, minlength=la.out_features)
              for la in layers]
    before = [la.seft_indices["default"].clone() for la in layers]
    stats = _steps(pm, opt, range(1, 10), total=12)
    assert sum(s["seft/replaced"] for s in stats.values()) > 0
    assert any(not torch.equal(b, la.seft_indices["default"]) for b, la in zip(before, layers))
    for la, c in zip(layers, counts):
        now = torch.bincount(la.seft_indices["default"].long() // la.in_features, minlength=la.out_features)
        assert torch.equal(now, c)
    report = pm.seft_sparsity_report()
    assert report["active"] == report["n"]
