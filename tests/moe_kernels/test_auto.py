"""auto's choice on CUDA among the Triton GEMM schedules, grouped_mm and the reference: which it
times, each candidate against the float64 reference, timed once, remembered in the cache file,
pinned by the environment, reported."""

import errno
import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from moe_kernels import auto, backend, moe_ffn
from tests.moe_kernels.test_functions import _fwd_bwd
from tests.utils import assert_close, make_moe_inputs


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "choice.json"
    monkeypatch.setenv(auto.AUTO_CACHE_ENV, str(path))
    monkeypatch.delenv(auto.AUTO_PIN_ENV, raising=False)
    auto._choices_this_process().clear()
    auto._last_choice()[0] = None
    yield path
    auto._choices_this_process().clear()


def test_auto_times_each_candidate_once_and_remembers(cache, caplog):
    calls = []

    def timer(name, seconds):
        return lambda: calls.append(name) or seconds

    with caplog.at_level(logging.INFO, logger="moe_kernels"):
        assert auto.choose_auto("k1", {"triton": timer("triton", 2.0), "grouped_mm": timer("grouped_mm", 1.0)}) == (
            "grouped_mm"
        )
    assert calls == ["triton", "grouped_mm"] and "k1: grouped_mm" in caplog.text
    saved = json.loads(cache.read_text())["k1"]
    assert saved == {
        "choice": "grouped_mm",
        "seconds": {"triton": 2.0, "grouped_mm": 1.0},
        "candidates": ["grouped_mm", "triton"],
    }
    assert auto.last_auto_choice() == ("k1", "grouped_mm")
    assert auto.choose_auto("k1", {"triton": timer("triton", 0.1), "grouped_mm": timer("grouped_mm", 9)}) == (
        "grouped_mm"
    )
    assert calls == ["triton", "grouped_mm"]  # remembered: not timed again
    auto._choices_this_process().clear()  # a new process reads the file
    assert auto.choose_auto("k1", {"triton": timer("triton", 0.1), "grouped_mm": timer("grouped_mm", 9)}) == (
        "grouped_mm"
    )
    assert calls == ["triton", "grouped_mm"] and auto.auto_choices() == {"k1": "grouped_mm"}
    # A new candidate (a schedule added by an upgrade) makes the remembered file choice stale.
    auto._choices_this_process().clear()
    three = {"triton": timer("triton", 2.0), "grouped_mm": timer("grouped_mm", 1.0), "new": timer("new", 0.5)}
    assert auto.choose_auto("k1", three) == "new" and calls[-3:] == ["triton", "grouped_mm", "new"]
    # Another shape class is timed on its own; a failing candidate is left out.
    failing = {"triton": timer("triton", 3.0), "grouped_mm": lambda: 1 / 0}
    assert auto.choose_auto("k2", failing) == "triton" and auto.last_auto_choice() == ("k2", "triton")
    assert set(json.loads(cache.read_text())) == {"k1", "k2"}


def test_auto_pin_and_a_corrupt_cache(cache, monkeypatch):
    cache.write_text("{not json")
    assert auto.choose_auto("k", {"triton": lambda: 1.0, "grouped_mm": lambda: 2.0}) == "triton"
    assert json.loads(cache.read_text())["k"]["choice"] == "triton"  # rewritten whole
    monkeypatch.setenv(auto.AUTO_PIN_ENV, "grouped_mm")
    assert auto.choose_auto("k", {"triton": lambda: 1.0, "grouped_mm": lambda: 2.0}) == "grouped_mm"
    monkeypatch.setenv(auto.AUTO_PIN_ENV, "cuda-magic")
    with pytest.raises(ValueError, match="MOE_ADAPTER_AUTO_BACKEND='cuda-magic'"):
        auto.choose_auto("k", {"triton": lambda: 1.0})


def test_auto_on_a_full_disk_keeps_the_old_file_and_leaves_no_partial_one(cache, monkeypatch, caplog):
    assert auto.choose_auto("k1", {"triton": lambda: 1.0, "grouped_mm": lambda: 2.0}) == "triton"
    before = cache.read_text()
    real_write = Path.write_text

    def half_then_full(self, text, *a, **k):  # writes part of the file, then the disk is full
        real_write(self, text[: len(text) // 2], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with caplog.at_level(logging.WARNING, logger="moe_kernels"):
        assert auto.choose_auto("k2", {"triton": lambda: 2.0, "grouped_mm": lambda: 1.0}) == "grouped_mm"
    assert "No space left on device" in caplog.text and "the choice holds for this process" in caplog.text
    assert cache.read_text() == before and [p.name for p in cache.parent.iterdir()] == [cache.name]
    assert auto.choose_auto("k2", {"triton": lambda: 0.1, "grouped_mm": lambda: 9.0}) == "grouped_mm"  # held


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
        chosen[i] = auto.choose_auto(f"k{i}", {"triton": lambda: 1.0 + i % 2, "grouped_mm": lambda: 1.5})

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
    key = auto.shape_class((z, r, w1, w2, 2))
    assert key == "cpu|float64|E8K2|D40F72N40|T<=128|fwd+bwd"
    with torch.no_grad():
        assert auto.shape_class((z[:65], r, w1, w2, 2)).endswith("T<=128|fwd")
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
    assert auto.auto_candidates(args) == want


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
        out = backend.implementation(name)(*inputs, K, None, "topk")
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
    ((key, choice),) = auto.auto_choices().items()
    timed = json.loads(cache.read_text())[key]
    assert timed["choice"] == choice and set(timed["seconds"]) == set(auto.auto_candidates(inputs + [2]))
    assert "triton:persistent+nosplit" in timed["seconds"]  # Hopper, bf16, fwd+bwd: every schedule timed
    a = moe_ffn(*inputs, top_k=2, backend="triton").h_TD.float()
    b = moe_ffn(*inputs, top_k=2, backend="grouped_mm").h_TD.float()
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()
