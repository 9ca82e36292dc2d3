"""The public API's promise under generated inputs (issue 39): a correct result or a clear error that
names the value. Hypothesis draws configs, tensors (shapes, dtypes, masks, NaN), models to swap
into, and manifest lines; each outcome is either checked against an independent float64
computation (tests/utils.py) or must be a ValueError (TypeError for a wrong kind of argument)
whose message names what was wrong. Shapes are small: the torch backend runs on CPU in
milliseconds. Example counts are fixed (no deadline: the 2-core CI machine is slow and shared)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapter import DenseAdapter, MoEAdapter, MoEAdapterConfig, preset, swap_adapter
from moe_kernels import moe_ffn
from moe_kernels.reference import reference_moe_ffn
from tests.utils import naive_moe_adapter

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SMALL = st.integers(min_value=-2, max_value=9)  # sizes, invalid ones (<= 0) included


def _names(exc: BaseException, *words: str) -> bool:
    return any(w in str(exc) for w in words)


# ------------------------------------------------------------------ configs and modules


@SETTINGS
@given(
    in_dim=SMALL,
    out_dim=SMALL,
    num_experts=SMALL,
    top_k=SMALL,
    expert_dim=SMALL,
    layout=st.sampled_from(["serial", "parallel", "sideways"]),
    norm_eps=st.sampled_from([1e-5, 0.0, -1.0, math.inf, math.nan]),
)
def test_moe_config_is_valid_or_names_the_field(in_dim, out_dim, num_experts, top_k, expert_dim, layout, norm_eps):
    kw = dict(in_dim=in_dim, out_dim=out_dim, num_experts=num_experts, top_k=top_k, expert_dim=expert_dim)
    try:
        cfg = MoEAdapterConfig(**kw, layout=layout, norm_eps=norm_eps)
    except ValueError as exc:
        bad = [k for k, v in kw.items() if v <= 0] + (["top_k"] if 0 < num_experts < top_k else [])
        bad += ["layout"] if layout == "sideways" else []
        bad += ["norm_eps"] if not (math.isfinite(norm_eps) and norm_eps > 0) else []
        assert bad, f"refused a valid config: {exc}"
        assert _names(exc, *bad), f"{exc!r} names none of {bad}"
        return
    assert min(kw.values()) > 0 and top_k <= num_experts and layout != "sideways"
    assert cfg.param_counts() == MoEAdapter(cfg).param_counts()


@SETTINGS
@given(
    lead=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    width=st.integers(1, 7),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.int64, torch.bool, torch.complex64]),
    mask_kind=st.sampled_from(["none", "right", "wrong-shape", "float"]),
    nan=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_moe_adapter_forward_is_correct_or_refused_by_name(lead, width, dtype, mask_kind, nan, seed):
    torch.manual_seed(seed)
    adapter = MoEAdapter(preset("moe-4c2-parallel", 6, 5, backend="torch")).double()
    x = (torch.randn(*lead, width, dtype=torch.float64) * 3).to(dtype)
    mask = {
        "none": None,
        "right": torch.rand(*lead) > 0.3,
        "wrong-shape": torch.ones(*lead, 2, dtype=torch.bool),
        "float": torch.ones(*lead),
    }[mask_kind]
    if nan and x.is_floating_point() and x.numel():
        x.view(-1)[0] = math.nan
    try:
        y = adapter(x, mask)
    except ValueError as exc:
        assert width != 6 or dtype != torch.float64 or mask_kind in ("wrong-shape", "float")  # the adapter is float64
        assert _names(exc, "in_dim", "last dim", "dtype", "mask", str(width)), exc
        return
    assert width == 6 and dtype == torch.float64 and mask_kind in ("none", "right")
    assert y.shape == (*lead, 5) and y.dtype == x.dtype
    x_TD = x.reshape(-1, 6)
    mask_T = mask.reshape(-1) if mask is not None else None
    want, _, _ = naive_moe_adapter(adapter, torch.where(mask_T[:, None], x_TD, 0) if mask is not None else x_TD, mask_T)
    got = y.reshape(-1, 5)
    finite = torch.isfinite(x_TD).all(1)  # a NaN token's row is NaN; every other row is correct
    if mask_T is not None:
        finite |= ~mask_T
    assert torch.isfinite(got[finite]).all()
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-9, atol=1e-10)
    if mask_T is not None:
        assert (got[~mask_T] == 0).all()


# ------------------------------------------------------------------ moe_ffn


@SETTINGS
@given(
    T=st.integers(0, 12),
    D=st.integers(1, 6),
    F=st.integers(1, 6),
    E=st.integers(1, 6),
    K=st.integers(-1, 7),
    wrong=st.sampled_from([None, "w1", "w2", "router", "dtype", "mask", "balance"]),
    seed=st.integers(0, 2**16),
)
def test_moe_ffn_equals_the_reference_or_names_the_argument(T, D, F, E, K, wrong, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, D, generator=g, dtype=torch.float64)
    router = torch.randn(E, D, generator=g, dtype=torch.float64)
    w1 = torch.randn(E, D, F, generator=g, dtype=torch.float64)
    w2 = torch.randn(E, F, D, generator=g, dtype=torch.float64)
    mask = torch.rand(T, generator=g) > 0.3
    balance = "topk"
    if wrong == "w1":
        w1 = w1[:, :, :0] if F > 1 else torch.randn(E, D + 1, F, dtype=torch.float64)
    elif wrong == "w2":
        w2 = torch.randn(E, F + 1, D, dtype=torch.float64)
    elif wrong == "router":
        router = torch.randn(E + 1, D, dtype=torch.float64)
    elif wrong == "dtype":
        w2 = w2.float()
    elif wrong == "mask":
        mask = mask.float()
    elif wrong == "balance":
        balance = "gshard"
    try:
        out = moe_ffn(z, router, w1, w2, top_k=K, token_mask_T=mask, balance_p=balance, backend="torch")
    except ValueError as exc:
        problems = [f"top_k={K}"] if not 1 <= K <= E else []  # whichever is checked first is named
        if wrong is not None:
            problems.append({"balance": "balance_p", "mask": "token_mask_T", "dtype": "dtype"}.get(wrong, "shape"))
        assert problems and _names(exc, *problems), exc
        return
    assert wrong is None and 1 <= K <= E
    want = reference_moe_ffn(z, router, w1, w2, K, mask, balance)
    torch.testing.assert_close(out.h_TD, want.h_TD, rtol=0, atol=0)  # the torch backend is the reference
    assert out.h_TD.shape == (T, D) and (out.h_TD[~mask] == 0).all()


# ------------------------------------------------------------------ swap_adapter and load_swapped


def _toy(hidden: int, with_alias: bool, width: int = 8) -> nn.Module:
    model = nn.Module()
    model.encoder = nn.Linear(3, width)
    model.proj = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 5))
    if with_alias:
        model.proj_alias = model.proj
    model.forward = lambda x: model.proj(model.encoder(x))  # noqa: B023 (one model per call)
    return model


@SETTINGS
@given(
    hidden=st.integers(1, 9),
    alias=st.booleans(),
    target=st.sampled_from(["proj", "proj_alias", "encoder", "missing.path", ""]),
    spec=st.sampled_from(["moe-8c4", "moe-4c2-parallel", "dense", "moe-8c4-double-f", "no-such-preset"]),
    upcycle=st.booleans(),
)
def test_swap_and_load_are_all_or_nothing(tmp_path, hidden, alias, target, spec, upcycle):
    from adapter.serialization import load_swapped, save_swapped

    torch.manual_seed(0)
    model = _toy(hidden, alias)
    x = torch.randn(4, 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = model.forward(x)
    try:
        handle = swap_adapter(model, target, spec, upcycle=upcycle, backend="torch")
    except ValueError as exc:
        assert _names(exc, repr(target), repr(spec), target or "root", "upcycl", "MoE", "no option"), exc
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing swapped
        return
    assert target in ("proj", "proj_alias", "encoder") and spec != "no-such-preset"
    swapped = model.get_submodule(target)
    assert isinstance(swapped, MoEAdapter | DenseAdapter)
    if alias and target.startswith("proj"):
        assert model.proj is model.proj_alias  # every name of the projector
    y = model.forward(x)
    assert y.shape == want.shape and torch.isfinite(y).all()
    if upcycle:
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)  # upcycling keeps the function
    path = tmp_path / f"m-{hidden}-{alias}-{target}-{spec}-{upcycle}.safetensors"
    save_swapped(model, path)
    fresh = _toy(hidden, alias)
    load_swapped(fresh, path)
    torch.testing.assert_close(fresh.forward(x), y, rtol=0, atol=0)
    other = _toy(hidden, alias, width=9)  # another model (not only inside what was swapped): refused, left as it was
    kept = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError):
        load_swapped(other, path)
    assert not any(isinstance(m, MoEAdapter | DenseAdapter) for m in other.modules())
    assert all(torch.equal(kept[k], v) for k, v in other.state_dict().items())
    handle.undo()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ------------------------------------------------------------------ the manifest reader

VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.text(max_size=6), st.lists(st.text(max_size=3), max_size=3)
)


@SETTINGS
@given(
    records=st.lists(
        st.dictionaries(
            st.sampled_from(["id", "question", "answer", "choices", "eval", "category", "task", "text", "context"]),
            VALUES,
            max_size=6,
        ),
        min_size=1,
        max_size=4,
    ),
    junk=st.sampled_from([None, "{not json", "[1, 2]", "\udcff"]),
)
def test_manifest_lines_are_read_or_refused_with_file_and_line(tmp_path, records, junk):
    from adapter.lalm.data import read_manifest

    lines = [json.dumps(r) for r in records]
    if junk is not None:
        lines.insert(len(lines) // 2, junk)
    path = tmp_path / "m.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape") + b"\n")
    try:
        examples = read_manifest(path)
    except ValueError as exc:
        assert str(exc).startswith(f"{path}:") and any(f"{path}:{n}:" in str(exc) for n in range(1, len(lines) + 1))
        return
    assert junk is None and len(examples) == len(records)
    for ex, rec in zip(examples, records, strict=True):
        assert ex.id == str(rec["id"]) and ex.question == rec["question"]
        assert ex.choices == rec.get("choices", []) and ex.answer == rec.get("answer", "")
        assert ex.source.startswith(f"{path}:")
