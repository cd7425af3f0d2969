"""Repair baselines that SEFT is compared against, at equal trainable parameters.

- `masked-lora` (SQFT-style): a LoRA update multiplied elementwise by the base
  mask, so merging keeps the sparsity exactly. Its forward materialises the
  dense masked delta (that is the method's real cost, kept on purpose).
- `full-masked`: every weight of the target linears trains; the mask is
  re-applied after each optimizer step. The memory upper bound.
- `lora-reprune` (LoRA*, the paper's baseline): plain dense LoRA (peft),
  merged, then re-pruned to the original sparsity with Wanda on the same
  calibration data; `lora-mask` re-applies the original mask instead.

The SEFT variants (`seft`, `seft-norevive`, `static`) live in seft.tuner and
are wired in seft.finetune; this module holds only what SEFT is not.
"""
from __future__ import annotations

import logging
import math

import torch
from torch import nn

from .models import TARGET_MODULES, decoder_layers, target_linears

logger = logging.getLogger(__name__)


def lora_equivalent_params(linear: nn.Linear, rank: int) -> int:
    """Trainable parameters of a rank-`rank` LoRA on `linear`: r * (in + out)."""
    return rank * (linear.in_features + linear.out_features)


class MaskedLoraLinear(nn.Module):
    """y = x (W + mask * (B A) * alpha / r)^T — LoRA confined to the surviving weights."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.register_buffer("mask", base.weight != 0, persistent=False)
        self.scaling = alpha / rank

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.mask * self.scaling  # [out, in], zero off-mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.base.weight + self.delta().to(self.base.weight.dtype)
        return nn.functional.linear(x, weight, self.base.bias)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += self.delta().to(self.base.weight.dtype)
        return self.base


def _replace_targets(model: nn.Module, make: callable, targets: tuple[str, ...]) -> int:
    count = 0
    for layer in decoder_layers(model):
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if name in targets and isinstance(child, nn.Linear):
                    setattr(parent, name, make(child))
                    count += 1
    return count


def apply_masked_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
                      targets: tuple[str, ...] = TARGET_MODULES) -> nn.Module:
    """Freeze `model` and put a MaskedLoraLinear on every target linear (in place)."""
    model.requires_grad_(False)
    n = _replace_targets(model, lambda lin: MaskedLoraLinear(lin, rank, alpha), targets)
    logger.info("masked-lora: %d linears, rank %d", n, rank)
    return model


def merge_masked_lora(model: nn.Module) -> nn.Module:
    """Fold every MaskedLoraLinear back into a plain nn.Linear (in place)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MaskedLoraLinear):
                setattr(parent, name, child.merged())
    return model


def base_masks(model: nn.Module, targets: tuple[str, ...] = TARGET_MODULES) -> dict[str, torch.Tensor]:
    """{qualified weight name: keep-mask} of the target linears, as bool tensors."""
    masks = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in target_linears(layer, targets).items():
            masks[f"{i}.{name}"] = lin.weight.detach() != 0
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor], targets: tuple[str, ...] = TARGET_MODULES) -> None:
    """Zero every weight outside its mask (used by full-masked after each step, and by lora-mask)."""
    for i, layer in enumerate(decoder_layers(model)):
        for name, lin in target_linears(layer, targets).items():
            lin.weight.mul_(masks[f"{i}.{name}"].to(lin.weight.device))


def enable_full_masked(model: nn.Module, targets: tuple[str, ...] = TARGET_MODULES) -> dict[str, torch.Tensor]:
    """Make only the target linears' weights trainable; return the masks to re-apply."""
    model.requires_grad_(False)
    for layer in decoder_layers(model):
        for lin in target_linears(layer, targets).values():
            lin.weight.requires_grad_(True)
    return base_masks(model, targets)
