"""The MoE adapter (paper eq. 2-5, Table 4) as a drop-in nn.Module, in either reading of Table 4.

    z = N(x)                                   LayerNorm with affine
    r = sum_{i in top-k} G_i W2_i SiLU(W1_i z) routed experts (moe_kernels.moe_ffn)
        + sum_s W2s_s SiLU(W1s_s z)            optional shared experts, always on
    P = Linear(d -> D), or the aggregation block LN -> Linear(d -> A) -> SiLU -> Linear(A -> D)

    layout "serial"   (Table 4's text)     experts d -> f -> d;  y = N(P(r))
    layout "parallel" (Table 4's numbers)  experts d -> f -> D;  y = N(r + P(z)): P is an always-on
                                           shared MLP beside the experts, reading the same z

The serial block counts 99.65M total / 73.44M active at the paper's d = 2560, D = 2048; the
parallel one 94.41M / 70.81M, the paper's own figures and exactly the dense adapter's size.
No biases by default. Routed expert weights are stacked: `w1` (E, d, f) and `w2` (E, f, d or D).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_kernels
from adapter._checks import check_adapter_input, check_field_types, check_positive
from adapter.counts import ParamCounts
from adapter.distributed import global_balance_loss, group_size, local_probability_sums

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
"""Nonlinearities the aggregation block may use (the paper's is SiLU; HF projectors often use GELU)."""

LAYOUTS = ("serial", "parallel")
"""serial: experts d -> f -> d, then P (Table 4's text); parallel: experts d -> f -> D beside P (its numbers)."""
EXPERT_INITS = ("independent", "replicated")
BALANCE_SCOPES = ("local", "global")
ROUTINGS = ("learned", "frozen", "label")
"""learned: the router trains (the paper); frozen: it keeps its random initial weights (a buffer:
sparsity without learned specialization); label: each token is routed among the experts its label
owns (an oracle that routes by the true category)."""
"""local: L_aux over one call's tokens; global: over every data-parallel rank's tokens (adapter/distributed.py)."""


@dataclass(kw_only=True)
class MoEAdapterConfig:
    """Sizes and options of an MoE adapter.

    in_dim d, out_dim D, expert_dim f, aggregation_dim A (0: a plain Linear d -> D),
    num_shared_experts S of width shared_expert_dim (default f), balance_p "topk" (p = G, eq. 8)
    or "softmax" (GShard). aux_loss_weight scales this adapter's term in `total_aux_loss` (0 turns
    the balance loss off, the "w/o EBL" ablation). backend: "auto", "triton", "torch" or "grouped_mm".
    compile_recompute: under torch.compile, recompute the routed-expert forward in backward instead
    of keeping its (T*K, f) activations (the Triton backend keeps them by default; the torch
    backend always recomputes there).
    layout "serial" (experts d -> f -> d, then P) or "parallel" (experts d -> f -> D summed with an
    always-on P(z)); see the module docstring. expert_init "independent" draws every routed expert
    on its own; "replicated" starts them all as copies of one draw, so at initialization the
    routed sum is one MLP whatever the router picks (sparse-upcycling style; the experts then
    diverge through the tokens each one receives). balance_scope "local" computes L_aux over the
    tokens of one call; "global" over the tokens of every rank of a data-parallel run (counts and
    probability sums all-reduced before eq. 10, adapter/distributed.py) when torch.distributed
    runs and the module is in training mode: every rank must then call forward equally often.
    routing "learned" (the paper) trains the router; the two controls of a routing study: "frozen"
    keeps the router at its random initial weights (a buffer, not a parameter), "label" routes each
    token among the experts its label owns: label c of num_labels owns experts [c m, (c + 1) m)
    with m = num_experts // num_labels (top_k <= m), and the router's softmax weighs the top_k of
    them; forward then needs `labels`. Label routing runs the torch reference ops on any device.

    The paper's adapter is the default. Three options let it take the place of a projector of a
    different shape without changing what it computes at initialization (upcycling, adapter/swap.py):
    layer_norms False drops the three LayerNorms (the router then reads x), bias adds biases to the
    projection / aggregation Linears, activation picks the aggregation block's nonlinearity.
    """

    in_dim: int
    out_dim: int
    expert_dim: int
    num_experts: int = 8
    top_k: int = 4
    aggregation_dim: int = 0
    num_shared_experts: int = 0
    shared_expert_dim: int | None = None
    balance_p: str = "topk"
    aux_loss_weight: float = 1.0
    norm_eps: float = 1e-5
    backend: str = "auto"
    compile_recompute: bool = False
    layer_norms: bool = True
    bias: bool = False
    activation: str = "silu"
    layout: str = "serial"
    expert_init: str = "independent"
    balance_scope: str = "local"
    routing: str = "learned"
    num_labels: int = 0

    def __post_init__(self) -> None:
        check_field_types(self)
        check_positive(
            in_dim=self.in_dim,
            out_dim=self.out_dim,
            expert_dim=self.expert_dim,
            num_experts=self.num_experts,
            top_k=self.top_k,
        )
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} > num_experts={self.num_experts}")
        for name in ("aggregation_dim", "num_shared_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.shared_expert_dim is None:
            self.shared_expert_dim = self.expert_dim
        check_positive(shared_expert_dim=self.shared_expert_dim)
        if self.balance_p not in moe_kernels.BALANCE_MODES:
            raise ValueError(f"balance_p must be one of {moe_kernels.BALANCE_MODES}, got {self.balance_p!r}")
        if not (math.isfinite(self.aux_loss_weight) and self.aux_loss_weight >= 0):
            raise ValueError(f"aux_loss_weight must be finite and >= 0, got {self.aux_loss_weight}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):  # inf: every output 0
            raise ValueError(f"norm_eps must be a positive finite number, got {self.norm_eps}")
        if self.backend not in moe_kernels.BACKENDS:
            raise ValueError(f"backend must be one of {moe_kernels.BACKENDS}, got {self.backend!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.expert_init not in EXPERT_INITS:
            raise ValueError(f"expert_init must be one of {EXPERT_INITS}, got {self.expert_init!r}")
        if self.balance_scope not in BALANCE_SCOPES:
            raise ValueError(f"balance_scope must be one of {BALANCE_SCOPES}, got {self.balance_scope!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.routing == "label":
            if not isinstance(self.num_labels, int) or self.num_labels < 1:
                raise ValueError(f"routing 'label' needs num_labels >= 1, got {self.num_labels!r}")
            owned = self.num_experts // self.num_labels
            if self.top_k > owned:
                raise ValueError(
                    f"routing 'label': each of the {self.num_labels} labels owns num_experts // num_labels = "
                    f"{owned} experts, fewer than top_k={self.top_k}"
                )

    @property
    def expert_out_dim(self) -> int:
        """Width of a routed (or shared) expert's output: d in the serial layout, D in the parallel."""
        return self.out_dim if self.layout == "parallel" else self.in_dim

    def param_counts(self) -> ParamCounts:
        d, D, f, E, k = self.in_dim, self.out_dim, self.expert_dim, self.num_experts, self.top_k
        A, S, fs = self.aggregation_dim, self.num_shared_experts, self.shared_expert_dim
        n = self.expert_out_dim
        per_expert = d * f + f * n
        ln = 2 if self.layer_norms else 0
        b = 1 if self.bias else 0
        out = (ln * d + d * A + A * D + b * (A + D)) if A else d * D + b * D
        always_on = ln * d + d * E + S * (d * fs + fs * n) + out + ln * D  # LN, router, shared, P, LN
        return ParamCounts(total=always_on + E * per_expert, active=always_on + k * per_expert)


class MoEAdapter(nn.Module):
    """Sparse MoE projector mapping (..., d) -> (..., D).

    `forward(x, mask=None)` returns a plain tensor. `mask` (bool, x's leading shape) marks real
    tokens: padded ones get no routed-expert work, come out as exact zeros, and are left out of
    the balance statistics. After each forward the module holds:
      aux_loss        differentiable scalar L_aux (eq. 10) of that call
      expert_counts   int32 (E,) tokens routed to each expert in that call
      last_topk_idx   int32 (N, k) experts chosen per flattened token (-1 for padding)
    With balance_scope "global", aux_loss is that of the data-parallel group `balance_group`
    (None: the default group) in training mode, and of this call's tokens in eval mode.
    A NaN in a real token's input makes that token's output and aux_loss NaN; the other tokens'
    outputs stay finite and equal their NaN-free values up to float rounding (the expert groups
    change size); the training loop skips non-finite steps.
    Under torch.export (deployment) the forward is the same and these statistics are not kept.
    """

    def __init__(self, config: MoEAdapterConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        d, E, f, n = c.in_dim, c.num_experts, c.expert_dim, c.expert_out_dim
        self.norm_in = nn.LayerNorm(d, eps=c.norm_eps) if c.layer_norms else nn.Identity()
        self.router = nn.Linear(d, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, d, f))
        self.w2 = nn.Parameter(torch.empty(E, f, n))
        if c.num_shared_experts:
            self.shared_w1 = nn.Parameter(torch.empty(c.num_shared_experts, d, c.shared_expert_dim))
            self.shared_w2 = nn.Parameter(torch.empty(c.num_shared_experts, c.shared_expert_dim, n))
        if c.aggregation_dim:
            self.agg_norm = nn.LayerNorm(d, eps=c.norm_eps) if c.layer_norms else nn.Identity()
            self.agg_up = nn.Linear(d, c.aggregation_dim, bias=c.bias)
            self.agg_down = nn.Linear(c.aggregation_dim, c.out_dim, bias=c.bias)
        else:
            self.proj = nn.Linear(d, c.out_dim, bias=c.bias)
        self.norm_out = nn.LayerNorm(c.out_dim, eps=c.norm_eps) if c.layer_norms else nn.Identity()
        self._act = ACTIVATIONS[c.activation]
        self.reset_expert_parameters()
        if c.routing == "frozen":  # the same random draw as a learned router, never trained
            weight = self.router.weight.detach()
            del self.router.weight
            self.router.register_buffer("weight", weight)
        self.aux_loss: torch.Tensor | None = None
        self.expert_counts: torch.Tensor | None = None
        self.last_topk_idx: torch.Tensor | None = None
        self.balance_group = None
        self._scope: list | None = None  # per call of an open forward scope: (psum_E, counts_E, real tokens)
        self._frame_lengths_B: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        """Copies (copy.deepcopy, AveragedModel / EMA, pickling) leave out the last forward's
        statistics (aux_loss is a node of that forward's graph, which deepcopy cannot copy) and
        the process group (a copy uses the default group)."""
        state = super().__getstate__()
        cleared = dict.fromkeys(("aux_loss", "expert_counts", "last_topk_idx", "balance_group", "_scope"))
        return {**state, **cleared, "_frame_lengths_B": None}

    def begin_forward(self, frame_lengths_B: torch.Tensor | None = None) -> None:
        """Open one forward of a model that may call this adapter several times (per clip, per
        chunk): the statistics are cleared now (a forward that never calls the adapter leaves none,
        not the previous step's), and each call adds its tokens, so aux_loss is the balance loss
        over every real token of the forward's calls and expert_counts / last_topk_idx cover them
        all. `frame_lengths_B`: real frames per sample of a (B, L, d) input the model passes without
        a mask (its padding is then routed nowhere and left out of the statistics). swap_adapter
        opens and closes this around each forward of the model it swapped into."""
        self.aux_loss = self.expert_counts = self.last_topk_idx = None
        self._scope = []
        self._frame_lengths_B = frame_lengths_B

    def end_forward(self) -> None:
        """Close the forward begin_forward opened; the statistics stay for the loss to read."""
        self._scope = None
        self._frame_lengths_B = None

    @torch.no_grad()
    def reset_expert_parameters(self) -> None:
        """nn.Linear's default init, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); with
        expert_init "replicated" every routed expert then copies expert 0."""
        # Draw order w1, shared_w1, w2, shared_w2: a seed gives the same weights as before expert_init.
        for w in (self.w1, getattr(self, "shared_w1", None), self.w2, getattr(self, "shared_w2", None)):
            if w is not None:
                w.uniform_(-(w.shape[1] ** -0.5), w.shape[1] ** -0.5)
        if self.config.expert_init == "replicated":
            self.w1.copy_(self.w1[:1].expand_as(self.w1))
            self.w2.copy_(self.w2[:1].expand_as(self.w2))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        c = self.config
        check_adapter_input(x, mask, c.in_dim, self.w1, "MoEAdapter")
        lengths_B = self._frame_lengths_B
        if mask is None and lengths_B is not None and x.dim() == 3 and x.shape[0] == lengths_B.shape[0]:
            # The model's own frame lengths (swap_adapter): its padded frames are no tokens.
            mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths_B.to(x.device)[:, None]
        labels_T = self._check_labels(x, mask, labels)
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, c.in_dim)
        mask_T = None
        if mask is not None:
            mask_T = mask.reshape(-1)
            # Zero padded rows first: a NaN there would otherwise reach LayerNorm's weight grad.
            x_TD = torch.where(mask_T[:, None], x_TD, 0)
        z_TD = self.norm_in(x_TD)
        out = self.routed_experts(z_TD, mask_T) if labels_T is None else self._label_routed(z_TD, mask_T, labels_T)
        h_TD = out.h_TD
        if c.num_shared_experts:
            h_TD = h_TD + self._shared_experts(z_TD)
        # parallel: the shared MLP reads z beside the experts; serial: P reads the experts' sum.
        pre_TD = h_TD + self._projection(z_TD) if c.layout == "parallel" else self._projection(h_TD)
        # The last op runs at x's shape: the output is no view (FSDP2 warns of views it returns).
        y = self.norm_out(pre_TD.reshape(*lead, c.out_dim))
        if mask is not None:
            y = torch.where(mask[..., None], y, 0)
        if torch.compiler.is_exporting():
            # An exported program is a function of its inputs: it cannot update module attributes
            # (torch.export warns of each tensor assigned), so an export keeps no statistics.
            return y
        self.aux_loss = out.aux_loss
        if c.balance_scope == "global" and self.training and group_size(self.balance_group) > 1:
            psum_E = local_probability_sums(out, z_TD, self.router.weight, c.balance_p)
            num_real = (out.topk_idx_TK[:, 0] >= 0).sum() if out.topk_idx_TK.shape[0] else 0
            # + 0 x the local loss: a rank without tokens still joins the router to the graph (zero grads).
            self.aux_loss = global_balance_loss(psum_E, out.counts_E, num_real, self.balance_group) + 0 * out.aux_loss
        self.expert_counts = out.counts_E.detach()
        self.last_topk_idx = out.topk_idx_TK.detach()
        if self._scope is not None:
            self._add_to_scope(out, z_TD)
        if self.training and x.requires_grad and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._warn_aux_loss_without_grad()
        return y

    def _add_to_scope(self, out: moe_kernels.MoEOutput, z_TD: torch.Tensor) -> None:
        """This call's statistics joined to the open forward scope's earlier calls: L_aux (eq. 10)
        over the union of their real tokens, P_e and f_e means over all of them; expert_counts
        summed and last_topk_idx concatenated in call order (one call: its own, unchanged)."""
        c = self.config
        idx_TK = out.topk_idx_TK.detach()
        num_real = (idx_TK[:, 0] >= 0).sum() if idx_TK.shape[0] else idx_TK.new_zeros((), dtype=torch.long)
        psum_E = local_probability_sums(out, z_TD, self.router.weight, c.balance_p)
        self._scope.append((psum_E, out.counts_E.detach(), num_real, idx_TK))
        if len(self._scope) == 1:
            return
        if c.balance_scope == "global" and self.training and group_size(self.balance_group) > 1:
            raise NotImplementedError(
                "balance_scope='global' with several adapter calls in one forward: the ranks may call it a "
                "different number of times, so their balance losses cannot be joined; use balance_scope='local'"
            )
        psum_E = torch.stack([s[0] for s in self._scope]).sum(0)
        counts_E = torch.stack([s[1] for s in self._scope]).sum(0)
        tokens = torch.stack([s[2] for s in self._scope]).sum().clamp(min=1)
        f_E = (counts_E.to(psum_E.dtype) / tokens).detach()  # f carries no gradient (eq. 9)
        self.aux_loss = c.num_experts * (psum_E / tokens * f_E).sum()
        self.expert_counts = counts_E
        self.last_topk_idx = torch.cat([s[3] for s in self._scope])

    def _warn_aux_loss_without_grad(self) -> None:
        """An input that wants gradients, fed in training mode with gradients disabled: the mark of
        torch.utils.checkpoint(use_reentrant=True), which runs forward so and recomputes it in
        backward, where only the output's gradient flows; the aux_loss the loss reads then never
        reaches the router (the experts may collapse), silently. (A plain no_grad forward of data
        that wants no gradient, e.g. an evaluation left in training mode, is not warned about.)"""
        if self.router.weight.requires_grad and self.config.aux_loss_weight > 0:
            warnings.warn(
                "MoEAdapter: forward in training mode with gradients disabled on an input that requires "
                "grad (torch.utils.checkpoint with use_reentrant=True?): aux_loss carries no gradient "
                "to the router. Pass use_reentrant=False, which keeps it; for inference call .eval().",
                UserWarning,
                stacklevel=2,  # names forward's line: Python's default filter shows it once per process
            )

    def routed_experts(self, z_TD: torch.Tensor, mask_T: torch.Tensor | None) -> moe_kernels.MoEOutput:
        """Router, top-k, routed expert MLPs, weighted sum and balance loss (eq. 2-4, 8-10).
        Benchmarks override this to time other MoE implementations on the same module."""
        c = self.config
        return moe_kernels.moe_ffn(
            z_TD,
            self.router.weight,
            self.w1,
            self.w2,
            top_k=c.top_k,
            token_mask_T=mask_T,
            balance_p=c.balance_p,
            backend=c.backend,
            compile_recompute=c.compile_recompute,
        )

    def _check_labels(self, x, mask, labels) -> torch.Tensor | None:
        """labels (x's leading shape, integer) flattened, checked against routing and num_labels."""
        c = self.config
        if c.routing != "label":
            if labels is not None:
                raise ValueError(f"labels are only read with routing='label'; this adapter's routing is {c.routing!r}")
            return None
        if labels is None:
            raise ValueError("routing='label' routes by each token's label: pass labels (x's leading shape)")
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
        if tuple(labels.shape) != tuple(x.shape[:-1]) or labels.device != x.device:
            raise ValueError(
                f"labels {tuple(labels.shape)} on {labels.device} must have the input's leading shape "
                f"{tuple(x.shape[:-1])} and device {x.device}"
            )
        labels_T = labels.reshape(-1)
        real_T = mask.reshape(-1) if mask is not None else torch.ones_like(labels_T, dtype=torch.bool)
        bad = real_T & ((labels_T < 0) | (labels_T >= c.num_labels))
        if bool(bad.any()):
            raise ValueError(f"labels of real tokens must be in [0, {c.num_labels}); got {labels_T[bad][:5].tolist()}")
        return torch.where(real_T, labels_T, 0)  # padding is routed nowhere; any label keeps its logits finite

    def _label_routed(self, z_TD: torch.Tensor, mask_T: torch.Tensor | None, labels_T: torch.Tensor):
        """routed_experts with each token's choice restricted to the experts its label owns."""
        c = self.config
        ref = moe_kernels.reference
        owned = c.num_experts // c.num_labels
        logits_TE = self.router(z_TD)
        owner_E = torch.arange(c.num_experts, device=z_TD.device) // owned
        logits_TE = logits_TE.masked_fill(owner_E[None, :] != labels_T[:, None], float("-inf"))
        idx_TK, weight_TK = ref.topk_route(logits_TE, c.top_k, mask_T)
        perm = ref.permute(idx_TK, c.num_experts)
        aux = ref.balance_loss(logits_TE, idx_TK, weight_TK, c.num_experts, c.balance_p)
        h_TD = ref.combine(ref.expert_mlp(z_TD, self.w1, self.w2, perm, c.top_k), perm, weight_TK)
        return moe_kernels.MoEOutput(h_TD, aux, perm.counts_E, idx_TK, weight_TK)

    def _projection(self, h_TD: torch.Tensor) -> torch.Tensor:
        """P: the aggregation block (LN -> Linear -> act -> Linear) or a Linear d -> D."""
        if self.config.aggregation_dim:
            return self.agg_down(self._act(self.agg_up(self.agg_norm(h_TD))))
        return self.proj(h_TD)

    def _shared_experts(self, z_TD: torch.Tensor) -> torch.Tensor:
        # sum_s W2s_s SiLU(W1s_s z) is one MLP whose hidden layer concatenates the S experts'.
        S, d, fs = self.shared_w1.shape
        w1_cat = self.shared_w1.permute(1, 0, 2).reshape(d, S * fs)
        w2_cat = self.shared_w2.reshape(S * fs, self.shared_w2.shape[2])
        return F.silu(z_TD @ w1_cat) @ w2_cat

    def param_counts(self) -> ParamCounts:
        """Counted from the weights it computes with, trained or not (a frozen router's weights are a
        buffer, counted as the config counts them); routed experts count k/E of their size as active."""
        frozen_router = 0 if isinstance(self.router.weight, nn.Parameter) else self.router.weight.numel()
        total = sum(p.numel() for p in self.parameters()) + frozen_router
        routed = self.w1.numel() + self.w2.numel()
        per_expert = routed // self.config.num_experts
        return ParamCounts(total=total, active=total - routed + self.config.top_k * per_expert)
