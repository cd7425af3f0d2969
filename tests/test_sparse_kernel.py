"""The sparse kernel (sampled grad(values), CSR delta products) equals the dense path.

Parity of outputs, grad_x and grad_values at the layer level (fp32 and bf16,
with removed positions, slots on removed positions, a 4-bit base), and of a
whole training run through topology updates (unstructured and N:M bases).
"""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from conftest import TINY_VOCAB, build_tiny_model
from test_tuner_helpers import batches, prune_tiny

import seft
from seft.errors import SeftError
from seft.sparsity import row_topk_mask
from seft.tuner import sparse_ops as SO
from seft.tuner.layer import Linear as SeftLinear


def _layer(kernel: str, dtype=torch.float32, seed: int = 0) -> SeftLinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(40, 24, bias=True)
    with torch.no_grad():
        lin.weight.mul_(row_topk_mask(lin.weight.abs(), 0.5))
    lin.requires_grad_(False)
    layer = SeftLinear(lin.to(dtype), "default", seft.SeftConfig(density=0.1, kernel=kernel), "l")
    vals, idx, _ = layer.seft_state("default")
    with torch.no_grad():
        vals.normal_(0, 0.1)
        flat = lin.weight.reshape(-1)
        free = (flat != 0).nonzero().flatten()
        free = free[~torch.isin(free, idx.long())][:5]
        # removed: 5 slot-free survivors plus the position of slot 0 (a slot revived on a removed weight)
        layer.seft_removed["default"] = torch.cat([free, idx[:1].long()]).sort().values.to(idx.dtype)
    # hand-made state off the active-count invariant (kernel math only): known good, not refused on use
    layer.state_mark_good("default")
    return layer


def _grads(layer: SeftLinear, x: torch.Tensor):
    layer.seft_values["default"].grad = None
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y.float() ** 2).sum().backward()
    return y.detach(), x.grad, layer.seft_values["default"].grad.clone()


def _move_slot(layer: SeftLinear, slot: int) -> torch.Tensor:
    """Move `slot` to the first free position, in place, as a topology update does; the indices tensor."""
    with torch.no_grad():
        idx = layer.seft_indices["default"]
        taken = set(idx.tolist()) | set(layer.seft_removed["default"].tolist())
        idx[slot] = next(p for p in range(layer.in_features * layer.out_features) if p not in taken)
    return idx


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_layer_sparse_equals_dense(dtype, tol):
    dense, sparse = _layer("dense", dtype), _layer("sparse", dtype)
    assert torch.equal(dense.seft_indices["default"], sparse.seft_indices["default"])
    x = torch.randn(3, 7, 40, dtype=dtype)
    y_d, gx_d, gv_d = _grads(dense, x)
    y_s, gx_s, gv_s = _grads(sparse, x)
    assert sparse._seft_csr and not dense._seft_csr  # the sparse path really ran
    assert torch.allclose(y_s.float(), y_d.float(), rtol=tol, atol=tol)
    assert torch.allclose(gx_s.float(), gx_d.float(), rtol=tol, atol=tol)
    scale = gv_d.abs().max()
    assert torch.allclose(gv_s, gv_d, rtol=tol, atol=tol * scale)


def test_sampled_grad_is_in_slot_order_after_indices_change():
    layer = _layer("sparse")
    x = torch.randn(6, 40)
    first = layer.slot_views("default", x.device, with_delta=False)
    assert layer.slot_views("default", x.device, with_delta=False) is first  # cached
    idx = _move_slot(layer, 3)
    assert layer.slot_views("default", x.device, with_delta=False) is not first
    _, _, gv = _grads(layer, x)
    dense = _layer("dense")
    with torch.no_grad():
        dense.seft_indices["default"].copy_(idx)
    _, _, gv_ref = _grads(dense, x)
    assert torch.allclose(gv, gv_ref, atol=1e-5)


def test_slot_csr_roundtrip():
    idx = torch.randperm(24 * 40)[:50].to(torch.int32)
    csr = SO.slot_csr(idx, (24, 40))
    assert csr.shape == (24, 40)
    crow = csr.crow.long()
    rows_out = torch.repeat_interleave(torch.arange(24), crow[1:] - crow[:-1])  # output row of each entry
    assert torch.equal(rows_out * 40 + csr.col.long(), idx.long()[csr.perm])


def test_auto_kernel_choice():
    cpu = torch.device("cpu")
    assert SO.use_sparse_kernel("auto", 100, 10_000, cpu)
    assert not SO.use_sparse_kernel("auto", 5_000, 10_000, cpu)  # dense budget
    assert not SO.use_sparse_kernel("auto", 100, 10_000, torch.device("cuda"))
    assert SO.use_sparse_kernel("sparse", 5_000, 10_000, cpu)
    assert not SO.use_sparse_kernel("dense", 100, 10_000, cpu)
    with pytest.raises(SeftError, match="unknown kernel 'sprase'.*sparse"):
        seft.SeftConfig(kernel="sprase")


def _set_kernel(pm, kernel: str) -> None:
    for layer in pm.seft_layers().values():
        layer.seft_meta["default"].kernel = kernel


def _values_grads(pm, x) -> dict[str, torch.Tensor]:
    pm.zero_grad(set_to_none=True)
    pm(input_ids=x, labels=x).loss.backward()
    return {n: layer.seft_values["default"].grad.clone() for n, layer in pm.seft_layers().items()}


