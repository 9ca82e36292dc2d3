"""Test setup: Triton's interpreter must be on before anything imports triton."""

import hashlib
import os
import platform
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (the README's `-n 2`) every worker is a process of its own: give each its
# share of the cores, so two workers' BLAS threads do not spin against each other on a 2-core box.
# Subprocesses the tests start choose their own threads (most pass OMP_NUM_THREADS=1).
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _keep_the_thread_count():
    """A test that pins torch's thread count (the experiment runners' pin_threads) leaves the
    worker's own count to the tests after it."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _cpu_kind() -> str:
    """ATen's vector capability (ATEN_CPU_CAPABILITY included) and a hash of the CPU's feature flags."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor() or platform.machine()
    return f"{torch.backends.cpu.get_cpu_capability().lower()}-{hashlib.sha256(flags.encode()).hexdigest()[:8]}"


# Inductor's FX graph cache (torch 2.13) keys its entries without the CPU vector ISA the C++ was
# generated for, so a cache directory that saw another ISA hands back code for the wrong vector
# width: the compiled adapter returned NaN under ATEN_CPU_CAPABILITY=avx2 after an AVX-512 run,
# and an AVX-512 run after an AVX2 one corrupted the heap (this Xeon, 2026-12-03; a fresh
# directory passes both). Unless the user chose a directory, the tests (and the processes they
# start) use one per kind of CPU, so a cache restored from another machine cannot reach them.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    try:  # torch's default folder (per user); a private helper, so older torch (a lent GPU's) may lack it
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        base = Path(default_cache_dir())
    except ImportError:
        base = Path(tempfile.gettempdir()) / f"torchinductor-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base / f"moe-adapter-tests-{_cpu_kind()}")


# The test files that take longest, longest first (seconds of setup + call summed per file, from
# `--junitxml` of the full suite on the 2-core Xeon, 2026-12-03; every other file took <= 33 s).
# `-n 2 --dist loadfile` hands whole files to the two workers in collection order, which
# pytest-xdist first sorts by test count (`--loadscope-reorder`): these few-test, long files then
# came last and one worker ran them while the other idled (15:25 wall for 23:05 of CPU). Longest
# first, the short files fill in at the end: 11:45 for the same tests, 20:20 of CPU, within the
# hour (with a first cut of this list, read off `--durations`; these times come from that run).
LONGEST_FILES_FIRST = (
    "tests/adapter/lalm/training/test_fsdp.py",  # 283 s, 7 tests: 2-process runs (as test_train_fsdp.py)
    "tests/adapter/lalm/training/test_loop.py",  # 229 s (as test_train.py)
    "tests/benchmarks/test_inspect_sm90.py",  # 118 s: sm_90 compiles
    "tests/moe_kernels/test_functions.py",  # 99 s
    "tests/benchmarks/test_gpu_suite.py",  # 88 s
    "tests/moe_kernels/test_custom_ops.py",  # 79 s
    "tests/moe_kernels/test_grouped_gemm.py",  # 73 s
    "tests/moe_kernels/test_routing.py",  # 47 s
)


def pytest_configure(config):
    """Keep the collection's order under pytest-xdist (above), and fail at once, with the fix, where
    the installed Triton interpreter cannot run the kernels (rather than with hundreds of identical
    TypeErrors from inside Triton)."""
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order set below
        config.option.loadscopereorder = False
    if os.environ["TRITON_INTERPRET"] == "1":
        from moe_kernels.platform import installed_interpreter_incompatibility

        if reason := installed_interpreter_incompatibility():
            raise pytest.UsageError(f"TRITON_INTERPRET=1 tests cannot run: {reason}")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="gpu: needs a CUDA GPU (benchmarks/gpu_suite.sh runs these)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def module_tmp_path(request, tmp_path_factory):
    """A folder for the runs a module's tests share, removed once the module is done unless one of
    its tests failed (what `tmp_path_retention_policy = "failed"` in pyproject.toml does for each
    test's `tmp_path`). Kept to the end of the session, as pytest keeps `tmp_path_factory`'s
    folders, the suite's training runs and checkpoints had filled 6.2 GB of /tmp by its end
    (2026-12-03), and a CI machine with less free disk failed with ENOSPC."""
    failed_before = request.session.testsfailed
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    if request.session.testsfailed == failed_before:
        shutil.rmtree(path, ignore_errors=True)
