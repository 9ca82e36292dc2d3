"""Drop-in adapters (dense baseline, MoE) that replace the projector of an existing model."""

from adapter.dense import DenseAdapter, DenseAdapterConfig
from adapter.moe import MoEAdapter, MoEAdapterConfig
from adapter.presets import PRESETS, build_adapter, preset
from adapter.stats import ParamCounts, expert_loads, moe_adapters, total_aux_loss

__all__ = [
    "PRESETS",
    "DenseAdapter",
    "DenseAdapterConfig",
    "MoEAdapter",
    "MoEAdapterConfig",
    "ParamCounts",
    "build_adapter",
    "expert_loads",
    "moe_adapters",
    "preset",
    "total_aux_loss",
]
