"""Pure SEFT topology math: schedule, candidates, drop, grow, rebalance, moment seeding.

Imports torch only (no transformers, no peft, no seft modules), so every rule
of DESIGN.md §1 is testable on small tensors without a model. All positions
are *flat* indices into a row-major `out x in` weight.

Vocabulary (per layer):
  - `slots`      : the k positions holding a trainable delta (`indices`).
  - `base_active`: `(W != 0) & ~removed` — pretrained weights still in use.
  - `active`     : `base_active | slot` — what the effective weight keeps.
  - a *revival*  : growing a slot at a position that is not `base_active`
                   (a pruned zero, or a position SEFT itself removed).

Design choices where the spec is silent:
  - A replaced slot keeps its slot number: slot j is dropped and the new
    position is written to `indices[j]`. `values` and the optimizer moments
    are then edited in place at j, so the optimizer's state stays aligned
    with the parameter without any re-keying.
  - Grow candidates are fixed at the start of the statistics window and held
    no slot then, so a slot dropped in this update can never be regrown in
    the same update (no drop/regrow churn at one position).
  - If fewer valid candidates exist than the replace count `r`, only as many
    slots are replaced as can be grown, so the slot count stays exactly k.
  - Rebalance that cannot reach `n` (nothing slot-free left in `removed` to
    restore, or no slot-free active weight left to remove) does what it can
    and reports the shortfall instead of raising; the caller logs it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "linear")
SENSITIVITIES = ("taylor", "magnitude")
GROWTHS = ("gradient", "normalized")
INITS = ("random", "reselect")
REGROW_MOMENTS = ("seeded", "zero")
DROP_VALUES = ("discard", "fold")
DROP_SCORES = ("value", "momentum")
SLOT_LRS = ("plain", "channel", "density")
BALANCES = ("none", "row")


# --- schedule -----------------------------------------------------------------


def evolve_horizon(total_steps: int, evolve_until: float) -> float:
    """T = evolve_until * total_steps: the last step at which topology may change."""
    return evolve_until * total_steps


def is_update_step(step: int, total_steps: int, update_interval: int, evolve_until: float) -> bool:
    """Topology updates happen after optimizer step `step` (1-based) when it is a
    multiple of `update_interval` and `step < evolve_until * total_steps`.

    Strictly before T: both schedules reach a replace fraction of exactly 0 at
    T, so an update there would change nothing (and was logged as an update,
    after a statistics window spent for nothing)."""
    return step > 0 and step % update_interval == 0 and step < evolve_horizon(total_steps, evolve_until)


def next_update_step(step: int, total_steps: int, update_interval: int, evolve_until: float) -> int | None:
    """The first update step >= `step`, or None when evolution is over."""
    nxt = max(update_interval, math.ceil(step / update_interval) * update_interval)
    return nxt if is_update_step(nxt, total_steps, update_interval, evolve_until) else None


def in_stat_window(step: int, total_steps: int, update_interval: int, evolve_until: float, stat_window: int) -> bool:
    """True if optimizer step `step` (1-based) belongs to the statistics window
    of an upcoming update, i.e. its gradients must be observed."""
    nxt = next_update_step(step, total_steps, update_interval, evolve_until)
    return nxt is not None and nxt - step < stat_window


def is_reselect_step(step: int, init: str, stat_window: int) -> bool:
    """`init: reselect`: the update after the first `stat_window` optimizer steps re-chooses every slot."""
    return init == "reselect" and step == stat_window


def in_reselect_window(step: int, init: str, stat_window: int) -> bool:
    """Steps 1..stat_window feed the initial reselection (`init: reselect`)."""
    return init == "reselect" and 1 <= step <= stat_window


def replace_fraction(step: int, total_steps: int, p0: float, evolve_until: float, schedule: str = "cosine") -> float:
    """p(t): cosine `p0 (1 + cos(pi t / T)) / 2` or linear `p0 (1 - t / T)`; 0 past T."""
    horizon = evolve_horizon(total_steps, evolve_until)
    if horizon <= 0 or step > horizon:
        return 0.0
    frac = step / horizon
    if schedule == "cosine":
        return p0 * (1.0 + math.cos(math.pi * frac)) / 2.0
    if schedule == "linear":
        return p0 * (1.0 - frac)
    raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def replace_count(p: float, k: int) -> int:
    """r = round(p * k), clipped to [0, k]."""
    return max(0, min(k, int(round(p * k))))


# --- masks ----------------------------------------------------------------------


def flat_mask(positions: torch.Tensor, numel: int) -> torch.Tensor:
    """Boolean mask of length `numel` with True at `positions`."""
    mask = torch.zeros(numel, dtype=torch.bool, device=positions.device)
    if positions.numel():
        mask[positions.long()] = True
    return mask


def base_active_mask(weight_flat: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """(W != 0) minus removed."""
    mask = weight_flat != 0
    if removed.numel():
        mask[removed.long()] = False
    return mask


def active_count(weight_flat: torch.Tensor, removed: torch.Tensor, slots: torch.Tensor) -> int:
    """count((W != 0) - removed + slots): the layer's active count."""
    mask = base_active_mask(weight_flat, removed)
    mask[slots.long()] = True
    return int(mask.sum().item())


