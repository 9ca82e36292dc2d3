"""Presets: parameter counts equal the formulas from Table 4's dims."""

import dataclasses

import pytest
import torch

from adapter import PRESETS, MoEAdapterConfig, build_adapter, preset

d, D = 2560, 2048  # Table 4
LN = lambda n: 2 * n  # noqa: E731  (LayerNorm weight + bias)


def table4_moe(E, k, f, A=10240, n=d):
    """Serial reading: experts d -> f -> d (n = d); parallel: d -> f -> D (n = D). The always-on
    part is the same: input LN, router, aggregation block (LN, d -> A -> D), output LN."""
    experts = E * (d * f + f * n)
    always = LN(d) + d * E + LN(d) + d * A + A * D + LN(D)
    return always + experts, always + k * (d * f + f * n)


EXPECTED = {
    "dense": (LN(d) + d * 20480 + 20480 * D + LN(D),) * 2,
    "moe-8c4": table4_moe(8, 4, 1280),
    "moe-16c4": table4_moe(16, 4, 1280),
    "moe-8c1": table4_moe(8, 1, 1280),
    "moe-4c2": table4_moe(4, 2, 1280),
    "moe-8c4-half-f": table4_moe(8, 4, 640),
    "moe-8c4-double-f": table4_moe(8, 4, 2560),
    "moe-8c4-no-ebl": table4_moe(8, 4, 1280),
}
EXPECTED.update({f"{k}-parallel": table4_moe(*_args, n=D) for k, _args in {
    "moe-8c4": (8, 4, 1280), "moe-16c4": (16, 4, 1280), "moe-8c1": (8, 1, 1280), "moe-4c2": (4, 2, 1280),
    "moe-8c4-half-f": (8, 4, 640), "moe-8c4-double-f": (8, 4, 2560), "moe-8c4-no-ebl": (8, 4, 1280),
}.items()})  # fmt: skip
EXPECTED["moe-8c4-matched"] = table4_moe(8, 4, 1151)  # the width that equals dense's 94.38M
EXPECTED["moe-8c4-matched-parallel"] = table4_moe(8, 4, 1279, n=D)
EXPECTED["dense-active"] = (LN(d) + d * 15366 + 15366 * D + LN(D),) * 2  # moe-8c4-parallel's 70.81M active


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_counts_match_table4_formulas(name):
    cfg = preset(name)
    with torch.device("meta"):  # ~100M parameters: count them without allocating
        module = build_adapter(cfg)
    total, active = EXPECTED[name]
    assert (cfg.param_counts().total, cfg.param_counts().active) == (total, active)
    assert (module.param_counts().total, module.param_counts().active) == (total, active)


def test_paper_numbers_and_the_documented_mismatch():
    dense, moe = preset("dense").param_counts(), preset("moe-8c4").param_counts()
    assert round(dense.total / 1e6, 1) == 94.4  # the paper's dense figure
    assert round(moe.total / 1e6, 2) == 99.65 and round(moe.active / 1e6, 2) == 73.44  # not 94.4 / 70.8


def test_ablation_knobs():
    assert preset("moe-8c4-no-ebl").aux_loss_weight == 0.0
    assert (preset("moe-4c2").num_experts, preset("moe-4c2").top_k) == (4, 2)
    small = preset("moe-8c4", in_dim=64, out_dim=48, backend="torch")
    assert isinstance(small, MoEAdapterConfig)
    assert (small.expert_dim, small.aggregation_dim, small.backend) == (32, 256, "torch")
    with pytest.raises(ValueError, match="unknown preset 'moe-9c9'"):
        preset("moe-9c9")


@pytest.mark.parametrize("layout", ["serial", "parallel"])
@pytest.mark.parametrize("dims", [(64, 128), (2560, 2048), (96, 40), (7, 13)])
def test_matched_preset_has_the_dense_total_nearest_any_width(dims, layout):
    """moe-8c4-matched picks the expert width whose total is nearest dense's: one step of width
    either way (8 experts x (d + n) parameters) is no nearer."""
    name = "moe-8c4-matched" + ("-parallel" if layout == "parallel" else "")
    cfg, dense = preset(name, *dims), preset("dense", *dims).param_counts().total
    assert cfg.layout == layout
    gap = abs(cfg.param_counts().total - dense)
    step = cfg.num_experts * (cfg.in_dim + cfg.expert_out_dim)
    assert gap <= step / 2
    for f in (cfg.expert_dim - 1, cfg.expert_dim + 1):
        if f >= 1:
            assert abs(dataclasses.replace(cfg, expert_dim=f).param_counts().total - dense) >= gap
    assert preset("moe-8c4-matched", 64, 128).expert_dim == 47  # the demo's dims: wider than f = 32


@pytest.mark.parametrize("scale", [0.125, 0.5, 3.0])
def test_width_scale_scales_hidden_widths_and_keeps_matched_presets_at_dense_size(scale):
    """A capacity sweep scales every preset alike; a -matched MoE preset stays at the total of the
    dense adapter scaled the same way (within half a step of expert width), whatever E is."""
    d, D = 256, 128
    dense = preset("dense", d, D, width_scale=scale)
    assert dense.hidden_dim == round(8 * d * scale)
    moe = preset("moe-8c4-parallel", d, D, width_scale=scale)
    assert (moe.expert_dim, moe.aggregation_dim) == (round(d / 2 * scale), round(4 * d * scale))
    for experts in (8, 12):
        cfg = preset("moe-8c4-matched-parallel", d, D, width_scale=scale, num_experts=experts)
        assert cfg.num_experts == experts and cfg.aggregation_dim == round(4 * d * scale)
        step = cfg.num_experts * (cfg.in_dim + cfg.expert_out_dim)
        assert abs(cfg.param_counts().total - dense.param_counts().total) <= step / 2
    assert preset("moe-8c4", d, D, width_scale=1.0) == preset("moe-8c4", d, D)
    with pytest.raises(ValueError, match="width scale must be > 0, got 0"):
        preset("dense", d, D, width_scale=0)


def test_an_option_a_preset_does_not_take_is_refused_by_name():
    """Found by tests/test_properties.py: swap_adapter(model, path, "dense", backend="torch") raised a
    TypeError from inside the preset's factory."""
    with pytest.raises(ValueError, match=r"preset 'dense' \(DenseAdapterConfig\) has no option \['backend'\]"):
        preset("dense", 8, 6, backend="torch")
    with pytest.raises(ValueError, match=r"preset 'moe-8c4' \(MoEAdapterConfig\) has no option \['experts'\]"):
        preset("moe-8c4", 8, 6, experts=4)


def test_dense_active_has_the_moe_presets_active_count_at_any_size():
    """Issue 40: the control with the MoE preset's compute per token and no routing."""
    from adapter import DenseAdapterConfig

    for d, D, scale in ((64, 128, 1.0), (2560, 2048, 1.0), (256, 128, 0.5), (7, 3, 1.0)):
        dense = preset("dense-active", d, D, width_scale=scale)
        active = preset("moe-8c4-parallel", d, D, width_scale=scale).param_counts().active
        per_unit = d + D  # one more hidden unit: a row of W1 and a column of W2
        assert isinstance(dense, DenseAdapterConfig)
        assert abs(dense.param_counts().total - active) <= per_unit / 2 + 1, (d, D, scale)
    assert preset("dense-active", 64, 128).param_counts().total == 74_688  # against 74,752 active
