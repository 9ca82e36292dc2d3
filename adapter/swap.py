"""Swap an adapter into an existing model in one line, and undo it.

    from adapter.swap import swap_adapter
    handle = swap_adapter(model, "multi_modal_projector", "moe-8c4")      # a dotted path
    handle = swap_adapter(model)                                          # a known projector, by name
    handle = swap_adapter(model, lambda name, m: name.endswith("proj"), "dense")
    handle = swap_adapter(model, adapter="moe-8c4", upcycle=True)              # start from its weights
    handle.undo()                                                         # the originals back

Sizes (in, out), dtype and device come from the module replaced. A module registered under several
names (aliased or tied submodules) is replaced under every one by the same adapter, each listed in
the handle and restored by `undo`. `adapter` is a preset name
(adapter.presets, scaled to the inferred sizes), a config, or a callable (in_dim, out_dim) -> config.

Upcycling (`upcycle=True`, MoE only) starts the MoE adapter from the replaced dense projector so the
swapped model computes what the original did; training then lets the experts diverge. In this
adapter the place of a dense MLP d -> A -> D is the aggregation block (a Linear d -> D: the
projection P). In the parallel layout the experts sit beside P and start silent (random W1, zero
W2). In the serial layout they sit before it in d-space. So:
  - the aggregation block / projection takes the dense weights (biases and activation included),
  - every expert starts as the same exact identity map, E_i(z) = SiLU(z) - SiLU(-z) = z
    (W1_i = [I, -I], W2_i = [I; -I]; needs f >= 2d, the default f = 2d), so h = sum_i G_i z = z
    whatever the router picks,
  - the router starts small random (std `router_std`),
  - a projector without LayerNorms gets `layer_norms=False`; a DenseAdapter's input norm moves to
    the aggregation norm (the MoE's input norm starts as the identity affine).
The swapped output equals the original's up to float rounding (a projector without norms) or
LayerNorm's eps (a DenseAdapter source); tests/adapter/test_swap.py states the measured error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn

from adapter.dense import DenseAdapter, DenseAdapterConfig
from adapter.moe import MoEAdapter, MoEAdapterConfig
from adapter.presets import AdapterConfig, build_adapter, preset

KNOWN_PROJECTORS = {
    "Qwen2AudioForConditionalGeneration": "model.multi_modal_projector",
    "VoxtralForConditionalGeneration": "model.multi_modal_projector",
    "AudioFlamingo3ForConditionalGeneration": "model.multi_modal_projector",
}
"""transformers audio LLMs whose audio projector is one module, by class name. The attribute name is
looked up wherever it sits (`multi_modal_projector` at any depth), so layout changes between
transformers versions do not break the lookup."""

PROJECTOR_NAMES = ("multi_modal_projector",)

FRAME_MASKS = {
    "Qwen2AudioForConditionalGeneration": "feature_attention_mask",
    "AudioFlamingo3ForConditionalGeneration": "input_features_mask",
}
"""Models that call their projector on every encoder frame, padding included, by the forward argument
that says which mel frames are real; their audio tower's `_get_feat_extract_output_lengths` turns
its counts into the projector input's real frames (transformers 5: [1] of what it returns)."""

_ACTIVATION_NAMES = {  # class name of an activation module -> MoEAdapterConfig.activation
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELU": "gelu",
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "ReLU": "relu",
}


@dataclass
class Swap:
    path: str
    original: nn.Module
    adapter: nn.Module


class ForwardScope:
    """Hooks on a model's forward that make each forward one balance-loss scope for the MoE
    adapters swapped into it (MoEAdapter.begin_forward / end_forward): every call of an adapter in
    the forward counts, a forward that skips it leaves no statistics (not the previous step's freed
    graph), and for the FRAME_MASKS models the padded encoder frames are no tokens."""

    def __init__(self, model: nn.Module, adapters: list[MoEAdapter]) -> None:
        self.adapters = adapters
        self.mask_arg = FRAME_MASKS.get(type(model).__name__)
        towers = [m for m in model.modules() if hasattr(m, "_get_feat_extract_output_lengths")]
        self.tower = towers[0] if self.mask_arg and len(towers) == 1 else None
        self.handles = [
            model.register_forward_pre_hook(self._begin, with_kwargs=True),
            model.register_forward_hook(self._end, always_call=True),  # also when the forward raises
        ]

    def _begin(self, module, args, kwargs) -> None:
        lengths_B = None
        mel_mask = kwargs.get(self.mask_arg) if self.tower is not None else None
        if mel_mask is not None:
            lengths_B = self.tower._get_feat_extract_output_lengths(mel_mask.sum(-1))[1]
        for a in self.adapters:
            a.begin_forward(lengths_B)

    def _end(self, module, args, output) -> None:
        for a in self.adapters:
            a.end_forward()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class SwapHandle:
    """What `swap_adapter` replaced: iterate it for `Swap(path, original, adapter)`; `undo()` restores."""

    def __init__(self, model: nn.Module, swaps: list[Swap]) -> None:
        self.model = model
        self.swaps = swaps
        moe = list({id(s.adapter): s.adapter for s in swaps if isinstance(s.adapter, MoEAdapter)}.values())
        self.scope = ForwardScope(model, moe) if moe else None

    def __iter__(self):
        return iter(self.swaps)

    def __len__(self) -> int:
        return len(self.swaps)

    def undo(self) -> None:
        for s in reversed(self.swaps):
            set_module(self.model, s.path, s.original)
        if self.scope is not None:
            self.scope.remove()
            self.scope = None
        self.swaps = []


