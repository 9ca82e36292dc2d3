"""Kernel-level benchmarks (GPU): each Triton kernel of the MoE op against its ceiling.

Router + balance and the permutation are memory-bound: bytes each must move (every input read
once, every output written once) over the measured copy bandwidth. The grouped GEMMs are
compute-bound: their TFLOP/s against a dense torch.matmul (cuBLAS) doing the same FLOPs on the
same dtype, and against the datasheet peak.
"""

from __future__ import annotations

import time

import torch
import triton

from adapter.environment import environment
from benchmarks.timing import datasheet_for, time_gpu
from moe_kernels import grouped_gemm, permutation, routing, wgrad


def _dense_equivalent_ms(m: int, k: int, n: int, dtype, device) -> float:
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    return time_gpu(lambda: torch.matmul(a, b)).median_ms


def run_kernel_benchmarks(
    d: int, f: int, E: int, K: int, tokens_list, device, ceilings, dtype=torch.bfloat16, deadline: float | None = None
) -> list[dict]:
    """Rows for each T in tokens_list; a T not started by `deadline` (time.monotonic()) is left out
    and said so on stdout."""
    sheet = datasheet_for(environment(device)["device"])
    rows = []
    for T in tokens_list:
        if deadline is not None and time.monotonic() >= deadline:
            print(f"kernel benchmarks: time budget spent, T={T} not run")
            continue
        rows += _memory_bound_rows(T, E, K, device, dtype, ceilings, sheet)
        rows += _gemm_rows(T, d, f, E, K, device, dtype, sheet)
    return rows


def _route(logits, K):
    r = routing.router_forward(logits, K, None, "topk")
    return r, routing.balance_forward(r.blk_count_NE, r.blk_psum_NE, K)


def _memory_bound_rows(T, E, K, device, dtype, ceilings, sheet) -> list[dict]:
    logits = torch.randn(T, E, device=device, dtype=dtype)
    nb = triton.cdiv(T, routing.router_block_t(E))
    r, (counts, _, _) = _route(logits, K)
    cases = [  # name, fn, bytes it must move: inputs read once, outputs written once
        ("router+balance", lambda: _route(logits, K), T * E * logits.element_size() + T * K * 8 + nb * E * 16 + E * 12),
        (
            "permutation",
            lambda: permutation.permute(r.topk_idx_TK, counts, r.blk_count_NE),
            T * K * 4 + T * K * 8 + nb * E * 8 + E * 8,
        ),
    ]
    rows = []
    for name, fn, nbytes in cases:
        t = time_gpu(fn)
        gbs = nbytes / (t.median_ms * 1e-3) / 1e9
        rows.append(
            {
                "kernel": name,
                "tokens": T,
                "dtype": str(dtype).removeprefix("torch."),
                "median_ms": t.median_ms,
                "p20_ms": t.p20_ms,
                "p80_ms": t.p80_ms,
                "bytes": nbytes,
                "gbs": gbs,
                "pct_copy_bw": 100 * gbs / ceilings["copy_gbs"],
                "pct_datasheet_bw": 100 * gbs / sheet["hbm_gbs"] if sheet else None,
            }
        )
    return rows


