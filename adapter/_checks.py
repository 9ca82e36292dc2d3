"""Input checks shared by the adapters: clear ValueErrors that name the actual values."""

from __future__ import annotations

import dataclasses
import typing

import torch


def check_adapter_input(
    x: torch.Tensor, mask: torch.Tensor | None, in_dim: int, param: torch.Tensor, name: str
) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} expects a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != in_dim:
        raise ValueError(f"{name} expects input (..., {in_dim}), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} expects a floating-point input, got dtype {x.dtype}")
    if x.device != param.device:
        raise ValueError(f"{name}: input is on {x.device} but the adapter's parameters are on {param.device}")
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"{name}: input dtype {x.dtype} does not match the parameter dtype {param.dtype}; "
            "cast one of them (adapter.to(dtype)) or run under torch.autocast"
        )
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(f"{name}: mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"{name}: mask shape {tuple(mask.shape)} must equal the input's leading shape {tuple(x.shape[:-1])}"
            )
        if mask.device != x.device:
            raise ValueError(f"{name}: mask is on {mask.device}, input on {x.device}")


def check_positive(**dims: int) -> None:
    for name, value in dims.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_field_types(obj) -> None:
    """Refuse values of the wrong JSON type (a config file's "false" string is not False, 2.5 is no
    step count): bool fields take bools, int fields ints, float fields numbers, str fields strings."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp, value = hints[f.name], getattr(obj, f.name)
        ok = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, int | float) and not isinstance(value, bool),
            str: isinstance(value, str),
        }.get(tp, True)
        if not ok:
            raise ValueError(f"{f.name} must be of type {tp.__name__}, got {value!r} ({type(value).__name__})")
