"""save/load of adapters and swapped models: exact round trips, no pickle, clear errors."""

import errno
import json
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from adapter import DenseAdapter, MoEAdapter, build_adapter, preset, swap_adapter
from adapter.files import atomic_write_text
from adapter.serialization import load_adapter, load_swapped, save_adapter, save_swapped


@pytest.mark.parametrize(
    "name, dtype, overrides",
    [
        ("moe-8c4", torch.float32, {"backend": "torch", "num_shared_experts": 2}),
        ("moe-8c1", torch.bfloat16, {"balance_p": "softmax", "layer_norms": False, "bias": True}),
        ("dense", torch.float64, {}),
        ("moe-4c2-parallel", torch.float32, {"backend": "torch", "num_shared_experts": 1}),
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
    with pytest.raises(ValueError, match=r"missing 2 tensor\(s\) \['3.bias', '3.weight'\], unexpected 0"):
        load_swapped(other, tmp_path / "m.safetensors")


def test_load_adapter_checks_the_header_before_allocating(tmp_path):
    """Mixed dtypes, shapes that do not fit the config, a config asking for 1e9 experts, a file of
    the other kind, undecodable metadata, a directory: each refused by name, nothing allocated."""
    a = build_adapter(preset("moe-4c2", 8, 6, backend="torch"))
    state = {k: v.detach().contiguous() for k, v in a.state_dict().items()}
    meta = {"format": "moe-adapter/1", "adapter": json.dumps({"kind": "moe", "config": a.config.__dict__})}
    mixed = tmp_path / "mixed.safetensors"
    save_file({**state, "w1": state["w1"].double()}, str(mixed), metadata=meta)
    with pytest.raises(ValueError, match=r"mixed.safetensors: an adapter's tensors must share one dtype.*F64"):
        load_adapter(mixed)
    huge = tmp_path / "huge.safetensors"
    record = {"kind": "moe", "config": {**a.config.__dict__, "num_experts": 1_000_000_000}}
    save_file(state, str(huge), metadata={**meta, "adapter": json.dumps(record)})
    with pytest.raises(ValueError, match=r"huge.safetensors: tensor shapes do not match its config: .*w1"):
        load_adapter(huge)  # from the header: building it would allocate 256 GB of expert weights
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6))
    swap_adapter(model, "1", "moe-4c2", backend="torch")
    save_swapped(model, tmp_path / "swapped.safetensors")
    with pytest.raises(ValueError, match=r"swapped.safetensors holds a swapped model \(load it with load_swapped\)"):
        load_adapter(tmp_path / "swapped.safetensors")
    save_adapter(a, tmp_path / "one.safetensors")
    with pytest.raises(ValueError, match=r"one.safetensors holds a single adapter \(load it with load_adapter\)"):
        load_swapped(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6)), tmp_path / "one.safetensors")
    broken = tmp_path / "broken.safetensors"
    save_file(state, str(broken), metadata={**meta, "adapter": "{not json"})
    with pytest.raises(ValueError, match=r"broken.safetensors: metadata 'adapter' is not valid JSON"):
        load_adapter(broken)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_adapter(tmp_path)
    with pytest.raises(FileNotFoundError, match="no-such.safetensors"):
        load_adapter(tmp_path / "no-such.safetensors")
    (tmp_path / "text.safetensors").write_text("hello")
    with pytest.raises(ValueError, match="text.safetensors is not a readable safetensors file"):
        load_adapter(tmp_path / "text.safetensors")
    record = {"kind": "moe", "config": {**a.config.__dict__, "layer_norms": "false"}}
    save_file(state, str(broken), metadata={**meta, "adapter": json.dumps(record)})
    with pytest.raises(ValueError, match="layer_norms must be of type bool, got 'false'"):
        load_adapter(broken)


def test_saves_are_atomic_per_call_and_refuse_directories(tmp_path):
    import threading

    a = build_adapter(preset("dense", 8, 6))
    with pytest.raises(IsADirectoryError, match="is a directory"):
        save_adapter(a, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no stray temporary
    # Two threads saving one path: each writes its own temporary, the file ends whole.
    adapters = [build_adapter(preset("moe-8c4", 32, 24, backend="torch")) for _ in range(2)]
    errors = []

    def save(m):
        try:
            for _ in range(5):
                save_adapter(m, tmp_path / "a.safetensors")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=save, args=(m,)) for m in adapters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    loaded = load_adapter(tmp_path / "a.safetensors")
    assert any(torch.equal(loaded.w1, m.w1) for m in adapters)


def test_atomic_write_text_leaves_the_old_file_or_the_new_one_and_no_temporary(tmp_path, monkeypatch):
    """What manifests, run configs, the checkpoint pointer and logs are written with."""
    path = tmp_path / "manifest.jsonl"
    atomic_write_text(path, "old\n")
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"

    def full(fd):  # the data is written, the flush to the disk fails: a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "newer\n")
    assert path.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["manifest.jsonl"]
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_write_text(tmp_path, "x")


def test_a_failed_load_swapped_leaves_the_model_as_it_was(tmp_path):
    """Issue 39 item 13: a failed load_swapped left the caller's model holding freshly initialized
    adapters (and load_model had already copied the tensors that fit). All or nothing now."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)), nn.Linear(6, 2))
    swap_adapter(model, "1", "moe-4c2", backend="torch")
    save_swapped(model, tmp_path / "m.safetensors")
    for other in (
        nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)), nn.Linear(6, 3)),
        nn.Sequential(
            nn.Linear(4, 8),
            nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6)),
            nn.Linear(6, 2),
            nn.ReLU(),
            nn.Linear(2, 2),
        ),
    ):
        before = {k: v.clone() for k, v in other.state_dict().items()}
        projector = other[1]
        with pytest.raises(ValueError, match="does not fit Sequential"):
            load_swapped(other, tmp_path / "m.safetensors")
        assert other[1] is projector  # the original module back, not a fresh adapter
        after = other.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class _Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6))
        self.proj_alias = self.proj

    def forward(self, x):
        return self.proj(x) + self.proj_alias(x)


def test_an_aliased_projector_round_trips_under_both_names(tmp_path):
    torch.manual_seed(0)
    model = _Aliased()
    swap_adapter(model, "proj", "moe-4c2", backend="torch")
    x = torch.randn(3, 8)
    want = model(x)
    save_swapped(model, tmp_path / "m.safetensors")
    fresh = _Aliased()
    load_swapped(fresh, tmp_path / "m.safetensors")
    assert isinstance(fresh.proj, MoEAdapter) and fresh.proj_alias is fresh.proj
    assert torch.equal(fresh(x), want)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float8_e4m3fn, torch.complex64])
def test_load_adapter_refuses_files_of_non_float_tensors_by_name(tmp_path, dtype):
    """Issue 39 item 15: an adapter file of int, bool, float8 or complex tensors raised deep in torch."""
    a = build_adapter(preset("moe-4c2", 8, 6, backend="torch"))
    state = {k: v.detach().to(dtype).contiguous() for k, v in a.state_dict().items()}
    meta = {"format": "moe-adapter/1", "adapter": json.dumps({"kind": "moe", "config": a.config.__dict__})}
    path = tmp_path / "odd.safetensors"
    save_file(state, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"odd.safetensors: an adapter's tensors are float16, bfloat16, float32 or"):
        load_adapter(path)
