"""swap_adapter: paths and predicates, inferred sizes / dtype / device, undo, upcycling closeness."""

import pytest
import torch
import torch.nn as nn

from adapter import DenseAdapter, DenseAdapterConfig, MoEAdapter, preset, swap_adapter
from adapter.swap import dense_structure, find_projector, infer_dims, upcycle_moe


class Toy(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.encoder = nn.Linear(5, 12, dtype=dtype)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(12, 20, dtype=dtype), nn.GELU(), nn.Linear(20, 8, dtype=dtype))]
        )
        self.head = nn.Linear(8, 3, dtype=dtype)

    def forward(self, x):
        return self.head(self.blocks[0](self.encoder(x)))


def test_swap_by_path_infers_sizes_dtype_and_undo_restores():
    model = Toy(torch.float64)
    original = model.blocks[0]
    handle = swap_adapter(model, "blocks.0", "moe-8c4", backend="torch")
    new = model.blocks[0]
    assert isinstance(new, MoEAdapter) and (new.config.in_dim, new.config.out_dim) == (12, 8)
    assert new.w1.dtype == torch.float64 and new.config.expert_dim == 6  # the preset's f = d/2
    assert [(s.path, s.original) for s in handle] == [("blocks.0", original)]
    y = model(torch.randn(4, 7, 5, dtype=torch.float64))
    assert y.shape == (4, 7, 3) and new.aux_loss is not None
    handle.undo()
    assert model.blocks[0] is original and len(handle) == 0


def test_swap_by_predicate_keeps_outermost_matches_and_takes_configs():
    model = Toy()
    handle = swap_adapter(model, lambda name, m: isinstance(m, nn.Linear) and m.in_features == 12, "dense")
    assert [s.path for s in handle] == ["blocks.0.0"]
    assert isinstance(model.blocks[0][0], DenseAdapter) and model.blocks[0][0].config.hidden_dim == 96
    handle.undo()
    cfg = DenseAdapterConfig(in_dim=12, out_dim=8, hidden_dim=4)
    swap_adapter(model, lambda n, m: n in ("blocks.0", "blocks.0.0"), cfg)
    assert isinstance(model.blocks[0], DenseAdapter)  # blocks.0.0 sat inside the replaced module
    swap_adapter(model, "head", lambda d, D: preset("moe-8c1", d, D, backend="torch"))
    assert model.head.config.top_k == 1 and (model.head.config.in_dim, model.head.config.out_dim) == (8, 3)


def test_swap_errors_name_what_is_wrong():
    model = Toy()
    with pytest.raises(ValueError, match="no submodule 'blocks.7'"):
        swap_adapter(model, "blocks.7")
    with pytest.raises(ValueError, match="matched no module"):
        swap_adapter(model, lambda n, m: False)
    with pytest.raises(ValueError, match=r"maps 4 -> 4 but the module replaced maps 8 -> 3"):
        swap_adapter(model, "head", DenseAdapterConfig(in_dim=4, out_dim=4, hidden_dim=2))
    with pytest.raises(ValueError, match="unknown preset"):
        swap_adapter(model, "head", "moe-3c9")
    with pytest.raises(ValueError, match="found 0 modules named"):
        find_projector(model)
    with pytest.raises(ValueError, match="holds no Linear"):
        infer_dims(nn.GELU())
    with pytest.raises(ValueError, match="cannot upcycle from LayerNorm"):
        swap_adapter(nn.Sequential(nn.LayerNorm(4)), "0", upcycle=True)
    with pytest.raises(ValueError, match="expert_dim >= 2\\*in_dim=16"):
        upcycle_moe(nn.Linear(8, 3), expert_dim=15)
    with pytest.raises(ValueError, match="upcycling builds an MoE adapter"):
        swap_adapter(model, "head", "dense", upcycle=True)


def test_structures_of_dense_projectors():
    s = dense_structure(nn.Sequential(nn.Linear(4, 9), nn.SiLU(), nn.Linear(9, 2)))
    assert (s.in_dim, s.hidden, s.out_dim, s.activation) == (4, 9, 2, "silu")
    assert dense_structure(nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 2))) is None  # unknown act
    assert dense_structure(nn.Linear(4, 2)).hidden == 0