def initial_slots(active: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct flat positions drawn uniformly at random from the True entries of `active`."""
    pool = active.nonzero().flatten()
    if k > pool.numel():
        raise ValueError(f"budget k={k} exceeds the {pool.numel()} active positions")
    pick = torch.randperm(pool.numel(), generator=generator, device="cpu")[:k].to(pool.device)
    return pool[pick].sort().values


# --- statistics window -----------------------------------------------------------


def top_positions(score: torch.Tensor, eligible: torch.Tensor, c: int, largest: bool = True) -> torch.Tensor:
    """Up to `c` flat positions among `eligible` with the largest (or smallest) `score`."""
    c = min(c, int(eligible.sum().item()))
    if c <= 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    fill = float("-inf") if largest else float("inf")
    masked = torch.where(eligible, score.float(), torch.full_like(score, fill, dtype=torch.float32))
    return torch.topk(masked, c, largest=largest, sorted=False).indices


def grow_candidates(grad_flat: torch.Tensor, slot_mask: torch.Tensor, allowed: torch.Tensor | None, c: int) -> torch.Tensor:
    """Top-|G| positions that hold no slot (and, in N:M mode, lie in `allowed`)."""
    eligible = ~slot_mask if allowed is None else (~slot_mask & allowed)
    return top_positions(grad_flat.abs(), eligible, c, largest=True)


def channel_scale(x_sq_sum: torch.Tensor, tokens: int) -> torch.Tensor:
    """RMS of each input channel over a window's tokens (floored so a dead channel cannot divide by 0).

    `growth: normalized` divides |G_ij| by it: with Adam every slot moves by
    about `lr` whatever its gradient, so a slot on an input channel with large
    activations changes the output `rms_j` times more. |G_ij| / rms_j is the
    square root of the diagonal Gauss-Newton loss decrease G^2 / (2 H_jj),
    with H_jj proportional to rms_j^2; plain |G_ij| piles slots onto a few
    outlier channels instead (measured on SmolLM2: 10-20% of slots in 1% of
    the input channels, against 3% for a random draw).
    """
    rms = (x_sq_sum.float() / max(tokens, 1)).sqrt()
    floor = rms.mean().clamp_min(1e-12) * 1e-3
    return rms.clamp_min(floor)


def channel_lr_scale(x_sq_sum: torch.Tensor, tokens: int, power: float = -1.0, lo: float = 1e-2,
                     hi: float = 4.0) -> torch.Tensor:
    """Per input channel: (this channel's RMS / mean channel RMS) ** power, clipped to [lo, hi] (`slot_lr:
    channel`, `slot_lr_power`).

    Adam moves every slot by about `lr` in weight units, so a slot on input
    channel j moves the layer output by about `lr * rms_j`: slots on outlier
    channels (RMS 10-100x the mean) take steps much larger in output terms
    than slots on quiet channels. `power = -1` scales each slot's applied
    update by mean / rms_j: Adam on the delta in units of `1 / rms_j` (the
    Wanda-normalized coordinates; Adam is invariant to the gradient's scale),
    the same output step for every slot. `power > 0` does the opposite:
    larger steps on loud channels, closer to what plain gradient descent
    would do there. The clip keeps near-dead channels (tiny RMS) from large
    weights that would only matter on text where they wake up, and caps any
    slot's lr at `hi` times the base lr.
    """
    rms = channel_scale(x_sq_sum, tokens)
    return (rms / rms.mean()).pow(power).clamp(min=lo, max=hi)


def density_lr_scale(k: list[int], out_features: list[int]) -> list[float]:
    """Per layer: a factor proportional to 1 / (slots per output row) = out / k, normalized so the
    k-weighted mean factor is 1 (`slot_lr: density`).

    The density-aware learning rate of SMET / SμPar for Adam: a row's output
    moves by about lr times the number of its slots that move coherently, so
    layers whose budget puts more slots in each row (k / out: 11 on SmolLM2's
    gate/up, 32 on k/v) take proportionally smaller steps; the normalization
    keeps the lr grid comparable with `plain`.
    """
    ref = sum(k) / sum(out_features)
    return [ref * o / kk for kk, o in zip(k, out_features)]


def sensitivity_candidates(weight_flat: torch.Tensor, grad_flat: torch.Tensor, base_active: torch.Tensor,
                           slot_mask: torch.Tensor, c: int) -> torch.Tensor:
    """Lowest-|w * G| base-active positions that hold no slot: the likely re-prune targets."""
    score = (weight_flat.float() * grad_flat.float()).abs()
    return top_positions(score, base_active & ~slot_mask, c, largest=False)


# --- drop and grow ---------------------------------------------------------------


def drop_slots(values: torch.Tensor, r: int, protect: torch.Tensor | None = None) -> torch.Tensor:
    """Slot numbers (0..k-1) of the `r` smallest |values|; `protect`ed slots (bool [k]) go last.

    `protect` is how young slots are exempted from drop (`protect_updates`):
    a slot regrown a few steps ago has a small |value| by construction, so
    plain smallest-|value| dropping removes young slots first.
    """
    if r <= 0:
        return torch.empty(0, dtype=torch.long, device=values.device)
    return torch.topk(drop_order(values, protect), r, largest=False, sorted=False).indices


def drop_order(values: torch.Tensor, protect: torch.Tensor | None = None) -> torch.Tensor:
    """Per slot, the key that `drop_slots` drops smallest-first: |value|, with `protect`ed slots after every
    unprotected one (in |value| order among themselves)."""
    score = values.detach().abs().float()
    if protect is not None and bool(protect.any()):
        score = torch.where(protect, score + score.max() + 1.0, score)
    return score


def choose_growth(score: torch.Tensor, is_revival: torch.Tensor, r: int, max_revivals: int) -> torch.Tensor:
    """Indices into the candidate list of the `r` largest `score`, with at most
    `max_revivals` revivals.

    Walking candidates in score order, a revival is admitted only while the cap
    allows; so every admitted revival outranks the non-revival candidate it
    displaces, and every non-admitted one is replaced by the next non-revival.
    """
    if r <= 0 or score.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    order = torch.argsort(score, descending=True, stable=True)
    rev_sorted = is_revival[order]
    rev_rank = torch.cumsum(rev_sorted.long(), 0)  # 1-based rank among revivals
    admissible = ~rev_sorted | (rev_rank <= max_revivals)
    return order[admissible][:r]


def _rank_in_group(groups: torch.Tensor) -> torch.Tensor:
    """For a 1-D tensor sorted by group: each entry's 0-based position within its group."""
    first = torch.searchsorted(groups, groups, right=False)
    return torch.arange(groups.numel(), device=groups.device) - first


def row_balanced_swap(drop_by: torch.Tensor, protect: torch.Tensor | None, slot_rows: torch.Tensor,
                      cand_rows: torch.Tensor, order: torch.Tensor, r: int, n_rows: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot numbers to drop, candidate indices to grow) with every output row keeping its slot count.

    `order`: admissible candidates, best first. The `r` drop choices are
    made as usual; each row then grows as many of its own best candidates
    as it dropped, and where a row has fewer candidates it keeps its
    largest dropped slots instead (so it never loses slots to other rows).
    """
    dropped = drop_slots(drop_by, r, protect)
    if dropped.numel() == 0 or order.numel() == 0:
        empty = torch.empty(0, dtype=torch.long, device=drop_by.device)
        return empty, empty
    need = torch.bincount(slot_rows[dropped], minlength=n_rows)
    rows_c = cand_rows[order]
    by_row = torch.argsort(rows_c, stable=True)  # grouped by row, best first within a row
    grouped = rows_c[by_row]
    take = _rank_in_group(grouped) < need[grouped]
    chosen = order[by_row[take]]
    granted = torch.bincount(cand_rows[chosen], minlength=n_rows)
    # keep only `granted[row]` of each row's dropped slots: those first in drop order (smallest score)
    score = drop_order(drop_by, protect)[dropped]
    d_rows = slot_rows[dropped]
    by_score = torch.argsort(score, stable=True)
    regroup = torch.argsort(d_rows[by_score], stable=True)
    ordered = by_score[regroup]
    keep = _rank_in_group(d_rows[ordered]) < granted[d_rows[ordered]]
    return dropped[ordered[keep]], chosen


@dataclass
class WindowStats:
    """What a statistics window leaves behind for one layer (all flat, on one device).

    `grow_sum`/`grow_sq` are sums over optimizer steps of the per-step gradient
    at `grow_idx` (and of its square); `sens_sum` likewise at `sens_idx`.
    """

    grow_idx: torch.Tensor
    grow_sum: torch.Tensor
    grow_sq: torch.Tensor
    sens_idx: torch.Tensor
    sens_sum: torch.Tensor
    steps: int
    grow_scale: torch.Tensor | None = None  # per grow candidate: divide |g_mean| by it (growth: normalized)


@dataclass
class EvolveResult:
    """Outcome of one topology update of one layer."""

    indices: torch.Tensor  # new slot positions (same length k; changed only at `replaced_slots`)
    removed: torch.Tensor  # new removed set (sorted)
    replaced_slots: torch.Tensor  # slot numbers that got a new position
    seed_g_mean: torch.Tensor  # per replaced slot: window mean gradient at its new position
    seed_g_sq: torch.Tensor  # per replaced slot: window mean squared gradient
    revived: int
    repruned: int
    restored: int
    active: int
    shortfall: int  # |active - n| left after rebalance (0 unless impossible)


def evolve(
    weight_flat: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    removed: torch.Tensor,
    stats: WindowStats,
    r: int,
    n: int,
    revive_fraction: float,
    sensitivity: str = "taylor",
    nm: bool = False,
    protect: torch.Tensor | None = None,
    reselect: bool = False,
    drop_score: torch.Tensor | None = None,
    balance: str = "none",
    in_features: int | None = None,
) -> EvolveResult:
    """One SEFT topology update (DESIGN.md §1 steps 2, 3 and 5) for one layer.

    Drop the `r` smallest-|value| slots (`protect`ed ones last), grow at the
    largest-|g_mean| window candidates (revival capped at
    `revive_fraction * r`; none in N:M mode), then rebalance `removed` so the
    active count is exactly `n`.

    `reselect` (the initial reselection, `init: reselect`): the candidates
    may include slot positions and the new slot set is the top-k of them;
    slots already there keep their position and value, the others move to
    the chosen positions that hold no slot (fewest-|value| first if there
    are fewer of those). `r` is ignored.

    Does not touch `values` or the optimizer; the caller zeroes values and
    re-seeds moments at `replaced_slots` from `seed_g_mean`/`seed_g_sq`.
    """
    numel = weight_flat.numel()
    device = weight_flat.device
    steps = max(stats.steps, 1)
    idx_dtype = indices.dtype
    slots = indices.long()
    removed = removed.long()
    base_active = base_active_mask(weight_flat, removed)

    # Grow candidates: still slot-free (true by construction) and scored by |g_mean|.
    cand = stats.grow_idx.long()
    g_mean = stats.grow_sum / steps
    g_sq = stats.grow_sq / steps
    score = g_mean.abs() if stats.grow_scale is None else g_mean.abs() / stats.grow_scale
    is_revival = ~base_active[cand] if cand.numel() else torch.zeros(0, dtype=torch.bool, device=device)
    if nm:  # N:M: only already-active positions may grow
        keep = ~is_revival
        cand, g_mean, g_sq, score, is_revival = cand[keep], g_mean[keep], g_sq[keep], score[keep], is_revival[keep]
    if reselect:
        k = slots.numel()
        max_rev = 0 if nm else int(math.floor(revive_fraction * k + 1e-9))
        top = choose_growth(score, is_revival, k, max_rev)  # the new slot set, best first
        old_mask = flat_mask(slots, numel)
        already = old_mask[cand[top]]
        chosen = top[~already]  # chosen positions that hold no slot yet
        keep = flat_mask(cand[top[already]], numel)[slots]  # slots sitting on a chosen position
        movable = (~keep).nonzero().flatten()
        n_move = min(int(chosen.numel()), int(movable.numel()))
        order = torch.argsort(values.detach().abs()[movable], stable=True)
        dropped = movable[order[:n_move]]
        chosen = chosen[:n_move]
    else:
        max_rev = 0 if nm else int(math.floor(revive_fraction * r + 1e-9))
        drop_by = values if drop_score is None else drop_score
        if balance == "row":  # each output row keeps its slot count
            order = choose_growth(score, is_revival, int(score.numel()), max_rev)
            dropped, chosen = row_balanced_swap(drop_by, protect, slots // in_features, cand // in_features, order,
                                                r, numel // in_features)
        else:
            chosen = choose_growth(score, is_revival, r, max_rev)
            dropped = drop_slots(drop_by, int(chosen.numel()), protect)
    new_slots = slots.clone()
    new_slots[dropped] = cand[chosen]
    revived = int(is_revival[chosen].sum().item())

    slot_mask = flat_mask(new_slots, numel)
    active_mask = base_active | slot_mask
    count = int(active_mask.sum().item())
    repruned = restored = 0
    if count > n:
        excess = count - n
        pool = base_active & ~slot_mask  # never a slot, hence never a position grown now
        if sensitivity == "taylor" and stats.sens_idx.numel():
            s_idx = stats.sens_idx.long()
            ok = pool[s_idx]
            s_idx = s_idx[ok]
            s_score = (weight_flat[s_idx].float() * (stats.sens_sum[ok] / steps)).abs()
            take = s_idx[torch.topk(s_score, min(excess, s_idx.numel()), largest=False).indices]
        else:
            take = torch.empty(0, dtype=torch.long, device=device)
        if take.numel() < excess:  # magnitude (ablation) or too few window candidates
            pool = pool.clone()
            pool[take] = False
            more = top_positions(weight_flat.abs(), pool, excess - take.numel(), largest=False)
            take = torch.cat([take, more])
        repruned = int(take.numel())
        removed = torch.cat([removed, take])
    elif count < n:
        deficit = n - count
        restorable = removed[~slot_mask[removed]] if removed.numel() else removed
        if restorable.numel():
            order = torch.topk(weight_flat[restorable].abs().float(), min(deficit, restorable.numel())).indices
            back = flat_mask(restorable[order], numel)
            removed = removed[~back[removed]]
            restored = int(order.numel())
    final = count + restored - repruned
    return EvolveResult(
        indices=new_slots.to(idx_dtype),
        removed=removed.sort().values.to(idx_dtype),
        replaced_slots=dropped,
        seed_g_mean=g_mean[chosen],
        seed_g_sq=g_sq[chosen],
        revived=revived,
        repruned=repruned,
        restored=restored,
        active=final,
        shortfall=abs(final - n),
    )


# --- optimizer moments and warm-up -------------------------------------------------


def seeded_moments(g_mean: torch.Tensor, g_sq_mean: torch.Tensor, step: int, beta1: float, beta2: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam moments for a regrown slot: `(1 - b1**t) g_mean`, `(1 - b2**t) mean(G**2)`.

    After bias correction the slot looks as if it had seen its window gradient
    for all `t` steps, so its first update `m_hat / sqrt(v_hat)` is at most
    `lr` by Cauchy-Schwarz (|mean G| <= sqrt(mean G**2)).
    """
    t = max(int(step), 1)
    return (1.0 - beta1**t) * g_mean.float(), (1.0 - beta2**t) * g_sq_mean.float()


def warmup_scale(age: torch.Tensor, warmup: int) -> torch.Tensor:
    """Per-slot factor on the applied update: (age + 1) / (warmup + 1) while age < warmup, else 1."""
    if warmup <= 0:
        return torch.ones_like(age, dtype=torch.float32)
    return torch.clamp((age.float() + 1.0) / (warmup + 1.0), max=1.0)
