"""The training loop of the reference LALM (`python -m adapter.lalm.train --help`; under torchrun:
DDP, or FSDP2 with --fsdp).

Loss (eq. 6): next-token cross-entropy on the answer tokens + lambda * the adapters' balance
losses. One optimizer step consumes `grad_accum x world` micro-batches; every micro-batch's
cross-entropy is divided by the answer tokens of the whole step and its balance loss by the number
of micro-batches that ran the adapters (text-only ones do not), so lambda means the same whatever
the text/audio mix, and a step on R processes equals a step on one process that accumulates the
same micro-batches (tests/adapter/lalm/training/test_loop.py checks it with 2 processes on gloo, with
text-only micro-batches on one rank; test_train_fsdp.py the same under --fsdp). With
--balance-scope global the balance loss of each micro-batch index is taken over all R ranks'
tokens together (adapter/distributed.py). The log's `aux` is the unweighted L_aux (null on a step
without audio), `aux_weighted` what entered the loss before lambda.

Data parallelism: DDP (the default) keeps a full copy of the model and optimizer on every
process; --fsdp shards them (training/parallel.py), reduces gradients once per step (not per
micro-batch), and clips and checks for non-finite values on the norm over all shards.

A run folder holds one run: a fresh run refuses a folder that holds one (unless --overwrite), a
--resume refuses a configuration that differs from the saved one except in logging, evaluation
and checkpoint cadence (and grad_accum where grad_accum x processes is unchanged), and nothing but
the folder's lock file is written before these checks pass. A folder in which a run is training is
refused, naming its process (`RunFolderLock`: a lock the OS drops when that process ends, however
it ends). Loading is strict.

Checkpoints hold what trains (safetensors; with --fsdp, torch.distributed.checkpoint shards that
any number of processes reads), the optimizer, the schedule, the data position and every RNG
state; they are assembled in a temporary folder and renamed into place, so a run killed at any
instant (SIGKILL included) resumes from its last checkpoint and continues with the same losses it
would have logged uninterrupted, on the same or another number of processes. SIGTERM or Ctrl-C
(SIGINT) stops a run cleanly: the step in progress finishes, every rank saves a checkpoint of it and
the program exits 128 + the signal (143, 130) naming the folder; a second signal stops at once.
Under torchrun the launcher passes its SIGTERM on to the workers and kills them 30 s later (torch's
shutdown timeout), so a save longer than that leaves the previous checkpoint the newest. A step
whose loss or gradient is not finite is skipped on every rank, counted and logged; it never reaches
the weights.

Precision: bf16 autocast on CUDA (the default, sm_80 on); --fp16 for GPUs without bf16 (T4, V100):
fp16 autocast with a dynamic loss scale (torch.amp.GradScaler), where a step whose scaled gradients
overflow on any rank is such a skipped step and halves the scale on every rank (logged as
loss_scale; the checkpoints carry it); --no-bf16 trains in fp32.

Reading order: `train` (the loop, one screen), `train_step` (one optimizer step), `_start` (what a
run sets up before its first step). Checkpoints: checkpoint.py; the folder's files: runs.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from adapter.cli import RunFailed, Stopped, stop_requests
from adapter.files import atomic_write_text
from adapter.lalm.assemble import build_model
from adapter.lalm.config import TrainConfig
from adapter.lalm.data import (
    Batch,
    BatchStream,
    DataPosition,
    Example,
    FeatureSource,
    check_categories,
    check_lengths,
    collate,
    length_batches,
    read_manifests,
)
from adapter.lalm.model import AudioLLM
from adapter.lalm.training import parallel
from adapter.lalm.training.checkpoint import (
    Checkpointer,
    checkpoint_disk_shortfall,
    load_checkpoint,
    read_checkpoint_file,
)
from adapter.lalm.training.runs import RunFolder, RunFolderLock, config_differences, step_folders, truncate_log
from adapter.lalm.training.setup import (
    autocast,
    barrier,
    bf16_refusal,
    compute_dtype,
    distributed,
    enable_activation_checkpointing,
    feature_memory_warning,
    fit_semantic,
    param_groups,
    seed_everything,
    set_trainable,
    wsd_schedule,
)
from adapter.stats import moe_adapters


@torch.no_grad()
def evaluate_loss(model: AudioLLM, examples: list[Example], source: FeatureSource, cfg: TrainConfig, device) -> dict:
    """Teacher-forced next-token loss on held-out examples (answer tokens only)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    batches = length_batches(
        examples,
        model.tokenizer,
        max_batch_tokens=cfg.max_batch_tokens,
        max_batch_size=cfg.max_batch_size,
        seed=0,
        epoch=0,
    )
    for idx in batches:
        batch = collate([examples[i] for i in idx], model.tokenizer, source).to(device)
        with autocast(device, cfg):
            out = model(batch)
        total += float(out.ntp_sum)
        tokens += out.num_tokens
    model.train(was_training)
    return {"val_loss": total / max(tokens, 1), "val_tokens": tokens}


