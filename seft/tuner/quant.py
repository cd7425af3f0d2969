"""QSEFT: SEFT on a bitsandbytes 4-bit (NF4) base.

Design (the simplest correct one we found):
  - The base matmul stays bnb's (`Linear4bit.forward`, its own autograd for
    `grad_x`); the SEFT layer adds `x @ D^T` with the dense *delta*
    `D = scatter(indices, values) - scatter(removed, W_q[removed])`, built
    transiently (see `function.SparseDelta`). A CSR sparse product was no
    faster on CPU at SmolLM2 shapes, and a gathered (SDDMM) gradient was
    3-10x slower than the dense `g^T x` + gather, as on GPU.
  - The sparsity mask must be the *unquantized* checkpoint's: NF4 rounds
    small surviving weights to exactly 0 (|w| < ~0.04 * block absmax), which
    would shrink `n` and mark live weights as pruned. `seft.load_model(...,
    load_in_4bit=True)` therefore compares each quantized target weight with
    the fp checkpoint tensor and stores on the module the few positions where
    `(W_q != 0) != (W_fp != 0)`, with their fp values (`seft_fp_patch`).
    `topology_weight()` = dequantized weight with that patch applied: its
    nonzero pattern is exactly the fp checkpoint's, so `n`, initial slots,
    N:M detection, window candidates, rebalance and the sparsity report all
    work unchanged on it. The patch is O(few % of n), not a dense mask.
  - Merge never happens on the 4-bit weights: `seft finetune --load-in-4bit
    --merge` reloads the fp checkpoint, loads the adapter and merges there.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SeftError

PATCH_ATTR = "seft_fp_patch"


def is_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes `Linear4bit` (bitsandbytes imported only if present)."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return False
    return isinstance(module, Linear4bit)


def dequantize(module: nn.Module) -> torch.Tensor:
    """The 4-bit weight as a dense [out, in] tensor in the quant state's dtype."""
    from bitsandbytes.functional import dequantize_4bit

    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        raise SeftError("this 4-bit layer was repacked for CPU inference by bitsandbytes; load it with "
                        "seft.load_model(..., load_in_4bit=True), which keeps the trainable layout")
    return dequantize_4bit(weight.data, weight.quant_state).reshape(module.out_features, module.in_features)


@torch.no_grad()
def attach_fp_patch(module: nn.Module, fp_weight: torch.Tensor) -> int:
    """Record where the quantized weight's zero pattern differs from `fp_weight`'s; returns the count."""
    fp = fp_weight.to(module.weight.device).reshape(-1)
    deq = dequantize(module).reshape(-1)
    idx = ((deq != 0) != (fp != 0)).nonzero().flatten()
    setattr(module, PATCH_ATTR, (idx, fp[idx].float()))
    return int(idx.numel())


@torch.no_grad()
def topology_weight(module: nn.Module) -> torch.Tensor:
    """Dense fp32 [out, in] weight whose nonzeros are exactly the fp checkpoint's."""
    patch = getattr(module, PATCH_ATTR, None)
    if patch is None:
        raise SeftError("SEFT on a 4-bit base needs the unquantized sparsity mask; load the model with "
                        "seft.load_model(path, load_in_4bit=True) instead of a bare BitsAndBytesConfig")
    weight = dequantize(module).float()
    idx, values = patch
    weight.view(-1)[idx.to(weight.device)] = values.to(weight.device)
    return weight
