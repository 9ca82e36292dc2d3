"""The "grouped_mm" backend (Triton router and permutation, torch._grouped_mm experts) against the
float64 reference in fp32, over odd shapes and routing extremes, with masked tokens; reruns give
the same bits. (auto's choice between it and the Triton schedules: test_auto.py.)"""

import pytest
import torch

from moe_kernels import moe_ffn
from tests.moe_kernels.test_functions import CASES, _fwd_bwd
from tests.utils import make_moe_inputs, poison_allocations


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
    _assert_fp32_matches(out, grads, ref, ref_grads)
    if masked:  # masked tokens: zero rows, whatever the grouped GEMM left past the last group
        assert (out.h_TD[~mask] == 0).all()


def _assert_fp32_matches(out, grads, ref, ref_grads):
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


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN in masked lanes, by design
def test_grouped_mm_with_poisoned_allocations(monkeypatch):
    """Every buffer the backend allocates in Python poisoned (tests.utils.poison_allocations; the
    rows torch._grouped_mm leaves past the last group are ATen's own): padded tokens and empty
    experts still give the reference's routing and values."""
    inputs64 = make_moe_inputs(64, 40, 100, 8, routing="empty")
    inputs32 = tuple(t.detach().float().requires_grad_(True) for t in inputs64)
    mask = torch.rand(64, generator=torch.Generator().manual_seed(5)) > 0.3
    ref, ref_grads = _fwd_bwd(inputs64, 4, mask, "topk", "torch")
    poison_allocations(monkeypatch)
    out, grads = _fwd_bwd(inputs32, 4, mask, "topk", "grouped_mm")
    assert (ref.counts_E == 0).any()
    _assert_fp32_matches(out, grads, ref, ref_grads)


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


@pytest.mark.parametrize(
    "D,F,N,permuted",
    [
        (100, 50, 64, False),  # preset("moe-8c4", 100, 64): rows of f = 50 fp32 are 200 bytes
        (13, 7, 5, False),  # nothing aligned
        (16, 8, 16, True),  # aligned widths, w2 a permuted (non-contiguous) view
        (13, 7, 13, True),
    ],
)
def test_grouped_mm_takes_any_width_and_strides(D, F, N, permuted):
    """Issue 39 item 14: widths whose rows are not 16-byte multiples and a permuted w2 failed
    inside torch._grouped_mm ("strides should be multiple of 16 bytes", "Invalid strides/sizes")."""
    T, E, K = 23, 4, 2
    z, router, w1, _ = make_moe_inputs(T, D, F, E)
    w2 = torch.randn(E, F, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * F**-0.5
    if permuted:  # the same values, stored with the last two dims swapped
        w2 = w2.transpose(1, 2).contiguous().transpose(1, 2)
        assert not w2.is_contiguous()
    inputs64 = tuple(t.detach().requires_grad_(True) for t in (z, router, w1, w2))
    inputs32 = tuple(t.detach().float().requires_grad_(True) for t in inputs64)
    if permuted:
        inputs32 = (*inputs32[:3], inputs64[3].detach().float().transpose(1, 2).contiguous().transpose(1, 2))
        inputs32[3].requires_grad_(True)
    ref, ref_grads = _fwd_bwd(inputs64, K, None, "topk", "torch")
    out, grads = _fwd_bwd(inputs32, K, None, "topk", "grouped_mm")
    assert out.h_TD.shape == (T, N)
    _assert_fp32_matches(out, grads, ref, ref_grads)


def test_grouped_mm_bf16_at_unaligned_widths():
    """bf16 rows are 16-byte multiples at 8 values: d = 100 is not."""
    z, router, w1, w2 = make_moe_inputs(19, 100, 50, 4)
    inputs = tuple(t.detach().to(torch.bfloat16).requires_grad_(True) for t in (z, router, w1, w2))
    ref, _ = _fwd_bwd(tuple(t.detach().double().requires_grad_(True) for t in inputs), 2, None, "topk", "torch")
    out, grads = _fwd_bwd(inputs, 2, None, "topk", "grouped_mm")
    assert all(torch.isfinite(g).all() for g in grads)
    # bf16 rounding of inputs, products and the fp32-accumulated sum: within 2% of the scale.
    h, want = out.h_TD.detach().double(), ref.h_TD.detach()
    assert float((h - want).abs().max()) <= 2e-2 * float(want.abs().max())
