"""The paper's adapters (Table 4) and every ablation of Tables 2 and 3, as configs.

Widths are tied to the audio hidden size d exactly as Table 4 ties them at d = 2560: dense hidden
8d (20480), expert width f = d/2 (1280), aggregation width A = 4d (10240). At the paper's
d = 2560, D = 2048 the presets are the paper's sizes; at a small d they keep the same shape.

Table 2's "Dim" column marks the default row "D" and the variants "D/2" and "2D". The default
expert width is f = 1280 (Table 4), not the LLM's D = 2048, so the variants are read as half and
double the default expert width: f = d/4 (640) and f = d (2560).

Parameter counts (what `param_counts()` reports, counted from these dims, LayerNorms included):
  dense:   94.38M total and active; the paper quotes 94.4M: agrees.
  moe-8c4: 99.65M total, 73.44M active in the serial reading of Table 4 (its text: experts
           d -> f -> d, then the aggregation block); the paper quotes 94.4M / 70.8M.
  moe-8c4-parallel: 94.41M total, 70.81M active: the parallel reading (experts d -> f -> D beside
           an always-on aggregation MLP from the same normalized input) reproduces the paper's
           figures and equals the dense adapter's size. Both are kept; results name which ran.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import replace

import torch.nn as nn

from adapter.dense import DenseAdapter, DenseAdapterConfig
from adapter.moe import MoEAdapter, MoEAdapterConfig

PAPER_IN_DIM = 2560  # d: audio hidden size after feature fusion (Table 4)
PAPER_OUT_DIM = 2048  # D: Qwen3-1.7B hidden size

AdapterConfig = DenseAdapterConfig | MoEAdapterConfig


def dense_baseline(in_dim: int = PAPER_IN_DIM, out_dim: int = PAPER_OUT_DIM) -> DenseAdapterConfig:
    """Table 4 II: LN -> MLP d -> 8d -> D -> LN."""
    return DenseAdapterConfig(in_dim=in_dim, out_dim=out_dim, hidden_dim=8 * in_dim)


def moe_adapter(
    in_dim: int = PAPER_IN_DIM,
    out_dim: int = PAPER_OUT_DIM,
    *,
    num_experts: int = 8,
    top_k: int = 4,
    expert_dim_ratio: float = 0.5,
    aux_loss_weight: float = 1.0,
    **overrides,
) -> MoEAdapterConfig:
    """Table 4 III: 8 experts, top-4, f = d/2, aggregation block of width 4d."""
    return MoEAdapterConfig(
        in_dim=in_dim,
        out_dim=out_dim,
        num_experts=num_experts,
        top_k=top_k,
        expert_dim=max(1, round(expert_dim_ratio * in_dim)),
        aggregation_dim=4 * in_dim,
        aux_loss_weight=aux_loss_weight,
        **overrides,
    )


def scale_widths(config: AdapterConfig, scale: float) -> AdapterConfig:
    """`config` with every hidden width times `scale` (rounded, at least 1): the dense MLP's hidden
    width; the MoE experts' f, the aggregation width A and the shared experts' width. In and out
    widths (d, D), expert count and top-k stay. A capacity sweep scales every preset alike."""
    if not scale > 0:
        raise ValueError(f"width scale must be > 0, got {scale}")
    w = lambda n: max(1, round(n * scale))  # noqa: E731
    if isinstance(config, DenseAdapterConfig):
        return replace(config, hidden_dim=w(config.hidden_dim))
    return replace(
        config,
        expert_dim=w(config.expert_dim),
        aggregation_dim=w(config.aggregation_dim) if config.aggregation_dim else 0,
        shared_expert_dim=w(config.shared_expert_dim),
    )


def matched_to_dense(config: MoEAdapterConfig, width_scale: float = 1.0) -> MoEAdapterConfig:
    """`config` with the expert width f that brings its total parameters nearest the dense
    adapter's at the same dims (total = a + b*f is linear in f): MoE and dense compared at equal
    size whatever d and D are (at d = 64, D = 128 the serial moe-8c4 has 84% of dense's size).
    `width_scale`: the dense adapter it is matched to has its hidden width scaled so."""
    dense_total = scale_widths(dense_baseline(config.in_dim, config.out_dim), width_scale).param_counts().total
    a = replace(config, expert_dim=1).param_counts().total
    b = replace(config, expert_dim=2).param_counts().total - a
    return replace(config, expert_dim=max(1, round(1 + (dense_total - a) / b)))


PRESETS: dict[str, Callable[..., AdapterConfig]] = {
    "dense": dense_baseline,
    "moe-8c4": moe_adapter,
    "moe-16c4": lambda in_dim=PAPER_IN_DIM, out_dim=PAPER_OUT_DIM, **kw: moe_adapter(
        in_dim, out_dim, num_experts=16, top_k=4, **kw
    ),
    "moe-8c1": lambda in_dim=PAPER_IN_DIM, out_dim=PAPER_OUT_DIM, **kw: moe_adapter(
        in_dim, out_dim, num_experts=8, top_k=1, **kw
    ),
    "moe-4c2": lambda in_dim=PAPER_IN_DIM, out_dim=PAPER_OUT_DIM, **kw: moe_adapter(
        in_dim, out_dim, num_experts=4, top_k=2, **kw
    ),
    "moe-8c4-half-f": lambda in_dim=PAPER_IN_DIM, out_dim=PAPER_OUT_DIM, **kw: moe_adapter(
        in_dim, out_dim, expert_dim_ratio=0.25, **kw
    ),
    "moe-8c4-double-f": lambda in_dim=PAPER_IN_DIM, out_dim=PAPER_OUT_DIM, **kw: moe_adapter(
        in_dim, out_dim, expert_dim_ratio=1.0, **kw
    ),
    "moe-8c4-no-ebl": lambda in_dim=PAPER_IN_DIM, out_dim=PAPER_OUT_DIM, **kw: moe_adapter(
        in_dim, out_dim, aux_loss_weight=0.0, **kw
    ),
    "moe-8c4-matched": lambda in_dim=PAPER_IN_DIM, out_dim=PAPER_OUT_DIM, **kw: matched_to_dense(
        moe_adapter(in_dim, out_dim, **kw)
    ),
}
"""Name -> config factory. Table 1: dense, moe-8c4. Table 2: moe-16c4, moe-8c1, moe-4c2,
moe-8c4-half-f, moe-8c4-double-f. Table 3: moe-8c4-no-ebl. Not in the paper: moe-8c4-matched,
whose expert width makes its total the nearest to the dense adapter's at the same dims
(equal-size comparisons): f = 47 at d = 64, D = 128 (98,304 against 98,688 parameters); f = 1151
at the paper's dims (94.37M against 94.38M). Each MoE preset also in the parallel reading of
Table 4, as `<name>-parallel` (experts d -> f -> D beside the always-on aggregation MLP: 94.41M
total / 70.81M active for moe-8c4-parallel at the paper's dims, the paper's own figures)."""


def _parallel(factory: Callable[..., MoEAdapterConfig]) -> Callable[..., MoEAdapterConfig]:
    return lambda in_dim=PAPER_IN_DIM, out_dim=PAPER_OUT_DIM, **kw: factory(
        in_dim, out_dim, **{"layout": "parallel", **kw}
    )


PRESETS.update({f"{name}-parallel": _parallel(f) for name, f in list(PRESETS.items()) if name != "dense"})


def dense_matched_to_active(
    in_dim: int = PAPER_IN_DIM, out_dim: int = PAPER_OUT_DIM, moe: str = "moe-8c4-parallel", width_scale: float = 1.0
) -> DenseAdapterConfig:
    """The dense adapter whose hidden width makes its total the nearest to the active parameters of
    `moe` at the same dims (and width scale): the compute per token of the MoE preset, no routing
    (total = a + b*h is linear in the hidden width h). 74,688 against 74,752 at d = 64, D = 128."""
    active = preset(moe, in_dim, out_dim, width_scale=width_scale).param_counts().active
    a = DenseAdapterConfig(in_dim=in_dim, out_dim=out_dim, hidden_dim=1).param_counts().total
    b = DenseAdapterConfig(in_dim=in_dim, out_dim=out_dim, hidden_dim=2).param_counts().total - a
    return DenseAdapterConfig(in_dim=in_dim, out_dim=out_dim, hidden_dim=max(1, round(1 + (active - a) / b)))


PRESETS["dense-active"] = dense_matched_to_active
DENSE_PRESETS = frozenset({"dense", "dense-active"})
"""The presets that build a DenseAdapter (no router, no experts)."""


def is_dense(name: str) -> bool:
    return name in DENSE_PRESETS


def preset(
    name: str, in_dim: int = PAPER_IN_DIM, out_dim: int = PAPER_OUT_DIM, width_scale: float = 1.0, **overrides
) -> AdapterConfig:
    """The config of a named preset; `overrides` go to MoEAdapterConfig (e.g. backend="torch",
    num_experts=12). `width_scale` multiplies its hidden widths (scale_widths); a `-matched` preset
    then takes the expert width that matches the dense adapter scaled alike."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    kind = DenseAdapterConfig if is_dense(name) else MoEAdapterConfig
    fields = {f.name for f in dataclasses.fields(kind)} - {"in_dim", "out_dim"}
    if unknown := sorted(set(overrides) - fields):  # not a TypeError from inside the preset's factory
        raise ValueError(f"preset {name!r} ({kind.__name__}) has no option {unknown}; its options: {sorted(fields)}")
    if name == "dense-active":  # matched at the scaled size (its width follows the MoE preset's)
        return dense_matched_to_active(in_dim, out_dim, width_scale=width_scale, **overrides)
    config = PRESETS[name](in_dim, out_dim, **overrides)
    if width_scale != 1.0:
        config = scale_widths(config, width_scale)
        if "-matched" in name:  # re-match at the scaled size (matching sets f from the other widths)
            config = matched_to_dense(config, width_scale)
    return config


def build_adapter(config: AdapterConfig) -> nn.Module:
    """DenseAdapter or MoEAdapter for a config."""
    if isinstance(config, DenseAdapterConfig):
        return DenseAdapter(config)
    if isinstance(config, MoEAdapterConfig):
        return MoEAdapter(config)
    raise ValueError(f"expected DenseAdapterConfig or MoEAdapterConfig, got {type(config).__name__}")


RECOMMENDED_MOE = "moe-8c4-parallel"
"""The MoE preset to put in place of a dense projector: the parallel layout keeps the dense
adapter's depth and size. Measured in the demo setting on the pretrained tiny.en encoder over
seeds (README, "Presets"); the serial moe-8c4 lost to dense there."""
