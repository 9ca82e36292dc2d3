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

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from adapter.dense import DenseAdapter, DenseAdapterConfig
from adapter.files import atomic_write
from adapter.moe import MoEAdapter, MoEAdapterConfig
from adapter.presets import build_adapter
from adapter.swap import ForwardScope, module_placement, registrations, set_module

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
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise TypeError("expected {'kind': ..., 'config': {...}}")
        cls = _KINDS[record["kind"]]
        return cls(**record["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid adapter record {record!r}: {exc}") from exc


def _open_header(path) -> tuple[dict, dict[str, tuple[tuple[int, ...], str]]]:
    """(metadata, {tensor name: (shape, dtype)}) of a safetensors file, read from its header only;
    a missing path, a directory or a file that is not safetensors raises naming the path."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; expected a .safetensors file written by moe-adapter")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            names = fh.keys()  # the safe_open handle is not itself iterable
            tensors = {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in names}
    except Exception as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} was not written by moe-adapter (metadata format {meta.get('format')!r})")
    return meta, tensors


def _json_field(meta: dict, key: str, path, other: str) -> object:
    """The JSON value of metadata `key`; a file of the other kind (an adapter vs a swapped model)
    or undecodable metadata raises naming the file and what it is."""
    if key not in meta:
        kinds = {
            "adapter": "a single adapter (load it with load_adapter)",
            "swaps": "a swapped model (load it with load_swapped)",
        }
        found = kinds.get(other) if other in meta else "neither an adapter nor a swapped model"
        raise ValueError(f"{path} holds {found}, not what was asked for (its metadata lacks {key!r})")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON: {exc}") from exc


def save_adapter(adapter: nn.Module, path: str | Path) -> None:
    """One adapter's weights and config in one safetensors file (written atomically)."""
    meta = {"format": FORMAT, "adapter": json.dumps(_describe(adapter))}
    state = {k: v.detach().contiguous() for k, v in adapter.state_dict().items()}
    atomic_write(Path(path), lambda p: save_file(state, p, metadata=meta))


def _check_tensors(path, header: dict, adapter_on_meta: nn.Module) -> None:
    """The file's tensors are exactly the adapter's, of its shapes, in one dtype."""
    want = {k: tuple(v.shape) for k, v in adapter_on_meta.state_dict().items()}
    missing, unexpected = sorted(set(want) - set(header)), sorted(set(header) - set(want))
    if missing or unexpected:
        raise ValueError(f"{path}: tensors do not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [f"{k}: {header[k][0]} in the file, {want[k]} by the config" for k in want if header[k][0] != want[k]]
    if wrong:
        raise ValueError(f"{path}: tensor shapes do not match its config: {wrong[:5]}")
    dtypes = sorted({dt for _, dt in header.values()})
    if odd := [dt for dt in dtypes if dt not in ("F16", "BF16", "F32", "F64")]:  # int, bool, float8, complex
        raise ValueError(
            f"{path}: an adapter's tensors are float16, bfloat16, float32 or float64; the file holds {odd}"
        )
    if len(dtypes) > 1:
        by_dtype = {dt: sorted(k for k, (_, d) in header.items() if d == dt)[:3] for dt in dtypes}
        raise ValueError(f"{path}: an adapter's tensors must share one dtype, found {by_dtype}")


def load_adapter(path: str | Path, device="cpu") -> nn.Module:
    """The adapter `save_adapter` wrote, with its dtype, on `device`. The config and the tensor
    shapes and dtypes are checked from the file's header before anything is allocated."""
    meta, header = _open_header(path)
    config = _config(_json_field(meta, "adapter", path, other="swaps"), path)
    with torch.device("meta"):
        _check_tensors(path, header, build_adapter(config))
    adapter = build_adapter(config)
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
    atomic_write(Path(path), lambda p: save_model(model, p, metadata=meta))


def load_swapped(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Swap the saved adapters into `model` (built the original way; a module registered under
    several names is replaced under each) and load every saved tensor. All or nothing: the file is
    checked against the swapped model (names, shapes) before a tensor is copied, and on any
    failure `model` keeps its original modules and weights."""
    meta, tensors = _open_header(path)
    swaps = _json_field(meta, "swaps", path, other="adapter")
    if not isinstance(swaps, dict):
        raise ValueError(f"{path}: metadata 'swaps' must be a JSON object, got {type(swaps).__name__}")
    placed = []  # (path, original, adapter), built before any is placed
    for name, record in swaps.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"{path} holds an adapter at {name!r}, which {type(model).__name__} lacks") from exc
        dtype, device = module_placement(old)
        new = build_adapter(_config(record, path)).to(device=device, dtype=dtype)
        placed += [(alias, old, new) for alias in registrations(model, old)]
    for alias, _, new in placed:
        set_module(model, alias, new)
    try:
        _check_against(model, tensors, path, strict)
        load_model(model, str(path), strict=strict)
    except BaseException:
        for alias, old, _ in reversed(placed):
            set_module(model, alias, old)
        raise
    moe = list({id(new): new for _, _, new in placed if isinstance(new, MoEAdapter)}.values())
    if moe:  # each forward one balance-loss scope, as after swap_adapter
        ForwardScope(model, moe)
    return model


def _check_against(model: nn.Module, tensors: dict, path, strict: bool) -> None:
    """Refuse, before anything is copied, a file whose tensors do not fit `model`: missing (unless a
    tied alias of the name is there: the file holds shared tensors once) or unexpected names with
    `strict`, and any shape that differs."""
    state = model.state_dict()
    groups: dict[tuple, set[str]] = {}  # names that share storage (tied weights)
    for name, t in state.items():
        groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), set()).add(name)
    missing = sorted(n for g in groups.values() if not g & tensors.keys() for n in g)
    unexpected = sorted(tensors.keys() - state.keys())
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path} does not fit {type(model).__name__} with its adapters swapped in: missing {len(missing)} "
            f"tensor(s) {missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]} (built from another config?)"
        )
    wrong = [
        f"{n}: file {shape}, model {tuple(state[n].shape)}"
        for n, (shape, _) in tensors.items()
        if n in state and tuple(state[n].shape) != shape
    ]
    if wrong:  # (dtypes may differ: load_state_dict casts, e.g. fp32 weights into a bf16 model)
        raise ValueError(f"{path} does not fit {type(model).__name__}: {wrong[:5]}")
