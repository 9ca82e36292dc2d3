"""`python -m adapter.lalm.train`: train the reference LALM (one process, or under torchrun: DDP, or
FSDP2 with --fsdp). The loop and what it guarantees: adapter/lalm/training/loop.py."""

from __future__ import annotations

import json
import os
import sys

from adapter.cli import run_cli
from adapter.lalm.config import train_config_from_argv
from adapter.lalm.training import loop


def main(argv: list[str] | None = None) -> int:
    cfg = train_config_from_argv(argv, description=loop.__doc__)
    if not cfg.train_manifest:
        raise SystemExit("--train-manifest is required")
    summary = loop.train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if not k.startswith("expert_load")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
