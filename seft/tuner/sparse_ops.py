"""CSR views of a SEFT layer's slots, and the sparse products built on them (pure torch).

Outside statistics windows SEFT needs only `G[indices]` of the weight
gradient `G = g^T x`, not the dense `out x in` product: a *sampled* dense
product (SDDMM, `torch.sparse.sampled_addmm`) computes exactly those k
entries in O(k * tokens). It needs the slots as a CSR pattern, i.e. sorted
row-major; `SlotCSR` holds that pattern plus the permutation back to slot
order, so `values` (and its optimizer state) keep their slot numbering and
identity. The view is rebuilt only when the topology changes (the layer
caches it against the `indices`/`removed` tensors and their versions).

A 4-bit base (QSEFT) adds `x @ D^T` for the delta
`D = scatter(indices, values) - scatter(removed, W_q[removed])`; with
`DeltaCSR` that product and its `grad_x` are CSR x dense products instead of
two dense `out x in` matmuls on a transient dense D.

Measured on 1 CPU thread at SmolLM2 shapes (1536x576, 512 tokens, k =
8 * (in + out)): dense `x^T g` + gather 9.9 ms vs sampled 1.2-1.8 ms; CSR
`D @ x^T` 1.0-3.4 ms vs a dense matmul of the same shape 10-13 ms; but
`x @ W_eff^T` with a transient dense `W_eff` is no slower than `x @ W^T`
alone, so a plain base keeps its dense forward (benchmarks/train_speed.py
times every variant side by side).

CPU `sampled_addmm` and CSR `mm` have no bf16 kernels: bf16 operands are
upcast to fp32 (O(tokens * (in + out)) copies; `grad_values` is fp32 like
`values` anyway).
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

# torch warns once per process that CSR support is "beta"; these kernels are covered by our parity tests.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)

KERNELS = ("auto", "dense", "sparse")
AUTO_MAX_DENSITY = 0.1  # `kernel: auto` goes sparse on CPU up to this k / (out * in); see train_speed.md


def use_sparse_kernel(kernel: str, k: int, numel: int, device: torch.device) -> bool:
    """Whether a layer runs the sparse products (`kernel: sparse | dense | auto`).

    `auto`: sparse on CPU while the budget is at most AUTO_MAX_DENSITY of the
    layer (measured crossover there is far above LoRA-like budgets); dense on
    accelerators, where the design measured a gathered product losing to the
    dense GEMM and `sampled_addmm` has not been timed yet
    (benchmarks/gpu_check.sh does).
    """
    if kernel == "auto":
        return device.type == "cpu" and k <= AUTO_MAX_DENSITY * numel
    return kernel == "sparse"


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _crow(rows: torch.Tensor, n_rows: int, dtype: torch.dtype) -> torch.Tensor:
    crow = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return crow.to(dtype)


@dataclass(frozen=True)
class SlotCSR:
    """The slots as a CSR pattern of the weight (`out x in`, the shape of `G = g^T x`).

    `perm[i]` is the slot number of the i-th CSR entry (the slots in
    ascending flat position), so `grad_values[perm] = csr_values`. This
    orientation samples `g^T x` with `g^T` as a transposed view. With the
    operands out of cache, as in training, it was 1.0-1.1x as fast as
    sampling `x^T g` on the pattern of the transposed weight at one CPU
    thread and 0.8-1.2x at two (SmolLM2 shapes; benchmarks/train_speed.py
    `--kernels` times both): kept because the slots' CSR order is then the
    weight's memory order, which the in-place patch (function.py
    `PatchPlan`) shares and walks 1.2x faster on the large shapes.
    """

    perm: torch.Tensor  # [k] long
    crow: torch.Tensor  # [out + 1]
    col: torch.Tensor  # [k] input columns
    shape: tuple[int, int]  # (out, in)

    def pattern(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An all-zero CSR tensor on the slot pattern (the `input` of sampled_addmm)."""
        zeros = torch.zeros(self.col.numel(), dtype=dtype, device=self.col.device)
        return torch.sparse_csr_tensor(self.crow, self.col, zeros, self.shape, check_invariants=False)

    @functools.cached_property
    def pattern32(self) -> torch.Tensor:
        """`pattern(float32)`, built once per topology: `sampled_addmm` with beta=0 only reads its structure."""
        return self.pattern(torch.float32)


