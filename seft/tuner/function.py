"""The SEFT linear as a custom autograd Function.

Forward applies the effective weight `W_eff = W with removed zeroed, plus
scatter(indices, values)` and lets it go: only `x`, the (frozen, already
resident) base weight and the O(k) tensors are kept. With the sparse kernel
`W_eff` is the base weight patched in place at its O(k) changed positions
and restored (`patched_weight`); otherwise a transient dense copy. (A base
product plus a CSR correction was measured slower on CPU than either, see
sparse_ops.py.) Backward rebuilds `W_eff` the same way for `grad_x`. The weight gradient `G = g^T x` is needed:
  - outside statistics windows only at the slots: with a `SlotCSR` (the
    layer's `kernel` picked the sparse path) `grad_values` is a sampled
    product (SDDMM) in O(k * tokens); without one, the dense `G` is formed
    and gathered;
  - during a statistics window densely: `G` and the layer input are handed to
    `sink(G, x)` (the layer's accumulator), which keeps only candidate
    entries (and, for `growth: normalized`, per-channel sums of x**2);
    `grad_values` is gathered from the same `G`, which is then freed.

dtypes: the base weight may be fp32, bf16 or fp16; `W_eff` is built in the
base dtype (so a bf16 base adds fp32 values rounded to bf16 — the same
rounding a merge performs), the matmuls run in the input dtype, and `G` and
`grad_values` are fp32 because `values` is.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from .sparse_ops import DeltaCSR, SlotCSR, csr_linear, sampled_weight_grad

GradSink = Callable[[torch.Tensor, torch.Tensor], None]  # (G [out, in], the layer input x [tokens, in])


def effective_weight(weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                     removed: torch.Tensor) -> torch.Tensor:
    """W_eff (dense, base dtype): W with `removed` zeroed, plus `values` at `indices`."""
    flat = weight.detach().reshape(-1).clone()
    if removed.numel():
        flat[removed.long()] = 0
    flat.index_add_(0, indices.long(), values.detach().to(flat.dtype))
    return flat.view_as(weight)


class PatchPlan:
    """What an in-place patch of one base weight needs, built once per topology instead of per product.

    The slot and removed positions as int64, sorted, and the base's original
    values there as the last patch read them. A forward always reads them
    afresh; the backward that follows reuses them if the weight is the one
    the forward restored (same storage, dtype and in-place version: an edit
    in between, e.g. an FSDP2 refill of the unsharded buffer, makes it read
    again). Not across steps: an edit through `.data` does not bump the
    version, and a stale original written back would corrupt the base.
    """

    def __init__(self, indices: torch.Tensor, removed: torch.Tensor, order: torch.Tensor | None = None):
        """`order`: the permutation sorting `indices` if the caller has it (a `SlotCSR`'s `perm`: shared)."""
        # positions ascending, so each edit walks the weight in memory order (cheaper than slot order with the
        # weight out of cache, as it is before a forward); `order` puts the values in the same order
        flat = indices.long()
        self.order = flat.argsort() if order is None else order
        self.pos = torch.cat([flat[self.order], removed.long().sort().values])
        self.idx, self.rem = self.pos[:flat.numel()], self.pos[flat.numel():]  # views
        self._originals: tuple[int, int, torch.dtype, torch.Tensor] | None = None

    def originals(self, flat: torch.Tensor, reuse: bool) -> torch.Tensor:
        """The values of `flat` (the base weight, flattened) at `pos`; with `reuse`, the last ones read if
        `flat` is unchanged since they were restored."""
        held = self._originals
        if reuse and held is not None and held[:3] == (flat.data_ptr(), flat._version, flat.dtype):
            return held[3]
        return flat[self.pos]

    def remember(self, flat: torch.Tensor, originals: torch.Tensor) -> None:
        """Record `originals` as `flat`'s values at `pos` as of its current version (call after restoring)."""
        self._originals = (flat.data_ptr(), flat._version, flat.dtype, originals)


class patched_weight:
    """Context manager: the base weight itself edited into `W_eff` in place, restored exactly on exit.

    Instead of a dense copy of W per forward and per backward (a full
    `out x in` copy into fresh memory, measured ~9% of a SmolLM2 step on
    CPU), the k slot positions and the removed positions are saved, edited
    and written back: O(k) work, bit-exact restore (the saved originals, not
    a subtraction). The same rounding as `effective_weight` (values added in
    the base dtype). Not for a weight that another thread reads concurrently;
    a non-contiguous weight falls back to the copy. `plan` (the layer's, per
    topology) saves re-deriving the positions; `reuse` (backward) lets it
    skip re-reading the originals the forward read.
    """

    def __init__(self, weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, removed: torch.Tensor,
                 plan: PatchPlan | None = None, reuse: bool = False):
        self.weight, self.values, self.indices, self.removed = weight.detach(), values, indices, removed
        self.plan, self.reuse = plan, reuse

    def __enter__(self) -> torch.Tensor:
        if not self.weight.is_contiguous():
            self.saved = None
            return effective_weight(self.weight, self.values, self.indices, self.removed)
        if self.plan is None:
            self.plan = PatchPlan(self.indices, self.removed)
        flat = self.weight.view(-1)
        self.saved = self.plan.originals(flat, self.reuse)
        if self.plan.rem.numel():
            flat[self.plan.rem] = 0
        flat.index_add_(0, self.plan.idx, self.values.detach()[self.plan.order].to(flat.dtype))
        return self.weight

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            flat = self.weight.view(-1)
            flat[self.plan.pos] = self.saved
            self.plan.remember(flat, self.saved)


def _weight_grad(grad_out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, sink: GradSink | None,
                 want_values: bool, csr: SlotCSR | None = None) -> torch.Tensor | None:
    """`G[indices]` for `values`, and the dense `G = g^T x` [out, in] for an open window.

    With no window and a `csr` view of the slots, `G[indices]` is sampled
    directly (no dense product).

    G is formed as `(x^T g)` [in, out] and read through its transpose: on CPU
    BLAS that orientation was ~1.8x faster than `g^T x` at SmolLM2 shapes
    (measured 9.7 vs 17.4 ms, 512 tokens, 1536x576). `values`' gradient is
    then a gather at the transposed flat positions, so no dense copy is made
    outside statistics windows; the window's sink gets a contiguous G.
    """
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1]).to(g2.dtype)
    if sink is None and csr is not None:
        return sampled_weight_grad(g2, x2, csr) if want_values else None
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
                indices: torch.Tensor, removed: torch.Tensor, sink: GradSink | None,
                csr: SlotCSR | None, plan: PatchPlan | None) -> torch.Tensor:
        bias = None if bias is None else bias.to(x.dtype)
        if plan is not None:
            with patched_weight(weight, values, indices, removed, plan) as w_eff:
                out = F.linear(x, w_eff.to(x.dtype), bias)
        else:
            out = F.linear(x, effective_weight(weight, values, indices, removed).to(x.dtype), bias)
        # the frozen base weight is kept as an attribute, not saved: the in-place patch bumps its version
        ctx.save_for_backward(x, values, indices, removed)
        ctx.weight, ctx.sink, ctx.csr, ctx.plan = weight, sink, csr, plan
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, values, indices, removed = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            if ctx.plan is not None:
                with patched_weight(weight, values, indices, removed, ctx.plan, reuse=True) as w_eff:
                    grad_x = (grad_out @ w_eff.to(grad_out.dtype)).to(x.dtype)
            else:
                grad_x = (grad_out @ effective_weight(weight, values, indices, removed).to(grad_out.dtype)
                          ).to(x.dtype)
        if ctx.needs_input_grad[3] or ctx.sink is not None:
            grad_values = _weight_grad(grad_out, x, indices, ctx.sink, ctx.needs_input_grad[3], ctx.csr)
        return grad_x, None, None, grad_values, None, None, None, None, None


