"""Save and load adapters, and models with adapters swapped in, as safetensors.

    save_adapter(adapter, "moe.safetensors");  adapter = load_adapter("moe.safetensors")
    save_swapped(model, "model.safetensors");  load_swapped(fresh_model, "model.safetensors")

Nothing is unpickled: weights are safetensors, and the adapter configs travel as JSON in the
file's metadata, validated by the config dataclasses on load. `load_swapped` takes a model built the
original way (e.g. `from_config` / `from_pretrained`), swaps adapters in at the saved paths with the
saved configs, then loads every tensor (strict by default: a missing or unexpected tensor raises).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from adapter.dense import DenseAdapter, DenseAdapterConfig
from adapter.moe import MoEAdapter, MoEAdapterConfig
from adapter.presets import build_adapter
from adapter.swap import module_placement, set_module

FORMAT = "moe-adapter/1"
_KINDS = {"dense": DenseAdapterConfig, "moe": MoEAdapterConfig}


def _describe(adapter: nn.Module) -> dict:
    if isinstance(adapter, MoEAdapter):
        kind = "moe"
    elif isinstance(adapter, DenseAdapter):
        kind = "dense"
    else:
        raise ValueError(f"expected a DenseAdapter or MoEAdapter, got {type(adapter).__name__}")
    return {"kind": kind, "config": dataclasses.asdict(adapter.config)}


def _config(record: dict, path) -> DenseAdapterConfig | MoEAdapterConfig:
    try:
        cls = _KINDS[record["kind"]]
        return cls(**record["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid adapter record {record!r}: {exc}") from exc


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} was not written by moe-adapter (metadata format {meta.get('format')!r})")
    return meta


def _atomic(path: Path, write) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    tmp.replace(path)


def save_adapter(adapter: nn.Module, path: str | Path) -> None:
    """One adapter's weights and config in one safetensors file (written atomically)."""
    meta = {"format": FORMAT, "adapter": json.dumps(_describe(adapter))}
    state = {k: v.detach().contiguous() for k, v in adapter.state_dict().items()}
    _atomic(Path(path), lambda p: save_file(state, p, metadata=meta))


def load_adapter(path: str | Path, device="cpu") -> nn.Module:
    """The adapter `save_adapter` wrote, with its dtype, on `device`."""
    meta = _metadata(path)
    adapter = build_adapter(_config(json.loads(meta["adapter"]), path))
    state = load_file(str(path), device=str(device))
    dtype = next(iter(state.values())).dtype
    adapter = adapter.to(device=device, dtype=dtype)
    adapter.load_state_dict(state, strict=True)
    return adapter


def swapped_adapters(model: nn.Module) -> dict[str, dict]:
    """{dotted path: {"kind", "config"}} of the outermost adapters in `model`."""
    found = {}
    for name, m in model.named_modules():
        if isinstance(m, DenseAdapter | MoEAdapter) and not any(name.startswith(p + ".") for p in found):
            found[name] = _describe(m)
    return found


def save_swapped(model: nn.Module, path: str | Path) -> None:
    """Every tensor of `model` (tied weights once) and where its adapters sit, with their configs."""
    meta = {"format": FORMAT, "swaps": json.dumps(swapped_adapters(model))}
    _atomic(Path(path), lambda p: save_model(model, p, metadata=meta))


def load_swapped(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Swap the saved adapters into `model` (built the original way) and load every saved tensor."""
    swaps = json.loads(_metadata(path)["swaps"])
    for name, record in swaps.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{path} holds an adapter at {name!r}, which {type(model).__name__} lacks") from exc
        dtype, device = module_placement(old)
        set_module(model, name, build_adapter(_config(record, path)).to(device=device, dtype=dtype))
    load_model(model, str(path), strict=strict)
    return model
