"""The frozen-backbone setting: a text stage trains the LLM first; the audio stage then trains only
the feature fusion and the adapter on a frozen LLM, so the adapter is what two runs differ in.

Text stage (`train_backbone`): the small random Qwen3 learns from text alone
- every corpus item of the training split with its audio replaced by its caption between the
  audio markers (`<|audio_start|> low voice <|audio_end|> Is the voice high or low? ... -> low`):
  the answer words of every task, and to read what stands between the markers;
- the knowledge questions as plain text (text.jsonl: every fact, the held-out ones included, is
  what the backbone knows; their spoken versions in the test split are never heard).
Its weights are written as a transformers directory (`<run>/llm`) that each audio-stage run
loads frozen (`ModelConfig.llm`): the adapter must produce from audio what the LLM reads as the
caption (the spoken question itself, for the knowledge and dictation tasks).

The text-only backbone's own scores on the test split (captions in place of audio; the test
knowledge questions as text) are the one number the audio stage is measured against: the
modality gap of paper Table 1.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from adapter.lalm.config import TrainConfig
from adapter.lalm.data import write_manifest
from adapter.lalm.studies.experiment import ExperimentConfig, train_and_evaluate
from adapter.lalm.training.checkpoint import load_trained
from adapter.lalm.training.runs import RunFolder

BACKBONE = "backbone"  # the text stage's run folder under the experiment's output folder


def caption_records(records: list[dict]) -> list[dict]:
    """Text-only twins of audio items: the caption stands where the audio was."""
    out = []
    for r in records:
        if not r.get("caption"):
            raise ValueError(f"item {r.get('id')!r} has no caption: rebuild the corpus (corpus version >= 7)")
        # "text": the knowledge question as plain text (as text.jsonl has it), the backbone's own number
        keep = ("question", "choices", "answer", "category", "task", "eval", "text")
        twin = {k: r.get(k, "") for k in keep}
        out.append({"id": f"caption-{r['id']}", "audio": None, "context": r["caption"], **twin})
    return out


def caption_manifests(manifests: dict[str, Path]) -> dict[str, Path]:
    """{"train", "val", "test", "text"}: the corpus splits as caption items (captions-<split>.jsonl
    beside the corpus manifests, written atomically) and the text knowledge."""
    out: dict[str, Path] = {"text": Path(manifests["text"])}
    for split in ("train", "val", "test"):
        records = [json.loads(x) for x in Path(manifests[split]).read_text().splitlines() if x.strip()]
        out[split] = Path(manifests[split]).parent / f"captions-{split}.jsonl"
        write_manifest(out[split], caption_records(records))
    return out


def text_stage(cfg: TrainConfig) -> TrainConfig:
    """The text stage trains the LLM only (the adapter never sees audio here, and no semantic
    codebook can be fitted without audio)."""
    model = dataclasses.replace(cfg.model, semantic_codes=0)
    return dataclasses.replace(cfg, train_adapter=False, freeze_llm=False, model=model)


def frozen_llm(llm_dir: str | Path, **model_changes):
    """An `adjust` for train_and_evaluate: the LLM loaded from llm_dir and frozen (the fusion, the
    semantic embeddings and the adapter train), `model_changes` applied to the ModelConfig."""

    def adjust(cfg: TrainConfig) -> TrainConfig:
        model = dataclasses.replace(cfg.model, llm=str(llm_dir), **model_changes)
        return dataclasses.replace(cfg, freeze_llm=True, train_adapter=True, model=model)

    return adjust


def train_backbone(exp: ExperimentConfig, steps: int, manifests: dict[str, Path]) -> dict:
    """Train (or reuse, with exp.run.resume) the text stage in <exp.out>/backbone for `steps` steps and
    export its LLM; returns {"llm": the transformers directory, "eval": its text-only test scores,
    "seconds": training time}."""
    exp = exp.with_(max_steps=steps)
    result = train_and_evaluate(exp, "dense", caption_manifests(manifests), name=BACKBONE, adjust=text_stage)
    run_dir = Path(exp.out) / BACKBONE
    llm_dir = run_dir / "llm"
    stamp = {"step": steps, "eval": str(RunFolder(run_dir).eval)}
    if not (llm_dir / "done.json").is_file() or json.loads((llm_dir / "done.json").read_text()) != stamp:
        tmp = run_dir / "llm.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        load_trained(run_dir).llm.save_pretrained(tmp)
        (tmp / "done.json").write_text(json.dumps(stamp))
        shutil.rmtree(llm_dir, ignore_errors=True)
        tmp.rename(llm_dir)  # a crash before this leaves no half-written backbone under the final name
    return {"llm": llm_dir, "eval": result["eval"], "seconds": result["seconds"]}
