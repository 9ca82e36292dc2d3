"""Compile every Triton kernel of the MoE forward and backward for Hopper (sm_90) on a machine
without a GPU, and report what the compiler made of it.

The real host wrappers run on CPU tensors with Triton's JIT pointed at a stub sm_90 target; each
launch compiles (with exactly the argument specialization a GPU launch would get: unit strides,
16-divisible sizes and pointers) and is then skipped. Triton's bundled ptxas, cuobjdump and
nvdisasm read the cubins. Nothing runs, so values are never read: this also shows the host path
makes no data-dependent decisions.

Per kernel it prints registers, local-memory (spill) bytes, shared memory, blocks per SM (from
registers, shared memory and threads: sm90_ir.SM_LIMITS, '-' for parts it lacks), and the
instruction mix: the tensor-core instruction the GEMMs compiled to (`mma`: HGMMA, wgmma on sm_90;
HMMA, mma.sync on sm_80-89 and sm_120; UTCHMMA, tcgen05 on sm_100; or FMA: no tensor cores,
Triton's tl.dot below sm_80), LDGSTS (cp.async, with its width) and LDL/STL (spills).
From the Triton IR after pipelining (TTGIR) it reads each GEMM's main loop (the scf.for holding
the dot): stages in flight (the depth of its multi-buffered shared-memory operands, bounded by the
loop's tightest async_wait: a wait for all copies leaves one in flight), whether the loop waits
for its own wgmma to finish (warp_group_dot_wait with pendings = 0: a synchronous main loop), and
whether it uses TMA. `--check` exits 1 when a kernel spills, or a 16-bit GEMM lacks the tensor-core
instruction of its `--arch` (tensor_core_op), or (D and F multiples of 16, sm_80 on) no 128-bit
cp.async; `--check-pipeline` (sm_80 on) also when a GEMM keeps fewer than MIN_STAGES stages in
flight or waits on the MMA it has just issued (wgmma on sm_90, tcgen05 on sm_100).

    python -m benchmarks.inspect_sm90                      # paper shape, bf16
    python -m benchmarks.inspect_sm90 --tokens 512 --check # the small-T tile configs
    python -m benchmarks.inspect_sm90 --arch 80 --check    # an A100
"""

from __future__ import annotations

import os

if "triton" in __import__("sys").modules and os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("inspect_sm90 needs the compiling JIT: run it in a process without TRITON_INTERPRET=1")
os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from adapter.cli import run_cli  # noqa: E402
from benchmarks.sm90_ir import MIN_STAGES, blocks_per_sm, pipeline  # noqa: E402
from moe_kernels.platform import triton_mma  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GEMM_KERNELS = ("_grouped_mm_kernel", "_persistent_mm_kernel", "_wgrad_kernel")
SHOWN_CONSTEXPRS = (
    "EPILOGUE",
    "GATHER_A",
    "GATHER_X",
    "BLOCK_M",
    "BLOCK_N",
    "BLOCK_K",
    "BLOCK_P",
    "BLOCK_Q",
    "BLOCK_T",
    "BLOCK_E",
)