def slot_csr(indices: torch.Tensor, shape: tuple[int, int]) -> SlotCSR:
    """CSR view of the slots at flat positions `indices` of an `out x in` weight."""
    out_f, in_f = shape
    flat, perm = indices.long().sort()
    dt = _index_dtype(out_f * in_f)
    return SlotCSR(perm=perm, crow=_crow(flat // in_f, out_f, dt), col=(flat % in_f).to(dt), shape=(out_f, in_f))


def sampled_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, csr: SlotCSR) -> torch.Tensor:
    """`(g^T x)[indices]` in slot order, fp32, without the dense `out x in` product.

    grad_out: [tokens, out], x: [tokens, in].
    """
    sampled = torch.sparse.sampled_addmm(csr.pattern32, grad_out.float().t(), x.float(), beta=0.0)
    grad = torch.empty(csr.perm.numel(), dtype=torch.float32, device=x.device)
    grad[csr.perm] = sampled.values()
    return grad


@dataclass(frozen=True)
class DeltaCSR:
    """CSR patterns of the delta D (slots plus removed positions) and of D^T.

    `inv`/`inv_t` map each entry of `cat(values, -removed_base)` to its CSR
    entry (a slot may sit on a removed position: both add into one entry).
    """

    crow: torch.Tensor
    col: torch.Tensor
    inv: torch.Tensor
    crow_t: torch.Tensor
    col_t: torch.Tensor
    inv_t: torch.Tensor
    nnz: int
    shape: tuple[int, int]

    def matrices(self, values: torch.Tensor, removed_base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(D, D^T) as fp32 CSR tensors for the current values."""
        entries = torch.cat([values.detach().float(), -removed_base.detach().float()])
        vals = torch.zeros(self.nnz, dtype=torch.float32, device=entries.device).index_add_(0, self.inv, entries)
        vals_t = torch.zeros(self.nnz, dtype=torch.float32, device=entries.device).index_add_(0, self.inv_t, entries)
        out_f, in_f = self.shape
        d = torch.sparse_csr_tensor(self.crow, self.col, vals, (out_f, in_f), check_invariants=False)
        d_t = torch.sparse_csr_tensor(self.crow_t, self.col_t, vals_t, (in_f, out_f), check_invariants=False)
        return d, d_t


def delta_csr(indices: torch.Tensor, removed: torch.Tensor, shape: tuple[int, int]) -> DeltaCSR:
    """CSR structure of `D = scatter(indices, .) - scatter(removed, .)` and of its transpose."""
    out_f, in_f = shape
    dt = _index_dtype(out_f * in_f)
    pos = torch.cat([indices.long(), removed.long()])
    uniq, inv = torch.unique(pos, sorted=True, return_inverse=True)
    rows, cols = uniq // in_f, uniq % in_f
    pos_t = (pos % in_f) * out_f + pos // in_f
    uniq_t, inv_t = torch.unique(pos_t, sorted=True, return_inverse=True)
    return DeltaCSR(crow=_crow(rows, out_f, dt), col=cols.to(dt), inv=inv,
                    crow_t=_crow(uniq_t // out_f, in_f, dt), col_t=(uniq_t % out_f).to(dt), inv_t=inv_t,
                    nnz=int(uniq.numel()), shape=(out_f, in_f))


def csr_linear(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """`x @ M^T` for an fp32 CSR `M` [n, m] and x [tokens, m] -> [tokens, n] in x's dtype.

    Computed as `(M @ x^T)^T` in fp32 (CPU has no bf16 CSR kernel).
    """
    return torch.sparse.mm(matrix, x.t().float().contiguous()).t().to(x.dtype)
