"""save/load of adapters and swapped models: exact round trips, no pickle, clear errors."""

import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from adapter import DenseAdapter, MoEAdapter, build_adapter, preset, swap_adapter
from adapter.serialization import load_adapter, load_swapped, save_adapter, save_swapped


@pytest.mark.parametrize(
    "name, dtype, overrides",
    [
        ("moe-8c4", torch.float32, {"backend": "torch", "num_shared_experts": 2}),
        ("moe-8c1", torch.bfloat16, {"balance_p": "softmax", "layer_norms": False, "bias": True}),
        ("dense", torch.float64, {}),
    ],
)
def test_adapter_round_trip_is_exact(name, dtype, overrides, tmp_path):
    torch.manual_seed(0)
    a = build_adapter(preset(name, 16, 12, **overrides)).to(dtype)
    path = tmp_path / "a.safetensors"
    save_adapter(a, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temporary left behind
    b = load_adapter(path)
    assert type(b) is type(a) and b.config == a.config
    for (n, p), (m, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert n == m and q.dtype == dtype and torch.equal(p, q), n
    x = torch.randn(3, 16, dtype=dtype)
    assert torch.equal(a(x), b(x))


def test_files_not_written_by_us_or_tampered_are_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not written by moe-adapter"):
        load_adapter(plain)
    bad = tmp_path / "bad.safetensors"
    record = {"kind": "moe", "config": {"in_dim": 4, "out_dim": 4, "expert_dim": 2, "num_experts": 2, "top_k": 3}}
    save_file({"w": torch.zeros(2)}, str(bad), metadata={"format": "moe-adapter/1", "adapter": json.dumps(record)})
    with pytest.raises(ValueError, match="top_k=3 > num_experts=2"):
        load_adapter(bad)
    record = {"kind": "moe", "config": {"in_dim": 4, "out_dim": 4, "expert_dim": 2, "__class__": "os.system"}}
    save_file({"w": torch.zeros(2)}, str(bad), metadata={"format": "moe-adapter/1", "adapter": json.dumps(record)})
    with pytest.raises(ValueError, match="invalid adapter record"):
        load_adapter(bad)
    with pytest.raises(ValueError, match="expected a DenseAdapter or MoEAdapter"):
        save_adapter(nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_swapped_model_round_trip_and_strictness(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)), nn.Linear(6, 2))
    swap_adapter(model, "1", "moe-4c2", backend="torch")
    swap_adapter(model, "2", "dense")
    x = torch.randn(5, 4)
    want = model(x)
    save_swapped(model, tmp_path / "m.safetensors")
    fresh = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)), nn.Linear(6, 2))
    load_swapped(fresh, tmp_path / "m.safetensors")
    assert isinstance(fresh[1], MoEAdapter) and isinstance(fresh[2], DenseAdapter)
    assert torch.equal(fresh(x), want)
    with pytest.raises(ValueError, match="holds an adapter at '2'"):
        load_swapped(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 6)), tmp_path / "m.safetensors")
    other = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(6, 2), nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="Unexpected|Missing"):
        load_swapped(other, tmp_path / "m.safetensors")
