"""The SEFT linear as a custom autograd Function.

Forward builds the effective weight `W_eff = W with removed zeroed, plus
scatter(indices, values)` transiently, applies it, and lets it go: only `x`,
the (frozen, already resident) base weight and the O(k) tensors are saved.
Backward rebuilds `W_eff` for `grad_x`, and forms the dense weight gradient
`G = g^T x` once, which serves both purposes:
  - `grad_values = G.flatten()[indices]` (dense product then gather: a
    chunked SDDMM was 5-14x slower on CPU, see benchmarks/train_speed.py);
  - during a statistics window `G` and the layer input are handed to
    `sink(G, x)` (the layer's accumulator), which keeps only candidate
    entries (and, for `growth: normalized`, per-channel sums of x**2); `G`
    is then freed.

dtypes: the base weight may be fp32, bf16 or fp16; `W_eff` is built in the
base dtype (so a bf16 base adds fp32 values rounded to bf16 — the same
rounding a merge performs), the matmuls run in the input dtype, and `G` and
`grad_values` are fp32 because `values` is.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

GradSink = Callable[[torch.Tensor, torch.Tensor], None]  # (G [out, in], the layer input x [tokens, in])


def effective_weight(weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     removed: torch.Tensor) -> torch.Tensor:
    """W_eff (dense, base dtype): W with `removed` zeroed, plus `values` at `indices`."""
    flat = weight.detach().reshape(-1).clone()
    if removed.numel():
        flat[removed.long()] = 0
    flat.index_add_(0, indices.long(), values.detach().to(flat.dtype))
    return flat.view_as(weight)


def _weight_grad(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, sink: GradSink | None,
                 want_values: bool) -> torch.Tensor | None:
    """`G[indices]` for `values`, and the dense `G = g^T x` [out, in] for an open window.

    G is formed as `(x^T g)` [in, out] and read through its transpose: on CPU
    BLAS that orientation was ~1.8x faster than `g^T x` at SmolLM2 shapes
    (measured 9.7 vs 17.4 ms, 512 tokens, 1536x576). `values`' gradient is
    then a gather at the transposed flat positions, so no dense copy is made
    outside statistics windows; the window's sink gets a contiguous G.
    """
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1]).to(g2.dtype)
    g_t = (x2.t() @ g2).float()  # [in, out] = G^T, transient
    if sink is not None:
        sink(g_t.t().contiguous(), x2)
    if not want_values:
        return None
    in_features, out_features = g_t.shape
    flat = indices.long()
    return g_t.reshape(-1)[(flat % in_features) * out_features + flat // in_features]


class SparseDeltaLinear(torch.autograd.Function):
    """y = x @ W_eff^T + b, differentiable w.r.t. x and `values` only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor,
                indices: torch.Tensor, removed: torch.Tensor, sink: GradSink | None) -> torch.Tensor:
        w_eff = effective_weight(weight, values, indices, removed).to(x.dtype)
        out = F.linear(x, w_eff, None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x, weight, values, indices, removed)
        ctx.sink = sink
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, values, indices, removed = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            w_eff = effective_weight(weight, values, indices, removed).to(grad_out.dtype)
            grad_x = (grad_out @ w_eff).to(x.dtype)
            del w_eff
        if ctx.needs_input_grad[3] or ctx.sink is not None:
            grad_values = _weight_grad(grad_out, x, indices, ctx.sink, ctx.needs_input_grad[3])
        return grad_x, None, None, grad_values, None, None, None


def seft_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor,
                indices: torch.Tensor, removed: torch.Tensor, sink: GradSink | None = None) -> torch.Tensor:
    return SparseDeltaLinear.apply(x, weight, bias, values, indices, removed, sink)


def delta_weight(shape: torch.Size, values: torch.Tensor, indices: torch.Tensor, removed: torch.Tensor,
                 removed_base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """D (dense, `dtype`): `values` at `indices`, minus the base's value at `removed` (zeroing it)."""
    flat = torch.zeros(shape.numel(), dtype=dtype, device=values.device)
    if removed.numel():
        flat.index_add_(0, removed.long(), -removed_base.detach().to(dtype))
    flat.index_add_(0, indices.long(), values.detach().to(dtype))
    return flat.view(shape)


class SparseDelta(torch.autograd.Function):
    """y = x @ D^T for a quantized base whose own matmul runs separately (QSEFT, see quant.py).

    Saves `x` (which the base's matmul saves too: same storage) and O(k) tensors;
    backward rebuilds D for `grad_x` and forms `G = g^T x` for `grad_values` and the window.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, removed: torch.Tensor,
                removed_base: torch.Tensor, shape: torch.Size, sink: GradSink | None) -> torch.Tensor:
        out = F.linear(x, delta_weight(shape, values, indices, removed, removed_base, x.dtype))
        ctx.save_for_backward(x, values, indices, removed, removed_base)
        ctx.shape, ctx.sink = shape, sink
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, values, indices, removed, removed_base = ctx.saved_tensors
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ delta_weight(ctx.shape, values, indices, removed, removed_base,
                                              grad_out.dtype)).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.sink is not None:
            grad_values = _weight_grad(grad_out, x, indices, ctx.sink, ctx.needs_input_grad[1])
        return grad_x, grad_values, None, None, None, None, None


def sparse_delta(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, removed: torch.Tensor,
                 removed_base: torch.Tensor, shape: torch.Size, sink: GradSink | None = None) -> torch.Tensor:
    return SparseDelta.apply(x, values, indices, removed, removed_base, shape, sink)
