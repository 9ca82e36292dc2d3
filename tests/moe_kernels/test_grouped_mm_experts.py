"""The "grouped_mm" backend (Triton router and permutation, torch._grouped_mm experts) against the
float64 reference in fp32, over odd shapes and routing extremes, with masked tokens; reruns give
the same bits; and "auto"'s choice among it and the Triton path's GEMM schedules: which it times,
each candidate against the reference, timed once, remembered in the cache file, pinned by the
environment, reported."""

import errno
import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from moe_kernels import backend, moe_ffn
from tests.moe_kernels.test_functions import CASES, _fwd_bwd
from tests.utils import assert_close, make_moe_inputs, poison_allocations


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("T,D,F,E,K,routing", CASES)
def test_grouped_mm_fp32_within_1e5_of_float64(T, D, F, E, K, routing, masked):
    """fp32 against the float64 reference: same routing, outputs and gradients within 1e-5 of the
    reference's largest entry (the fp32 tolerance the Triton path is held to; torch._grouped_mm
    takes no float64). With all tokens on one expert the softmax saturates and the float64 router
    gradient is ~1e-15, below fp32's resolution: errors are taken relative to at least 1e-3."""
    inputs64 = make_moe_inputs(T, D, F, E, routing=routing)
    inputs32 = tuple(t.detach().float().requires_grad_(True) for t in inputs64)
    mask = torch.rand(T, generator=torch.Generator().manual_seed(5)) > 0.3 if masked else None
    ref, ref_grads = _fwd_bwd(inputs64, K, mask, "topk", "torch")
    out, grads = _fwd_bwd(inputs32, K, mask, "topk", "grouped_mm")
    _assert_fp32_matches(out, grads, ref, ref_grads)
    if masked:  # masked tokens: zero rows, whatever the grouped GEMM left past the last group
        assert (out.h_TD[~mask] == 0).all()


def _assert_fp32_matches(out, grads, ref, ref_grads):
    assert torch.equal(out.topk_idx_TK, ref.topk_idx_TK) and torch.equal(out.counts_E, ref.counts_E)
    for name, a, b in zip(
        ("h", "aux", "dz", "drouter", "dw1", "dw2"),
        (out.h_TD, out.aux_loss, *grads),
        (ref.h_TD, ref.aux_loss, *ref_grads),
        strict=True,
    ):
        assert torch.isfinite(a).all(), name
        err = float((a.detach().double() - b.detach()).abs().max() / max(float(b.detach().abs().max()), 1e-3))
        assert err <= 1e-5, f"{name}: {err:.3g}"


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN in masked lanes, by design
def test_grouped_mm_with_poisoned_allocations(monkeypatch):
    """Every buffer the backend allocates in Python poisoned (tests.utils.poison_allocations; the
    rows torch._grouped_mm leaves past the last group are ATen's own): padded tokens and empty
    experts still give the reference's routing and values."""
    inputs64 = make_moe_inputs(64, 40, 100, 8, routing="empty")
    inputs32 = tuple(t.detach().float().requires_grad_(True) for t in inputs64)
    mask = torch.rand(64, generator=torch.Generator().manual_seed(5)) > 0.3
    ref, ref_grads = _fwd_bwd(inputs64, 4, mask, "topk", "torch")
    poison_allocations(monkeypatch)
    out, grads = _fwd_bwd(inputs32, 4, mask, "topk", "grouped_mm")
    assert (ref.counts_E == 0).any()
    _assert_fp32_matches(out, grads, ref, ref_grads)


def test_grouped_mm_reruns_are_bit_identical_and_refuse_float64():
    inputs = tuple(t.detach().float().requires_grad_(True) for t in make_moe_inputs(129, 40, 72, 8, routing="uniform"))
    a, ga = _fwd_bwd(inputs, 2, None, "topk", "grouped_mm")
    b, gb = _fwd_bwd(inputs, 2, None, "topk", "grouped_mm")
    assert torch.equal(a.h_TD, b.h_TD) and all(torch.equal(x, y) for x, y in zip(ga, gb, strict=True))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16, got torch.float64"):
        moe_ffn(*make_moe_inputs(7, 40, 72, 3), top_k=1, backend="grouped_mm")