def _gemm_rows(T, d, f, E, K, device, dtype, sheet) -> list[dict]:
    logits = torch.randn(T, E, device=device, dtype=dtype)
    r, (counts, _, _) = _route(logits, K)
    perm = permutation.permute(r.topk_idx_TK, counts, r.blk_count_NE)
    z = torch.randn(T, d, device=device, dtype=dtype)
    w1 = torch.randn(E, d, f, device=device, dtype=dtype) / d**0.5
    w2 = torch.randn(E, f, d, device=device, dtype=dtype) / f**0.5
    dh = torch.randn(T, d, device=device, dtype=dtype)
    weight, R = r.topk_weight_TK, T * K
    mm = grouped_gemm.grouped_mm
    up = dict(epilogue=grouped_gemm.EPI_SILU, out_rows=R, out_dtype=dtype, weight_TK=weight, store_pre=True)
    gact, pre = mm(z, w1, perm, K, gather_a=True, **up)  # what the forward keeps: G * SiLU(pre), pre
    dsilu = dict(epilogue=grouped_gemm.EPI_DSILU, out_rows=R, out_dtype=dtype, weight_TK=weight, pre_RN=pre)
    dpre, _ = mm(dh, w2.transpose(1, 2), perm, K, gather_a=True, **dsilu)

    def row_gemms(persistent: bool) -> list:
        """The four row GEMMs of a forward + backward on the tile or the persistent schedule."""
        tag = " [persistent]" if persistent else ""
        sc = dict(epilogue=grouped_gemm.EPI_SCATTER, out_rows=R, out_dtype=dtype, persistent=persistent)
        up_p, dsilu_p = {**up, "persistent": persistent}, {**dsilu, "persistent": persistent}
        return [  # name, fn, (M, K, N) of the dense matmul with the same FLOPs
            (f"up: gather z, @W1, SiLU, x G{tag}", lambda: mm(z, w1, perm, K, gather_a=True, **up_p), (R, d, f)),
            (f"down: G act @W2, scatter{tag}", lambda: mm(gact, w2, perm, K, gather_a=False, **sc), (R, f, d)),
            (
                f"down dX: dh @W2^T, dSiLU{tag}",
                lambda: mm(dh, w2.transpose(1, 2), perm, K, gather_a=True, **dsilu_p),
                (R, d, f),
            ),
            (
                f"up dX: dpre @W1^T, scatter{tag}",
                lambda: mm(dpre, w1.transpose(1, 2), perm, K, gather_a=False, **sc),
                (R, f, d),
            ),
        ]

    cases = row_gemms(persistent=False)
    cases += [
        (
            "dW1 = z^T dpre",
            lambda: wgrad.grouped_wgrad(z, dpre, perm, K, gather_x=True, gather_y=False, out_dtype=dtype),
            (d, R, f),
        ),
        (
            "dW2 = (G act)^T dh",
            lambda: wgrad.grouped_wgrad(gact, dh, perm, K, gather_x=False, gather_y=True, out_dtype=dtype),
            (f, R, d),
        ),
    ]
    # The same row GEMMs on the persistent TMA kernel (moe_kernels/persistent_gemm.py), and the
    # weight gradients without the split (one chunk per expert): what decides the defaults.
    cases += row_gemms(persistent=True)
    cases += [
        (
            "dW1 [no split]",
            lambda: wgrad.grouped_wgrad(z, dpre, perm, K, gather_x=True, gather_y=False, out_dtype=dtype, chunk=R),
            (d, R, f),
        ),
        (
            "dW2 [no split]",
            lambda: wgrad.grouped_wgrad(gact, dh, perm, K, gather_x=False, gather_y=True, out_dtype=dtype, chunk=R),
            (f, R, d),
        ),
    ]
    rows = []
    dname = str(dtype).removeprefix("torch.")
    for name, fn, (m, k, n) in cases:
        t = time_gpu(fn)
        flops = 2.0 * m * k * n
        tflops = flops / (t.median_ms * 1e-3) / 1e12
        dense_tflops = flops / (_dense_equivalent_ms(m, k, n, dtype, device) * 1e-3) / 1e12
        rows.append(
            {
                "kernel": name,
                "tokens": T,
                "dtype": dname,
                "median_ms": t.median_ms,
                "p20_ms": t.p20_ms,
                "p80_ms": t.p80_ms,
                "tflops": tflops,
                "dense_matmul_tflops": dense_tflops,
                "vs_dense_matmul": tflops / dense_tflops,
                "pct_datasheet": 100 * tflops / sheet[dname] if sheet else None,
            }
        )
    return rows
