"""Pure topology functions: schedule, drop/grow invariants, N:M, rebalance, moment seeding."""
from __future__ import annotations

import math

import pytest
import torch

from seft.sparsity import detect_nm, is_nm, nm_mask, row_topk_mask
from seft.tuner import topology as T


def _layer(out=16, inp=32, sparsity=0.5, nm=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    mask = nm_mask(w.abs(), *nm) if nm else row_topk_mask(w.abs(), sparsity)
    return (w * mask).flatten()


def _stats(w_flat, slots, removed, allowed, c, steps=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    numel = w_flat.numel()
    slot_mask = T.flat_mask(slots, numel)
    grads = [torch.randn(numel, generator=g) for _ in range(steps)]
    g0 = grads[0]
    grow = T.grow_candidates(g0, slot_mask, allowed, c)
    base = T.base_active_mask(w_flat, removed)
    sens = T.sensitivity_candidates(w_flat, g0, base, slot_mask, c)
    return T.WindowStats(
        grow_idx=grow, grow_sum=sum(x[grow] for x in grads), grow_sq=sum(x[grow] ** 2 for x in grads),
        sens_idx=sens, sens_sum=sum(x[sens] for x in grads), steps=steps,
    )


def test_schedule_cosine_and_linear():
    assert T.replace_fraction(0, 100, 0.3, 0.75) == pytest.approx(0.3)
    assert T.replace_fraction(75, 100, 0.3, 0.75) == pytest.approx(0.0, abs=1e-12)
    assert T.replace_fraction(37.5, 100, 0.3, 0.75) == pytest.approx(0.15)
    assert T.replace_fraction(30, 100, 0.3, 0.75, "linear") == pytest.approx(0.3 * (1 - 30 / 75))
    assert T.replace_fraction(80, 100, 0.3, 0.75) == 0.0
    assert T.replace_count(0.1, 95) == 10


def test_update_steps_and_window():
    ups = [s for s in range(1, 101) if T.is_update_step(s, 100, 20, 0.75)]
    assert ups == [20, 40, 60]
    window = [s for s in range(1, 101) if T.in_stat_window(s, 100, 20, 0.75, 4)]
    assert window == [17, 18, 19, 20, 37, 38, 39, 40, 57, 58, 59, 60]
    assert T.next_update_step(61, 100, 20, 0.75) is None


@pytest.mark.parametrize("revive", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("sensitivity", ["taylor", "magnitude"])
def test_evolve_invariants_unstructured(revive, sensitivity):
    w = _layer()
    n = int((w != 0).sum())
    k = 40
    slots = T.initial_slots(w != 0, k, torch.Generator().manual_seed(0)).int()
    removed = torch.empty(0, dtype=torch.int32)
    values = torch.randn(k)
    total_rev = total_rep = 0
    for it in range(6):
        stats = _stats(w, slots, removed, None, c=k, seed=it)
        res = T.evolve(w, values, slots, removed, stats, r=12, n=n, revive_fraction=revive, sensitivity=sensitivity)
        assert res.indices.numel() == k and res.indices.dtype == torch.int32
        assert res.indices.unique().numel() == k  # no duplicate slots
        assert res.removed.unique().numel() == res.removed.numel()
        assert T.active_count(w, res.removed, res.indices) == n  # exactly the budget
        assert res.shortfall == 0
        assert res.revived <= math.floor(revive * 12)
        changed = (res.indices != slots).nonzero().flatten()
        assert set(changed.tolist()) <= set(res.replaced_slots.tolist())
        total_rev += res.revived
        total_rep += res.repruned
        slots, removed = res.indices, res.removed
        values = values.clone()
        values[res.replaced_slots] = 0.0
        values += 0.01 * torch.randn(k)
    if revive > 0:
        assert total_rev > 0 and total_rep > 0
    else:
        assert total_rev == 0 and removed.numel() == 0


def test_evolve_nm_keeps_pattern():
    w = _layer(nm=(2, 4))
    n = int((w != 0).sum())
    k = 30
    slots = T.initial_slots(w != 0, k, torch.Generator().manual_seed(0))
    values = torch.randn(k)
    removed = torch.empty(0, dtype=torch.long)
    for it in range(4):
        stats = _stats(w, slots, removed, w != 0, c=k, seed=it)
        res = T.evolve(w, values, slots, removed, stats, r=10, n=n, revive_fraction=1.0, nm=True)
        assert res.revived == 0 and res.removed.numel() == 0
        active = T.base_active_mask(w, res.removed)
        active[res.indices.long()] = True
        assert is_nm(active.reshape(16, 32).float(), 2, 4)
        slots, removed = res.indices, res.removed


def test_choose_growth_caps_revivals():
    score = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0, 4.0])
    is_rev = torch.tensor([True, True, True, False, False, False])
    assert sorted(T.choose_growth(score, is_rev, 3, 1).tolist()) == [0, 3, 4]
    assert sorted(T.choose_growth(score, is_rev, 3, 0).tolist()) == [3, 4, 5]
    assert sorted(T.choose_growth(score, is_rev, 3, 5).tolist()) == [0, 1, 2]


def test_drop_smallest_values():
    values = torch.tensor([0.5, -0.01, 2.0, 0.02, -3.0])
    assert sorted(T.drop_slots(values, 2).tolist()) == [1, 3]


def test_rebalance_restores_when_short():
    w = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])
    removed = torch.tensor([1, 2])
    slots = torch.tensor([3])  # revived slot at a pruned position
    n = 4  # {0, 5} base-active + slot 3 = 3 active: one short
    values = torch.tensor([0.0])
    stats = T.WindowStats(torch.empty(0, dtype=torch.long), torch.empty(0), torch.empty(0),
                          torch.empty(0, dtype=torch.long), torch.empty(0), 1)
    res = T.evolve(w, values, slots, removed, stats, r=0, n=n, revive_fraction=0.1)
    assert res.restored == 1 and res.removed.tolist() == [1]  # |w|=3 restored first
    assert T.active_count(w, res.removed, res.indices) == n


