"""grouped_gemm.py: expert forward (up + SiLU, down + weight, combine) and backward (dX, dW, dG)
against reference.expert_mlp + reference.combine, in float64, for fp32 and fp16 inputs."""

import math

import pytest
import torch

from moe_kernels import gemm_config, grouped_gemm, reference
from tests.utils import max_rel_error, poison_allocations, three_way_check

CASES = [  # T, D, F, E, K, routing
    (1, 40, 72, 1, 1, "uniform"),
    (1, 100, 40, 8, 8, "uniform"),
    (7, 40, 100, 3, 2, "uniform"),
    (7, 72, 72, 8, 1, "skewed"),
    (64, 100, 72, 8, 2, "empty"),
    (64, 40, 40, 3, 3, "uniform"),
    (129, 72, 100, 8, 2, "skewed"),
    (129, 40, 72, 1, 1, "uniform"),
    (129, 100, 40, 3, 1, "empty"),
]


def _problem(T, D, F, E, K, routing, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64)
    if routing == "skewed":
        logits[:, 0] += 50.0
    elif routing == "empty":
        logits[:, E // 2 :] -= 50.0
    mask = torch.rand(T, generator=g) > 0.3 if masked else None
    idx, w = reference.topk_route(logits, K, mask)
    perm = reference.permute(idx, E)
    z = torch.randn(T, D, generator=g, dtype=torch.float64)
    w1 = torch.randn(E, D, F, generator=g, dtype=torch.float64) / math.sqrt(D)
    w2 = torch.randn(E, F, D, generator=g, dtype=torch.float64) / math.sqrt(F)
    dh = torch.randn(T, D, generator=g, dtype=torch.float64)
    return z, w1, w2, w, perm, dh


def _torch_path(z, w1, w2, w, perm, dh, K):
    """reference.expert_mlp + combine with autograd: (h, dz, dw1, dw2, dweight)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (z, w1, w2, w)]
    h = reference.combine(reference.expert_mlp(*leaves[:3], perm, K), perm, leaves[3])
    grads = torch.autograd.grad(h, leaves, dh.to(h.dtype), allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves, strict=True)]
    return (h, *grads)


def _triton_path(z, w1, w2, w, perm, dh):
    """Forward and backward on the schedule the environment names (MOE_ADAPTER_GEMM/_WGRAD)."""
    schedule = gemm_config.default_schedule()
    h, saved = grouped_gemm.experts_forward(z, w1, w2, w, perm, save_pre=True, schedule=schedule)
    grads = grouped_gemm.experts_backward(dh, z, w1, w2, w, perm, saved, (True, True, True, True), schedule)
    return (h, *grads)


NAMES = ("h", "dz", "dw1", "dw2", "dweight")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("T,D,F,E,K,routing", CASES)
def test_fp32_within_1e5_of_float64(T, D, F, E, K, routing, masked):
    z, w1, w2, w, perm, dh = _problem(T, D, F, E, K, routing, masked)
    ref = _torch_path(z, w1, w2, w, perm, dh, K)
    ours = _triton_path(z.float(), w1.float(), w2.float(), w.float(), perm, dh.float())
    for name, a, b in zip(NAMES, ours, ref, strict=True):
        assert a.dtype == (torch.float32), name
        assert max_rel_error(a, b) <= 1e-5, f"{name}: {max_rel_error(a, b):.3g}"
    if masked:  # padded tokens: zero output, zero input gradient, zero routing-weight gradient
        pad = ~perm.pair_row_TK[:, 0].ge(0)
        assert (ours[0][pad] == 0).all() and (ours[1][pad] == 0).all() and (ours[4][pad] == 0).all()


@pytest.mark.parametrize("T,D,F,E,K,routing", CASES[::2])
def test_float64_matches_reference_exactly_enough(T, D, F, E, K, routing):
    z, w1, w2, w, perm, dh = _problem(T, D, F, E, K, routing, masked=True)
    ref = _torch_path(z, w1, w2, w, perm, dh, K)
    ours = _triton_path(z, w1, w2, w, perm, dh)
    for name, a, b in zip(NAMES, ours, ref, strict=True):
        assert max_rel_error(a, b) <= 1e-12, f"{name}: {max_rel_error(a, b):.3g}"


@pytest.mark.parametrize("T,D,F,E,K,routing", CASES)
def test_fp16_three_way(T, D, F, E, K, routing):
    z, w1, w2, w, perm, dh = _problem(T, D, F, E, K, routing, masked=False)
    ref = _torch_path(z, w1, w2, w, perm, dh, K)
    half = [t.half() for t in (z, w1, w2)]
    torch16 = _torch_path(*half, w.float(), perm, dh.half(), K)
    ours = _triton_path(*half, w.float(), perm, dh.half())
    for name, a, t, r in zip(NAMES, ours, torch16, ref, strict=True):
        three_way_check(a, t, r, atol=1e-3, name=name)


def test_experts_with_no_rows_get_zero_weight_gradients():
    z, w1, w2, w, perm, dh = _problem(64, 40, 72, 8, 2, "empty", masked=False)
    assert (perm.counts_E[4:] == 0).all()
    _, _, dw1, dw2, _ = _triton_path(z.float(), w1.float(), w2.float(), w.float(), perm, dh.float())
    assert (dw1[4:] == 0).all() and (dw2[4:] == 0).all()
    assert (dw1[:4].abs().sum((1, 2)) > 0).all()


def test_backward_skips_what_is_not_needed():
    z, w1, w2, w, perm, dh = _problem(7, 40, 72, 3, 2, "uniform", masked=False)
    args = [t.float() for t in (z, w1, w2, w)]
    _, saved = grouped_gemm.experts_forward(*args, perm, save_pre=True)
    grads = grouped_gemm.experts_backward(dh.float(), *args, perm, saved, needs=(False, True, False, False))
    assert grads[0] is None and grads[1] is not None and grads[2] is None and grads[3] is None
    _, no_pre = grouped_gemm.experts_forward(*args, perm, save_pre=False)
    assert no_pre.pre_RF is None
    with pytest.raises(ValueError, match="save_pre=False"):
        grouped_gemm.experts_backward(dh.float(), *args, perm, no_pre, needs=(True,) * 4)


def test_input_checks_name_values():
    z, w1, w2, w, perm, _ = _problem(7, 40, 72, 3, 2, "uniform", masked=False)
    with pytest.raises(ValueError, match=r"do not fit z_TD \(T, 40\)"):
        grouped_gemm.experts_forward(z.float(), w1.float()[:, :39], w2.float(), w.float(), perm, save_pre=False)
    with pytest.raises(ValueError, match="dtypes differ"):
        grouped_gemm.experts_forward(z.float(), w1.half(), w2.float(), w.float(), perm, save_pre=False)


@pytest.mark.gpu
@pytest.mark.parametrize("T,D,F,E,K,routing", [(129, 72, 100, 8, 2, "skewed"), (4096, 256, 192, 8, 4, "uniform")])
def test_bf16_three_way_on_gpu(T, D, F, E, K, routing):
    z, w1, w2, w, perm, dh = _problem(T, D, F, E, K, routing, masked=True)
    ref = _torch_path(z, w1, w2, w, perm, dh, K)
    cuda = lambda t: t.cuda()  # noqa: E731
    perm_c = reference.Permutation(*(cuda(t) for t in perm))
    bf = [cuda(t).bfloat16() for t in (z, w1, w2)]
    torch_bf = _torch_path(*bf, cuda(w).float(), perm_c, cuda(dh).bfloat16(), K)
    ours = _triton_path(*bf, cuda(w).float(), perm_c, cuda(dh).bfloat16())
    for name, a, t, r in zip(NAMES, ours, torch_bf, ref, strict=True):
        three_way_check(a.cpu(), t.cpu(), r, atol=1e-2, name=name)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN in masked lanes, by design
@pytest.mark.parametrize("gemm", ["tiles", "persistent"])
def test_every_output_written_and_no_unwritten_row_read(monkeypatch, gemm):
    """Every buffer the kernels allocate starts poisoned (NaN; integers -7777) instead of whatever
    memory held: the results still equal the float64 reference, so each valid output element is
    written and no row the kernels never wrote (the sorted rows past the routed pairs, which a
    sorted-order operand's TMA box or a tile's masked-out lanes may load) reaches a valid output.
    Padded tokens (masked) leave such rows; three of the five experts are empty."""
    monkeypatch.setenv("MOE_ADAPTER_GEMM", gemm)
    z, w1, w2, w, perm, dh = _problem(64, 40, 40, 5, 2, "empty", masked=True)
    assert perm.sorted_pair_R.shape[0] == 64 * 2 and int(perm.counts_E.sum()) < 64 * 2
    assert perm.counts_E[2:].tolist() == [0, 0, 0]
    ref = _torch_path(z, w1, w2, w, perm, dh, 2)
    poison_allocations(monkeypatch)
    ours = _triton_path(z.float(), w1.float(), w2.float(), w.float(), perm, dh.float())
    for name, a, b in zip(NAMES, ours, ref, strict=True):
        assert max_rel_error(a, b) <= 1e-5, f"{name}: {max_rel_error(a, b):.3g}"
