"""DenseAdapter (eq. 1) against a hand evaluation; masks and errors."""

import pytest
import torch
import torch.nn.functional as F

from adapter import DenseAdapter, DenseAdapterConfig
from tests.utils import assert_close, layer_norm


def _dense(dtype=torch.float64):
    m = DenseAdapter(DenseAdapterConfig(in_dim=10, out_dim=6, hidden_dim=24)).to(dtype)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


def test_matches_equation_1():
    m = _dense()
    x = torch.randn(2, 5, 10, dtype=torch.float64)
    p = m.state_dict()
    z = layer_norm(x, p["norm_in.weight"], p["norm_in.bias"], 1e-5)
    y_ref = layer_norm(
        F.silu(z @ p["up.weight"].T) @ p["down.weight"].T, p["norm_out.weight"], p["norm_out.bias"], 1e-5
    )
    assert_close(m(x), y_ref, rtol=1e-10, atol=1e-10, name="y")


def test_mask_and_empty_batch():
    m = _dense()
    x = torch.randn(2, 4, 10, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    junk = x.clone()
    junk[~mask] = float("nan")
    y = m(junk, mask)
    assert (y[~mask] == 0).all() and torch.equal(y[mask], m(x)[mask])
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert m(torch.randn(0, 10, dtype=torch.float64)).shape == (0, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    m = _dense(torch.float32)
    x = torch.randn(3, 10)
    y = m.to(dtype)(x.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()


def test_errors():
    m = _dense(torch.float32)
    with pytest.raises(ValueError, match=r"expects input \(\.\.\., 10\), got shape \(3, 9\)"):
        m(torch.randn(3, 9))
    with pytest.raises(ValueError, match="does not match the parameter dtype"):
        m(torch.randn(3, 10, dtype=torch.float64))
    with pytest.raises(ValueError, match="hidden_dim must be a positive int"):
        DenseAdapterConfig(in_dim=4, out_dim=4, hidden_dim=0)