def seft_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, values: torch.Tensor,
                indices: torch.Tensor, removed: torch.Tensor, sink: GradSink | None = None,
                csr: SlotCSR | None = None, plan: PatchPlan | None = None) -> torch.Tensor:
    """`x @ W_eff^T + b`; with a `plan` (the sparse kernel) the base weight is patched in place, not copied."""
    return SparseDeltaLinear.apply(x, weight, bias, values, indices, removed, sink, csr, plan)


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

    Saves `x` (which the base's matmul saves too: same storage) and O(k) tensors.
    With a `DeltaCSR` (sparse kernel) forward and `grad_x` are CSR products and
    `grad_values` is sampled; otherwise D is built densely (transiently) and
    backward forms the dense `G = g^T x`. A window always gets the dense `G`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, removed: torch.Tensor,
                removed_base: torch.Tensor, shape: torch.Size, sink: GradSink | None,
                csr: tuple[SlotCSR, DeltaCSR] | None) -> torch.Tensor:
        if csr is None:
            out = F.linear(x, delta_weight(shape, values, indices, removed, removed_base, x.dtype))
        else:
            d, _ = csr[1].matrices(values, removed_base)
            out = csr_linear(x.reshape(-1, x.shape[-1]), d).reshape(*x.shape[:-1], shape[0])
        ctx.save_for_backward(x, values, indices, removed, removed_base)
        ctx.shape, ctx.sink, ctx.csr = shape, sink, csr
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, values, indices, removed, removed_base = ctx.saved_tensors
        grad_x = grad_values = None
        csr = ctx.csr
        if ctx.needs_input_grad[0]:
            if csr is None:
                grad_x = (grad_out @ delta_weight(ctx.shape, values, indices, removed, removed_base,
                                                  grad_out.dtype)).to(x.dtype)
            else:
                _, d_t = csr[1].matrices(values, removed_base)
                g2 = grad_out.reshape(-1, grad_out.shape[-1])
                grad_x = csr_linear(g2, d_t).reshape(*grad_out.shape[:-1], ctx.shape[1]).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.sink is not None:
            grad_values = _weight_grad(grad_out, x, indices, ctx.sink, ctx.needs_input_grad[1],
                                       None if csr is None else csr[0])
        return grad_x, grad_values, None, None, None, None, None, None


def sparse_delta(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, removed: torch.Tensor,
                 removed_base: torch.Tensor, shape: torch.Size, sink: GradSink | None = None,
                 csr: tuple[SlotCSR, DeltaCSR] | None = None) -> torch.Tensor:
    return SparseDelta.apply(x, values, indices, removed, removed_base, shape, sink, csr)
