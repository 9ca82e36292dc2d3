"""The row GEMMs' epilogues, one @triton.jit helper shared by the tile-per-program kernel
(grouped_gemm.py) and the persistent one (persistent_gemm.py), so both store the same values.

Shape legend as grouped_gemm.py: a (BLOCK_M sorted rows) x (BLOCK_N columns) accumulator `acc`
of one expert; `pair` holds the rows' pair ids (t*K + s), `m_in`/`n_in` mask rows past the
expert's end and columns past N. EPILOGUE (gemm_config.EPI_*):

    EPI_SILU     out = SiLU(acc) (x G_pair if SCALE) at the sorted rows; pre = acc if STORE_PRE
    EPI_SCATTER  out = acc (x G_pair if SCALE) at the pair's row: no two programs write a row
    EPI_DSILU    acc = dh[token] @ W2[e]^T; out = dpre = G * acc * SiLU'(pre) at the sorted rows,
                 and this N tile's share of dG_p = <acc, SiLU(pre)> in dw_part[row, pid_n]
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def store_epilogue(
    acc,
    offs_m,
    m_in,
    offs_n,
    n_in,
    pair,
    pid_n,
    num_n,
    out_ptr,
    pre_ptr,
    weight_ptr,
    dw_part_ptr,
    stride_om,
    stride_on,
    EPILOGUE: tl.constexpr,
    STORE_PRE: tl.constexpr,
    SCALE: tl.constexpr,
    ACC: tl.constexpr,
):
    out_mask = m_in[:, None] & n_in[None, :]
    sorted_offs = offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    if EPILOGUE == 0:  # EPI_SILU
        if STORE_PRE:
            tl.store(pre_ptr + sorted_offs, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
        act = acc * tl.sigmoid(acc)
        if SCALE:
            act = act * tl.load(weight_ptr + pair, mask=m_in, other=0.0).to(ACC)[:, None]
        tl.store(out_ptr + sorted_offs, act.to(out_ptr.dtype.element_ty), mask=out_mask)
    elif EPILOGUE == 1:  # EPI_SCATTER
        if SCALE:
            acc = acc * tl.load(weight_ptr + pair, mask=m_in, other=0.0).to(ACC)[:, None]
        pair_offs = pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptr + pair_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:  # EPI_DSILU
        pre = tl.load(pre_ptr + sorted_offs, mask=out_mask, other=0.0).to(ACC)
        sig = tl.sigmoid(pre)
        g_sig = acc * sig
        # dG_p = <dh_t, W2 SiLU(pre_r)> = sum g * pre * sig: this N tile's share, summed over tiles
        # in a fixed order by grouped_gemm._dweight_kernel.
        tl.store(dw_part_ptr + offs_m.to(tl.int64) * num_n + pid_n, tl.sum(g_sig * pre, axis=1), mask=m_in)
        w = tl.load(weight_ptr + pair, mask=m_in, other=0.0).to(ACC)
        dpre = w[:, None] * g_sig * (1.0 + pre * (1.0 - sig))
        tl.store(out_ptr + sorted_offs, dpre.to(out_ptr.dtype.element_ty), mask=out_mask)
