"""The "grouped_mm" backend: the Triton router and permutation, and the expert GEMMs through
PyTorch's `torch._grouped_mm` (cuBLAS/CUTLASS grouped GEMMs on Hopper, a loop on CPU).

Shape legend: T tokens, D token width, F expert hidden width, N expert output width, E experts,
K experts per token, R = T*K pairs (sorted rows past offsets[E] belong to masked tokens).

    x_RD = z[token(r)]                    one gathered copy of the routed rows
    act_RF = SiLU(x_RD @ W1[e])           torch._grouped_mm over the expert groups
    y_RN = act_RF @ W2[e]                 torch._grouped_mm
    h_TN[t] = sum_s G_{t,s} y[row(t,s)]   slots gathered back by pair, summed over s in order

Autograd runs through torch's ops. Every size comes from shapes (no host sync). Rows of masked
tokens are selected away with torch.where before they meet a weight, so whatever _grouped_mm leaves
in rows past the last group never reaches an output or a gradient; the gathers' backward adds only
exact zeros where two indices coincide, so gradients are the same bits on every run.
Semantics: reference.reference_moe_ffn. torch._grouped_mm takes float32, bfloat16 and float16 on CPU;
on CUDA bfloat16 on sm_90 and newer (GROUPED_MM_CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_kernels.functions import route
from moe_kernels.reference import MoEOutput, Permutation, routing_dtype

GROUPED_MM_CUDA = {"dtype": torch.bfloat16, "capability": (9, 0)}  # what torch._grouped_mm runs on CUDA


def grouped_mm_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why torch._grouped_mm cannot run the experts on `device` in `dtype`, or None."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if device.type == "cuda":
        if dtype != GROUPED_MM_CUDA["dtype"]:
            return f"torch._grouped_mm on CUDA takes bfloat16 only, got {dtype}"
        if torch.cuda.get_device_capability(device) < GROUPED_MM_CUDA["capability"]:
            return f"torch._grouped_mm on CUDA needs sm_90 or newer, got {torch.cuda.get_device_name(device)}"
    elif dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"torch._grouped_mm takes float32, bfloat16 or float16, got {dtype}"
    return None


# torch._grouped_mm wants every operand's row stride a multiple of 16 bytes ("strides should be
# multiple of 16 bytes", torch 2.13): rows of f = 50 fp32 values (200 bytes) or a permuted weight
# view are refused there.
_ALIGN_BYTES = 16


def _padded(t: torch.Tensor, *pads: int) -> torch.Tensor:
    """`t` contiguous, its last dims zero-padded by `pads` (last dim first, as F.pad takes them)."""
    return F.pad(t, [p for n in pads for p in (0, n)]) if any(pads) else t.contiguous()


def _pad_to_align(n: int, dtype: torch.dtype) -> int:
    per = _ALIGN_BYTES // torch.tensor([], dtype=dtype).element_size()
    return -n % per


def grouped_experts(
    z_TD: torch.Tensor,
    w1_EDF: torch.Tensor,
    w2_EFN: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    perm: Permutation,
) -> torch.Tensor:
    """h_TN = sum_s G_{t,s} E_{e(t,s)}(z_t) with two torch._grouped_mm calls."""
    T, K = perm.pair_row_TK.shape
    R = T * K
    real_R = torch.arange(R, device=z_TD.device) < perm.offsets_E1[-1]
    # Gather through the (T, K) slots: the backward of expand sums over K in order.
    z_RD = z_TD[:, None, :].expand(T, K, z_TD.shape[1]).reshape(R, -1)
    pairs_R = torch.where(real_R, perm.sorted_pair_R.long(), 0)
    x_RD = torch.where(real_R[:, None], z_RD.index_select(0, pairs_R), 0)
    offs_E = perm.offsets_E1[1:].to(torch.int32)
    # Any widths and strides: pad D, F and N to 16-byte rows (zeros in a reduction dim add nothing,
    # SiLU(0) = 0 in a padded hidden column, padded output columns are dropped); no copy when the
    # operands are aligned and contiguous already.
    N = w2_EFN.shape[2]
    pad_D, pad_F, pad_N = (_pad_to_align(n, z_TD.dtype) for n in (z_TD.shape[1], w1_EDF.shape[2], N))
    x_RD = _padded(x_RD, pad_D)
    act_RF = F.silu(torch._grouped_mm(x_RD, _padded(w1_EDF, pad_F, pad_D), offs=offs_E))
    y_RN = torch._grouped_mm(act_RF, _padded(w2_EFN, pad_N, pad_F), offs=offs_E)
    y_RN = y_RN[:, :N] if pad_N else y_RN
    rows_TK = perm.pair_row_TK.long()
    routed_TK = rows_TK >= 0
    y_TKN = y_RN.index_select(0, rows_TK.clamp_min(0).reshape(-1)).view(T, K, -1)
    y_TKN = torch.where(routed_TK[..., None], y_TKN, 0)
    acc = routing_dtype(z_TD.dtype)
    weight_TK = torch.where(routed_TK, topk_weight_TK, 0).to(acc)
    return (y_TKN.to(acc) * weight_TK[..., None]).sum(1).to(z_TD.dtype)


def grouped_mm_moe_ffn(
    z_TD: torch.Tensor,
    router_weight_ED: torch.Tensor,
    w1_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    top_k: int,
    token_mask_T: torch.Tensor | None = None,
    balance_p: str = "topk",
) -> MoEOutput:
    """reference_moe_ffn with the Triton router/permutation and torch._grouped_mm experts (inputs
    already validated by ops.moe_ffn)."""
    reason = grouped_mm_unavailable(z_TD.device, z_TD.dtype)
    if reason:
        raise ValueError(f"backend='grouped_mm': {reason}")
    weight_TK, aux, idx_TK, counts_E, perm = route(z_TD, router_weight_ED, top_k, token_mask_T, balance_p)
    h_TD = grouped_experts(z_TD, w1_EDF, w2_EFD, weight_TK, perm)
    return MoEOutput(h_TD, aux, counts_E, idx_TK, weight_TK)
