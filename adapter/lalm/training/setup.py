"""What a training run (and a tool that runs a trained model) sets up: seeds, devices and processes,
which parameters train and with which learning rates, the schedule, the autocast dtype, and the
semantic codebook fitted before the first step.
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from adapter.lalm.config import TrainConfig
from adapter.lalm.data import Example, FeatureSource, distinct_clips
from adapter.lalm.model import AudioLLM
from adapter.stats import moe_adapters


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """Where a tool runs a trained model when not told: the GPU training would use, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(name: str | None) -> torch.device:
    """The `--device` of a tool that runs a trained model (evaluate, analysis, diagnose): None is
    default_device(); a device this torch cannot use is refused (ValueError) before any loading."""
    if not name:
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch sees no CUDA GPU (torch {torch.__version__})")
    return device


def add_device_flag(parser) -> None:
    """`--device` for a tool that runs a trained model; read it back with device_from_flag."""
    parser.add_argument(
        "--device", help="where the model runs: cpu, cuda, cuda:1, ... (default: the GPU when there is one, else cpu)"
    )


def device_from_flag(parser, args) -> torch.device:
    """The parsed `--device` (resolve_device); one this torch cannot use is a usage error."""
    try:
        return resolve_device(args.device)
    except ValueError as exc:
        parser.error(str(exc))