def test_moe_adapter_runs_on_the_grouped_mm_backend():
    """A MoEAdapter takes backend="grouped_mm". In fp32 its output and gradients are as close to
    the float64 torch-backend adapter as the fp32 torch backend is (within 4x its error, plus
    1e-7 of each tensor's scale): the router gradient, a difference of nearly equal terms, carries
    fp32 rounding at ~1e-4 of its scale on either backend."""
    from adapter import MoEAdapter, preset

    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    results = {}
    for name, dtype in (("torch", torch.float64), ("torch", torch.float32), ("grouped_mm", torch.float32)):
        torch.manual_seed(0)
        adapter = MoEAdapter(preset("moe-8c4-parallel", 32, 48, backend=name)).double().to(dtype)
        y = adapter(x.to(dtype), mask)
        y.square().mean().backward()
        results[name, dtype] = [t.detach().double() for t in (y, adapter.router.weight.grad, adapter.w1.grad)]
    exact = results["torch", torch.float64]
    fp32, got32 = results["torch", torch.float32], results["grouped_mm", torch.float32]
    for ref32, got, want in zip(fp32, got32, exact, strict=True):
        scale = want.abs().max()
        assert (got - want).abs().max() <= 4 * (ref32 - want).abs().max() + 1e-7 * scale


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "choice.json"
    monkeypatch.setenv(backend.AUTO_CACHE_ENV, str(path))
    monkeypatch.delenv(backend.AUTO_PIN_ENV, raising=False)
    backend._choices_this_process().clear()
    backend._last_choice()[0] = None
    yield path
    backend._choices_this_process().clear()


def test_auto_times_each_candidate_once_and_remembers(cache, caplog):
    calls = []

    def timer(name, seconds):
        return lambda: calls.append(name) or seconds

    with caplog.at_level(logging.INFO, logger="moe_kernels"):
        assert backend.choose_auto("k1", {"triton": timer("triton", 2.0), "grouped_mm": timer("grouped_mm", 1.0)}) == (
            "grouped_mm"
        )
    assert calls == ["triton", "grouped_mm"] and "k1: grouped_mm" in caplog.text
    saved = json.loads(cache.read_text())["k1"]
    assert saved == {
        "choice": "grouped_mm",
        "seconds": {"triton": 2.0, "grouped_mm": 1.0},
        "candidates": ["grouped_mm", "triton"],
    }
    assert backend.last_auto_choice() == ("k1", "grouped_mm")
    assert backend.choose_auto("k1", {"triton": timer("triton", 0.1), "grouped_mm": timer("grouped_mm", 9)}) == (
        "grouped_mm"
    )
    assert calls == ["triton", "grouped_mm"]  # remembered: not timed again
    backend._choices_this_process().clear()  # a new process reads the file
    assert backend.choose_auto("k1", {"triton": timer("triton", 0.1), "grouped_mm": timer("grouped_mm", 9)}) == (
        "grouped_mm"
    )
    assert calls == ["triton", "grouped_mm"] and backend.auto_choices() == {"k1": "grouped_mm"}
    # A new candidate (a schedule added by an upgrade) makes the remembered file choice stale.
    backend._choices_this_process().clear()
    three = {"triton": timer("triton", 2.0), "grouped_mm": timer("grouped_mm", 1.0), "new": timer("new", 0.5)}
    assert backend.choose_auto("k1", three) == "new" and calls[-3:] == ["triton", "grouped_mm", "new"]
    # Another shape class is timed on its own; a failing candidate is left out.
    failing = {"triton": timer("triton", 3.0), "grouped_mm": lambda: 1 / 0}
    assert backend.choose_auto("k2", failing) == "triton" and backend.last_auto_choice() == ("k2", "triton")
    assert set(json.loads(cache.read_text())) == {"k1", "k2"}


def test_auto_pin_and_a_corrupt_cache(cache, monkeypatch):
    cache.write_text("{not json")
    assert backend.choose_auto("k", {"triton": lambda: 1.0, "grouped_mm": lambda: 2.0}) == "triton"
    assert json.loads(cache.read_text())["k"]["choice"] == "triton"  # rewritten whole
    monkeypatch.setenv(backend.AUTO_PIN_ENV, "grouped_mm")
    assert backend.choose_auto("k", {"triton": lambda: 1.0, "grouped_mm": lambda: 2.0}) == "grouped_mm"
    monkeypatch.setenv(backend.AUTO_PIN_ENV, "cuda-magic")
    with pytest.raises(ValueError, match="MOE_ADAPTER_AUTO_BACKEND='cuda-magic'"):
        backend.choose_auto("k", {"triton": lambda: 1.0})


