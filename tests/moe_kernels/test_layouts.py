"""Every public op, every tensor argument contiguous and as a strided view, in fp32 / fp16 / bf16,
on both backends, against the float64 reference: the next dtype or layout hole shows up here.

Routing is made unambiguous so that a low-precision run must pick the reference's experts: the
router weight is the identity on the first E features and those features of z are a permutation
of {1, ..., E} / 4 per token (exact in every dtype, logits 0.25 apart), so the logits are exact
and distinct whatever the dtype's rounding.
"""

import pytest
import torch

import moe_kernels
from moe_kernels import reference
from tests.utils import assert_close, max_rel_error

T, D, F, E, K = 13, 24, 20, 4, 2
ARGS = ("z_TD", "router_weight_ED", "w1_EDF", "w2_EFD", "token_mask_T")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# max |err| / max |ref| against float64 on the same rounded inputs. The 16-bit paths round the
# logits, the hidden activations and h to the dtype: a few ulps of 2^-11 (fp16) or 2^-8 (bf16).
# Measured here (interpreter and torch): fp32 <= 1e-6, fp16 <= 1.4e-3, bf16 <= 1.3e-2.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def strided(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view holding t's values: every other element of a buffer twice as wide in
    the last dim (for 1-D tensors, every other element)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    view = wide[..., ::2]
    same = (view == t) | (view != view) & (t != t)  # unspecified rows of a buffer may hold NaN
    assert not view.is_contiguous() and bool(same.all())
    return view


def _inputs(dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, D, generator=g, dtype=torch.float64)
    z[:, :E] = torch.stack([torch.randperm(E, generator=g) + 1 for _ in range(T)]).double() / 4
    router = torch.zeros(E, D, dtype=torch.float64)
    router[:, :E] = torch.eye(E, dtype=torch.float64)
    w1 = torch.randn(E, D, F, generator=g, dtype=torch.float64) / D**0.5
    w2 = torch.randn(E, F, D, generator=g, dtype=torch.float64) / F**0.5
    mask = torch.rand(T, generator=g) > 0.25
    mask[0] = True
    return {
        "z_TD": z.to(dtype),
        "router_weight_ED": router.to(dtype),
        "w1_EDF": w1.to(dtype),
        "w2_EFD": w2.to(dtype),
        "token_mask_T": mask,
    }