# Measured on this 2-core CPU (float64 inputs of unit scale): a projector without norms comes back to
# 2e-16 .. 7e-16, the float32 HF projectors to 0.9e-7 .. 1.7e-7 (tests/adapter/test_hf_targets.py), a
# DenseAdapter source to 2e-6 (LayerNorm's eps in the second normalization). The bounds leave room
# for other BLAS builds.
@pytest.mark.parametrize(
    "source, tol",
    [
        (nn.Linear(12, 8, dtype=torch.float64), 1e-13),
        (nn.Sequential(nn.Linear(12, 30), nn.GELU(), nn.Linear(30, 8)).double(), 1e-13),
        (nn.Sequential(nn.Linear(12, 30, bias=False), nn.SiLU(), nn.Linear(30, 8, bias=False)).double(), 1e-13),
        (nn.Sequential(nn.Linear(12, 30), nn.GELU(approximate="tanh"), nn.Linear(30, 8)).double(), 1e-13),
    ],
)
@pytest.mark.parametrize("layout", ["serial", "parallel"])
def test_upcycled_adapter_computes_what_the_projector_did(source, tol, layout):
    torch.manual_seed(0)
    x = torch.randn(3, 11, 12, dtype=torch.float64)
    want = source(x)
    m = upcycle_moe(source, backend="torch", layout=layout)
    assert m.config.layer_norms is False and m.config.expert_dim == 24 and m.config.layout == layout
    assert m.w2.shape[2] == (8 if layout == "parallel" else 12)
    err = (m(x) - want).abs().max().item()
    assert err <= tol, err
    # whatever the router picks: a different random router gives the same output
    with torch.no_grad():
        m.router.weight.normal_(0, 3.0)
    assert (m(x) - want).abs().max().item() <= tol
    assert set(m.last_topk_idx.unique().tolist()) == set(range(8))  # and it does pick differently


def test_upcycling_a_dense_adapter_matches_up_to_layernorm_eps():
    torch.manual_seed(0)
    dense = DenseAdapter(DenseAdapterConfig(in_dim=12, out_dim=8, hidden_dim=40)).double()
    with torch.no_grad():
        for p in (dense.norm_in.weight, dense.norm_in.bias, dense.norm_out.weight, dense.norm_out.bias):
            p.add_(0.3 * torch.randn_like(p))
    model = nn.Sequential(dense)
    x = torch.randn(5, 12, dtype=torch.float64)
    want = model(x)
    handle = swap_adapter(model, "0", "moe-8c4", upcycle=True, backend="torch", expert_dim=30)
    m = model[0]
    assert m.config.layer_norms and m.config.aggregation_dim == 40 and m.config.expert_dim == 30
    err = (model(x) - want).abs().max().item()
    assert err < 1e-4, err
    m.train()
    model(x).square().sum().backward()
    assert m.w1.grad[:, :, 24:].abs().sum() == 0 and m.w2.grad[:, 24:, :].abs().sum() > 0  # spare units train
    handle.undo()
    assert model[0] is dense


def test_upcycled_adapter_trains_its_experts_apart():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 4))
    outer = nn.Sequential(model)
    swap_adapter(outer, "0", upcycle=True, backend="torch")
    m = outer[0]
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x, target = torch.randn(64, 6), torch.randn(64, 4)
    for _ in range(5):
        opt.zero_grad()
        loss = (m(x) - target).square().mean() + 0.01 * m.aux_loss
        loss.backward()
        opt.step()
    assert not torch.equal(m.w1[0], m.w1[1])  # routed differently, updated differently