def test_seeded_moments_bound_first_update():
    g = torch.randn(100, 5)
    g_mean, g_sq = g.mean(1), (g**2).mean(1)
    t, b1, b2 = 10, 0.9, 0.999
    m, v = T.seeded_moments(g_mean, g_sq, t, b1, b2)
    m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
    assert torch.all((m_hat / v_hat.sqrt()).abs() <= 1 + 1e-5)


def test_warmup_scale():
    age = torch.tensor([0, 4, 9, 10, 50])
    assert torch.allclose(T.warmup_scale(age, 9), torch.tensor([0.1, 0.5, 1.0, 1.0, 1.0]))
    assert torch.all(T.warmup_scale(age, 0) == 1)


def test_detect_nm_tolerates_kept_zeros_but_not_unstructured():
    """A 2:4 matrix with a few exact zeros among its kept weights is still 2:4; a 50% unstructured one is not."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    nm = w * nm_mask(w.abs(), 2, 4)
    assert detect_nm(nm) == (2, 4)
    nm.view(-1)[nm.flatten().nonzero().flatten()[:5]] = 0.0  # 5 of 2048 groups now hold 1 nonzero
    assert detect_nm(nm) == (2, 4)
    assert detect_nm(w * row_topk_mask(w.abs(), 0.5)) is None
    assert detect_nm(w) is None


def test_normalized_growth_ranks_by_gradient_over_channel_scale():
    """With a per-candidate scale, growth takes the largest |g_mean| / scale, not the largest |g_mean|."""
    w = _layer()
    slots = T.initial_slots(w != 0, 20, torch.Generator().manual_seed(0))
    removed = torch.empty(0, dtype=torch.long)
    stats = _stats(w, slots, removed, None, c=60)
    scale = torch.rand(stats.grow_idx.numel(), generator=torch.Generator().manual_seed(3)) * 10 + 0.1
    values = torch.randn(20)
    plain = T.evolve(w, values, slots, removed, stats, r=5, n=int((w != 0).sum()), revive_fraction=0.0)
    stats.grow_scale = scale
    normed = T.evolve(w, values, slots, removed, stats, r=5, n=int((w != 0).sum()), revive_fraction=0.0)
    g_mean = (stats.grow_sum / stats.steps).abs()
    allowed = (w != 0)[stats.grow_idx]  # revival off: only base-active candidates can grow
    for res, score in ((plain, g_mean), (normed, g_mean / scale)):
        grown = set(res.indices[res.replaced_slots].tolist())
        ranked = stats.grow_idx[allowed][torch.argsort(score[allowed], descending=True)][:5]
        assert grown == set(ranked.tolist())
    assert set(plain.indices.tolist()) != set(normed.indices.tolist())


def test_channel_scale_is_rms_with_a_floor():
    x = torch.tensor([[3.0, 0.0, 1.0], [4.0, 0.0, 1.0]])
    s = T.channel_scale(x.pow(2).sum(0), tokens=2)
    assert torch.allclose(s[[0, 2]], torch.tensor([12.5**0.5, 1.0]))
    assert s[1] > 0  # a dead channel is floored, never divides by zero