# ------------------------------------------------------------------------------ module lookup


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if name not in parent._modules:
        raise ValueError(f"{type(parent).__name__} at {parent_path or '<root>'} has no child {name!r}")
    parent._modules[name] = new


def registrations(model: nn.Module, module: nn.Module) -> list[str]:
    """Every path at which `module` is registered in `model`: one per (parent, attribute name), so a
    module reached through an aliased parent counts once. Setting each replaces it everywhere."""
    seen, paths = set(), []
    for path, m in model.named_modules(remove_duplicate=False):
        if m is module and path:
            parent_path, _, name = path.rpartition(".")
            key = (id(model.get_submodule(parent_path) if parent_path else model), name)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def find_projector(model: nn.Module) -> str:
    """The dotted path of the audio projector of a known transformers model (KNOWN_PROJECTORS)."""
    hits = [n for n, _ in model.named_modules() if n.rpartition(".")[2] in PROJECTOR_NAMES]
    if len(hits) == 1:
        return hits[0]
    known = ", ".join(sorted(KNOWN_PROJECTORS))
    raise ValueError(
        f"found {len(hits)} modules named {PROJECTOR_NAMES} in {type(model).__name__} ({hits}); known models: "
        f"{known}. Pass the dotted path (or a predicate) of the module to replace."
    )


def _targets(model: nn.Module, target) -> list[str]:
    if target is None:
        return [find_projector(model)]
    if isinstance(target, str):
        try:
            model.get_submodule(target)
        except AttributeError as exc:
            raise ValueError(f"{type(model).__name__} has no submodule {target!r}: {exc}") from exc
        if not target:
            raise ValueError("cannot replace the root module itself; give a submodule's path")
        return [target]
    if callable(target):
        paths = [n for n, m in model.named_modules() if n and target(n, m)]
        # A match inside another match would be replaced with its parent: keep the outermost.
        paths = [p for p in paths if not any(p.startswith(q + ".") for q in paths)]
        if not paths:
            raise ValueError(f"the predicate matched no module of {type(model).__name__}")
        return paths
    raise ValueError(f"target must be a dotted path, a predicate (name, module) -> bool or None, got {target!r}")


# ------------------------------------------------------------------------------ what is replaced


@dataclass
class DenseStructure:
    """A dense projector seen as: [norm_in] -> Linear d -> A -> act -> Linear A -> D -> [norm_out],
    or a single Linear d -> D (hidden 0, no act)."""

    in_dim: int
    out_dim: int
    hidden: int
    linears: list[nn.Linear]
    activation: str | None
    norms: tuple[nn.LayerNorm, nn.LayerNorm] | None = None


def dense_structure(module: nn.Module) -> DenseStructure | None:
    """The structure of `module` when it is a Linear (or a module whose one child is a Linear), an
    MLP (Linear, activation, Linear as its children in order, like transformers' projectors) or a
    DenseAdapter; None otherwise. Children are assumed to run in registration order, as in every
    known target; the upcycling tests compare outputs to catch a module where that is not so."""
    if isinstance(module, nn.Linear):
        return DenseStructure(module.in_features, module.out_features, 0, [module], None)
    if isinstance(module, DenseAdapter):
        c = module.config
        return DenseStructure(
            c.in_dim, c.out_dim, c.hidden_dim, [module.up, module.down], "silu", (module.norm_in, module.norm_out)
        )
    children = list(module.children())
    if len(children) == 1 and isinstance(children[0], nn.Linear):  # a wrapper, e.g. Qwen2-Audio's projector
        return dense_structure(children[0])
    if len(children) == 3 and isinstance(children[0], nn.Linear) and isinstance(children[2], nn.Linear):
        act = _ACTIVATION_NAMES.get(type(children[1]).__name__)
        if act == "gelu" and getattr(children[1], "approximate", "none") == "tanh":
            act = "gelu_tanh"
        if act is not None and children[0].out_features == children[2].in_features:
            first, last = children[0], children[2]
            return DenseStructure(first.in_features, last.out_features, first.out_features, [first, last], act)
    return None