class _StubTarget:
    """Just enough of a Triton driver for the JIT to compile for a GPU it cannot see."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def tensor_core_op(arch: int) -> str | None:
    """The SASS instruction a 16-bit tl.dot becomes on sm_<arch> (platform.triton_mma's path):
    HGMMA (wgmma), UTCHMMA (tcgen05), HMMA (mma.sync); None below sm_80, where Triton lowers
    tl.dot to FFMA (triton-lang/triton#5066; sm_75: 4096 FFMA)."""
    return {"wgmma": "HGMMA", "tcgen05": "UTCHMMA", "mma.sync": "HMMA"}.get(triton_mma(arch))


def _bin(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def analyse(name: str, kernel, constexprs: dict) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([_bin("nvdisasm"), f.name], capture_output=True, text=True).stdout
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", res))
    ops = collections.Counter(re.findall(r"\b(HGMMA|HMMA|UTCHMMA|FFMA|LDGSTS|LDL|STL)\b", sass))
    ldgsts_widths = sorted({int(w) for w in re.findall(r"LDGSTS\S*?\.(\d+)\b", sass)}) or (
        [32] if ops["LDGSTS"] else []
    )
    return {
        "kernel": name,
        "config": {
            k: (str(v) if not isinstance(v, (int, bool)) else v) for k, v in constexprs.items() if k in SHOWN_CONSTEXPRS
        },
        "num_warps": kernel.metadata.num_warps,
        "num_stages": kernel.metadata.num_stages,
        "registers": int(usage.get("REG", 0)),
        "spill_bytes": int(usage.get("STACK", 0)) + int(usage.get("LOCAL", 0)),
        "shared_bytes": kernel.metadata.shared,
        "mma": {op: ops[op] for op in ("HGMMA", "HMMA", "UTCHMMA") if ops[op]},  # tensor-core instructions
        "ffma": ops["FFMA"],
        "cp_async": ops["LDGSTS"],
        "cp_async_bits": max(ldgsts_widths) if ldgsts_widths else 0,
        "ldl_stl": ops["LDL"] + ops["STL"],
        "blocks_per_sm": blocks_per_sm(
            int(usage.get("REG", 0)), kernel.metadata.num_warps, kernel.metadata.shared, kernel.metadata.target.arch
        ),
        **pipeline(kernel.asm["ttgir"]),
    }


def compile_all(tokens: int, d: int, f: int, experts: int, top_k: int, dtype: torch.dtype, arch: int) -> list[dict]:
    """Run moe_ffn forward + backward through the real wrappers with every launch compile-only."""
    driver.set_active(_StubTarget(arch))
    seen: list[dict] = []
    original_run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        seen.append(analyse(self.fn.__name__, kernel, kwargs))

    JITFunction.run = compile_only
    try:
        from moe_kernels import functions

        z = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
        wr = torch.randn(experts, d, dtype=dtype, requires_grad=True)
        w1 = torch.randn(experts, d, f, dtype=dtype, requires_grad=True)
        w2 = torch.randn(experts, f, d, dtype=dtype, requires_grad=True)
        out = functions.triton_moe_ffn(z, wr, w1, w2, top_k)
        (out.h_TD.float().sum() + out.aux_loss).backward()
    finally:
        JITFunction.run = original_run
    return seen


def problems(
    rows: list[dict], dtype: torch.dtype, aligned: bool, check_pipeline: bool = False, arch: int = 90
) -> list[str]:
    """Spills anywhere; for 16-bit GEMMs no tensor-core instruction of `arch` (tensor_core_op), or
    (widths multiples of 16, sm_80 on) no 128-bit cp.async; with check_pipeline, GEMM main loops
    with fewer than MIN_STAGES stages or a synchronous wgmma wait."""
    want = tensor_core_op(arch)
    found = []
    for r in rows:
        label = f"{r['kernel']} {r['config']}"
        if check_pipeline and r["kernel"] in GEMM_KERNELS:
            if r["stages"] < MIN_STAGES:
                found.append(f"{label}: {r['stages']} stage(s) in flight in the main loop (< {MIN_STAGES})")
            if r["mma_sync_wait"]:
                found.append(f"{label}: the main loop waits for the MMA it has just issued")
        if r["spill_bytes"] or r["ldl_stl"]:
            found.append(f"{label}: spills {r['spill_bytes']} B ({r['ldl_stl']} LDL/STL)")
        if r["kernel"] in GEMM_KERNELS and dtype != torch.float32:
            if want is None:
                found.append(
                    f"{label}: no tensor cores on sm_{arch} ({r['ffma']} FFMA): Triton lowers tl.dot to FMA below "
                    "sm_80 (triton-lang/triton#5066); backend='auto' runs the torch reference on such GPUs"
                )
                continue
            if not r["mma"].get(want):
                found.append(f"{label}: no {want} (tensor-core) instructions for sm_{arch}")
            if aligned and r["cp_async_bits"] < 128 and not r["tma"]:  # TMA copies are the bulk path
                found.append(f"{label}: no 128-bit cp.async (widest {r['cp_async_bits']} bit)")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="T, tokens per call (picks the GEMM tile config)")
    p.add_argument("--d", type=int, default=2560, help="D, token width (paper: 2560)")
    p.add_argument("--f", type=int, default=1280, help="F, expert hidden width (paper: 1280)")
    p.add_argument("--experts", type=int, default=8, help="E, number of experts")
    p.add_argument("--top-k", type=int, default=4, help="K, experts per token")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="input dtype")
    p.add_argument("--arch", type=int, default=90, help="compute capability x10 to compile for (90 = Hopper)")
    p.add_argument("--json", type=Path, help="also write the table as JSON here")
    p.add_argument("--check", action="store_true", help="exit 1 on spills, or 16-bit GEMMs without wgmma/cp.async")
    p.add_argument(
        "--check-pipeline",
        action="store_true",
        help=f"with --check, also exit 1 when a GEMM main loop keeps < {MIN_STAGES} stages in flight or waits on its "
        "own MMA (wgmma on sm_90, tcgen05 on sm_100; mma.sync on sm_80-89/120 reads stages only)",
    )
    args = p.parse_args(argv)
    if args.check_pipeline and tensor_core_op(args.arch) is None:
        p.error(f"--check-pipeline reads tensor-core GEMM pipelines (sm_80 on), got --arch {args.arch}")
    dtype = DTYPES[args.dtype]
    rows = compile_all(args.tokens, args.d, args.f, args.experts, args.top_k, dtype, args.arch)
    print(
        f"sm_{args.arch} compile of moe_ffn fwd+bwd, {args.dtype}, T={args.tokens} D={args.d} F={args.f} "
        f"E={args.experts} K={args.top_k} (triton {triton.__version__}, no GPU needed)"
    )
    header = (
        f"{'kernel':24s} {'regs':>4s} {'spill':>5s} {'smem':>6s} {'blk/SM':>6s} {'mma':>9s} {'cp.async':>8s} "
        f"{'stages':>6s} {'sync':>4s} {'tma':>3s}  config"
    )
    print(header)
    for r in rows:
        cp = f"{r['cp_async']}x{r['cp_async_bits']}b" if r["cp_async"] else "-"
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items())
        gemm = r["kernel"] in GEMM_KERNELS
        stages, sync = (str(r["stages"]), "yes" if r["mma_sync_wait"] else "no") if gemm else ("-", "-")
        mma = ",".join(f"{n}x{op}" for op, n in r["mma"].items()) or ("FMA" if gemm and r["ffma"] else "-")
        blocks = "-" if r["blocks_per_sm"] is None else str(r["blocks_per_sm"])
        print(
            f"{r['kernel']:24s} {r['registers']:4d} {r['spill_bytes']:5d} {r['shared_bytes']:6d} "
            f"{blocks:>6s} {mma:>9s} {cp:>8s} {stages:>6s} {sync:>4s} {r['tma']:3d}  "
            f"w{r['num_warps']} s{r['num_stages']} {cfg}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    aligned = args.d % 16 == 0 and args.f % 16 == 0
    found = problems(rows, dtype, aligned=aligned, check_pipeline=args.check_pipeline, arch=args.arch)
    for line in found:
        print("PROBLEM:", line)
    return 1 if (args.check and found) else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
