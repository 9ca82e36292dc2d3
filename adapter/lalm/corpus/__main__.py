"""python -m adapter.lalm.corpus --out data/corpus --size demo"""

import argparse
import sys
from dataclasses import replace

from adapter.cli import run_cli
from adapter.lalm.corpus.build import SIZES, build_corpus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m adapter.lalm.corpus",
        description=__import__("adapter.lalm.corpus.build", fromlist=["x"]).__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, help="folder for the audio files and the train/val/test/text manifests")
    p.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="demo",
        help="items per task: ci = 8/2/3 (train/val/test), demo = 150/10/25, full = 2500/100/250",
    )
    p.add_argument("--train-per-task", type=int, help="override the size's training items per task")
    p.add_argument("--val-per-task", type=int, help="override the size's validation items per task")
    p.add_argument("--test-per-task", type=int, help="override the size's test items per task")
    p.add_argument("--seed", type=int, default=0, help="seed of every sentence, question, voice and sound")
    p.add_argument("--workers", type=int, default=4, help="parallel espeak-ng processes")
    p.add_argument("--force", action="store_true", help="rebuild even if the same corpus is cached in --out")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    cfg = replace(
        SIZES[args.size],
        seed=args.seed,
        **{
            k: v
            for k, v in {
                "train_per_task": args.train_per_task,
                "val_per_task": args.val_per_task,
                "test_per_task": args.test_per_task,
            }.items()
            if v is not None
        },
    )
    manifests = build_corpus(args.out, cfg, workers=args.workers, force=args.force)
    for name, path in manifests.items():
        print(f"{name}: {path} ({len(path.read_text().splitlines())} items)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
