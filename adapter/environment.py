"""What a measured number ran on: device, library versions, git sha and date (for results files)."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone

import torch


def environment(device: torch.device | str = "cpu") -> dict[str, str]:
    """{"device", "device_detail", "torch", "triton", "transformers", "python", "date", "git_sha"[, "cuda"]}."""
    device = torch.device(device)
    info = {"torch": torch.__version__}
    for lib in ("triton", "transformers"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            info[lib] = "not installed"
    info["python"] = platform.python_version()
    info["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    info["git_sha"] = git_sha()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device"] = torch.cuda.get_device_name(device)
        sm = f"sm_{props.major}{props.minor}"  # which kernels ran: wgmma, mma.sync or none (README)
        info["device_detail"] = f"{sm}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB"
        info["cuda"] = torch.version.cuda or ""
    else:
        info["device"] = f"CPU: {cpu_model()}"
        # the vector kernels ATen runs (AVX2 on a CPU without AVX-512, or as ATEN_CPU_CAPABILITY says)
        info["device_detail"] = (
            f"{os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads, "
            f"ATen {torch.backends.cpu.get_cpu_capability()}"
        )
    return info


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_sha() -> str:
    """Short sha of this checkout, "-dirty" when it has uncommitted changes. Outside git (the
    device tool copies the working tree without .git) MOE_ADAPTER_GIT_SHA names it, else "unknown"."""
    given = os.environ.get("MOE_ADAPTER_GIT_SHA")
    if given:
        return given
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"