def check_run_folder(cfg: TrainConfig, out_dir: Path, previous: Path | None, world: int = 1) -> None:
    """Refuse, before anything is written, a run that would mix with the one already in out_dir.
    A resume may change grad_accum when the micro-batches per step (grad_accum x processes) stay."""
    if previous is not None and not (cfg.resume or cfg.overwrite):
        raise ValueError(
            f"{out_dir} already holds a run ({previous.name}); pass --resume to continue it or "
            "--overwrite to start afresh"
        )
    saved_cfg = out_dir / "config.json"
    if cfg.resume and previous is not None and saved_cfg.is_file():
        saved = json.loads(saved_cfg.read_text())
        state = read_checkpoint_file(previous / "state.json")
        per_step = state.get("micro_batches_per_step", saved.get("grad_accum", 1) * world)
        if per_step != cfg.grad_accum * world:
            raise ValueError(
                f"--resume: a step of the run in {out_dir} consumed {per_step} micro-batches; --grad-accum "
                f"{cfg.grad_accum} on {world} process(es) gives {cfg.grad_accum * world}: pass "
                f"--grad-accum {per_step // world}" + ("" if per_step % world == 0 else f" on a divisor of {per_step}")
            )
        diffs = [d for d in config_differences(saved, cfg) if not d.startswith("grad_accum:")]
        if diffs:
            raise ValueError(
                f"--resume: the configuration differs from the run in {out_dir} ({'; '.join(diffs)}); "
                "resume with the run's own config (--config " + str(saved_cfg) + ") or start afresh elsewhere"
            )


def clear_adapter_stats(adapters) -> None:
    """Forget the last forward's routing statistics, so a micro-batch that never runs an adapter
    (text only) is not credited with the previous one's."""
    for a in adapters:
        a.aux_loss = a.expert_counts = a.last_topk_idx = None


def _stop(ckpt: Checkpointer, state: dict, saved_step, objects, rank, world, signals) -> None:
    """A stop asked for by a signal, at a step boundary: save the steps done (every rank takes part),
    then raise `Stopped`. A step already saved (or a run stopped before its first step) saves nothing."""
    step = state["step"]
    if step and step != saved_step:
        where = ckpt.save(step, *objects, state, rank, world)
        done = f"after step {step}; saved {where}; add --resume to the same command to continue"
    elif step:
        done = f"after step {step}, which {ckpt.root} already holds; add --resume to the same command to continue"
    else:
        done = "before its first step: nothing to save"
    if world > 1:
        dist.destroy_process_group()
    if signals:
        raise Stopped(f"training stopped by {signal.Signals(signals[0]).name} {done}", signals[0])
    raise Stopped(f"training stopped by a signal to another process {done}", signal.SIGTERM)


