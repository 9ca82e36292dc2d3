"""platform.py: the machine facts the kernels and dispatch read (installed versions, tensor-core paths)."""

import pytest

from moe_kernels import platform


@pytest.mark.parametrize(
    "triton_version,numpy_version,broken",
    [
        ("3.6.0", "2.4.6", True),  # torch 2.11's pin with today's numpy: measured broken
        ("3.6.0", "2.3.5", False),  # measured working
        ("3.2.0", "2.4.0", True),
        ("3.7.0", "2.4.6", False),  # the upstream fix
        ("3.9.0", "2.5.2", False),
        ("3.6.0+git4f2a", "2.4.0rc1", True),
    ],
)
def test_interpreter_incompatibility_by_version(triton_version, numpy_version, broken):
    reason = platform.interpreter_incompatibility(triton_version, numpy_version)
    assert (reason is not None) == broken
    if broken:
        assert f"Triton {triton_version}" in reason and f"numpy {numpy_version}" in reason and "#9171" in reason


@pytest.mark.parametrize(
    "arch,want",
    [(70, None), (75, None), (80, "mma.sync"), (89, "mma.sync"), (90, "wgmma"), (100, "tcgen05"), (120, "mma.sync")],
)
def test_triton_mma_path_by_arch(arch, want):
    """What Triton 3.9 compiles tl.dot to (read from its SASS by benchmarks/inspect_sm90 --arch N)."""
    assert platform.triton_mma(arch) == want


@pytest.mark.parametrize("value,want", [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True),
                                        ("0", False), ("false", False), ("off", False), ("", False)])  # fmt: skip
def test_the_interpreter_is_asked_for_as_triton_reads_it(monkeypatch, value, want):
    """Issue 39 item 16: TRITON_INTERPRET=true ran Triton's interpreter but was refused here (the
    values are those Triton 3.9's getenv_bool took in this project's run of it, 2026-12-08)."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert platform.interpreter_requested() is want


def test_an_empty_schedule_variable_is_the_default(monkeypatch):
    from moe_kernels.gemm_config import BUILTIN_SCHEDULE, default_schedule

    monkeypatch.setenv("MOE_ADAPTER_GEMM", "")
    monkeypatch.setenv("MOE_ADAPTER_WGRAD", "")
    assert default_schedule() == BUILTIN_SCHEDULE
