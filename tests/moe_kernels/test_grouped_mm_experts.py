"""The "grouped_mm" backend (Triton router and permutation, torch._grouped_mm experts) against the
float64 reference in fp32, over odd shapes and routing extremes, with masked tokens; reruns give
the same bits; and "auto"'s choice between it and the Triton path: timed once, remembered in the
cache file, pinned by the environment, reported."""

import json
import logging

import pytest
import torch

from moe_kernels import backend, moe_ffn
from tests.moe_kernels.test_functions import CASES, _fwd_bwd
from tests.utils import make_moe_inputs


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("T,D,F,E,K,routing", CASES)
def test_grouped_mm_fp32_within_1e5_of_float64(T, D, F, E, K, routing, masked):
    """fp32 against the float64 reference: same routing, outputs and gradients within 1e-5 of the
    reference's largest entry (the fp32 tolerance the Triton path is held to; torch._grouped_mm
    takes no float64). With all tokens on one expert the softmax saturates and the float64 router
    gradient is ~1e-15, below fp32's resolution: errors are taken relative to at least 1e-3."""
    inputs64 = make_moe_inputs(T, D, F, E, routing=routing)
    inputs32 = tuple(t.detach().float().requires_grad_(True) for t in inputs64)
    mask = torch.rand(T, generator=torch.Generator().manual_seed(5)) > 0.3 if masked else None
    ref, ref_grads = _fwd_bwd(inputs64, K, mask, "topk", "torch")
    out, grads = _fwd_bwd(inputs32, K, mask, "topk", "grouped_mm")
    assert torch.equal(out.topk_idx_TK, ref.topk_idx_TK) and torch.equal(out.counts_E, ref.counts_E)
    for name, a, b in zip(
        ("h", "aux", "dz", "drouter", "dw1", "dw2"),
        (out.h_TD, out.aux_loss, *grads),
        (ref.h_TD, ref.aux_loss, *ref_grads),
        strict=True,
    ):
        assert torch.isfinite(a).all(), name
        err = float((a.detach().double() - b.detach()).abs().max() / max(float(b.detach().abs().max()), 1e-3))
        assert err <= 1e-5, f"{name}: {err:.3g}"
    if masked:  # masked tokens: zero rows, whatever the grouped GEMM left past the last group
        assert (out.h_TD[~mask] == 0).all()


def test_grouped_mm_reruns_are_bit_identical_and_refuse_float64():
    inputs = tuple(t.detach().float().requires_grad_(True) for t in make_moe_inputs(129, 40, 72, 8, routing="uniform"))
    a, ga = _fwd_bwd(inputs, 2, None, "topk", "grouped_mm")
    b, gb = _fwd_bwd(inputs, 2, None, "topk", "grouped_mm")
    assert torch.equal(a.h_TD, b.h_TD) and all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16, got torch.float64"):
        moe_ffn(*make_moe_inputs(7, 40, 72, 3), top_k=1, backend="grouped_mm")


def test_moe_adapter_runs_on_the_grouped_mm_backend():
    """A MoEAdapter takes backend="grouped_mm". In fp32 its output and gradients are as close to
    the float64 torch-backend adapter as the fp32 torch backend is (within 4x its error, plus
    1e-7 of each tensor's scale): the router gradient, a difference of nearly equal terms, carries
    fp32 rounding at ~1e-4 of its scale on either backend."""
    from adapter import MoEAdapter, preset

    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    results = {}
    for name, dtype in (("torch", torch.float64), ("torch", torch.float32), ("grouped_mm", torch.float32)):
        torch.manual_seed(0)
        adapter = MoEAdapter(preset("moe-8c4-parallel", 32, 48, backend=name)).double().to(dtype)
        y = adapter(x.to(dtype), mask)
        y.square().mean().backward()
        results[name, dtype] = [t.detach().double() for t in (y, adapter.router.weight.grad, adapter.w1.grad)]
    exact = results["torch", torch.float64]
    fp32, got32 = results["torch", torch.float32], results["grouped_mm", torch.float32]
    for ref32, got, want in zip(fp32, got32, exact, strict=True):
        scale = want.abs().max()
        assert (got - want).abs().max() <= 4 * (ref32 - want).abs().max() + 1e-7 * scale


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "choice.json"
    monkeypatch.setenv(backend.AUTO_CACHE_ENV, str(path))
    monkeypatch.delenv(backend.AUTO_PIN_ENV, raising=False)
    backend._choices_this_process().clear()
    yield path
    backend._choices_this_process().clear()


