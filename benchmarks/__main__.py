import sys

from adapter.cli import run_cli
from benchmarks.run import main

sys.exit(run_cli(main, prog="python -m benchmarks"))