def test_auto_on_a_full_disk_keeps_the_old_file_and_leaves_no_partial_one(cache, monkeypatch, caplog):
    assert backend.choose_auto("k1", {"triton": lambda: 1.0, "grouped_mm": lambda: 2.0}) == "triton"
    before = cache.read_text()
    real_write = Path.write_text

    def half_then_full(self, text, *a, **k):  # writes part of the file, then the disk is full
        real_write(self, text[: len(text) // 2], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with caplog.at_level(logging.WARNING, logger="moe_kernels"):
        assert backend.choose_auto("k2", {"triton": lambda: 2.0, "grouped_mm": lambda: 1.0}) == "grouped_mm"
    assert "No space left on device" in caplog.text and "the choice holds for this process" in caplog.text
    assert cache.read_text() == before and [p.name for p in cache.parent.iterdir()] == [cache.name]
    assert backend.choose_auto("k2", {"triton": lambda: 0.1, "grouped_mm": lambda: 9.0}) == "grouped_mm"  # held


def test_auto_cache_writers_with_one_pid_never_share_a_temporary(cache, monkeypatch, caplog):
    """Ranks on two nodes sharing a home directory can have the same pid; threads of one process
    always do. Six writers at once, each write held open halfway so they overlap: with a temporary
    named by pid, one's rename moved the file another was writing (a "cannot write" warning, or a
    torn file). Now every write lands whole, no temporary is left, and each writer's choice holds.
    (Concurrent writers still each rewrite the whole file: a key may be lost and timed again.)"""
    real_write = Path.write_text
    started = threading.Barrier(6)

    def slow_write(self, text, *a, **k):
        real_write(self, text[: len(text) // 2], *a, **k)
        time.sleep(0.05)
        return real_write(self, text, *a, **k)

    monkeypatch.setattr(Path, "write_text", slow_write)
    chosen = {}

    def writer(i):
        started.wait()
        chosen[i] = backend.choose_auto(f"k{i}", {"triton": lambda: 1.0 + i % 2, "grouped_mm": lambda: 1.5})

    with caplog.at_level(logging.WARNING, logger="moe_kernels"):
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert "cannot write" not in caplog.text, caplog.text
    assert chosen == {i: "triton" if i % 2 == 0 else "grouped_mm" for i in range(6)}
    saved = json.loads(cache.read_text())  # whole JSON, not a torn half
    assert saved and all(saved[k]["choice"] == chosen[int(k[1:])] for k in saved)
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]


def test_shape_class_rounds_tokens_and_names_the_setting():
    z, r, w1, w2 = make_moe_inputs(100, 40, 72, 8)
    key = backend.shape_class((z, r, w1, w2, 2))
    assert key == "cpu|float64|E8K2|D40F72N40|T<=128|fwd+bwd"
    with torch.no_grad():
        assert backend.shape_class((z[:65], r, w1, w2, 2)).endswith("T<=128|fwd")
    assert backend.resolve_backend("auto", torch.device("cpu"), 8) == "torch"  # CPU: auto never times


TRITON_ALL = ["triton:tiles+split", "triton:tiles+nosplit", "triton:persistent+split", "triton:persistent+nosplit"]


@pytest.mark.parametrize(
    "dtype,grad,tma,want",
    [
        (torch.float16, True, True, [*TRITON_ALL, "grouped_mm", "torch"]),
        (torch.float16, False, True, ["triton:tiles+split", "triton:persistent+split", "grouped_mm", "torch"]),
        (torch.float16, True, False, ["triton:tiles+split", "triton:tiles+nosplit", "grouped_mm", "torch"]),  # A100
        (torch.float32, True, True, ["triton:tiles+split", "triton:tiles+nosplit", "grouped_mm", "torch"]),  # tiles
        (torch.float64, True, True, ["triton:tiles+split", "triton:tiles+nosplit", "torch"]),  # no grouped_mm
    ],
)
def test_auto_candidates_are_the_distinct_schedules(dtype, grad, tma, want, monkeypatch):
    """auto times every schedule that runs different kernels, and no schedule twice, and the
    reference last (what runs where no fused path beats cuBLAS)."""
    from moe_kernels import gemm_config

    monkeypatch.setattr(gemm_config, "runs_persistent", lambda device: tma)
    args = (*(t.detach().to(dtype).requires_grad_(grad) for t in make_moe_inputs(9, 16, 8, 4)), 2)
    assert backend.auto_candidates(args) == want


def test_every_triton_candidate_runs_its_schedule_forward_and_backward(monkeypatch):
    """Each "triton:<schedule>" candidate equals the float64 reference, runs the GEMMs its name
    says (persistent launches, weight-gradient chunks, chunk tables launched once per size and
    call), and its backward keeps the forward's schedule when the environment changes in between."""
    from moe_kernels import gemm_config, grouped_gemm, permutation, persistent_gemm

    seen, tables = [], []
    real_table = permutation.chunk_table
    monkeypatch.setattr(permutation, "chunk_table", lambda *a: tables.append(a[2]) or real_table(*a))
    real_launch, real_wgrad = persistent_gemm.launch, grouped_gemm.grouped_wgrad
    monkeypatch.setattr(persistent_gemm, "launch", lambda *a, **k: seen.append("persistent") or real_launch(*a, **k))
    monkeypatch.setattr(
        grouped_gemm, "grouped_wgrad", lambda *a, **k: seen.append(f"chunk={k['chunk']}") or real_wgrad(*a, **k)
    )
    T, K = 29, 2
    inputs = make_moe_inputs(T, 16, 24, 4)
    ref, ref_grads = _fwd_bwd(inputs, K, None, "topk", "torch")
    for name in TRITON_ALL:
        seen.clear()
        tables.clear()
        monkeypatch.setenv("MOE_ADAPTER_GEMM", "tiles")
        out = backend._implementation(name)(*inputs, K, None, "topk")
        monkeypatch.setenv("MOE_ADAPTER_GEMM", "persistent")  # must not reach this call's backward
        monkeypatch.setenv("MOE_ADAPTER_WGRAD", "split")
        g = torch.Generator().manual_seed(1)
        dh = torch.randn(out.h_TD.shape, generator=g, dtype=torch.float64)
        grads = torch.autograd.grad((out.h_TD * dh).sum() + 0.3 * out.aux_loss, inputs)
        persistent, nosplit = "persistent+" in name, name.endswith("nosplit")
        chunk = f"chunk={T * K if nosplit else None}"
        # forward: up, down; backward: down-dX, up-dX, then dW1 and dW2
        assert seen == ["persistent"] * (4 if persistent else 0) + [chunk] * 2, f"{name}: {seen}"
        # Chunk tables, one launch per chunk size and call: the forward's and the backward's row
        # GEMMs (BLOCK_M rows, persistent only), the weight gradients' (both share one).
        cfg = gemm_config.gemm_config(torch.float64, T * K, 4, aligned=True)  # the interpreter's tiles
        wgrad_chunk = T * K if nosplit else min(cfg.block_k, T * K)  # chunk_rows: one K-step, at most R
        assert tables == [cfg.block_m] * (2 if persistent else 0) + [wgrad_chunk], f"{name}: {tables}"
        assert_close(out.h_TD, ref.h_TD, rtol=1e-10, atol=1e-12, name=f"{name} h")
        for n, a, b in zip(("dz", "drouter", "dw1", "dw2"), grads, ref_grads, strict=True):
            assert_close(a, b, rtol=1e-10, atol=1e-12, name=f"{name} {n}")


@pytest.mark.gpu
def test_auto_on_cuda_times_every_candidate_once(cache):
    """bf16 on a Hopper GPU: the first call times every candidate (the four Triton schedules,
    grouped_mm and the torch reference, forward + backward) and writes the choice; the Triton and grouped_mm paths agree
    within bf16 rounding."""
    dev = torch.device("cuda")
    inputs = [t.detach().to(dev, torch.bfloat16).requires_grad_(True) for t in make_moe_inputs(2048, 256, 128, 8)]
    out = moe_ffn(*inputs, top_k=2, backend="auto")
    out.h_TD.float().sum().backward()
    ((key, choice),) = backend.auto_choices().items()
    timed = json.loads(cache.read_text())[key]
    assert timed["choice"] == choice and set(timed["seconds"]) == set(backend.auto_candidates(inputs + [2]))
    assert "triton:persistent+nosplit" in timed["seconds"]  # Hopper, bf16, fwd+bwd: every schedule timed
    a = moe_ffn(*inputs, top_k=2, backend="triton").h_TD.float()
    b = moe_ffn(*inputs, top_k=2, backend="grouped_mm").h_TD.float()
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()
