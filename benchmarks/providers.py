"""The implementations a benchmark run compares, all on one module's weights and the same inputs.

Shape legend: T tokens, D adapter input width (the paper's d), F expert hidden width, E experts,
K experts per token. FLOPs count matrix products only (2 per multiply-add); LayerNorm, SiLU,
softmax and the permutation are memory-bound and excluded. A backward pass costs twice its forward
(input and weight gradients), so fwd+bwd is 3x.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapter import DenseAdapter, MoEAdapter, preset
from moe_kernels import MoEOutput, reference

LAYOUT_PROVIDERS = ("moe-triton-parallel", "moe-torch-parallel")
"""The parallel reading of Table 4 (preset moe-8c4-parallel: experts d -> f -> D beside the
always-on aggregation MLP, the dense adapter's size) on our kernels and on the torch reference;
the other MoE providers are the serial reading (moe-8c4)."""
MOE_PROVIDERS = (
    "moe-triton",
    "moe-torch",
    "moe-eager-loop",
    "moe-grouped-mm",
    *LAYOUT_PROVIDERS,
    "moe-gmm-backend",
    "moe-auto",
)
PROVIDERS = (*MOE_PROVIDERS, "dense")
"""moe-grouped-mm: the routed experts in plain torch around torch._grouped_mm (a gathered copy of
the rows, torch routing); moe-gmm-backend: our backend="grouped_mm" (Triton router and
permutation, torch._grouped_mm experts); moe-auto: backend="auto", which times its candidates
(the Triton GEMM schedules, grouped_mm, the torch reference) in its first call and runs the fastest: its row says
which (`auto_choice`), and the report checks it is never slower than the fastest other row by
more than their timing spread."""
LEVELS = ("adapter", "block")
"""What a provider's step runs: the whole adapter, or its routed-expert block alone (input
LayerNorm, router, top-k, permutation, expert MLPs, weighted combine, balance loss: the part the
kernels implement; the always-on aggregation MLP, a third of the adapter's FLOPs, is left out)."""


class RoutedBlock(nn.Module):
    """The routed-expert block of an MoE adapter as a module: x (T, d) -> h (T, n)."""

    def __init__(self, adapter: MoEAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        c = adapter.config
        self.config = BlockConfig(c.in_dim, c.expert_out_dim, c.expert_dim, c.num_experts, c.top_k)
        self.aux_loss = self.expert_counts = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z_TD = self.adapter.norm_in(x.reshape(-1, x.shape[-1]))
        out = self.adapter.routed_experts(z_TD, None)
        self.aux_loss, self.expert_counts = out.aux_loss, out.counts_E
        return out.h_TD.reshape(*x.shape[:-1], -1)


@dataclass
class BlockConfig:
    in_dim: int
    out_dim: int  # the experts' output width n
    expert_dim: int
    num_experts: int
    top_k: int


class EagerLoopMoE(MoEAdapter):
    """Routed experts as Hugging Face MoE blocks (e.g. Mixtral) write them: a Python loop over
    experts, `torch.where` on a one-hot mask, gather, expert MLP, `index_add_` back."""

    def routed_experts(self, z_TD: torch.Tensor, mask_T: torch.Tensor | None) -> MoEOutput:
        E, K = self.config.num_experts, self.config.top_k
        logits_TE = self.router(z_TD)
        weights_TE = torch.softmax(logits_TE.float(), dim=-1)
        top_w, top_idx = torch.topk(weights_TE, K, dim=-1)
        top_w = (top_w / top_w.sum(-1, keepdim=True)).to(z_TD.dtype)  # = softmax over the kept k
        out = z_TD.new_zeros(z_TD.shape[0], self.w2.shape[2])  # the experts' output width (d or D)
        expert_mask = F.one_hot(top_idx, E).permute(2, 1, 0)  # (E, K, T)
        for e in range(E):
            slot, tok = torch.where(expert_mask[e])
            if tok.numel() == 0:
                continue
            y = F.silu(z_TD[tok] @ self.w1[e]) @ self.w2[e]
            out.index_add_(0, tok, y * top_w[tok, slot, None])
        idx32 = top_idx.to(torch.int32)
        aux = reference.balance_loss(logits_TE, idx32, top_w.float(), E, self.config.balance_p)
        return MoEOutput(out, aux, reference.expert_counts(idx32, E), idx32, top_w)


class GroupedMMMoE(MoEAdapter):
    """Routed experts through `torch._grouped_mm`: sort pairs by expert, gather a (T*K, D) copy of
    the rows, two grouped GEMMs, weight, and un-permute with a (T, K, D) sum."""

    def routed_experts(self, z_TD: torch.Tensor, mask_T: torch.Tensor | None) -> MoEOutput:
        E, K = self.config.num_experts, self.config.top_k
        T = z_TD.shape[0]
        logits_TE = self.router(z_TD)
        idx_TK, w_TK = reference.topk_route(logits_TE, K, mask_T)
        perm = reference.permute(idx_TK, E)
        tokens_R = perm.sorted_pair_R.long() // K
        x_RD = z_TD[tokens_R]
        offs = perm.offsets_E1[1:].to(torch.int32)
        act_RF = F.silu(torch._grouped_mm(x_RD, self.w1, offs=offs))
        y_RD = torch._grouped_mm(act_RF, self.w2, offs=offs)
        y_TKD = y_RD[perm.pair_row_TK.long().reshape(-1)].view(T, K, -1)
        h_TD = (y_TKD * w_TK[..., None].to(y_TKD.dtype)).sum(1)
        aux = reference.balance_loss(logits_TE, idx_TK, w_TK, E, self.config.balance_p)
        return MoEOutput(h_TD, aux, perm.counts_E, idx_TK, w_TK)


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(can torch._grouped_mm run here, why not): the backend's own check."""
    from moe_kernels.grouped_mm_experts import grouped_mm_unavailable

    why = grouped_mm_unavailable(device, dtype)
    return why is None, why or ""


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why provider `name` cannot run on `device` in `dtype`, or None (decided without building it)."""
    if name in ("moe-triton", "moe-triton-parallel", "moe-gmm-backend") and device.type != "cuda":
        return "GPU only: on CPU the Triton kernels run in the interpreter, a test vehicle"
    if name == "moe-auto" and device.type != "cuda":
        return "GPU only: on CPU backend='auto' is the torch reference (moe-torch)"
    if name == "moe-gmm-backend":
        ok, why = grouped_mm_available(device, dtype)
        return None if ok else why
    if name == "moe-grouped-mm":
        ok, why = grouped_mm_available(device, dtype)
        return None if ok else why
    return None


@dataclass
class Shapes:
    d: int  # adapter input width (paper 2560)
    D: int  # adapter output width (paper 2048)

    def moe_config(self, backend: str, layout: str = "serial"):
        return preset("moe-8c4" if layout == "serial" else "moe-8c4-parallel", self.d, self.D, backend=backend)

    def dense_config(self):
        return preset("dense", self.d, self.D)


def build_providers(shapes: Shapes, device: torch.device, dtype: torch.dtype, seed: int = 0, level: str = "adapter"):
    """{name: module or a reason it cannot run here}. The serial MoE providers share one set of
    weights, the two parallel-layout ones another (their experts' output width differs). At level
    "block" each MoE provider is its routed-expert block (RoutedBlock) and dense is left out."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    bases = {}
    for layout in ("serial", "parallel"):
        torch.manual_seed(seed)
        bases[layout] = MoEAdapter(shapes.moe_config("torch", layout)).to(device, dtype)
    out: dict[str, nn.Module | str] = {}
    classes = {
        "moe-triton": (MoEAdapter, "triton", "serial"),
        "moe-torch": (MoEAdapter, "torch", "serial"),
        "moe-eager-loop": (EagerLoopMoE, "torch", "serial"),
        "moe-grouped-mm": (GroupedMMMoE, "torch", "serial"),
        "moe-triton-parallel": (MoEAdapter, "triton", "parallel"),
        "moe-torch-parallel": (MoEAdapter, "torch", "parallel"),
        "moe-gmm-backend": (MoEAdapter, "grouped_mm", "serial"),
        "moe-auto": (MoEAdapter, "auto", "serial"),
    }
    for name, (cls, backend, layout) in classes.items():
        if why := unavailable_reason(name, device, dtype):
            out[name] = why
            continue
        m = cls(shapes.moe_config(backend, layout)).to(device, dtype)
        m.load_state_dict(bases[layout].state_dict())
        out[name] = RoutedBlock(m) if level == "block" else m
    if level == "block":
        out["dense"] = "the dense adapter has no routed block"
        return out
    torch.manual_seed(seed)
    out["dense"] = DenseAdapter(shapes.dense_config()).to(device, dtype)
    return out


def adapter_flops(module: nn.Module, tokens: int, mode: str) -> float:
    """Matrix-product FLOPs of one call; mode: forward, backward or fwd+bwd."""
    c = module.config
    if isinstance(module, RoutedBlock):
        fwd = 2 * tokens * (c.in_dim * c.num_experts + c.top_k * (c.in_dim + c.out_dim) * c.expert_dim)
    elif isinstance(module, DenseAdapter):
        fwd = 2 * tokens * (c.in_dim * c.hidden_dim + c.hidden_dim * c.out_dim)
    else:
        d, f, n = c.in_dim, c.expert_dim, c.expert_out_dim
        out = (d * c.aggregation_dim + c.aggregation_dim * c.out_dim) if c.aggregation_dim else d * c.out_dim
        shared = c.num_shared_experts * (d + n) * c.shared_expert_dim
        fwd = 2 * tokens * (d * c.num_experts + c.top_k * (d + n) * f + shared + out)
    return {"forward": 1, "backward": 2, "fwd+bwd": 3}[mode] * float(fwd)


def saved_activation_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of what one forward saves for its backward, weights and the input excluded: the
    activation memory a training step holds between forward and backward. Counted from the
    autograd graph (each storage once), so it is the same on any device and needs no allocator."""
    skip = {p.untyped_storage().data_ptr() for p in module.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def make_step(module: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """A no-argument callable doing one `mode` step. backward re-runs the backward of one retained
    forward graph (gradients accumulate; the timers reset them)."""
    dy = torch.randn(*x.shape[:-1], module.config.out_dim, device=x.device, dtype=x.dtype)

    def loss_of(y):
        aux = getattr(module, "aux_loss", None)
        loss = (y.float() * dy.float()).sum()
        return loss if aux is None else loss + 0.01 * aux

    if mode == "forward":
        data = x.detach()  # inference: the input wants no gradient (a wanting one would mean a checkpoint)

        def step():
            with torch.no_grad():
                module(data)

        return step
    if mode == "fwd+bwd":

        def step():
            loss_of(module(x)).backward()

        return step
    if mode == "backward":
        loss = loss_of(module(x))

        def step():
            loss.backward(retain_graph=True)

        return step
    raise ValueError(f"mode must be forward, backward or fwd+bwd, got {mode!r}")
