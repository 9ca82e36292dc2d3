"""The test setup itself: each kind of CPU compiles into an inductor cache of its own (conftest.py)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _cache_dir(**env: str) -> str:
    """TORCHINDUCTOR_CACHE_DIR as tests/conftest.py leaves it in a fresh process with env set."""
    base = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "ATEN_CPU_CAPABILITY")}
    code = "import os, tests.conftest; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_inductor_cache_is_one_per_cpu_kind_unless_chosen(tmp_path):
    scalar, avx2 = _cache_dir(ATEN_CPU_CAPABILITY="default"), _cache_dir(ATEN_CPU_CAPABILITY="avx2")
    assert Path(scalar).name.startswith("moe-adapter-tests-default-")
    assert Path(avx2).name.startswith("moe-adapter-tests-avx2-")
    assert Path(scalar).parent == Path(avx2).parent  # torch's default folder (per user)
    assert _cache_dir(TORCHINDUCTOR_CACHE_DIR=str(tmp_path)) == str(tmp_path)  # the user's choice stands
