"""`python -m adapter.lalm.train` with one micro-batch's loss turned NaN on one rank: run under
torchrun by test_train_fsdp.py. POISON_RANK and POISON_CALL (1-based forward call) pick it."""

import os
import sys

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


if __name__ == "__main__":
    AudioLLM.forward = _poisoned
    sys.exit(train.main())