def infer_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) sizes of a module: an adapter's config, else its first and last Linear-like child."""
    cfg = getattr(module, "config", None)
    if isinstance(cfg, DenseAdapterConfig | MoEAdapterConfig):
        return cfg.in_dim, cfg.out_dim
    linears = [m for m in module.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]
    if not linears:
        raise ValueError(
            f"cannot infer the sizes of {type(module).__name__}: it holds no Linear; pass adapter as a config"
        )
    return linears[0].in_features, linears[-1].out_features


def module_placement(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(iter(module.parameters()), None)
    return (p.dtype, p.device) if p is not None else (torch.get_default_dtype(), torch.device("cpu"))


# ------------------------------------------------------------------------------ upcycling


def upcycle_moe(
    source: nn.Module,
    *,
    num_experts: int = 8,
    top_k: int = 4,
    expert_dim: int | None = None,
    router_std: float = 0.02,
    **overrides,
) -> MoEAdapter:
    """An MoEAdapter computing what the dense projector `source` computes (see the module docstring)."""
    s = dense_structure(source)
    if s is None:
        raise ValueError(
            f"cannot upcycle from {type(source).__name__}: expected an nn.Linear, an MLP whose children are "
            f"Linear, activation ({', '.join(sorted(_ACTIVATION_NAMES))}), Linear, or a DenseAdapter"
        )
    d = s.in_dim
    f = 2 * d if expert_dim is None else expert_dim
    parallel = overrides.get("layout", "serial") == "parallel"
    if f < 2 * d and not parallel:
        raise ValueError(
            f"upcycling the serial layout starts every expert as the identity, which needs expert_dim >= "
            f"2*in_dim={2 * d} (the parallel layout starts them silent and takes any width)"
        )
    # What the projector fixes; a caller's value for one of these must agree with it.
    structure = {
        "in_dim": d,
        "out_dim": s.out_dim,
        "aggregation_dim": s.hidden,
        "layer_norms": s.norms is not None,
        "bias": any(lin.bias is not None for lin in s.linears),
        "activation": s.activation or "silu",
        **({"norm_eps": s.norms[0].eps} if s.norms else {}),
    }
    clash = {k: (v, structure[k]) for k, v in overrides.items() if k in structure and v != structure[k]}
    if clash:
        detail = ", ".join(f"{k}={given!r} (the projector needs {need!r})" for k, (given, need) in clash.items())
        raise ValueError(
            f"cannot upcycle {type(source).__name__} with {detail}: upcycling takes in/out sizes, the "
            "aggregation block, norms, biases and activation from the projector it replaces"
        )
    rest = {k: v for k, v in overrides.items() if k not in structure}
    cfg = MoEAdapterConfig(**structure, expert_dim=f, num_experts=num_experts, top_k=top_k, **rest)
    dtype, device = module_placement(source)
    m = MoEAdapter(cfg).to(device=device, dtype=dtype)
    with torch.no_grad():
        m.w2.zero_()
        if parallel:  # beside the projector: experts start silent (random in, zero out)
            m.w1.normal_(0.0, d**-0.5)
        else:  # before it: every expert starts as the identity
            eye = torch.eye(d, dtype=dtype, device=device)
            m.w1.zero_()
            m.w1[:, :, :d] = eye
            m.w1[:, :, d : 2 * d] = -eye
            m.w2[:, :d, :] = eye
            m.w2[:, d : 2 * d, :] = -eye
            if f > 2 * d:  # spare hidden units: random inputs, zero outputs (no effect now, trainable later)
                m.w1[:, :, 2 * d :].normal_(0.0, d**-0.5)
        m.router.weight.normal_(0.0, router_std)
        if cfg.num_shared_experts:  # shared experts start silent (random in, zero out): h stays z
            m.shared_w2.zero_()
        targets = [m.agg_up, m.agg_down] if s.hidden else [m.proj]
        for dst, src in zip(targets, s.linears, strict=True):
            dst.weight.copy_(src.weight)
            if dst.bias is not None:
                dst.bias.copy_(src.bias) if src.bias is not None else dst.bias.zero_()
        if s.norms is not None:  # z = LN(x) with identity affine; the dense input norm's affine follows
            m.norm_in.reset_parameters()
            m.agg_norm.load_state_dict(s.norms[0].state_dict())
            m.norm_out.load_state_dict(s.norms[1].state_dict())
    return m


# ------------------------------------------------------------------------------ the swap


def _adapter_config(spec, in_dim: int, out_dim: int, overrides: dict) -> AdapterConfig:
    if isinstance(spec, str):
        return preset(spec, in_dim, out_dim, **overrides)
    if isinstance(spec, DenseAdapterConfig | MoEAdapterConfig):
        cfg = dataclasses.replace(spec, **overrides) if overrides else spec
    elif callable(spec):
        cfg = spec(in_dim, out_dim)
    else:
        raise ValueError(f"adapter must be a preset name, a config or a callable, got {spec!r}")
    if (cfg.in_dim, cfg.out_dim) != (in_dim, out_dim):
        raise ValueError(
            f"the adapter config maps {cfg.in_dim} -> {cfg.out_dim} but the module replaced maps {in_dim} -> {out_dim}"
        )
    return cfg


def swap_adapter(
    model: nn.Module,
    target: str | Callable[[str, nn.Module], bool] | None = None,
    adapter: str | AdapterConfig | Callable[[int, int], AdapterConfig] = "moe-8c4",
    *,
    upcycle: bool = False,
    **overrides,
) -> SwapHandle:
    """Replace the module(s) at `target` by adapters (see the module docstring); returns the handle
    that lists and undoes the swaps. `overrides` go to the adapter config (e.g. backend="torch");
    with `upcycle` to `upcycle_moe` (num_experts, top_k, expert_dim, router_std, ...)."""
    # Build every replacement before touching the model: a failure on any target swaps nothing.
    swaps, built = [], {}
    for path in _targets(model, target):
        original = model.get_submodule(path)
        if id(original) in built:  # the same module by another name: its swaps are made already
            continue
        if upcycle:
            s = dense_structure(original)  # None: upcycle_moe says what it takes
            dims = (s.in_dim, s.out_dim) if s is not None else (2, 2)
            new = upcycle_moe(original, **_upcycle_args(adapter, overrides, *dims))
        else:
            in_dim, out_dim = infer_dims(original)
            dtype, device = module_placement(original)
            new = build_adapter(_adapter_config(adapter, in_dim, out_dim, overrides)).to(device=device, dtype=dtype)
        built[id(original)] = new
        # Every name the module is registered under, or a path left with the original would run it.
        swaps += [Swap(alias, original, new) for alias in registrations(model, original)]
    for swap in swaps:
        set_module(model, swap.path, swap.adapter)
    return SwapHandle(model, swaps)


def _upcycle_args(adapter, overrides: dict, in_dim: int, out_dim: int) -> dict:
    """upcycle_moe's arguments. A preset name gives its expert count, top-k and balance-loss
    options, and in the parallel layout its expert width at the projector's sizes (the serial
    layout's identity experts fix f = 2d: a serial preset that asks for another width is refused);
    an explicit MoEAdapterConfig gives every field, and upcycle_moe refuses the ones that disagree
    with the projector (sizes, aggregation block, norms, biases, activation). The caller's
    overrides come last."""
    if isinstance(adapter, str):
        cfg = preset(adapter, in_dim, out_dim)
        if not isinstance(cfg, MoEAdapterConfig):
            raise ValueError(f"upcycling builds an MoE adapter; pass an MoE preset name or config, not {adapter!r}")
        base = {"num_experts": cfg.num_experts, "top_k": cfg.top_k, "balance_p": cfg.balance_p, "layout": cfg.layout}
        standard = preset("moe-8c4", in_dim, out_dim).expert_dim
        if cfg.layout == "parallel":
            base["expert_dim"] = cfg.expert_dim  # the parallel layout's experts start silent: any width
        elif cfg.expert_dim != standard and "expert_dim" not in overrides:
            raise ValueError(
                f"upcycling {adapter!r}: the serial layout starts every expert as the identity, which fixes the "
                f"expert width at f = 2*in_dim = {2 * in_dim}, but the preset asks for f = {cfg.expert_dim} (the "
                f"standard width is {standard}); upcycle {adapter}-parallel, which takes any width, or pass "
                "expert_dim= explicitly"
            )
        if cfg.aux_loss_weight != 1.0:
            base["aux_loss_weight"] = cfg.aux_loss_weight
        return {**base, **overrides}
    if not isinstance(adapter, MoEAdapterConfig):
        raise ValueError(f"upcycling builds an MoE adapter; pass an MoE preset name or config, not {adapter!r}")
    base = dataclasses.asdict(adapter)
    if not adapter.layer_norms:
        base.pop("norm_eps")  # unused without LayerNorms: nothing to agree on
    return {**base, **overrides}
