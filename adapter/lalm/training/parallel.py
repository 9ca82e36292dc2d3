"""FSDP2 for the reference LALM, and the sharded checkpoints of FSDP runs (torch.distributed.checkpoint).

`--fsdp` (train.py) shards parameters, gradients and AdamW state across the data-parallel ranks
with `torch.distributed.fsdp.fully_shard`: each LLM decoder layer is one unit, the adapter is one,
and the root unit holds the rest that trains (embeddings, final norm, fusion, semantic
embeddings, a trainable encoder). A trainable encoder is sharded in the root unit, not a unit of
its own: a text-only micro-batch has no mel to run it on, and the root is gathered on every rank
for every forward. A frozen encoder is left out (`ignored_params`): its features are computed
once before training and it never runs in a training step. Under autocast (--bf16 on CUDA, --fp16)
the units gather their parameters in that dtype and reduce gradients in fp32 (MixedPrecisionPolicy).

Units run on every rank for every micro-batch: a unit that all-gathers on one rank and not on
another stops the run. So the audio path runs on zero frames for a text-only micro-batch
(AudioLLM.run_audio_path_always), and a parameter left without a gradient is reduced as zero
(set_reduce_scatter_unused_params), DDP's find_unused_parameters for FSDP.

Checkpoints of FSDP runs (`step_N/dcp/`) hold the trained parameters and the optimizer state as
torch.distributed.checkpoint shards keyed by parameter name, so any number of processes reads
them (resume 2 -> 1 or 1 -> 2 processes), and a single process reads them without a process group
(`load_trained`, evaluation). Each rank's RNG state is saved beside them (`rng_<rank>.pt`).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

DCP_DIR = "dcp"


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def decoder_layers(llm: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a transformers causal LM (`get_decoder().layers`)."""
    decoder = llm.get_decoder() if hasattr(llm, "get_decoder") else llm
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(llm).__name__} (expected get_decoder().layers)")
    return list(layers)


def shard_model(model, compute_dtype: torch.dtype | None) -> None:
    """fully_shard the model in place (see the module docstring); the caller then collects its
    (now sharded) parameters for the optimizer. `compute_dtype`: the autocast dtype (None: fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if compute_dtype is not None:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for layer in decoder_layers(model.llm):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model.adapter, mp_policy=mp)
    encoder_frozen = not any(p.requires_grad for p in model.encoder.parameters())
    ignored = set(model.encoder.parameters()) if encoder_frozen else None
    fully_shard(model, mp_policy=mp, ignored_params=ignored)
    model.set_reduce_scatter_unused_params(True)
    model.run_audio_path_always = True


def save_sharded(path: Path, model, optimizer, names: set[str]) -> None:
    """Write the `names` entries of the model's state and the optimizer's state under path/dcp
    (a collective: every rank calls it)."""
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": {n: t for n, t in model_state.items() if n in names}, "optim": optim_state}
    with _single_process_is_intended():
        dcp.save(state, checkpoint_id=path / DCP_DIR, no_dist=_no_dist())


def is_sharded(path: Path) -> bool:
    return (path / DCP_DIR / ".metadata").is_file()


@contextlib.contextmanager
def _single_process_is_intended():
    """One process reading or writing shards is intended (no_dist), not a fallback to warn of."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (load|save) in a single process")
        yield


def _load(state: dict, path: Path) -> None:
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=path / DCP_DIR, no_dist=_no_dist())


def load_sharded(path: Path, model, optimizer, names: set[str]) -> None:
    """Load what save_sharded wrote into a model (sharded or not) and its optimizer, whatever the
    number of processes that wrote it."""
    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": {n: t for n, t in model_state.items() if n in names}, "optim": optim_state}
    _load(state, path)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(strict=False),
    )


def sharded_model_names(path: Path) -> set[str]:
    """Names of the model tensors a sharded checkpoint holds."""
    try:
        meta = dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata()
    except Exception as exc:
        raise ValueError(f"cannot read the sharded checkpoint {path / DCP_DIR}: {exc}") from exc
    return {k.removeprefix("model.") for k in meta.state_dict_metadata if k.startswith("model.")}


def load_sharded_model(path: Path, model, names: set[str]) -> dict[str, torch.Tensor]:
    """The `names` tensors of a sharded checkpoint, read into full tensors of `model`'s shapes (one
    process, no process group needed)."""
    state = {"model": {n: t.clone() for n, t in model.state_dict().items() if n in names}}
    _load(state, path)
    return state["model"]