def refuse_if_busy(busy: str | None, out_dir: Path, world: int, device) -> None:
    """Every rank raises, or none: only rank 0 knows who holds the folder's lock."""
    refused = torch.tensor([int(busy is not None)], device=device)
    if world > 1:
        dist.all_reduce(refused)
    if refused.item():
        raise ValueError(
            f"{out_dir} is in use by another training run ({busy or 'rank 0 found it locked'}); wait "
            "for it to end, stop it, or train elsewhere (--output-dir)"
        )


@dataclasses.dataclass(kw_only=True)
class Run:
    """What a run holds while it trains (set up by `_start`)."""

    cfg: TrainConfig
    folder: RunFolder
    rank: int
    world: int
    device: torch.device
    model: AudioLLM
    net: torch.nn.Module  # the model, or its DDP wrapper
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ckpt: Checkpointer
    source: FeatureSource
    stream: BatchStream
    val_examples: list[Example]
    sharded: bool
    state: dict  # step, skipped, data position, micro-batches per step: what a checkpoint saves
    # Tracked, not read from the folder: every rank must agree whether a stop saves (a collective
    # when sharded), and under DDP only rank 0 writes checkpoints that other nodes may not see.
    saved_step: int | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def adapters(self) -> list:
        return moe_adapters(self.model.adapter)

    @property
    def global_scope(self) -> bool:
        return self.world > 1 and bool(self.adapters) and self.cfg.model.balance_scope == "global"

    def objects(self) -> tuple:
        return self.model, self.optimizer, self.scheduler, self.scaler

    def save(self) -> Path:
        return self.ckpt.save(self.state["step"], *self.objects(), self.state, self.rank, self.world)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns a summary (steps, skipped steps, last losses)."""
    out_dir = Path(cfg.output_dir)
    lock = RunFolderLock(out_dir)
    try:
        return _train(cfg, out_dir, lock)
    finally:  # however training ends, in this process too (a caller may train in the folder again)
        lock.release()


def _train(cfg: TrainConfig, out_dir: Path, lock: RunFolderLock) -> dict:
    """The loop: a step at a time until max_steps, a stop at a step boundary when a signal asks."""
    run = _start(cfg, out_dir, lock)
    from tqdm import tqdm

    bar = tqdm(
        total=cfg.max_steps,
        initial=run.state["step"],
        desc="train",
        disable=not (cfg.progress and run.is_main),
        file=sys.stdout,
    )
    summary: dict = {}
    with stop_requests(announce=run.is_main) as stop_signals:  # SIGINT/SIGTERM: save, then stop
        while run.state["step"] < cfg.max_steps:
            t0 = time.perf_counter()
            micro = [collate(b, run.model.tokenizer, run.source).to(run.device) for b in run.stream.next_step()]
            counts = _step_counts(run, micro, len(stop_signals))
            if int(counts[0]):
                bar.close()
                _stop(run.ckpt, run.state, run.saved_step, run.objects(), run.rank, run.world, stop_signals)
            record = train_step(run, micro, counts, t0)
            step = record["step"]
            # FSDP: every rank takes part in every forward (each all-gathers), so every rank evaluates.
            if cfg.eval_every and step % cfg.eval_every == 0 and run.val_examples and (run.is_main or run.sharded):
                record.update(evaluate_loss(run.model, run.val_examples, run.source, cfg, run.device))
            if run.is_main and (step % cfg.log_every == 0 or record["skipped"] or "val_loss" in record):
                with open(run.folder.log, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                run.save()
                run.saved_step = step
            summary = record
    bar.close()
    return _finish(run, summary)


def _step_counts(run: Run, micro: list[Batch], stops: int) -> torch.Tensor:
    """Summed over the ranks: [stops asked, answer tokens, text positions, then per micro-batch index
    the ranks whose micro-batch holds audio]."""
    audio_pad = run.model.tokenizer.audio_pad_id
    counts = [
        stops,  # a stop asked of any rank stops every rank at this step boundary
        sum(int((b.labels_BL[:, 1:] != -100).sum()) for b in micro),
        sum(int(b.attention_mask_BL.sum()) for b in micro),
        *(int(bool((b.input_ids_BL == audio_pad).any())) for b in micro),  # which micro-batches hold audio
    ]
    counts = torch.tensor(counts, device=run.device)
    if run.world > 1:
        dist.all_reduce(counts)
    return counts


def train_step(run: Run, micro: list[Batch], counts: torch.Tensor, t0: float) -> dict:
    """One optimizer step on this rank's micro-batches (forward and backward of each, the gradient
    norm, the clip, the finite check, the step); returns the step's log record."""
    cfg, world, adapters, scaler = run.cfg, run.world, run.adapters, run.scaler
    global_scope = run.global_scope
    n_answer, n_positions = int(counts[1]), int(counts[2])
    ranks_with_audio = [int(c) for c in counts[3:]]  # per micro-batch index, over the ranks
    n_audio = sum(ranks_with_audio)
    # The balance loss is a mean over the micro-batches that ran the adapters, so lambda means the
    # same whatever share of the step is text-only. Local scope: one loss per (rank, micro-batch).
    # Global scope: one per micro-batch index, over all ranks' tokens; each rank's copy carries R x
    # its share of the gradient (adapter/distributed.py), hence the extra 1/R.
    n_aux = sum(1 for c in ranks_with_audio if c) if global_scope else n_audio
    aux_div = n_aux * world if global_scope else n_audio
    ntp_sum, aux_sum, raw_aux_sum = 0.0, 0.0, 0.0
    loads = [torch.zeros(a.config.num_experts, device=run.device) for a in adapters]
    for i, batch in enumerate(micro):
        clear_adapter_stats(adapters)
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if (world == 1 or last or run.sharded) else run.net.no_sync()
        if run.sharded:  # reduce-scatter the gradients once per step, after the last micro-batch
            run.model.set_requires_gradient_sync(last)
        with sync, autocast(run.device, cfg):
            out = run.net(batch)
            loss = out.ntp_sum / max(n_answer, 1)
            if out.aux_loss is not None and cfg.aux_lambda:
                loss = loss + cfg.aux_lambda * out.aux_loss / aux_div
            scaler.scale(loss * world).backward()  # DDP and FSDP average over ranks: undo it
        ntp_sum += float(out.ntp_sum.detach())
        if out.aux_loss is None:  # text only: the adapter ran on zero frames, or not at all
            continue
        # A global loss is the same on every rank that holds audio: count it once in the log.
        share = 1.0 / ranks_with_audio[i] if global_scope else 1.0
        aux_sum += share * float(out.aux_loss.detach())
        for load, a in zip(loads, adapters, strict=True):
            load += a.expert_counts.to(load)
            raw_aux_sum += share * float(a.aux_loss.detach())
    stats = torch.tensor([ntp_sum, aux_sum, raw_aux_sum], device=run.device, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(stats)
        for load in loads:
            dist.all_reduce(load)
    loss_scale = scaler.get_scale() if cfg.fp16 else None
    scaler.unscale_(run.optimizer)  # the true gradients, for the norm, the clip and the finite check
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if isinstance(grad_norm, DTensor):  # FSDP: the norm over every rank's shards
        grad_norm = grad_norm.full_tensor()
    ntp = float(stats[0]) / max(n_answer, 1)
    # aux: the adapters' balance losses as they enter the loss (each times its aux_loss_weight);
    # aux_raw: unweighted L_aux (eq. 10), logged even when its weight is 0 ("w/o EBL").
    aux = float(stats[1]) / n_aux if n_aux else 0.0
    aux_raw = float(stats[2]) / n_aux if n_aux and adapters else None
    finite = (
        math.isfinite(ntp)
        and math.isfinite(aux)
        and (aux_raw is None or math.isfinite(aux_raw))
        and bool(torch.isfinite(grad_norm))
    )
    state = run.state
    if finite:
        scaler.step(run.optimizer)  # fp16: the gradients are finite, so it steps
    else:
        state["skipped"] += 1
    scaler.update()  # fp16: an overflow (the unscale's finite check, over all ranks) halves the scale
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]
    with warnings.catch_warnings():
        # A skipped step still advances the schedule (the step count does); where the very first
        # step is skipped torch warns of a scheduler step before any optimizer step: intended.
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
        run.scheduler.step()
    state["step"] += 1
    state["position"] = dataclasses.asdict(run.stream.position)
    dt = time.perf_counter() - t0
    record = {
        "step": state["step"],
        "loss": ntp + cfg.aux_lambda * aux,
        "ntp": ntp,
        "aux": aux_raw,
        "aux_weighted": aux if n_audio else None,
        "audio_batches": n_audio,
        "lr": lr,
        "grad_norm": float(grad_norm),
        "answer_tokens": n_answer,
        "tokens_per_s": n_positions / dt,
        "skipped": not finite,
        "skipped_total": state["skipped"],
    }
    if cfg.fp16:
        record["loss_scale"] = loss_scale
    for k, load in enumerate(loads):  # null on a step whose micro-batches were all text-only
        total = load.sum()
        record[f"expert_load_{k}"] = [round(v, 4) for v in (load / total).tolist()] if total > 0 else None
    return record


