"""Public functional ops: validate inputs once, apply autocast, pick a backend, run it.

Shape legend: T tokens, D token width, F expert hidden width, E experts, K experts per token.
"""

from __future__ import annotations

import torch

from moe_kernels import custom_ops, reference
from moe_kernels.backend import moe_ffn_implementation
from moe_kernels.reference import BALANCE_MODES, MoEOutput


def check_top_k(top_k: int, num_experts: int) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise ValueError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts]; got top_k={top_k}, num_experts={num_experts}")


def _autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled for a device type; False where autocast does not exist (meta)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _vmapped(tensors) -> bool:
    """Whether any of `tensors` is batched by torch.func.vmap (under any other transforms too)."""
    functorch = torch._C._functorch
    for t in tensors:
        while isinstance(t, torch.Tensor) and functorch.is_functorch_wrapped_tensor(t):
            if functorch.is_batchedtensor(t):
                return True
            t = functorch.get_unwrapped(t)
    return False


def _check_moe_inputs(z_TD, router_weight_ED, w1_EDF, w2_EFD, top_k, token_mask_T, balance_p):
    named = {"z_TD": z_TD, "router_weight_ED": router_weight_ED, "w1_EDF": w1_EDF, "w2_EFD": w2_EFD}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        # complex would "compute" a complex result, int and bool fail deep in torch: refuse by name.
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    # Eager only: dynamo cannot trace the functorch queries (a graph break inside the adapter); a
    # vmap under torch.compile fails where it would have without the check.
    if not torch.compiler.is_compiling() and _vmapped([*named.values(), token_mask_T]):
        # torch would fail deep inside the permutation with an in-place error that names nothing.
        raise NotImplementedError(
            "moe_ffn (the MoE adapter's routed experts) under torch.func.vmap (per-sample gradients, model "
            "ensembles): the routing is data-dependent (each expert's token count sets its GEMM's shape), "
            "which vmap cannot batch. Call the adapter on the whole batch instead (every token is routed on "
            "its own; only aux_loss is a statistic of the batch) or loop over the samples"
        )
    if z_TD.dim() != 2:
        raise ValueError(f"z_TD must be 2-D (T, D), got shape {tuple(z_TD.shape)}")
    if w1_EDF.dim() != 3 or w2_EFD.dim() != 3 or router_weight_ED.dim() != 2:
        raise ValueError(
            "expected router_weight_ED (E, D), w1_EDF (E, D, F), w2_EFD (E, F, D); got "
            f"{tuple(router_weight_ED.shape)}, {tuple(w1_EDF.shape)}, {tuple(w2_EFD.shape)}"
        )
    T, D = z_TD.shape
    E, D1, F = w1_EDF.shape
    if D1 != D or tuple(w2_EFD.shape[:2]) != (E, F) or tuple(router_weight_ED.shape) != (E, D):
        raise ValueError(
            f"shape mismatch: z_TD {tuple(z_TD.shape)} (D={D}) needs router_weight_ED ({E}, {D}), "
            f"w1_EDF ({E}, {D}, F), w2_EFD ({E}, F, N); got {tuple(router_weight_ED.shape)}, "
            f"{tuple(w1_EDF.shape)}, {tuple(w2_EFD.shape)}"
        )
    devices = {t.device for t in named.values()}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    dtypes = {name: t.dtype for name, t in named.items()}
    if len(set(dtypes.values())) != 1 and not _autocast_enabled(z_TD.device.type):
        raise ValueError(f"dtype mismatch outside autocast: {dtypes}")
    check_top_k(top_k, E)
    if token_mask_T is not None:
        if token_mask_T.dtype != torch.bool or tuple(token_mask_T.shape) != (T,):
            raise ValueError(
                f"token_mask_T must be bool of shape ({T},), got {token_mask_T.dtype} {tuple(token_mask_T.shape)}"
            )
        if token_mask_T.device != z_TD.device:
            raise ValueError(f"token_mask_T is on {token_mask_T.device}, z_TD on {z_TD.device}")
    if balance_p not in BALANCE_MODES:
        raise ValueError(f"balance_p must be one of {BALANCE_MODES}, got {balance_p!r}")


def _empty_output(z_TD, router_weight_ED, w1_EDF, w2_EFD, top_k) -> MoEOutput:
    """T == 0: empty results that still reach every parameter, so backward gives zero grads."""
    E, N = router_weight_ED.shape[0], w2_EFD.shape[2]
    anchor = (z_TD.sum() + router_weight_ED.sum() + w1_EDF.sum() + w2_EFD.sum()) * 0
    acc = reference.routing_dtype(z_TD.dtype)
    dev = z_TD.device
    return MoEOutput(
        h_TD=z_TD.new_zeros(0, N) + anchor.to(z_TD.dtype),
        aux_loss=anchor.to(acc),
        counts_E=torch.zeros(E, dtype=torch.int32, device=dev),
        topk_idx_TK=torch.zeros(0, top_k, dtype=torch.int32, device=dev),
        topk_weight_TK=torch.zeros(0, top_k, dtype=acc, device=dev),
    )


def moe_ffn(
    z_TD: torch.Tensor,
    router_weight_ED: torch.Tensor,
    w1_EDF: torch.Tensor,
    w2_EFD: torch.Tensor,
    *,
    top_k: int,
    token_mask_T: torch.Tensor | None = None,
    balance_p: str = "topk",
    backend: str = "auto",
    compile_recompute: bool = False,
) -> MoEOutput:
    """Routed experts of the MoE adapter: router, top-k, expert MLPs, weighted sum, balance loss.

    z_TD is the normalized token (the router and experts read the same z). Returns `MoEOutput`
    (see reference.py): h_TD in z's dtype, a differentiable aux_loss, and the routing decisions.
    `token_mask_T` (bool) marks real tokens; the others get no expert work and a zero row.
    Under torch.autocast the floating inputs are cast to the autocast dtype. A NaN in a token's z
    makes that token's h and the aux loss NaN; other tokens' rows stay finite (equal to their
    NaN-free values up to rounding: the expert groups change size). Any strides are accepted.
    On the meta device only shapes are computed.
    Under torch.compile the call becomes a custom op (custom_ops.custom_op_moe_ffn); its backward reads saved
    activations on the Triton backend, or recomputes the expert block with `compile_recompute`.
    """
    _check_moe_inputs(z_TD, router_weight_ED, w1_EDF, w2_EFD, top_k, token_mask_T, balance_p)
    device_type = z_TD.device.type
    if device_type == "meta":  # shapes only (sizing a model before materializing it): the exact fake op
        return custom_ops.custom_op_moe_ffn(
            z_TD, router_weight_ED, w1_EDF, w2_EFD, top_k, token_mask_T, balance_p, backend
        )
    if _autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        z_TD, router_weight_ED, w1_EDF, w2_EFD = (t.to(dtype) for t in (z_TD, router_weight_ED, w1_EDF, w2_EFD))
    with torch.autocast(device_type, enabled=False):
        if z_TD.shape[0] == 0:
            return _empty_output(z_TD, router_weight_ED, w1_EDF, w2_EFD, top_k)
        args = (z_TD, router_weight_ED, w1_EDF, w2_EFD, top_k, token_mask_T, balance_p)
        if torch.compiler.is_compiling():  # one opaque custom op, no graph break (custom_ops.custom_op_moe_ffn)
            return custom_ops.custom_op_moe_ffn(*args, backend=backend, recompute=compile_recompute)
        return moe_ffn_implementation(backend, z_TD.device, w1_EDF.shape[0], args)(*args)