@pytest.mark.parametrize("nm", [None, (2, 4)], ids=["unstructured", "2of4"])
def test_grads_match_dense_through_topology_updates(nm):
    """One SEFT run; at every ordinary step grad(values) by the sampled product equals the dense gather."""
    model = prune_tiny(build_tiny_model("llama", seed=1), nm=nm)
    pm = peft.get_peft_model(model, seft.SeftConfig(
        lora_rank=2, update_interval=3, stat_window=1, evolve_until=1.0, revive_fraction=0.0 if nm else 0.5,
        regrow_warmup=2, kernel="sparse"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    total, compared, updates, revived = 10, 0, 0, 0
    for step, x in enumerate(batches(TINY_VOCAB, total, seed=2), 1):
        if not pm.seft_begin_window(step, total):
            _set_kernel(pm, "dense")
            ref = _values_grads(pm, x)
            _set_kernel(pm, "sparse")
            got = _values_grads(pm, x)
            for name, g in ref.items():
                assert torch.allclose(got[name], g, atol=1e-6, rtol=1e-4), (step, name)
            compared += 1
        else:
            pm.zero_grad(set_to_none=True)
            pm(input_ids=x, labels=x).loss.backward()
        pm.seft_pre_optimizer_step(opt)
        opt.step()
        pm.seft_post_optimizer_step(opt)
        opt.zero_grad()
        stats = pm.seft_update(step, total, opt)
        if stats:
            updates += 1
            revived += stats["seft/revived"]
    assert compared >= 6 and updates == 3
    if nm is None:
        assert revived > 0  # removed positions exist after the updates, so the parity covers them


@pytest.fixture
def qseft_pair(tmp_path, tiny_tokenizer):
    pytest.importorskip("bitsandbytes")
    from seft.models import load_model

    folder = tmp_path / "pruned"
    prune_tiny(build_tiny_model("llama", seed=3)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    layers = []
    for kernel in ("dense", "sparse"):
        model, _ = load_model(folder, load_in_4bit=True)
        pm = peft.get_peft_model(model, seft.SeftConfig(lora_rank=2, kernel=kernel))
        layers.append(next(iter(pm.seft_layers().values())))
    return layers


def test_qseft_layer_sparse_equals_dense(qseft_pair):
    dense, sparse = qseft_pair
    for layer in (dense, sparse):
        vals, idx, _ = layer.seft_state("default")
        with torch.no_grad():
            torch.manual_seed(0)
            vals.normal_(0, 0.05)
            w = layer.topology_weight().reshape(-1)
            free = (w != 0).nonzero().flatten()
            free = free[~torch.isin(free, idx.long())][:7]
            layer.seft_removed["default"] = torch.cat([free, idx[:1].long()]).sort().values.to(idx.dtype)
            # hand-made state off the active-count invariant (kernel math only): known good, not refused on use
            layer.state_mark_good("default")
    x = torch.randn(2, 5, dense.in_features)
    y_d, gx_d, gv_d = _grads(dense, x)
    y_s, gx_s, gv_s = _grads(sparse, x)
    assert sparse._seft_csr and not dense._seft_csr
    assert torch.allclose(y_s, y_d, atol=1e-5)
    assert torch.allclose(gx_s, gx_d, atol=1e-5)
    assert torch.allclose(gv_s, gv_d, atol=1e-4)


def test_backward_reads_the_base_again_after_an_edit_since_the_forward():
    """The backward reuses the originals its forward read only while the weight is unchanged: restoring stale
    ones would silently undo an in-place edit made between forward and backward."""
    layer = _layer("sparse")
    weight = layer.get_base_layer().weight
    x = torch.randn(3, 40, requires_grad=True)
    y = layer(x)
    pos = layer.seft_indices["default"][:4].long()
    with torch.no_grad():
        weight.view(-1)[pos] += 1.0  # bumps the version: the backward must not write the old values back
    edited = weight.detach().clone()
    y.sum().backward()
    assert torch.equal(weight, edited)
    plan = layer.patch_plan("default", None)
    assert layer.patch_plan("default", None) is plan  # cached per topology


def test_patch_plan_is_rebuilt_when_the_topology_changes():
    layer, dense = _layer("sparse"), _layer("dense")
    plan = layer.patch_plan("default", None)
    idx = _move_slot(layer, 3)
    with torch.no_grad():
        dense.seft_indices["default"].copy_(idx)
    assert layer.patch_plan("default", None) is not plan
    before = layer.get_base_layer().weight.detach().clone()
    x = torch.randn(2, 40)
    for got, want in zip(_grads(layer, x), _grads(dense, x)):
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(layer.get_base_layer().weight, before)


def test_deepcopy_keeps_kernel_choice():
    layer = _layer("sparse")
    clone = copy.deepcopy(layer)
    assert clone.seft_meta["default"].kernel == "sparse"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_patch_restores_the_base_weight_exactly(dtype):
    layer = _layer("sparse", dtype)
    before = layer.get_base_layer().weight.detach().clone()
    _grads(layer, torch.randn(4, 40, dtype=dtype))
    with torch.no_grad():
        layer(torch.randn(2, 40, dtype=dtype))
    assert torch.equal(layer.get_base_layer().weight, before)

    from seft.tuner.function import patched_weight

    vals, idx, removed = layer.seft_state("default")
    with pytest.raises(RuntimeError, match="boom"), patched_weight(layer.get_base_layer().weight, vals, idx, removed):
        raise RuntimeError("boom")
    assert torch.equal(layer.get_base_layer().weight, before)  # restored on an exception too
