"""Pruning methods (pure) and the sequential engine on tiny LLaMA/Mistral models."""
from __future__ import annotations

import pytest
import torch

from seft.data import calibration_windows
from seft.errors import SeftError
from seft.models import decoder_layers, target_linears
from seft.prune import PruneConfig, prune_model
from seft.prune.magnitude import magnitude_prune
from seft.prune.observers import InputStatistics
from seft.prune.sparsegpt import inverse_hessian_factor, sparsegpt_prune
from seft.prune.wanda import wanda_prune


def _stats(x: torch.Tensor, chunks: int = 3) -> InputStatistics:
    s = InputStatistics(x.shape[-1], hessian=True, sq_norms=True)
    for part in x.chunk(chunks):
        s.add_batch(part)
    return s


def test_wanda_mask_equals_closed_form():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g)
    x = torch.randn(300, 32, generator=g) * torch.rand(32, generator=g) * 5  # uneven column scales
    pruned = wanda_prune(w, _stats(x).sq_col_norms, 0.375)
    score = w.abs() * x.norm(dim=0)  # |W_ij| * ||X_j||_2
    k = int(0.375 * 32)
    expected = torch.ones_like(w, dtype=torch.bool)
    expected.scatter_(1, score.argsort(dim=1)[:, :k], False)
    assert torch.equal(pruned != 0, expected)
    assert torch.equal(pruned[expected], w[expected])