def distributed() -> tuple[int, int, torch.device]:
    """(rank, world, device): under torchrun, join the process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def trainable_names(model: AudioLLM, cfg: TrainConfig) -> set[str]:
    """Names of the parameters `cfg` trains (what a checkpoint's model.safetensors holds, with the
    semantic codebook)."""
    parts = []
    if cfg.train_adapter:
        parts += ["adapter", "fusion", "semantic_embed"]
    if not cfg.freeze_encoder:
        parts.append("encoder")
    if not cfg.freeze_llm:
        parts.append("llm")
    return {n for n, _ in model.named_parameters() if n.split(".", 1)[0] in parts}


def set_trainable(model: AudioLLM, cfg: TrainConfig) -> list[torch.nn.Parameter]:
    names = trainable_names(model, cfg)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(model: AudioLLM, params: list[torch.nn.Parameter], cfg: TrainConfig) -> list[dict]:
    """One AdamW group for everything but the MoE routers, whose learning rate is lr x
    router_lr_scale (the schedule's multiplier applies to both); a single group when the scale is
    1, the layout of runs from before the option (their optimizer state then still loads)."""
    if cfg.router_lr_scale == 1.0:
        return [{"params": params}]
    routers = {id(m.router.weight) for m in moe_adapters(model)}
    groups = [
        {"params": [p for p in params if id(p) not in routers]},
        {"params": [p for p in params if id(p) in routers], "lr": cfg.lr * cfg.router_lr_scale},
    ]
    return [g for g in groups if g["params"]]


def wsd_schedule(cfg: TrainConfig):
    """Warmup-Stable-Decay (Wen et al. 2024): linear warmup, flat, linear decay over the last
    `decay_fraction` of the steps to `min_lr_ratio` of the peak. A multiplier of the peak lr."""
    decay_start = cfg.max_steps - int(round(cfg.decay_fraction * cfg.max_steps))

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if step < decay_start:
            return 1.0
        frac = (step - decay_start + 1) / max(1, cfg.max_steps - decay_start)
        return 1.0 - (1.0 - cfg.min_lr_ratio) * min(1.0, frac)

    return factor


def compute_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """What the forward computes in under autocast, or None (fp32): fp16 where asked (on any device:
    it is opt-in), else bf16 on CUDA (the default; ignored on CPU, where it is the slower choice)."""
    if cfg.fp16:
        return torch.float16
    return torch.bfloat16 if cfg.bf16 and device.type == "cuda" else None


def autocast(device, cfg: TrainConfig):
    dtype = compute_dtype(cfg, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def bf16_refusal(cfg: TrainConfig, device: torch.device) -> str | None:
    """Why bf16 autocast cannot train on `device`, or None. Below sm_80 (T4, V100) a GPU has no bf16
    hardware: torch.cuda.is_bf16_supported() still says True there (it tests that a bf16 tensor can
    be made), but matmuls run emulated and cuDNN has no bf16 convolutions; the narrower question is
    is_bf16_supported(including_emulation=False)."""
    if compute_dtype(cfg, device) != torch.bfloat16 or torch.cuda.is_bf16_supported(including_emulation=False):
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return (
        f"--bf16 (the default) on {torch.cuda.get_device_name(device)} (sm_{major}{minor}), which has no bf16 "
        "hardware (sm_80 on): torch would emulate bf16 matmuls at fp32 speed or below and cuDNN has no bf16 "
        "convolutions there; pass --fp16 (fp16 autocast with a loss scale, the tensor cores' format there) or "
        "--no-bf16 (fp32)"
    )


def enable_activation_checkpointing(llm) -> None:
    """Recompute each decoder layer of a transformers LLM in backward. Non-reentrant: the
    reentrant form runs the layer without gradients and loses the gradient of anything read beside
    its output (and needs an input that requires grad: not so with a frozen embedding)."""
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def feature_memory_warning(cfg: TrainConfig, examples: list[Example], model: AudioLLM, world: int) -> str | None:
    """Without --feature-cache every process encodes every clip and keeps all features in memory:
    said when there are several processes, or when that memory is over half of this machine's."""
    if cfg.feature_cache:
        return None
    frames = sum(ex.num_frames for ex in distinct_clips(examples))
    per_process = 4 * model.encoder.stacked_dim * frames
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    if world == 1 and not (ram and per_process > ram / 2):
        return None
    return (
        f"the frozen encoder's features of {frames} frames take {per_process / 2**30:.1f} GiB in memory in each of "
        f"the {world} process(es), every one encoding every clip: --feature-cache DIR (on a filesystem they all "
        "share) keeps them on disk instead, each clip encoded once"
    )


def fit_semantic(
    model: AudioLLM, examples: list[Example], source: FeatureSource, seed: int, max_frames: int = 20000
) -> None:
    """Fit the frozen k-means codebook on (a seeded sample of) the training frames (through the
    encoder at its initial weights when the source feeds mels to a trainable encoder). The sample
    is the rows randperm picks from all clips' frames in order, gathered clip by clip: the frames
    of every clip are never in memory at once."""
    if source.encoder is None:
        source = FeatureSource(source.n_mels, encoder=model.encoder, cache=False)
    audio = [ex for ex in examples if ex.audio is not None]
    if not audio:
        raise ValueError("semantic_codes > 0 needs audio examples to fit the codebook; the training set has none")
    total = sum(ex.num_frames for ex in audio)  # the headers' count: each clip's features have that many rows
    if total <= max_frames:
        model.semantic.fit(torch.cat([source.features(ex) for ex in audio]), seed=seed)
        return
    pick = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_frames]
    frames = torch.tensor([ex.num_frames for ex in audio])
    starts = frames.cumsum(0) - frames
    clip_of = torch.searchsorted(starts, pick, right=True) - 1  # the clip each picked row lies in
    by_clip = torch.argsort(clip_of, stable=True)  # sample positions grouped by clip: one pass over the picks
    feats, first = None, 0
    for clip, count in zip(*torch.unique_consecutive(clip_of[by_clip], return_counts=True), strict=True):
        ex, mine = audio[int(clip)], by_clip[first : first + int(count)]
        first += int(count)
        rows = source.features(ex)
        if rows.shape[0] != ex.num_frames:
            raise ValueError(f"{ex.audio}: its header gives {ex.num_frames} frames, the encoder {rows.shape[0]}")
        feats = feats if feats is not None else rows.new_empty(max_frames, rows.shape[1])
        feats[mine] = rows[pick[mine] - starts[clip]]
    model.semantic.fit(feats, seed=seed)