def test_upcycling_honours_every_field_of_an_explicit_config_or_refuses():
    """Issue 20 item 5: an explicit MoEAdapterConfig is taken whole (expert count, width, balance
    mode, backend, shared experts, weights) and still computes the projector; a field that
    contradicts the projector (its sizes, biases, activation) is refused by name."""
    from adapter import MoEAdapterConfig

    torch.manual_seed(0)
    model = Toy(torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    want = model(x)
    cfg = MoEAdapterConfig(
        in_dim=12,
        out_dim=8,
        expert_dim=30,
        num_experts=3,
        top_k=2,
        aggregation_dim=20,
        layer_norms=False,
        bias=True,
        activation="gelu",
        balance_p="softmax",
        backend="torch",
        num_shared_experts=2,
        shared_expert_dim=5,
        aux_loss_weight=0.5,
    )
    handle = swap_adapter(model, "blocks.0", cfg, upcycle=True)
    m = model.blocks[0]
    assert m.config == cfg  # every field honoured
    assert (model(x) - want).abs().max() < 1e-12  # shared experts start silent: still the projector
    handle.undo()
    for field, value, need in (("in_dim", 100, 12), ("bias", False, True), ("activation", "silu", "gelu")):
        bad = MoEAdapterConfig(**{**cfg.__dict__, field: value, **({"out_dim": 3} if field == "in_dim" else {})})
        with pytest.raises(ValueError, match=rf"{field}={value!r} \(the projector needs {need!r}\)"):
            swap_adapter(model, "blocks.0", bad, upcycle=True)
        assert isinstance(model.blocks[0], nn.Sequential)  # nothing swapped


def test_a_failing_target_swaps_nothing():
    """Issue 20 item 10: every replacement is built before the first swap, so an error on the
    second target leaves the first in place (and no handle is needed to undo anything)."""
    model = Toy()
    model.blocks.append(nn.Sequential(nn.ReLU()))  # matched by the predicate, but holds no Linear
    with pytest.raises(ValueError, match="cannot infer the sizes of Sequential"):
        swap_adapter(model, lambda name, m: name.startswith("blocks.") and name.count(".") == 1, "dense")
    assert isinstance(model.blocks[0], nn.Sequential) and isinstance(model.blocks[0][0], nn.Linear)


def test_upcycling_a_parallel_preset_keeps_the_projector_and_its_layout():
    torch.manual_seed(0)
    model = Toy(torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    want = model(x)
    swap_adapter(model, "blocks.0", "moe-8c4-parallel", upcycle=True, backend="torch")
    m = model.blocks[0]
    # The preset's width, f = d/2 (issue 39 item 6: it was 2d whatever the preset said).
    assert m.config.layout == "parallel" and m.w2.shape == (8, 6, 8) and bool((m.w2 == 0).all())
    assert (model(x) - want).abs().max() < 1e-12


class Aliased(nn.Module):
    """One projector reached by two attribute paths (as tied or aliased submodules are), and a
    wrapper reaching it a third way through an aliased parent."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(5, 12)
        self.projector = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 8))
        self.mm_projector = self.projector  # the alias: a second name of the same module
        self.wrap = nn.ModuleDict({"inner": self.projector})
        self.wrap_alias = self.wrap  # the same registration (wrap.inner) by another path

    def forward(self, x):
        h = self.encoder(x)
        return self.projector(h) + self.mm_projector(h) + self.wrap["inner"](h)


@pytest.mark.parametrize("target", ["mm_projector", "projector", lambda n, m: n.endswith("projector")])
def test_an_aliased_projector_is_swapped_and_restored_under_every_name(target):
    """Issue 39 item 2: one name was replaced, the other path kept running the original projector,
    and the handle listed one swap."""
    torch.manual_seed(0)
    model = Aliased()
    original = model.projector
    handle = swap_adapter(model, target, "moe-8c4", backend="torch")
    new = model.projector
    assert isinstance(new, MoEAdapter) and model.mm_projector is new and model.wrap["inner"] is new
    assert model.wrap_alias["inner"] is new
    assert sorted(s.path for s in handle) == ["mm_projector", "projector", "wrap.inner"]
    assert all(s.adapter is new and s.original is original for s in handle)
    assert not any(m is original for m in model.modules())  # nothing runs the original any more
    assert model(torch.randn(2, 3, 5)).shape == (2, 3, 8)
    handle.undo()
    assert model.projector is original and model.mm_projector is original and model.wrap["inner"] is original
    assert not any(isinstance(m, MoEAdapter) for m in model.modules())


@pytest.mark.parametrize(
    "name,f", [("moe-8c4-half-f-parallel", 3), ("moe-8c4-double-f-parallel", 12), ("moe-8c4-matched-parallel", None)]
)
def test_upcycling_a_parallel_preset_takes_its_expert_width(name, f):
    """Issue 39 item 6: every preset built f = 2d when upcycled. The parallel layout starts its
    experts silent, so it takes any width: the preset's, at the projector's sizes."""
    torch.manual_seed(0)
    model = Toy(torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    want = model(x)
    swap_adapter(model, "blocks.0", name, upcycle=True, backend="torch")
    m = model.blocks[0]
    assert m.config.expert_dim == (f or preset(name, 12, 8).expert_dim)
    assert (model(x) - want).abs().max() < 1e-12  # still the projector's function


@pytest.mark.parametrize("name", ["moe-8c4-half-f", "moe-8c4-double-f", "moe-8c4-matched"])
def test_upcycling_a_serial_preset_of_another_width_is_refused_by_name(name):
    model = Toy(torch.float64)
    with pytest.raises(ValueError, match=rf"upcycling '{name}': the serial layout .* f = 2\*in_dim = 24.*-parallel"):
        swap_adapter(model, "blocks.0", name, upcycle=True, backend="torch")
    assert isinstance(model.blocks[0], nn.Sequential)  # nothing swapped
    swap_adapter(model, "blocks.0", "moe-8c4", upcycle=True, backend="torch")  # the standard width: f = 2d
    assert model.blocks[0].config.expert_dim == 24