def test_auto_times_each_candidate_once_and_remembers(cache, caplog):
    calls = []

    def timer(name, seconds):
        return lambda: calls.append(name) or seconds

    with caplog.at_level(logging.INFO, logger="moe_kernels"):
        assert backend.choose_auto("k1", {"triton": timer("triton", 2.0), "grouped_mm": timer("grouped_mm", 1.0)}) == (
            "grouped_mm"
        )
    assert calls == ["triton", "grouped_mm"] and "k1: grouped_mm" in caplog.text
    saved = json.loads(cache.read_text())["k1"]
    assert saved == {"choice": "grouped_mm", "seconds": {"triton": 2.0, "grouped_mm": 1.0}}
    assert backend.choose_auto("k1", {"triton": timer("triton", 0.1), "grouped_mm": timer("grouped_mm", 9)}) == (
        "grouped_mm"
    )
    assert calls == ["triton", "grouped_mm"]  # remembered: not timed again
    backend._choices_this_process().clear()  # a new process reads the file
    assert backend.choose_auto("k1", {"triton": timer("triton", 0.1), "grouped_mm": timer("grouped_mm", 9)}) == (
        "grouped_mm"
    )
    assert calls == ["triton", "grouped_mm"] and backend.auto_choices() == {"k1": "grouped_mm"}
    # Another shape class is timed on its own; a failing candidate is left out.
    failing = {"triton": timer("triton", 3.0), "grouped_mm": lambda: 1 / 0}
    assert backend.choose_auto("k2", failing) == "triton"
    assert set(json.loads(cache.read_text())) == {"k1", "k2"}


def test_auto_pin_and_a_corrupt_cache(cache, monkeypatch):
    cache.write_text("{not json")
    assert backend.choose_auto("k", {"triton": lambda: 1.0, "grouped_mm": lambda: 2.0}) == "triton"
    assert json.loads(cache.read_text())["k"]["choice"] == "triton"  # rewritten whole
    monkeypatch.setenv(backend.AUTO_PIN_ENV, "grouped_mm")
    assert backend.choose_auto("k", {"triton": lambda: 1.0, "grouped_mm": lambda: 2.0}) == "grouped_mm"
    monkeypatch.setenv(backend.AUTO_PIN_ENV, "cuda-magic")
    with pytest.raises(ValueError, match="MOE_ADAPTER_AUTO_BACKEND='cuda-magic'"):
        backend.choose_auto("k", {"triton": lambda: 1.0})


def test_shape_class_rounds_tokens_and_names_the_setting():
    z, r, w1, w2 = make_moe_inputs(100, 40, 72, 8)
    key = backend.shape_class((z, r, w1, w2, 2))
    assert key == "cpu|float64|E8K2|D40F72N40|T<=128|fwd+bwd"
    with torch.no_grad():
        assert backend.shape_class((z[:65], r, w1, w2, 2)).endswith("T<=128|fwd")
    assert backend.resolve_backend("auto", torch.device("cpu"), 8) == "torch"  # CPU: auto never times


@pytest.mark.gpu
def test_auto_on_cuda_times_triton_and_grouped_mm_once(cache):
    """bf16 on a Hopper GPU: the first call times both paths (forward + backward) and writes the
    choice; the second reads it; both paths agree within bf16 rounding."""
    dev = torch.device("cuda")
    inputs = [t.detach().to(dev, torch.bfloat16).requires_grad_(True) for t in make_moe_inputs(2048, 256, 128, 8)]
    out = moe_ffn(*inputs, top_k=2, backend="auto")
    out.h_TD.float().sum().backward()
    ((key, choice),) = backend.auto_choices().items()
    assert choice in backend.AUTO_CANDIDATES and json.loads(cache.read_text())[key]["choice"] == choice
    a = moe_ffn(*inputs, top_k=2, backend="triton").h_TD.float()
    b = moe_ffn(*inputs, top_k=2, backend="grouped_mm").h_TD.float()
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()
