"""`python -m adapter.lalm.train` with one non-finite value on one rank, run under torchrun by
test_train_fsdp.py (in one process the tests call `overflow_gradient_shard` themselves).

POISON_RANK picks the rank; then either POISON_CALL (1-based training forward call): that
micro-batch's loss turns NaN, or POISON_UNSCALE (1-based optimizer step, --fp16): one element of
the rank's own gradient shard turns inf just before the loss scaler unscales it, as a scaled
gradient that overflows fp16 in one place does (it then sits in one rank's shard only: the
reduce-scatter sums each element onto the rank that owns it)."""

import os
import sys

import torch

from adapter.lalm import train
from adapter.lalm.model import AudioLLM

_original = AudioLLM.forward
_calls = {"n": 0}


def _poisoned(self, batch):
    out = _original(self, batch)
    if self.training:
        _calls["n"] += 1
        if int(os.environ["RANK"]) == int(os.environ["POISON_RANK"]) and _calls["n"] == int(os.environ["POISON_CALL"]):
            out.ntp_sum = out.ntp_sum * float("nan")
    return out


def overflow_gradient_shard(step: int, patch=setattr) -> None:
    """Make GradScaler.unscale_ find an inf in this process's first non-empty gradient shard on its
    `step`-th call (one per optimizer step); `patch` is setattr or pytest's monkeypatch.setattr."""
    original, calls = torch.amp.GradScaler.unscale_, {"n": 0}

    def unscale_(self, optimizer):
        calls["n"] += 1
        if calls["n"] == step:
            grads = (p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None)
            local = (g.to_local() if hasattr(g, "to_local") else g for g in grads)
            next(g for g in local if g.numel()).view(-1)[0] = float("inf")
        return original(self, optimizer)

    patch(torch.amp.GradScaler, "unscale_", unscale_)


if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")) == int(os.environ["POISON_RANK"]):
        if "POISON_UNSCALE" in os.environ:
            overflow_gradient_shard(int(os.environ["POISON_UNSCALE"]))
        else:
            AudioLLM.forward = _poisoned
    sys.exit(train.main())
