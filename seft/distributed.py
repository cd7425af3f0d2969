"""SEFT under FSDP2 (`torch.distributed.fsdp.fully_shard`): sharding, checks, saving.

A SEFT model is sharded like any HF decoder: `fully_shard` on every decoder
layer, then on the root (`shard_for_seft`). Each rank then holds a dim-0
chunk of every parameter (frozen base weights and the trainable `values`
alike) and of `values`' Adam moments, plus the whole O(k) integer topology
(`indices`, `removed`, `age`), which every rank keeps identical: the
statistics-window gradients are all-reduced (as under DDP), so every rank
takes the same decisions from the same whole weights (gathered one layer at
a time at update steps). See seft/tuner/shards.py for the reads and writes.

What cannot work is refused by `check_fsdp` (also called by SeftCallback):
FSDP1 (`FullyShardedDataParallel` flattens parameters, so `values` and the
base weight lose their shapes), FSDP2 CPU offload (topology updates gather
shards with collectives on the training device), and a 4-bit (QSEFT) base
(bitsandbytes' packed weights cannot be sharded; QSEFT trains under DDP).

Saving: SeftModel gathers the sharded `values` when peft collects the
adapter state, so `save_pretrained` on every rank (rank 0 writing) gives the
files of a 1-process run; `save_pretrained` here does that, and for a merged
(plain HF) model gathers the whole state first (`full_state_dict`). Every
gather is a collective: call these, like `seft_update` and
`seft_sparsity_report`, on every rank in the same order.

The sparse kernel's in-place patch (function.py `patched_weight`) stays
correct under FSDP2: inside forward/backward the weight it edits is FSDP's
all-gather output (a buffer apart from the shard), the edit is undone
bit-exactly before the autograd Function returns, and FSDP refills that
buffer from the untouched shards at its next unshard (tests/test_fsdp.py
checks base weights bit-equal and values equal to a 1-process run).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .errors import SeftError
from .tuner.quant import is_4bit
from .tuner.shards import full

logger = logging.getLogger(__name__)

FSDP1_ERROR = ("SEFT does not support FSDP1 (FullyShardedDataParallel flattens the weights SEFT indexes); use FSDP2: "
               "fsdp_config {'version': 2} in TrainingArguments, fsdp_version: 2 in the accelerate config, or "
               "seft.distributed.shard_for_seft(model) under torchrun")
OFFLOAD_ERROR = ("SEFT does not support FSDP CPU offload (topology updates gather shards on the training device); "
                 "turn offload off (fsdp_config cpu_offload / fsdp_offload_params: false) and shard over more ranks")
QUANT_ERROR = ("SEFT cannot shard a 4-bit (QSEFT) base with FSDP (bitsandbytes' packed weights do not shard); "
               "train QSEFT with DDP (torchrun / accelerate launch without FSDP)")


def fsdp2_modules(model: nn.Module) -> list[nn.Module]:
    """The modules `fully_shard` was applied to."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def _offloads(module: nn.Module) -> bool:
    state = module._get_fsdp_state()
    group = getattr(state, "_fsdp_param_group", None)
    return group is not None and any(p.offload_to_cpu for p in group.fsdp_params)


def has_4bit_base(model: nn.Module) -> bool:
    """True if any linear of the model (a SEFT layer's base included) is a bitsandbytes 4-bit one."""
    return any(is_4bit(m) for m in model.modules())


def check_fsdp(model: nn.Module) -> bool:
    """SeftError for an FSDP setup SEFT cannot train under; True if the model is FSDP2-sharded."""
    if any(any(c.__name__ == "FullyShardedDataParallel" for c in type(m).__mro__) for m in model.modules()):
        raise SeftError(FSDP1_ERROR)
    sharded = fsdp2_modules(model)
    if not sharded:
        return False
    if any(_offloads(m) for m in sharded):
        raise SeftError(OFFLOAD_ERROR)
    if has_4bit_base(model):
        raise SeftError(QUANT_ERROR)
    return True


def shard_for_seft(model: nn.Module, mesh=None, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 `fully_shard` to every decoder layer and then the root of a SEFT (peft) model.

    Call after `peft.get_peft_model` and before building the optimizer (which
    must hold the sharded parameters), inside an initialized process group.
    Returns the same model object, sharded in place.
    """
    from torch.distributed.fsdp import fully_shard

    from .models import decoder_layers

    if has_4bit_base(model):
        raise SeftError(QUANT_ERROR)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    check_fsdp(model)
    return model


def full_state_dict(model: nn.Module, rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded tensor gathered whole, on CPU (a collective).

    Gathered one tensor at a time; with `rank0_only` the other ranks drop
    each tensor after the gather and return an empty dict (a whole model on
    every rank is what sharding avoids).
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    keep = not (rank0_only and distributed and torch.distributed.get_rank() != 0)
    out = {}
    for key, value in model.state_dict().items():
        value = full(value)
        if keep:
            out[key] = value.cpu().clone()
    return out


def save_pretrained(model: nn.Module, out_dir: str | Path, **kwargs) -> None:
    """`model.save_pretrained(out_dir)` for a sharded model: every rank gathers, rank 0 writes, all wait.

    A PeftModel saves its adapter (SeftModel gathers the sharded `values`, so
    plain `save_pretrained(..., is_main_process=rank == 0)` on every rank is
    the same); a plain HF model (e.g. after `merge_and_unload()`) saves its
    full weights, gathered one tensor at a time. Without a process group this
    is the ordinary save_pretrained.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    main = not distributed or torch.distributed.get_rank() == 0
    if callable(getattr(model, "get_base_model", None)):  # a PeftModel: the adapter only
        model.save_pretrained(str(out_dir), is_main_process=main, **kwargs)
    else:
        state = full_state_dict(model, rank0_only=True)
        if main:
            model.save_pretrained(str(out_dir), state_dict=state, **kwargs)
    if distributed:
        torch.distributed.barrier()
