"""MoEAdapter: the whole module against an independent float64 evaluation, masks, dtypes, errors."""

import math
import warnings

import pytest
import torch

from adapter import MoEAdapter, MoEAdapterConfig, total_aux_loss
from tests.utils import assert_close, naive_moe_adapter

SMALL = dict(in_dim=12, out_dim=10, expert_dim=7, num_experts=5, top_k=2)


def _adapter(dtype=torch.float64, **overrides):
    cfg = MoEAdapterConfig(**{**SMALL, "backend": "torch", **overrides})
    m = MoEAdapter(cfg).to(dtype)
    with torch.no_grad():  # non-trivial LayerNorm affines, so the test sees them
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"aggregation_dim": 9},
        {"aggregation_dim": 9, "num_shared_experts": 2, "shared_expert_dim": 3},
        {"balance_p": "softmax", "num_shared_experts": 1},
        {"top_k": 5},
        {"top_k": 1, "num_experts": 1},
        {"layout": "parallel"},
        {"layout": "parallel", "aggregation_dim": 9, "num_shared_experts": 2, "shared_expert_dim": 3},
    ],
)
def test_matches_independent_float64_evaluation(overrides):
    m = _adapter(**overrides)
    x = torch.randn(3, 7, SMALL["in_dim"], dtype=torch.float64)
    y = m(x)
    y_ref, aux_ref, counts_ref = naive_moe_adapter(m, x.reshape(-1, SMALL["in_dim"]))
    assert y.shape == (3, 7, SMALL["out_dim"])
    assert_close(y.reshape(-1, SMALL["out_dim"]), y_ref, rtol=1e-10, atol=1e-10, name="y")
    assert_close(m.aux_loss, aux_ref, rtol=1e-10, atol=1e-10, name="aux")
    assert torch.equal(m.expert_counts, counts_ref)
    assert m.last_topk_idx.shape == (21, m.config.top_k)


def test_gradcheck_float64():
    m = _adapter(aggregation_dim=6, num_shared_experts=1, shared_expert_dim=3)
    x = torch.randn(5, SMALL["in_dim"], dtype=torch.float64, requires_grad=True)
    params = tuple(m.parameters())

    def fn(x, *ps):
        with torch.nn.utils.stateless._reparametrize_module(
            m, dict(zip([n for n, _ in m.named_parameters()], ps, strict=True))
        ):
            y = m(x)
            return y, m.aux_loss

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_mask_padding_changes_nothing_for_real_tokens():
    m = _adapter(aggregation_dim=8, num_shared_experts=1)
    B, L = 3, 6
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    x = torch.randn(B, L, SMALL["in_dim"], dtype=torch.float64, requires_grad=True)
    junk = torch.where(mask[..., None], x.detach(), 1e3 * torch.randn_like(x))
    junk[~mask] = float("nan")  # NaN padding must not leak either
    junk.requires_grad_(True)
    y1 = m(x, mask)
    aux1, counts1 = m.aux_loss, m.expert_counts
    g1 = torch.autograd.grad((y1.sum() + aux1), tuple(m.parameters()))
    y2 = m(junk, mask)
    aux2, counts2 = m.aux_loss, m.expert_counts
    g2 = torch.autograd.grad((y2.sum() + aux2), tuple(m.parameters()))
    assert torch.equal(y1, y2) and torch.equal(aux1, aux2) and torch.equal(counts1, counts2)
    assert (y2[~mask] == 0).all()
    for a, b in zip(g1, g2, strict=True):
        assert torch.isfinite(b).all() and torch.equal(a, b)
    # And the masked call equals running the real tokens alone.
    y_real = m(x[mask])
    assert_close(y1[mask], y_real, rtol=1e-12, atol=1e-12, name="y real")
    assert_close(aux1, m.aux_loss, rtol=1e-12, atol=1e-12, name="aux")
    assert torch.equal(counts1, m.expert_counts)
    assert int(counts1.sum()) == int(mask.sum()) * m.config.top_k


