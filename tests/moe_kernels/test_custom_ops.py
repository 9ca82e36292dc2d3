"""moe_ffn as torch.library custom ops: opcheck (schema, fake, autograd), no graph break inside
MoEAdapter under torch.compile, compiled forward + backward equal to eager, on the torch backend and
on the Triton kernels (interpreter on CPU, compiled on a GPU)."""

import pytest
import torch

from adapter import MoEAdapter, MoEAdapterConfig
from moe_kernels import custom_ops
from tests.utils import assert_close, make_moe_inputs

BACKENDS = ["torch", "triton"]  # triton runs in the interpreter here (tests/conftest.py)


def _adapter(backend, dtype=torch.float64, **overrides):
    cfg = dict(in_dim=16, out_dim=12, expert_dim=8, num_experts=4, top_k=2, aggregation_dim=20, backend=backend)
    return MoEAdapter(MoEAdapterConfig(**{**cfg, **overrides})).to(dtype)


def _step(m):
    def step(x, mask):
        y = m(x, mask)
        return (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).square().sum() + 0.3 * m.aux_loss

    return step


def _eager_reference(m):
    """(x, mask, step, loss, grads) of one eager step of adapter m on a fixed masked batch (dynamo
    reset first, so a compiled run after it traces afresh)."""
    torch._dynamo.reset()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(2)) > 0.25
    step = _step(m)
    want = step(x, mask)
    want.backward()
    return x, mask, step, want, {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("masked, n_out", [(False, 16), (True, 16), (True, 11)])  # 11: experts d -> f -> N != d
def test_opcheck_both_ops(backend, masked, n_out):
    z, router, w1, w2 = make_moe_inputs(9, 16, 8, 4)
    if n_out != 16:
        w2 = torch.randn(4, 8, n_out, generator=torch.Generator().manual_seed(5), dtype=z.dtype).requires_grad_(True)
    mask = torch.rand(9, generator=torch.Generator().manual_seed(3)) > 0.3 if masked else None
    torch.library.opcheck(custom_ops.moe_ffn_op, (z, router, w1, w2, mask, 2, "topk", backend))
    g = torch.Generator().manual_seed(4)
    grads_out = (
        torch.randn(9, n_out, generator=g, dtype=z.dtype),
        torch.tensor(0.3, dtype=z.dtype),
        torch.randn(9, 2, generator=g, dtype=z.dtype),
    )
    args = tuple(t.detach() for t in (z, router, w1, w2))
    torch.library.opcheck(custom_ops.moe_ffn_backward_op, (*args, mask, 2, "softmax", backend, *grads_out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_graph_break_inside_the_adapter(backend):
    m = _adapter(backend, num_shared_experts=1)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    mask = torch.rand(2, 9, generator=torch.Generator().manual_seed(1)) > 0.2
    explained = torch._dynamo.explain(_step(m))(x, mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize(
    "backend, balance_p, layout",
    [(b, p, "serial") for b in BACKENDS for p in ("topk", "softmax")] + [(b, "topk", "parallel") for b in BACKENDS],
)
def test_compiled_forward_backward_equals_eager(backend, balance_p, layout):
    m = _adapter(backend, balance_p=balance_p, layout=layout)
    x, mask, step, want, want_grads = _eager_reference(m)
    want_idx = m.last_topk_idx.clone()
    m.zero_grad()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # traces fwd and bwd through the fakes
    got = compiled(x, mask)
    got.backward()
    assert_close(got, want, rtol=1e-12, name="loss")
    assert torch.equal(m.last_topk_idx, want_idx)
    for n, p in m.named_parameters():
        assert_close(p.grad, want_grads[n], rtol=1e-10, atol=1e-12, name=n)


def test_inductor_compiles_the_adapter_on_cpu():
    """The default backend (inductor, C++ on CPU) around the opaque op: same loss and gradients."""
    torch._dynamo.reset()
    m = _adapter("torch", dtype=torch.float32)
    x = torch.randn(4, 5, 16)
    mask = torch.ones(4, 5, dtype=torch.bool)
    step = _step(m)
    want = step(x, mask)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    got = torch.compile(step, fullgraph=True)(x, mask)
    got.backward()
    assert_close(got, want, rtol=1e-5, name="loss")
    for n, p in m.named_parameters():
        assert_close(p.grad, want_grads[n], rtol=1e-4, atol=1e-5, name=n)


@pytest.mark.gpu
def test_gpu_compiled_triton_adapter_has_no_graph_break_and_captures_in_a_cuda_graph():
    torch._dynamo.reset()
    m = _adapter("triton", dtype=torch.bfloat16, in_dim=256, out_dim=128, expert_dim=128, num_experts=8, top_k=4).cuda()
    x = torch.randn(8, 512, 256, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(8, 512, dtype=torch.bool, device="cuda")
    step = _step(m)
    explained = torch._dynamo.explain(step)(x, mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    want = step(x, mask)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)  # CUDA graphs
    for _ in range(3):  # warmup, record, replay
        m.zero_grad(set_to_none=False)
        got = compiled(x, mask)
        got.backward()
    torch.cuda.synchronize()
    assert torch.allclose(got.float(), want.float(), rtol=1e-2)
    for n, p in m.named_parameters():
        assert torch.allclose(p.grad.float(), want_grads[n].float(), rtol=5e-2, atol=5e-2), n


@pytest.mark.parametrize("masked,schedule", [(False, "tiles+split"), (True, "persistent+nosplit")])
def test_opcheck_saving_ops(masked, schedule):
    """The Triton backend's compile path that keeps activations: schema, fakes and autograd, on
    the default schedule and on the other kernels of both choices."""
    z, router, w1, w2 = make_moe_inputs(9, 16, 8, 4)
    mask = torch.rand(9, generator=torch.Generator().manual_seed(3)) > 0.3 if masked else None
    torch.library.opcheck(custom_ops.moe_ffn_saving_op, (z, router, w1, w2, mask, 2, "topk", schedule))
    with torch.no_grad():
        saved = custom_ops.moe_ffn_saving_op(z, router, w1, w2, mask, 2, "softmax", schedule)
    g = torch.Generator().manual_seed(4)
    grads_out = (
        torch.randn(9, 16, generator=g, dtype=z.dtype),
        torch.tensor(0.3, dtype=z.dtype),
        torch.randn(9, 2, generator=g, dtype=z.dtype),
    )
    args = (*(t.detach() for t in (z, router, w1, w2)), saved[2], saved[3], saved[4], *saved[5:])
    torch.library.opcheck(custom_ops.moe_ffn_saved_backward_op, (*args, 2, "softmax", schedule, *grads_out))


@pytest.mark.parametrize("recompute", [False, True])
def test_compiled_triton_backward_keeps_activations_unless_asked_to_recompute(recompute, monkeypatch):
    """Under torch.compile the Triton backend's backward reads the forward's saved activations: the
    expert forward runs once per step (twice with compile_recompute); gradients equal eager's."""
    from moe_kernels import grouped_gemm

    m = _adapter("triton", compile_recompute=recompute)
    x, mask, step, want, want_grads = _eager_reference(m)
    m.zero_grad()
    calls = []
    original = grouped_gemm.experts_forward
    monkeypatch.setattr(grouped_gemm, "experts_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(x, mask)
    forward_calls = len(calls)
    got.backward()
    assert forward_calls == 1 and len(calls) - forward_calls == (1 if recompute else 0)
    assert_close(got, want, rtol=1e-12, name="loss")
    for n, p in m.named_parameters():
        assert_close(p.grad, want_grads[n], rtol=1e-10, atol=1e-12, name=n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_loss_on_the_balance_loss_alone_in_the_parallel_layout(backend):
    """h unused by the loss in the parallel layout, where h is (T, N) and z (T, d): the compiled
    backward gives the eager router gradient (an unused output's gradient, if it arrives as None,
    becomes zeros of that output's shape)."""
    torch._dynamo.reset()
    m = _adapter(backend, layout="parallel")
    x = torch.randn(2, 5, 16, dtype=torch.float64)

    def step(x):
        m(x)
        return m.aux_loss

    step(x).backward()
    want = m.router.weight.grad.clone()
    m.zero_grad()
    torch.compile(step, backend="aot_eager", fullgraph=True)(x).backward()
    assert_close(m.router.weight.grad, want, rtol=1e-10, atol=1e-12, name="router")
