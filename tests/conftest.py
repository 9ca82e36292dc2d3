"""Test setup: Triton's interpreter must be on before anything imports triton."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (the README's `-n 2`) every worker is a process of its own: give each its
# share of the cores, so two workers' BLAS threads do not spin against each other on a 2-core box.
# Subprocesses the tests start choose their own threads (most pass OMP_NUM_THREADS=1).
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_configure(config):
    """Fail at once, with the fix, where the installed Triton interpreter cannot run the kernels
    (rather than with hundreds of identical TypeErrors from inside Triton)."""
    if os.environ["TRITON_INTERPRET"] == "1":
        from moe_kernels.backend import installed_interpreter_incompatibility

        if reason := installed_interpreter_incompatibility():
            raise pytest.UsageError(f"TRITON_INTERPRET=1 tests cannot run: {reason}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="gpu: needs a CUDA GPU (benchmarks/gpu_suite.sh runs these)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