def _finish(run: Run, summary: dict) -> dict:
    """After the last step: refuse a run that learned nothing, evaluate, write the final checkpoint."""
    cfg, state = run.cfg, run.state
    if state["step"] and state["skipped"] == state["step"]:
        raise RunFailed(
            f"all {state['step']} steps of the run in {run.folder.path} were skipped as non-finite (a NaN or inf "
            "loss or gradient): nothing was learned and no final checkpoint is written; check the "
            "inputs (audio, manifests) and --lr / --aux-lambda"
            + (
                f"; under --fp16 the loss scale fell to {run.scaler.get_scale():g}: when the forward itself overflows "
                "fp16 (an inf loss) no scale mends it: --bf16 (sm_80 on) or --no-bf16 (fp32)"
                if cfg.fp16
                else ""
            )
        )
    final = {}
    if run.val_examples and (run.is_main or run.sharded):
        final = evaluate_loss(run.model, run.val_examples, run.source, cfg, run.device)
        if run.is_main:
            with open(run.folder.log, "a") as fh:
                fh.write(json.dumps({"step": state["step"], "final": True, **final}) + "\n")
    run.save()
    summary = {**summary, **final, "steps": state["step"], "skipped_total": state["skipped"]}
    if run.world > 1:
        dist.destroy_process_group()
    return summary