def test_all_padding_gives_zero_output_and_zero_aux():
    m = _adapter()
    x = torch.randn(2, 4, SMALL["in_dim"], dtype=torch.float64)
    y = m(x, torch.zeros(2, 4, dtype=torch.bool))
    assert (y == 0).all() and m.aux_loss.item() == 0.0 and int(m.expert_counts.sum()) == 0


def test_empty_batch_returns_empty_and_backprops():
    m = _adapter()
    x = torch.randn(0, SMALL["in_dim"], dtype=torch.float64, requires_grad=True)
    y = m(x)
    assert y.shape == (0, SMALL["out_dim"])
    (y.sum() + m.aux_loss).backward()
    assert m.w1.grad is not None and (m.w1.grad == 0).all()
    assert m(torch.randn(2, 0, SMALL["in_dim"], dtype=torch.float64)).shape == (2, 0, SMALL["out_dim"])


def test_nan_input_stays_in_its_token():
    m = _adapter()
    x = torch.randn(6, SMALL["in_dim"], dtype=torch.float64)
    y_clean = m(x)
    x[2, 3] = float("nan")
    y = m(x)
    assert torch.isnan(y[2]).all()
    keep = torch.arange(6) != 2
    # The NaN token is still routed (below) but its expert groups change size, and BLAS may round
    # a row differently at another matrix shape (seen on AMD EPYC): equal within float64 rounding,
    # and finite. A rerun of the same input is bit-identical.
    assert torch.isfinite(y[keep]).all()
    assert_close(y[keep], y_clean[keep], rtol=1e-12, atol=1e-12, name="other tokens")
    assert torch.equal(m(x)[keep], y[keep])
    assert math.isnan(m.aux_loss.item())
    assert int(m.expert_counts.sum()) == 6 * m.config.top_k  # a NaN token is still routed


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"top_k": 6}, "top_k=6 > num_experts=5"),
        ({"top_k": 0}, "top_k must be a positive int"),
        ({"expert_dim": -3}, "expert_dim must be a positive int"),
        ({"in_dim": 2.5}, "in_dim must be of type int, got 2.5"),
        ({"layer_norms": "false"}, "layer_norms must be of type bool, got .false."),
        ({"balance_p": "gshard"}, "balance_p must be one of"),
        ({"backend": "cuda"}, "backend must be one of"),
        ({"aux_loss_weight": float("nan")}, "aux_loss_weight"),
        ({"aggregation_dim": -1}, "aggregation_dim"),
        ({"expert_init": "orthogonal"}, "expert_init must be one of"),
    ],
)
def test_config_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoEAdapterConfig(**{**SMALL, **kwargs})


