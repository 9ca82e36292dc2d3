"""Shared test helpers: a loud assert_close and an independent per-token MoE evaluation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    name: str = "tensor",
    max_show: int = 5,
) -> None:
    """Elementwise |a - e| <= atol + rtol * |e| (NaN must match NaN); on failure print the max
    absolute and relative errors and the first mismatching positions."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    err = (a - e).abs()
    bad = (err > atol + rtol * e.abs()) | (nan_a != nan_e)
    bad &= ~(nan_a & nan_e)
    bad |= torch.isinf(a) & (a != e)
    if bad.any():
        finite = ~(nan_a | nan_e)
        max_abs = err[finite].max().item() if finite.any() else math.nan
        rel = err / e.abs().clamp(min=1e-300)
        max_rel = rel[finite].max().item() if finite.any() else math.nan
        idx = bad.nonzero()[:max_show].tolist()
        shown = ", ".join(f"{tuple(i)}: got {a[tuple(i)].item():.6g} want {e[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} mismatches (rtol={rtol}, atol={atol}); "
            f"max abs err {max_abs:.3g}, max rel err {max_rel:.3g}; first: {shown}"
        )


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (a norm-free relative error that does not blow up near zeros)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((a - e).abs().max() / e.abs().max().clamp(min=1e-300)).item()


def naive_topk(logits_E: torch.Tensor, k: int) -> list[int]:
    """Top-k by a Python sort: larger logit first, ties to the lower index, NaN ranks as -inf."""
    vals = [(-math.inf if math.isnan(v) else v) for v in logits_E.tolist()]
    return sorted(range(len(vals)), key=lambda e: (-vals[e], e))[:k]


def naive_moe_ffn(z_TD, router_weight_ED, w1_EDF, w2_EFD, top_k, token_mask_T=None, balance_p="topk"):
    """Per-token loop evaluation of eq. 2-4 and 8-10; differentiable through autograd."""
    T, _ = z_TD.shape
    E = w1_EDF.shape[0]
    rows, p_rows, r_rows = [], [], []
    for t in range(T):
        if token_mask_T is not None and not bool(token_mask_T[t]):
            rows.append(torch.zeros_like(z_TD[t]))
            continue
        logits = router_weight_ED @ z_TD[t]
        kept = naive_topk(logits.detach(), top_k)
        g = torch.softmax(logits[kept], dim=0)
        h = sum(g[j] * (F.silu(z_TD[t] @ w1_EDF[e]) @ w2_EFD[e]) for j, e in enumerate(kept))
        rows.append(h)
        onehot = torch.zeros(E, dtype=z_TD.dtype)
        onehot[kept] = 1.0
        r_rows.append(onehot)
        if balance_p == "topk":
            p = torch.zeros(E, dtype=z_TD.dtype).index_put((torch.tensor(kept),), g)
        else:
            p = torch.softmax(logits, dim=0)
        p_rows.append(p)
    h_TD = torch.stack(rows)
    if not p_rows:
        return h_TD, z_TD.sum() * 0, torch.zeros(E, dtype=torch.int32)
    B = len(p_rows)
    P_E = torch.stack(p_rows).sum(0) / B
    f_E = torch.stack(r_rows).sum(0) / B
    aux = E * (P_E * f_E).sum()
    counts = torch.stack(r_rows).sum(0).to(torch.int32)
    return h_TD, aux, counts


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def naive_moe_adapter(module, x_TD, mask_T=None):
    """Independent float64 evaluation of the whole MoEAdapter (eq. 2-5, 8-10), token by token."""
    c = module.config
    p = {k: v.detach().double() for k, v in module.state_dict().items()}
    z = layer_norm(x_TD.double(), p["norm_in.weight"], p["norm_in.bias"], c.norm_eps)
    h, aux, counts = naive_moe_ffn(z, p["router.weight"], p["w1"], p["w2"], c.top_k, mask_T, c.balance_p)
    if c.num_shared_experts:
        for s in range(c.num_shared_experts):
            h = h + F.silu(z @ p["shared_w1"][s]) @ p["shared_w2"][s]

    def projection(v):
        if not c.aggregation_dim:
            return v @ p["proj.weight"].T
        a = layer_norm(v, p["agg_norm.weight"], p["agg_norm.bias"], c.norm_eps)
        return F.silu(a @ p["agg_up.weight"].T) @ p["agg_down.weight"].T

    # serial: P after the experts; parallel: P beside them, on the same z (experts end in D).
    out = h + projection(z) if c.layout == "parallel" else projection(h)
    y = layer_norm(out, p["norm_out.weight"], p["norm_out.bias"], c.norm_eps)
    if mask_T is not None:
        y = torch.where(mask_T[:, None], y, 0.0)
    return y, aux, counts


ROUTINGS = ("uniform", "one", "empty", "ties")


def make_moe_inputs(T, D, F_, E, *, dtype=torch.float64, routing="uniform", seed=0, requires_grad=True):
    """(z_TD, router_weight_ED, w1_EDF, w2_EFD) with a chosen routing pattern.

    uniform: random router. one: every token's best expert is 0. empty: the last two experts (when
    E >= 3) never win while k <= E - 2. ties: experts 1 and 2 have identical router rows, so every
    token sees an exact tie between them.
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, D, generator=g, dtype=torch.float64)
    wr = torch.randn(E, D, generator=g, dtype=torch.float64) / math.sqrt(D)
    if routing == "one":
        z = z.abs() + 0.1
        wr[0] = 5.0
    elif routing == "empty" and E >= 3:
        z = z.abs() + 0.1
        wr[-2:] = -5.0
    elif routing == "ties" and E >= 3:
        wr[2] = wr[1]
    elif routing not in ROUTINGS:
        raise ValueError(routing)
    w1 = torch.randn(E, D, F_, generator=g, dtype=torch.float64) / math.sqrt(D)
    w2 = torch.randn(E, F_, D, generator=g, dtype=torch.float64) / math.sqrt(F_)
    return tuple(t.to(dtype).requires_grad_(requires_grad) for t in (z, wr, w1, w2))


def three_way_check(ours, torch_lowp, ref64, *, atol, name):
    """fp16/bf16 rule: our error against float64 is at most twice torch's own low-precision error
    on the same inputs, plus atol (max-abs errors)."""
    ours_err = (ours.double() - ref64.double()).abs().max().item() if ours.numel() else 0.0
    torch_err = (torch_lowp.double() - ref64.double()).abs().max().item() if ours.numel() else 0.0
    assert ours_err <= 2 * torch_err + atol, (
        f"{name}: max error vs float64 {ours_err:.3g} > 2 x torch's low-precision error {torch_err:.3g} + {atol}"
    )


def torchrun(nproc: int = 2) -> list[str]:
    """The command prefix that starts `nproc` processes on this machine (torch.distributed.run)."""
    import sys

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def poison_allocations(monkeypatch) -> None:
    """torch.empty / empty_like return buffers filled with NaN (integers -7777) instead of whatever
    memory held, so a kernel that leaves an output element unwritten, or lets a row it never
    wrote reach a valid result, fails a comparison instead of passing on benign garbage."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan") if t.dtype.is_floating_point else -7777)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
