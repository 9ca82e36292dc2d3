"""adapter.environment: what every results file records about where it ran."""

import subprocess
from pathlib import Path

import torch

from adapter.environment import environment, git_sha

ROOT = Path(__file__).resolve().parents[2]


def test_git_sha_of_this_checkout_or_the_one_named(monkeypatch):
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert head.returncode == 0
    assert git_sha().removesuffix("-dirty") == head.stdout.strip()
    monkeypatch.setenv("MOE_ADAPTER_GIT_SHA", "abc1234")  # a copy without .git (the device tool)
    assert git_sha() == "abc1234" and environment("cpu")["git_sha"] == "abc1234"


def test_cpu_environment_names_versions_and_device():
    info = environment(torch.device("cpu"))
    assert info["torch"] == torch.__version__ and info["device"].startswith("CPU: ")
    assert "cuda" not in info and info["date"].endswith("UTC")
    assert info["device_detail"].endswith(f"ATen {torch.backends.cpu.get_cpu_capability()}")


def test_cuda_environment_names_the_architecture(monkeypatch):
    """A GPU results file says which architecture ran (the kernels differ: wgmma, mma.sync, FMA)."""
    from types import SimpleNamespace

    props = SimpleNamespace(major=9, minor=0, multi_processor_count=132, total_memory=141 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    info = environment(torch.device("cuda", 0))
    assert info["device"] == "NVIDIA H200" and info["device_detail"] == "sm_90, 132 SMs, 141 GiB" and "cuda" in info