def _start(cfg: TrainConfig, out_dir: Path, lock: RunFolderLock) -> Run:
    """Everything before the first step: the checks (nothing is written before they pass), the
    model, the features, the optimizer, and the state of a resumed run."""
    rank, world, device = distributed()
    if reason := bf16_refusal(cfg, device):
        raise ValueError(reason)
    is_main = rank == 0
    folder = RunFolder(out_dir)
    # Rank 0 locks a folder that exists before reading what it holds (it may be training there now).
    busy = lock.acquire() if is_main and out_dir.is_dir() else None
    refuse_if_busy(busy, out_dir, world, device)
    ckpt = Checkpointer(out_dir, cfg.keep_checkpoints, sharded=cfg.fsdp, full=cfg.full_checkpoints)
    previous = ckpt.latest()
    check_run_folder(cfg, out_dir, previous, world)
    train_examples = read_manifests(cfg.train_manifest)
    if not train_examples:
        raise ValueError(f"the training manifest(s) {cfg.train_manifest!r} hold no examples")
    val_examples = read_manifests(cfg.val_manifest) if cfg.val_manifest else []
    seed_everything(cfg.seed)
    model = build_model(cfg.model, seed=cfg.seed).to(device)
    check_lengths(train_examples + val_examples, model.tokenizer, model.position_limit)
    if model.routes_by_category:
        check_categories(train_examples + val_examples)
    params = set_trainable(model, cfg)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model.llm)
    # Every rank runs the adapter on every micro-batch (zero frames when text-only): FSDP units
    # and a global balance loss hold collectives in forward.
    model.run_audio_path_always = world > 1
    # Everything is checked: only now does the run touch its folder.
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        busy = lock.acquire()
        if busy is None and ckpt.latest() != previous:  # a run that made the folder since the checks
            busy = "a run that started there meanwhile"
    refuse_if_busy(busy, out_dir, world, device)  # also holds every rank here until rank 0 is done
    latest = previous if cfg.resume else None
    if is_main:
        if cfg.overwrite and not cfg.resume:
            shutil.rmtree(ckpt.root, ignore_errors=True)
        if latest is None:  # a fresh start: no earlier log lines may survive
            folder.log.unlink(missing_ok=True)
        atomic_write_text(folder.config, cfg.to_json())
    source = FeatureSource(
        model.encoder.dims.n_mels,
        encoder=model.encoder if cfg.freeze_encoder else None,
        cache_dir=cfg.feature_cache or None,
    )
    if cfg.freeze_encoder:
        model.encoder.eval()
        heard = train_examples + val_examples
        if is_main and (warning := feature_memory_warning(cfg, heard, model, world)):
            warnings.warn(warning, stacklevel=4)
        source.precompute(heard, progress=cfg.progress and is_main, rank=rank, world=world)
        if cfg.feature_cache:
            barrier(world)  # every process's share is on disk before any reads them
    if latest is None and model.semantic is not None:
        fit_semantic(model, train_examples, source, cfg.seed)  # before sharding: it may run the encoder
    sharded = cfg.fsdp and world > 1
    if sharded:
        parallel.shard_model(model, compute_dtype(cfg, device))
        params = [p for p in model.parameters() if p.requires_grad]  # now sharded DTensors
    optimizer = torch.optim.AdamW(
        param_groups(model, params, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, wsd_schedule(cfg))
    # fp16: the loss is scaled before backward so small gradients do not flush to zero; a step whose
    # scaled gradients overflow is skipped and halves the scale, and 2000 clean steps double it
    # (GradScaler's defaults). Disabled (bf16, fp32), it passes everything through unchanged.
    scaler = torch.amp.GradScaler(device.type, init_scale=cfg.fp16_init_scale, enabled=cfg.fp16)
    if is_main:
        trained, there = sum(p.numel() for p in params), len(step_folders(ckpt.root))
        if short := checkpoint_disk_shortfall(out_dir, trained, cfg.keep_checkpoints, there, cfg.full_checkpoints):
            warnings.warn(short, stacklevel=4)
    per_step = cfg.grad_accum * world
    state = {
        "step": 0,
        "skipped": 0,
        "position": dataclasses.asdict(DataPosition()),
        "micro_batches_per_step": per_step,
    }
    if world > 1:
        dist.barrier()
    if latest is not None:
        if model.semantic is not None:
            model.semantic.fitted.fill_(True)  # the codebook comes from the checkpoint
        state = {**load_checkpoint(latest, model, optimizer, scheduler, rank), "micro_batches_per_step": per_step}
        if cfg.fp16:  # checkpointed with the step: a resume continues at the same scale
            scaler.load_state_dict(state.pop("scaler"))
        if is_main:
            truncate_log(folder.log, state["step"])
            print(f"resumed from {latest} at step {state['step']}", flush=True)

    stream = BatchStream(
        train_examples,
        model.tokenizer,
        max_batch_tokens=cfg.max_batch_tokens,
        max_batch_size=cfg.max_batch_size,
        seed=cfg.seed,
        per_step=per_step,
        rank=rank,
        world=world,
        position=DataPosition(**state["position"]),
    )
    net = model
    if world > 1 and not sharded:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    model.train()
    if cfg.freeze_encoder:
        model.encoder.eval()
    return Run(
        cfg=cfg,
        folder=folder,
        rank=rank,
        world=world,
        device=device,
        model=model,
        net=net,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        ckpt=ckpt,
        source=source,
        stream=stream,
        val_examples=val_examples,
        sharded=sharded,
        state=state,
        saved_step=state["step"] if latest is not None else None,
    )
