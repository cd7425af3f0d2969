"""Optimizer state surgery for regrown SEFT slots.

A replaced slot keeps its slot number, so the `values` Parameter (and the
optimizer's state keyed by it) never changes identity; only the moments at
the replaced slot numbers are rewritten, from the window statistics
(`topology.seeded_moments`). Everything else is left untouched.

Supported:
  - torch.optim.Adam / AdamW, any implementation (for-loop, foreach, fused:
    all keep per-parameter `exp_avg`/`exp_avg_sq` tensors and a `step`);
    with amsgrad, `max_exp_avg_sq` is seeded like `exp_avg_sq`;
  - bitsandbytes Adam8bit / AdamW8bit / PagedAdam(W)8bit: the blockwise
    8-bit moments are dequantised, edited and requantised (tensors below
    bnb's `min_8bit_size` keep fp32 moments and are edited directly);
  - stateless optimizers (plain SGD without momentum): nothing to seed.
Under FSDP2 the Adam moments are DTensors sharded like `values`: each rank
rewrites the replaced slots its shard holds (shards.py); bitsandbytes'
8-bit state is not supported there.
Any other stateful optimizer is a SeftError, since leaving stale moments on
a regrown slot is the cold-start spike the spec exists to avoid.

Optimizer wrappers (accelerate's AcceleratedOptimizer, ...) are unwrapped
through their `.optimizer` attribute.
"""
from __future__ import annotations

import torch

from ..errors import SeftError
from . import shards
from .topology import seeded_moments

TORCH_ADAM = (torch.optim.Adam, torch.optim.AdamW)
BNB_8BIT = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")
BNB_ADAM = ("Adam", "AdamW", "PagedAdam", "PagedAdamW")  # 8-bit when built with optim_bits=8 (Trainer's adamw_bnb_8bit)
SUPPORTED = "torch Adam/AdamW (incl. foreach/fused), bitsandbytes Adam8bit/AdamW8bit, or stateless SGD"


def unwrap_optimizer(optimizer):
    """The innermost optimizer under wrappers that expose `.optimizer`."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 8:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


def _is_bnb_8bit(opt) -> bool:
    if not type(opt).__module__.startswith("bitsandbytes"):
        return False
    name = type(opt).__name__
    return name in BNB_8BIT or (name in BNB_ADAM and getattr(getattr(opt, "args", None), "optim_bits", 32) == 8)


def _is_stateless(opt) -> bool:
    return isinstance(opt, torch.optim.SGD) and all(g.get("momentum", 0) == 0 for g in opt.param_groups)


def check_optimizer(optimizer) -> None:
    """Raise SeftError unless SEFT can re-seed this optimizer's state."""
    opt = unwrap_optimizer(optimizer)
    if isinstance(opt, TORCH_ADAM) or _is_bnb_8bit(opt) or _is_stateless(opt):
        return
    raise SeftError(f"SEFT cannot re-seed the state of optimizer {type(opt).__name__}; supported: {SUPPORTED}")


def _group_of(opt, param: torch.Tensor) -> dict:
    for group in opt.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise SeftError("the optimizer does not hold this SEFT adapter's values; build it after get_peft_model")


def optimizer_step_count(optimizer, param: torch.Tensor) -> int | None:
    """The optimizer's own step counter for `param` (None before its first step)."""
    opt = unwrap_optimizer(optimizer)
    state = opt.state.get(param) if hasattr(opt, "state") else None
    if not state or "step" not in state:
        return None
    step = state["step"]
    return int(step.item()) if torch.is_tensor(step) else int(step)


@torch.no_grad()
def reseed_moments(optimizer, param: torch.Tensor, slots: torch.Tensor, g_mean: torch.Tensor,
                   g_sq_mean: torch.Tensor) -> bool:
    """Write seeded Adam moments at `slots` of `param`; False if there is no state yet."""
    if slots.numel() == 0:
        return False
    check_optimizer(optimizer)
    opt = unwrap_optimizer(optimizer)
    if _is_stateless(opt):
        return False
    state = opt.state.get(param)
    step = optimizer_step_count(opt, param)
    if not state or step is None or step == 0:
        return False  # moments start at zero and Adam's bias correction handles step 1
    beta1, beta2 = _group_of(opt, param)["betas"]
    m, v = seeded_moments(g_mean, g_sq_mean, step, beta1, beta2)
    slots = slots.long()
    if isinstance(opt, TORCH_ADAM):
        # FSDP2: the moments are DTensors laid out like `param`; each rank writes the slots its shard holds
        mine, pos = shards.local_positions(state["exp_avg"], slots)
        for key, new in (("exp_avg", m), ("exp_avg_sq", v), ("max_exp_avg_sq", v)):
            if key in state:
                moment = shards.local(state[key])
                moment[pos] = new[mine].to(moment.dtype)
        return True
    if shards.is_sharded(param):
        raise SeftError(f"SEFT under FSDP2 re-seeds torch Adam/AdamW moments only, not {type(opt).__name__}'s; "
                        "use torch.optim.AdamW")
    _reseed_bnb(state, slots, m, v)
    return True


def _reseed_bnb(state: dict, slots: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
    if state["state1"].dtype == torch.float32:  # small tensors keep 32-bit state
        state["state1"][slots] = m
        state["state2"][slots] = v
        return
    from bitsandbytes import functional as bnbf

    blocksize = 256  # bnb's blockwise 8-bit optimizer block size
    for which, new in (("1", m), ("2", v)):
        q, code, absmax = state[f"state{which}"], state[f"qmap{which}"], state[f"absmax{which}"]
        dense = bnbf.dequantize_blockwise(q, absmax=absmax, code=code, blocksize=blocksize)
        dense[slots] = new.to(dense.dtype)
        q_new, qs = bnbf.quantize_blockwise(dense, code=code, blocksize=blocksize)
        q.copy_(q_new)
        absmax.copy_(qs.absmax)


def dequantized_moments(optimizer, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp_avg, exp_avg_sq) as fp32 tensors, for tests and diagnostics."""
    opt = unwrap_optimizer(optimizer)
    state = opt.state[param]
    if isinstance(opt, TORCH_ADAM):
        return state["exp_avg"].float().clone(), state["exp_avg_sq"].float().clone()
    if state["state1"].dtype == torch.float32:
        return state["state1"].clone(), state["state2"].clone()
    from bitsandbytes import functional as bnbf

    out = []
    for which in ("1", "2"):
        out.append(bnbf.dequantize_blockwise(state[f"state{which}"], absmax=state[f"absmax{which}"],
                                             code=state[f"qmap{which}"], blocksize=256))
    return out[0], out[1]