def _run(inputs: dict, backend: str):
    """moe_ffn forward and the gradients of sum(h * dh) + 0.3 aux w.r.t. the four float inputs."""
    floats = [inputs[n].detach().requires_grad_(True) if inputs[n].is_contiguous() else inputs[n] for n in ARGS[:4]]
    leaves = []
    for i, t in enumerate(floats):
        if not t.requires_grad:  # a strided view: its base is the leaf, the view carries the grad
            base = t._base.detach().requires_grad_(True)
            t = base[..., ::2]
            leaves.append(base)
        else:
            leaves.append(t)
        floats[i] = t
    out = moe_kernels.moe_ffn(*floats, top_k=K, token_mask_T=inputs["token_mask_T"], backend=backend)
    dh = torch.randn(out.h_TD.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss = (out.h_TD.double() * dh).sum() + 0.3 * out.aux_loss.double()
    grads = torch.autograd.grad(loss, leaves)
    grads = [g[..., ::2] if g.shape != f.shape else g for g, f in zip(grads, floats, strict=True)]
    return out, grads


@pytest.mark.parametrize("layout", ["contiguous", *ARGS, "all strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_moe_ffn_any_layout_and_dtype_matches_float64(backend, dtype, layout):
    inputs = _inputs(dtype)
    ref_inputs = {n: (t.double() if t.is_floating_point() else t) for n, t in inputs.items()}
    want, want_grads = _run(ref_inputs, "torch")
    if layout != "contiguous":
        for name in ARGS if layout == "all strided" else (layout,):
            inputs[name] = strided(inputs[name])
    out, grads = _run(inputs, backend)
    assert torch.equal(out.topk_idx_TK, want.topk_idx_TK), "routing differs from float64"
    assert torch.equal(out.counts_E, want.counts_E)
    assert out.h_TD.dtype == dtype and out.h_TD[~inputs["token_mask_T"]].eq(0).all()
    names = ("h", "aux", "dz", "drouter", "dw1", "dw2")
    for name, a, b in zip(
        names, (out.h_TD, out.aux_loss, *grads), (want.h_TD, want.aux_loss, *want_grads), strict=True
    ):
        err = max_rel_error(a, b)
        assert err <= TOLERANCE[dtype], f"{backend} {dtype} {layout}: {name} max rel err {err:.3g}"


# ----------------------------------------------------------------------------- Triton ops one by one
# A strided argument must give exactly what its contiguous copy gives: the same kernel on the same
# values and tiles (a rerun of one computation, so bit-identity is the right check).


def _route(dtype):
    x = _inputs(dtype)
    logits = x["z_TD"] @ x["router_weight_ED"].T
    return logits, x["token_mask_T"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_router_ops_take_strided_arguments(dtype):
    from moe_kernels import routing

    logits, mask = _route(dtype)
    r = routing.router_forward(logits, K, mask, "topk")
    rs = routing.router_forward(strided(logits), K, strided(mask), "topk")
    for a, b in zip(r, rs, strict=True):
        assert torch.equal(a, b)
    idx_ref, w_ref = reference.topk_route(logits.double(), K)
    real = mask.nonzero()[:, 0]
    assert torch.equal(r.topk_idx_TK[real].long(), idx_ref[real].long())
    assert_close(r.topk_weight_TK[real], w_ref[real], rtol=1e-6, atol=1e-6, name="weights")
    bal = routing.balance_forward(r.blk_count_NE, r.blk_psum_NE, K)
    bals = routing.balance_forward(strided(r.blk_count_NE), strided(r.blk_psum_NE), K)
    assert all(torch.equal(a, b) for a, b in zip(bal, bals, strict=True))
    counts, dp, _ = bal
    d_w = torch.randn(r.topk_weight_TK.shape, generator=torch.Generator().manual_seed(1)).to(r.topk_weight_TK)
    d_aux = torch.tensor(0.3, dtype=dp.dtype)
    g = routing.router_backward(logits, r.topk_idx_TK, r.topk_weight_TK, d_w, d_aux, dp, "topk")
    gs = routing.router_backward(
        strided(logits), strided(r.topk_idx_TK), strided(r.topk_weight_TK), strided(d_w), d_aux, strided(dp), "topk"
    )
    assert torch.equal(g, gs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_permute_and_expert_ops_take_strided_arguments(dtype):
    from moe_kernels import grouped_gemm, permutation, routing

    x = _inputs(dtype)
    logits, mask = _route(dtype)
    r = routing.router_forward(logits, K, mask, "topk")
    counts, _, _ = routing.balance_forward(r.blk_count_NE, r.blk_psum_NE, K)
    perm = permutation.permute(r.topk_idx_TK, counts, r.blk_count_NE)
    perm_s = permutation.permute(strided(r.topk_idx_TK), strided(counts), strided(r.blk_count_NE))
    n = int(perm.offsets_E1[-1])  # sorted rows past the routed pairs are unspecified (masked tokens)
    assert torch.equal(perm.counts_E, perm_s.counts_E) and torch.equal(perm.offsets_E1, perm_s.offsets_E1)
    assert torch.equal(perm.pair_row_TK, perm_s.pair_row_TK)
    assert torch.equal(perm.sorted_pair_R[:n], perm_s.sorted_pair_R[:n])
    weight = r.topk_weight_TK.to(dtype)
    h, saved = grouped_gemm.experts_forward(x["z_TD"], x["w1_EDF"], x["w2_EFD"], weight, perm, save_pre=True)
    strided_perm = reference.Permutation(*(strided(t) for t in perm))
    args = (strided(x["z_TD"]), strided(x["w1_EDF"]), strided(x["w2_EFD"]), strided(weight), strided_perm)
    hs, saved_s = grouped_gemm.experts_forward(*args, save_pre=True)
    assert torch.equal(h, hs)
    dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    needs = (True, True, True, True)
    g = grouped_gemm.experts_backward(dh, x["z_TD"], x["w1_EDF"], x["w2_EFD"], weight, perm, saved, needs)
    saved_strided = grouped_gemm.ExpertActivations(strided(saved_s.gact_RF), strided(saved_s.pre_RF))
    gs = grouped_gemm.experts_backward(strided(dh), *args[:4], strided_perm, saved_strided, needs)
    for a, b in zip(g, gs, strict=True):
        assert torch.equal(a, b)
    # And the expert block itself against float64 on the same rounded inputs.
    y64 = reference.expert_mlp(x["z_TD"].double(), x["w1_EDF"].double(), x["w2_EFD"].double(), perm, K)
    want = reference.combine(y64, perm, weight.double())
    assert max_rel_error(h, want) <= TOLERANCE[dtype]