def test_running_statistics_match_batch_formula():
    x = torch.randn(120, 8)
    s = _stats(x, chunks=4)
    torch.testing.assert_close(s.hessian, 2 / 120 * x.T @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.sq_col_norms, x.pow(2).mean(dim=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_wanda_per_row_sparsity_is_exact(sparsity):
    w = torch.randn(24, 40)
    pruned = wanda_prune(w, torch.rand(40) + 0.1, sparsity)
    assert ((pruned == 0).sum(dim=1) == round(sparsity * 40)).all()


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8), (1, 4)])
def test_every_nm_group_is_valid(pattern):
    n, m = pattern
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 256, generator=g)
    x = torch.randn(400, 256, generator=g)
    s = _stats(x)
    for pruned in (magnitude_prune(w, 0, pattern), wanda_prune(w, s.sq_col_norms, 0, pattern),
                   sparsegpt_prune(w, s.hessian, 0, pattern)):
        zeros = (pruned == 0).reshape(16, 256 // m, m).sum(dim=2)
        assert (zeros == m - n).all()


def _layer_inputs(model, tok, source, name="down_proj", n=16, seq_len=64):
    """Real activations: the inputs of layer 0's `name` on calibration text, [tokens, in]."""
    linear = target_linears(decoder_layers(model)[0])[name]
    got = []
    handle = linear.register_forward_hook(lambda _m, args, _o: got.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(calibration_windows(tok, source, n, seq_len, seed=0))
    handle.remove()
    return linear.weight.detach().clone(), torch.cat(got).float()


def reconstruction_errors(w: torch.Tensor, x: torch.Tensor, sparsity: float, pattern=None) -> dict[str, float]:
    s = _stats(x)
    pruned = {
        "magnitude": magnitude_prune(w, sparsity, pattern),
        "wanda": wanda_prune(w, s.sq_col_norms, sparsity, pattern),
        "sparsegpt": sparsegpt_prune(w, s.hessian, sparsity, pattern),
    }
    return {k: (x @ w.T - x @ p.T).norm().item() for k, p in pruned.items()}


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_reconstruction_error_orders_methods_tiny(tiny_llama, tiny_tokenizer, tiny_text_file, pattern):
    w, x = _layer_inputs(tiny_llama, tiny_tokenizer, str(tiny_text_file))
    err = reconstruction_errors(w, x, 0.5, pattern)
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


def test_sparsegpt_dead_columns_and_rank_deficient_hessian():
    w = torch.randn(8, 64)
    x = torch.randn(10, 64)  # rank 10 < 64
    x[:, 5] = 0  # a dead input
    pruned = sparsegpt_prune(w, _stats(x).hessian, 0.5)
    assert torch.isfinite(pruned).all() and pruned[:, 5].eq(0).all()
    assert (pruned == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_sparsegpt_failed_cholesky_retries_then_errors():
    u = inverse_hessian_factor(-0.5 * torch.eye(6))  # 1% dampening is not enough; more is
    assert torch.isfinite(u).all()
    with pytest.raises(SeftError, match="not positive definite"):
        inverse_hessian_factor(torch.full((6, 6), float("nan")))


def _record_layer_outputs(model):
    """Forward hooks keeping each decoder layer's latest output."""
    latest: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        def hook(_m, _a, out, i=i):
            latest[i] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        handles.append(layer.register_forward_hook(hook))
    return latest, handles


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sparsity_zero_reproduces_hidden_states(tiny_model, tiny_tokenizer, tiny_text_file, method):
    """Catches transformers signature drift: captured args/kwargs must drive each layer exactly as the model does."""
    config = PruneConfig(method=method, sparsity=0.0, calibration=str(tiny_text_file), num_samples=4,
                         seq_len=48, batch_size=4)
    windows = calibration_windows(tiny_tokenizer, config.calibration, 4, 48, seed=0)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    latest, handles = _record_layer_outputs(tiny_model)
    with torch.no_grad():
        tiny_model(windows, use_cache=False)
    reference = dict(latest)
    engine_outputs = {}
    prune_model(tiny_model, tiny_tokenizer, config, progress=False,
                on_layer=lambda i, _layer: engine_outputs.__setitem__(i, latest[i]))
    for h in handles:
        h.remove()
    assert len(engine_outputs) == len(reference) == 2
    for i in reference:
        torch.testing.assert_close(engine_outputs[i], reference[i], rtol=1e-5, atol=1e-5)
    for k, v in tiny_model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_engine_prunes_every_target_and_reports(tiny_llama, tiny_tokenizer, tiny_text_file, method):
    config = PruneConfig(method=method, pattern="2:4", sparsity=None, calibration=str(tiny_text_file),
                         num_samples=4, seq_len=32)
    report = prune_model(tiny_llama, tiny_tokenizer, config, progress=False)
    assert report["overall"]["sparsity"] == 0.5 and report["pattern"] == "2:4"
    assert [r["index"] for r in report["layers"]] == [0, 1]
    assert set(report["layers"][0]["modules"]) >= {"self_attn.q_proj", "mlp.down_proj"}
    for layer in decoder_layers(tiny_llama):
        for linear in target_linears(layer).values():
            w = linear.weight
            assert ((w == 0).reshape(w.shape[0], -1, 4).sum(dim=2) == 2).all()
    assert (report["calibration"] is None) == (method == "magnitude")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sparsity=1.0), r"sparsity must be in \[0, 1\), got 1.0"),
        (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
        (dict(method="wandaa"), r"unknown pruning method 'wandaa'.*did you mean wanda"),
        (dict(pattern="4:2", sparsity=None), r"need 0 < N < M"),
        (dict(pattern="2:4", sparsity=0.7), r"contradicts pattern 2:4"),
        (dict(sparsity=None), r"unstructured pruning needs a sparsity"),
        (dict(num_samples=0), r"num_samples must be at least 1"),
        (dict(targets=["q_prj"]), r"unknown target module"),
        (dict(device="cuda:0" if not torch.cuda.is_available() else "bogus"), r"device"),
    ],
)
def test_bad_config_is_clear(kwargs, message):
    with pytest.raises(SeftError, match=message):
        PruneConfig(**{"sparsity": 0.5, **kwargs}).validate()


def test_nm_that_does_not_fit_a_layer(tiny_llama, tiny_tokenizer):
    with pytest.raises(SeftError, match=r"pattern 2:5 does not fit layer 0 q_proj: in_features 64"):
        prune_model(tiny_llama, tiny_tokenizer, PruneConfig(method="wanda", pattern="2:5", sparsity=None))
