"""What the pipelined Triton IR (TTGIR) and the resource usage of a compiled kernel say about it
on Hopper (sm_90) and the other tensor-core GPUs: pure text and arithmetic, no triton import, so
tests and reports can use it in any process (benchmarks/inspect_sm90.py compiles the kernels and
calls these).
"""

from __future__ import annotations

import re

MIN_STAGES = 3  # stages in flight a Hopper GEMM main loop needs to hide global-memory latency
# Per-SM limits by compute capability (NVIDIA's cccl, cudax arch_traits.cuh; the CUDA C++
# Programming Guide's table): shared memory, the part of it the runtime reserves per block, resident
# threads and blocks. Every part has 64K 32-bit registers per SM, allocated per warp in units of 256.
SM_LIMITS = {
    75: {"shared": 64 * 1024, "reserved": 0, "threads": 1024, "blocks": 16},
    80: {"shared": 164 * 1024, "reserved": 1024, "threads": 2048, "blocks": 32},
    86: {"shared": 100 * 1024, "reserved": 1024, "threads": 1536, "blocks": 16},
    89: {"shared": 100 * 1024, "reserved": 1024, "threads": 1536, "blocks": 24},
    90: {"shared": 228 * 1024, "reserved": 1024, "threads": 2048, "blocks": 32},
}
REGISTERS, REG_UNIT = 65536, 256


def blocks_per_sm(registers: int, num_warps: int, shared_bytes: int, arch: int = 90) -> int | None:
    """Blocks of a kernel that fit on one SM of sm_<arch> at once (the occupancy limit of its
    resources); None for an architecture SM_LIMITS does not hold (not guessed)."""
    if arch not in SM_LIMITS:
        return None
    lim = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // REG_UNIT) * REG_UNIT
    by_regs = REGISTERS // (per_warp * num_warps) if registers else lim["blocks"]
    per_block = shared_bytes + lim["reserved"]
    by_smem = lim["shared"] // per_block if per_block else lim["blocks"]
    by_threads = lim["threads"] // (32 * num_warps)
    return min(by_regs, by_smem, by_threads, lim["blocks"])


def _main_loop(ttgir: str) -> str | None:
    """The body of the innermost scf.for that holds a dot (wgmma, tcgen05 or mma), from the TTGIR text."""
    lines = ttgir.splitlines()
    best = None
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for nxt in lines[i + 1 :]:
            if nxt.strip().startswith("}") and len(nxt) - len(nxt.lstrip()) == indent:
                break
            body.append(nxt)
        text = "\n".join(body)
        holds_dot = re.search(r"ttng\.warp_group_dot |ttng\.tc_gen5_mma |tt\.dot ", text)
        if holds_dot and (best is None or len(text) < len(best)):
            best = text
    return best


def _unconditional(body: str) -> str:
    """The loop body without the blocks of nested scf.if: a persistent kernel's flattened tile
    loop runs its epilogue (and the full wgmma wait before it) only where a tile ends."""
    out, skip_indent = [], None
    for line in body.splitlines():
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if indent == skip_indent and line.strip() == "}":
                skip_indent = None
            continue
        if "scf.if" in line and line.rstrip().endswith("{"):
            skip_indent = indent
            continue
        out.append(line)
    return "\n".join(out)


def _waits_on_own_mma(body: str) -> bool:
    """Whether an iteration waits for the MMA it has just issued. wgmma: a warp_group_dot_wait that
    leaves none pending. tcgen05 (sm_100): a wait_barrier whose operands (`deps`) are the shared
    buffers this iteration's tc_gen5_mma reads; a pipelined loop waits on the previous MMA's."""
    pendings = [int(n) for n in re.findall(r"ttng\.warp_group_dot_wait[^\n]*\{pendings = (\d+)", body)]
    mma = re.search(r"ttng\.tc_gen5_mma (%[\w#]+), (%[\w#]+),", body)
    deps = re.findall(r"ttng\.wait_barrier [^\n]*?deps (%[\w#]+), (%[\w#]+)", body)
    return 0 in pendings or bool(mma and mma.groups() in deps)


def pipeline(ttgir: str) -> dict:
    """Stages in flight, a wait on the MMA just issued and TMA use in a kernel's GEMM main loop."""
    tma = len(re.findall(r"async_tma_copy|tt\.descriptor_load|ttng\.tensormap", ttgir))
    loop = _main_loop(ttgir)
    if loop is None:
        return {"stages": 0, "mma_sync_wait": False, "tma": tma}
    depths = [int(n) for n in re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
    depth = max(depths, default=1)
    waits = [int(n) for n in re.findall(r"ttg\.async_wait[^\n]*\{num = (\d+)", loop)]
    stages = min(depth, min(waits) + 1) if waits else depth
    return {"stages": stages, "mma_sync_wait": _waits_on_own_mma(_unconditional(loop)), "tma": tma}
