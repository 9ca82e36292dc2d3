"""moe_kernels.ops.moe_ffn, the functional op every backend sits under: inputs it refuses."""

import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap

from adapter import MoEAdapter, preset


def test_vmap_is_refused_by_name_not_deep_in_the_permutation():
    """vmap over the adapter (per-sample gradients, ensembles over stacked weights) cannot batch
    data-dependent routing; without the check torch failed inside permute with an in-place error
    naming nothing of ours. torch.func.grad alone (no vmap) runs, and equals autograd."""
    torch.manual_seed(0)
    adapter = MoEAdapter(preset("moe-8c4", in_dim=16, out_dim=8, backend="torch"))
    x_BFD = torch.randn(3, 5, 16)
    params = dict(adapter.named_parameters())

    def loss(p, x):
        return functional_call(adapter, p, (x,)).pow(2).sum()

    match = r"moe_ffn .* under torch\.func\.vmap .* data-dependent"
    with pytest.raises(NotImplementedError, match=match):
        vmap(adapter)(x_BFD)
    with pytest.raises(NotImplementedError, match=match):  # per-sample gradients: inputs batched
        vmap(grad(loss), in_dims=(None, 0))(params, x_BFD[:, None])
    stacked, _ = stack_module_state([adapter, MoEAdapter(preset("moe-8c4", in_dim=16, out_dim=8, backend="torch"))])
    with pytest.raises(NotImplementedError, match=match):  # an ensemble: weights batched, inputs not
        vmap(lambda p: functional_call(adapter, p, (x_BFD,)))(stacked)
    grads = grad(loss)(params, x_BFD)
    want = torch.autograd.grad(loss(params, x_BFD), list(params.values()))
    for (name, g), w in zip(grads.items(), want, strict=True):
        # float32 rounding apart: functorch sums some gradients in another order (3.7e-9 at most on
        # the 2-core AMD EPYC, 2026-12-04).
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32, torch.int64, torch.bool])
@pytest.mark.parametrize("which", [0, 1, 2, 3])
def test_non_float_inputs_are_refused_by_name(dtype, which):
    """Issue 39 item 8: the check sat after a raise (dead code); complex64 gave a complex "result"
    and int/bool crashed deep in torch."""
    from moe_kernels import moe_ffn
    from tests.utils import make_moe_inputs

    inputs = list(make_moe_inputs(6, 8, 5, 4, dtype=torch.float32, requires_grad=False))
    inputs[which] = inputs[which].to(dtype)
    name = ("z_TD", "router_weight_ED", "w1_EDF", "w2_EFD")[which]
    with pytest.raises(ValueError, match=rf"{name} must be a floating-point tensor, got dtype {dtype}"):
        moe_ffn(*inputs, top_k=2, backend="torch")
