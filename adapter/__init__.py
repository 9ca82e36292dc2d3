"""Drop-in adapters (dense baseline, MoE) that replace the projector of an existing model."""

from adapter.counts import ParamCounts
from adapter.dense import DenseAdapter, DenseAdapterConfig
from adapter.moe import MoEAdapter, MoEAdapterConfig
from adapter.presets import PRESETS, build_adapter, preset
from adapter.stats import expert_loads, moe_adapters, total_aux_loss, with_aux_loss
from adapter.swap import SwapHandle, swap_adapter, upcycle_moe

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
    "SwapHandle",
    "swap_adapter",
    "total_aux_loss",
    "upcycle_moe",
    "with_aux_loss",
]