def test_bad_inputs_raise_clear_errors():
    m = _adapter(torch.float32)
    with pytest.raises(ValueError, match=r"expects input \(\.\.\., 12\), got shape \(4, 11\)"):
        m(torch.randn(4, 11))
    with pytest.raises(ValueError, match="input dtype torch.float16 does not match the parameter dtype"):
        m(torch.randn(4, 12, dtype=torch.float16))
    with pytest.raises(ValueError, match="floating-point"):
        m(torch.ones(4, 12, dtype=torch.long))
    with pytest.raises(ValueError, match="mask shape"):
        m(torch.randn(2, 3, 12), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        m(torch.randn(2, 3, 12), torch.ones(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_in_and_out(dtype):
    m32 = _adapter(torch.float32, aggregation_dim=16)
    m = _adapter(torch.float32, aggregation_dim=16)
    m.load_state_dict(m32.state_dict())
    m = m.to(dtype)
    x = torch.randn(4, 9, SMALL["in_dim"])
    y = m(x.to(dtype))
    assert y.dtype == dtype and y.shape == (4, 9, SMALL["out_dim"])
    y32 = m32(x)
    tol = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 2e-2}[dtype]
    # Low-precision routing may flip a near-tie; compare the tokens whose choices agree.
    same = (m.last_topk_idx == m32.last_topk_idx).all(1).reshape(4, 9)
    assert same.float().mean() > 0.8
    assert_close(y[same].float(), y32[same], atol=tol, rtol=tol, name=str(dtype))


def test_autocast_cpu_bf16():
    m = _adapter(torch.float32, aggregation_dim=16)
    x = torch.randn(4, 9, SMALL["in_dim"])
    y32 = m(x)
    idx32 = m.last_topk_idx
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        (y.float().sum() + m.aux_loss).backward()
    assert y.dtype in (torch.bfloat16, torch.float32) and y.shape == y32.shape
    same = (m.last_topk_idx == idx32).all(1).reshape(4, 9)
    assert same.float().mean() > 0.8
    assert_close(y[same].float(), y32[same], atol=0.1, rtol=0.1, name="autocast bf16")
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


def test_state_dict_round_trip():
    m = _adapter(torch.float32, aggregation_dim=8, num_shared_experts=2)
    m2 = MoEAdapter(m.config)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(5, SMALL["in_dim"])
    assert torch.equal(m(x), m2(x))
    assert set(m.state_dict()) >= {"w1", "w2", "router.weight", "shared_w1", "agg_up.weight"}
    assert m.state_dict()["w1"].shape == (5, 12, 7)


def test_total_aux_loss_sums_weighted_adapters():
    a = _adapter(aux_loss_weight=1.0)
    b = _adapter(aux_loss_weight=0.5)
    model = torch.nn.ModuleDict({"a": a, "b": b})
    assert total_aux_loss(model) is None
    x = torch.randn(6, SMALL["in_dim"], dtype=torch.float64)
    a(x)
    b(x)
    assert_close(total_aux_loss(model), a.aux_loss + 0.5 * b.aux_loss, rtol=1e-6, name="total aux")


def test_copies_after_a_training_forward():
    """deepcopy, AveragedModel (EMA/SWA) and pickling after a forward whose aux_loss is a graph
    node: the copy has the weights and none of the last call's statistics."""
    import copy
    import pickle

    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    m = _adapter()
    x = torch.randn(5, SMALL["in_dim"], dtype=torch.float64)
    (m(x).sum() + m.aux_loss).backward()
    assert m.aux_loss.requires_grad
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert twin.aux_loss is None and twin.expert_counts is None and twin.last_topk_idx is None
        assert torch.equal(twin(x), m(x))
    m(x)
    ema = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ema.update_parameters(m)
    assert torch.equal(ema.module.w1, m.w1)


def test_meta_device_sizes_without_allocating():
    """Shapes only, as when sizing a model before materializing it (DenseAdapter did this already)."""
    with torch.device("meta"):
        m = MoEAdapter(MoEAdapterConfig(**SMALL, num_shared_experts=1, aggregation_dim=8))
        x = torch.empty(2, 5, SMALL["in_dim"])
        y = m(x, torch.ones(2, 5, dtype=torch.bool))
    assert y.device.type == "meta" and y.shape == (2, 5, SMALL["out_dim"])
    assert m.aux_loss.shape == () and m.expert_counts.shape == (SMALL["num_experts"],)
    assert m.last_topk_idx.shape == (10, SMALL["top_k"])
    (y.sum() + m.aux_loss).backward()
    assert m.w1.grad.shape == m.w1.shape and m.w1.grad.device.type == "meta"


def test_parallel_layout_counts_the_papers_figures():
    """Issue 15: the parallel reading of Table 4 (experts d -> 1280 -> D beside the always-on
    aggregation MLP d -> 10240 -> D) gives the paper's 94.4M / 70.8M, the dense adapter's size."""
    from adapter import preset

    c = preset("moe-8c4-parallel")
    experts = 8 * (2560 * 1280 + 1280 * 2048)  # 47,185,920
    shared = 2560 * 10240 + 10240 * 2048  # 47,185,920
    norms = 2 * 2560 + 2 * 2560 + 2 * 2048  # input, aggregation and output LayerNorms
    total = experts + shared + 2560 * 8 + norms
    assert (c.param_counts().total, c.param_counts().active) == (total, total - experts // 2)
    assert round(total / 1e6, 1) == 94.4 and round((total - experts // 2) / 1e6, 1) == 70.8
    assert abs(total - preset("dense").param_counts().total) / total < 4e-4
    small = MoEAdapter(preset("moe-8c4-parallel", 64, 128, backend="torch"))
    assert small.w2.shape == (8, 32, 128) and small.param_counts() == small.config.param_counts()
    with pytest.raises(ValueError, match="layout must be one of"):
        MoEAdapterConfig(**SMALL, layout="stacked")


def test_parallel_layout_on_the_triton_kernels_matches_torch():
    """Routed experts d -> f -> N with N = D != d (N = 10, not a multiple of 16) through the Triton
    kernels in the interpreter, forward and backward, against the torch backend in float64."""
    torch.manual_seed(0)
    ref = _adapter(layout="parallel", aggregation_dim=9)
    tri = MoEAdapter(MoEAdapterConfig(**{**SMALL, "layout": "parallel", "aggregation_dim": 9, "backend": "triton"}))
    tri = tri.double()
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, SMALL["in_dim"], dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    grads = []
    for m in (ref, tri):
        y = m(x, mask)
        ((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + 0.1 * m.aux_loss).backward()
        grads.append((y, {n: p.grad for n, p in m.named_parameters()}))
    assert_close(grads[1][0], grads[0][0], rtol=1e-10, atol=1e-12, name="y")
    for n, g in grads[0][1].items():
        assert_close(grads[1][1][n], g, rtol=1e-9, atol=1e-11, name=n)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_export_with_dynamic_batch_and_frames_runs_every_shape_without_warnings(backend):
    """Deployment: torch.export with the batch and frame dims dynamic (the Triton backend's op
    through its fake implementation), then the exported module on shapes it was not traced at,
    with padding, one row and one frame. Export warned of each statistic the forward assigns;
    it now keeps none, and eager forwards after it still do. The exported graph is ATen's own
    ops, not the eager module's calls: compared with a tolerance (float64; same op order, so the
    difference measured on AMD EPYC is 0)."""
    torch.manual_seed(0)
    m = _adapter(layout="parallel", aggregation_dim=9, backend=backend).eval()
    x, mask = torch.randn(2, 7, SMALL["in_dim"], dtype=torch.float64), torch.ones(2, 7, dtype=torch.bool)
    batch, frames = torch.export.Dim("batch"), torch.export.Dim("frames")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        program = torch.export.export(m, (x, mask), dynamic_shapes=({0: batch, 1: frames}, {0: batch, 1: frames}))
    assert m.aux_loss is None and m.expert_counts is None  # the export assigned nothing
    exported = program.module()
    for B, F in ((3, 11), (1, 1), (5, 2)):
        x = torch.randn(B, F, SMALL["in_dim"], dtype=torch.float64)
        mask = torch.rand(B, F) < 0.7
        mask[0, 0] = True
        assert_close(exported(x, mask), m(x, mask), rtol=1e-12, atol=1e-13, name=f"exported y at {(B, F)}")
    assert m.expert_counts is not None and int(m.expert_counts.sum()) == 2 * int(mask.sum())  # eager keeps them


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_activation_checkpointing_keeps_every_gradient(backend):
    """torch.utils.checkpoint(use_reentrant=False) around the adapter: the recomputation in backward
    is a rerun of the same computation at the same shapes, so every gradient, the balance loss's
    included, is bit-identical to the run without checkpointing."""
    torch.manual_seed(0)
    m = _adapter(aggregation_dim=9, backend=backend)
    x = torch.randn(2, 9, SMALL["in_dim"], dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 7:] = False
    runs = []
    for checkpointed in (False, True):
        m.zero_grad()
        xx = x.clone().requires_grad_()
        y = torch.utils.checkpoint.checkpoint(m, xx, mask, use_reentrant=False) if checkpointed else m(xx, mask)
        ((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + 0.1 * m.aux_loss).backward()
        runs.append([y, m.aux_loss, xx.grad, *(p.grad for p in m.parameters())])
    assert runs[0][3 + 2].abs().sum() > 0  # the router's gradient (balance loss included) is there
    for plain, ckpt in zip(*runs, strict=True):
        assert torch.equal(plain, ckpt)


def test_a_training_forward_without_gradients_warns_that_the_balance_loss_cannot_train():
    """The reentrant checkpoint runs forward without gradients and recomputes it in backward, where
    the aux_loss the loss reads is not seen: the router would get no balance gradient, silently.
    Warned (Python's default filter: once per process); eval mode, a frozen router,
    aux_loss_weight 0 or a no_grad forward of data that wants no gradient (an evaluation left in
    training mode) do not warn."""
    m = _adapter()
    x = torch.randn(2, 5, SMALL["in_dim"], dtype=torch.float64, requires_grad=True)
    w = torch.linspace(-1, 1, 2 * 5 * SMALL["out_dim"], dtype=torch.float64).view(2, 5, -1)
    router_grads = []
    for loss_of in (lambda y: (y * w).sum(), lambda y: (y * w).sum() + m.aux_loss):
        m.zero_grad()
        loss_of(m(x)).backward()
        router_grads.append(m.router.weight.grad.clone())
    m.zero_grad()
    with pytest.warns(UserWarning, match="use_reentrant=False"):
        y = torch.utils.checkpoint.checkpoint(m, x, use_reentrant=True)
    ((y * w).sum() + m.aux_loss).backward()
    # What the warning is about: the router's gradient is the output's alone, the balance loss's is lost.
    assert_close(m.router.weight.grad, router_grads[0], rtol=1e-12, atol=1e-14, name="router grad")
    assert not torch.allclose(router_grads[1], router_grads[0])
    quiet = [m.eval(), _adapter(routing="frozen"), _adapter(aux_loss_weight=0.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for module in quiet:
            with torch.no_grad():
                module(x)
        with torch.no_grad():
            m.train()(x.detach())
        m(x)


@pytest.mark.parametrize("layout", ["serial", "parallel"])
def test_replicated_experts_start_as_one_mlp_whatever_the_routing(layout):
    """expert_init="replicated": every expert copies expert 0, and since the top-k gates sum to 1
    the routed sum is that one MLP's output: a different router changes nothing at init (up to
    float64 rounding of the gate sum)."""
    torch.manual_seed(0)
    m = _adapter(layout=layout, aggregation_dim=9, expert_init="replicated")
    assert all(torch.equal(w[e], w[0]) for w in (m.w1, m.w2) for e in range(m.config.num_experts))
    x = torch.randn(3, 17, SMALL["in_dim"], dtype=torch.float64)
    y = m(x)
    before = m.last_topk_idx.clone()
    with torch.no_grad():
        m.router.weight.copy_(torch.randn_like(m.router.weight))
    assert_close(m(x), y, atol=1e-12, rtol=1e-12)
    assert not torch.equal(m.last_topk_idx, before)  # the routing did change
    torch.manual_seed(0)
    independent = _adapter(layout=layout, aggregation_dim=9)
    assert not torch.equal(independent.w1[1], independent.w1[0])
    assert torch.equal(independent.w1[0], m.w1[0])  # the same draw; only the copies differ


def test_frozen_routing_keeps_the_initial_random_router():
    torch.manual_seed(3)
    learned = MoEAdapter(MoEAdapterConfig(**SMALL, backend="torch"))
    torch.manual_seed(3)
    frozen = MoEAdapter(MoEAdapterConfig(**SMALL, backend="torch", routing="frozen"))
    assert "router.weight" not in dict(frozen.named_parameters()) and "router.weight" in frozen.state_dict()
    assert torch.equal(frozen.router.weight, learned.router.weight)  # the same draw, never trained
    x = torch.randn(3, 4, 12)
    assert torch.equal(frozen(x), learned(x))  # same weights, same computation
    before = frozen.router.weight.clone()
    opt = torch.optim.SGD(frozen.parameters(), lr=0.5)
    (frozen(x).square().mean() + frozen.aux_loss).backward()
    opt.step()
    assert torch.equal(frozen.router.weight, before) and not torch.equal(frozen.w1, learned.w1)


def test_label_routing_routes_each_token_among_its_labels_experts():
    m = _adapter(num_experts=7, top_k=2, routing="label", num_labels=3)  # labels own experts 0-1, 2-3, 4-5
    x = torch.randn(2, 6, 12, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 1, 2, 0, 1, 2], [2, 2, 1, 0, -1, -1]])
    mask = labels >= 0
    y = m(x, mask, labels=labels)
    idx = m.last_topk_idx.reshape(2, 6, 2)
    assert (idx[mask] // 2 == labels[mask][:, None]).all() and (idx[~mask] == -1).all()
    # Every real token's output by hand: G = softmax over its label's two logits, then eq. 4-5.
    z = m.norm_in(x.detach())
    for b, t in mask.nonzero().tolist():
        block = [2 * labels[b, t].item(), 2 * labels[b, t].item() + 1]
        g = torch.softmax(m.router(z[b, t])[block], 0)
        h = sum(g[i] * (torch.nn.functional.silu(z[b, t] @ m.w1[e]) @ m.w2[e]) for i, e in enumerate(block))
        assert_close(y[b, t], m.norm_out(m.proj(h)), rtol=1e-10, atol=1e-12, name=f"token {b, t}")
    assert (y[~mask] == 0).all()
    (y.square().sum() + m.aux_loss).backward()
    assert m.router.weight.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()


def test_label_routing_errors_name_the_problem():
    with pytest.raises(ValueError, match="owns num_experts // num_labels = 1 experts, fewer than top_k=2"):
        MoEAdapterConfig(**SMALL, routing="label", num_labels=3)
    with pytest.raises(ValueError, match="needs num_labels >= 1"):
        MoEAdapterConfig(**SMALL, routing="label")
    m = _adapter(num_experts=6, routing="label", num_labels=3)
    x = torch.randn(4, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match="pass labels"):
        m(x)
    with pytest.raises(ValueError, match=r"labels of real tokens must be in \[0, 3\); got \[3\]"):
        m(x, labels=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="integer tensor"):
        m(x, labels=torch.zeros(4))
    with pytest.raises(ValueError, match="leading shape"):
        m(x, labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="only read with routing='label'"):
        _adapter()(x, labels=torch.zeros(4, dtype=torch.long))


def test_small_config_and_loss_settings_are_checked():
    """Issue 39 item 16: a frozen router's weights counted in the config's param_counts but not the
    module's (364 vs 332); norm_eps=inf (every output 0) and a NaN or negative balance-loss weight
    were accepted."""
    import math

    from adapter import DenseAdapterConfig, MoEAdapterConfig, preset, with_aux_loss

    for routing in ("learned", "frozen"):
        cfg = preset("moe-8c4", 8, 6, routing=routing)
        assert cfg.param_counts() == MoEAdapter(cfg).param_counts(), routing
    for cls, kw in ((MoEAdapterConfig, {"expert_dim": 4}), (DenseAdapterConfig, {"hidden_dim": 4})):
        with pytest.raises(ValueError, match="norm_eps must be a positive finite number, got inf"):
            cls(in_dim=8, out_dim=6, norm_eps=math.inf, **kw)
    adapter = MoEAdapter(preset("moe-8c4", 8, 6, backend="torch"))
    loss = adapter(torch.randn(3, 8)).sum()
    for bad in (math.nan, -1, math.inf, True, "0.01"):
        with pytest.raises(ValueError, match="with_aux_loss: weight must be a finite number >= 0"):
            with_aux_loss(loss, adapter, weight=bad)
    assert with_aux_loss(loss, adapter, weight=0) is loss
