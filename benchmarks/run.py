"""Benchmark entry point: `python -m benchmarks --help`.

Times every provider (benchmarks/providers.py) on the same weights and inputs, for each mode,
token count, routing pattern and dtype of a plan, plus kernel-level figures on a GPU, and writes
CSV, JSON, a markdown summary and a plot under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapter.cli import run_cli
from adapter.environment import environment
from benchmarks import report
from benchmarks.providers import (
    LEVELS,
    MOE_PROVIDERS,
    PROVIDERS,
    Shapes,
    adapter_flops,
    build_providers,
    make_step,
    saved_activation_bytes,
    unavailable_reason,
)
from benchmarks.routing_patterns import ROUTINGS, make_tokens, set_router
from benchmarks.timing import (
    CEILING_CPU_BUDGET_S,
    datasheet_for,
    measured_copy_gbs,
    measured_matmul_tflops,
    peak_memory_gpu,
    time_cpu_interleaved,
    time_gpu,
)
from moe_kernels.auto import last_auto_choice


def progress_bar(total: int, desc: str, enabled: bool):
    """tqdm's bar, or a silent stand-in where tqdm is not installed (a bare GPU box): numbers
    first, the bar is optional."""
    try:
        from tqdm import tqdm
    except ImportError:
        if enabled:
            print(f"{desc}: no progress bar (tqdm is not installed)", flush=True)
        enabled = False
        tqdm = None
    if not enabled:
        return _NoBar()
    return tqdm(total=total, desc=desc, file=sys.stdout)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MODES = ("forward", "backward", "fwd+bwd")


@dataclass
class Case:
    dtype: str
    routing: str
    tokens: int
    modes: tuple[str, ...]


@dataclass
class Plan:
    """What one run measures. `d`/`D` are the adapter widths (paper: 2560 / 2048)."""

    d: int
    D: int
    cases: list[Case] = field(default_factory=list)
    kernels: bool = False
    level: str = "adapter"  # providers.LEVELS: the whole adapter, or the routed-expert block alone
    # Seconds of CPU timer rounds per case and per ceiling; None: the defaults below. The smoke
    # plan sets 0 (the timer's minimum rounds): it checks that everything runs, not how fast.
    cpu_budget_s: float | None = None

    def case_budget_s(self) -> float:
        """Enough rounds for a stable median on a 2-core CPU: 2 s below d = 512, 6 s at the paper's."""
        if self.cpu_budget_s is not None:
            return self.cpu_budget_s
        return 2.0 if self.d < 512 else 6.0

    def ceiling_budget_s(self) -> float:
        return CEILING_CPU_BUDGET_S if self.cpu_budget_s is None else self.cpu_budget_s


def _plan(name: str) -> Plan:
    if name == "gpu":  # paper shapes (Table 4), bf16 sweep + skewed routing + an fp32 check
        cases = [Case("bfloat16", "uniform", t, MODES) for t in (1024, 4096, 8192, 16384, 65536)]
        cases += [Case("bfloat16", r, t, ("fwd+bwd",)) for r in ("zipf", "one") for t in (8192, 65536)]
        cases += [Case("float32", "uniform", t, ("fwd+bwd",)) for t in (1024, 8192)]
        return Plan(2560, 2048, cases, kernels=True)
    if name == "gpu-block":  # the routed-expert block alone at paper shapes: the kernels' own targets
        cases = [Case("bfloat16", "uniform", t, ("fwd+bwd",)) for t in (8192, 16384, 65536)]
        cases += [Case("bfloat16", "zipf", 65536, ("fwd+bwd",))]
        return Plan(2560, 2048, cases, level="block")
    if name == "cpu":  # paper shapes / 10, what a 2-core CPU finishes in a few minutes
        cases = [Case("float32", "uniform", t, MODES) for t in (1024, 4096)]
        cases += [Case("float32", r, 4096, ("fwd+bwd",)) for r in ("zipf", "one")]
        return Plan(256, 192, cases)
    if name == "layouts":  # paper shapes on a CPU: dense vs serial vs parallel, fwd+bwd, in minutes
        return Plan(2560, 2048, [Case("float32", "uniform", 512, ("fwd+bwd",))])
    if name == "smoke":  # seconds: checks that the whole pipeline runs, so the timer's minimum rounds
        cases = [Case("float32", "uniform", 256, ("forward", "fwd+bwd")), Case("float32", "one", 256, ("fwd+bwd",))]
        return Plan(64, 48, cases, cpu_budget_s=0.0)
    raise ValueError(f"unknown plan {name!r}")


def _clear_grads(params) -> None:
    for p in params:
        p.grad = None


def _load_imbalance(module) -> float | None:
    counts = getattr(module, "expert_counts", None)
    if counts is None:
        return None
    c = counts.double()
    return (c.max() / c.mean()).item() if c.sum() > 0 else None


def _row(name: str, mode: str, case: Case, plan: Plan) -> dict:
    return {
        "provider": name,
        "mode": mode,
        "tokens": case.tokens,
        "routing": case.routing,
        "dtype": case.dtype,
        "d": plan.d,
        "D": plan.D,
        "level": plan.level,
    }


def run_adapter_benchmarks(
    plan: Plan,
    device: torch.device,
    providers: list[str],
    ceilings: dict,
    progress: bool = True,
    *,
    events: bool | None = None,
    deadline: float | None = None,
    on_case: Callable[[list[dict], int], None] | None = None,
) -> list[dict]:
    """One row per (case, mode, provider). `events`: time with CUDA events and record peak memory
    (default: on CUDA). `deadline` (time.monotonic()): cases not started by then are reported as
    not run, so a run that must end in time still writes what it measured. `on_case(rows, n)` is
    called after the n-th case is measured (the entry point writes partial results there)."""
    events = device.type == "cuda" if events is None else events
    rows: list[dict] = []
    sheet = datasheet_for(environment(device)["device"]) if device.type == "cuda" else None
    total = sum(len(c.modes) for c in plan.cases)
    bar = progress_bar(total, "adapter benchmarks", progress)
    built: dict[str, dict] = {}
    # The cases that judge the targets run first, so a run stopped by its time budget (a lent GPU's
    # minutes) has measured those; the rows are kept in the plan's order (in_plan_order).
    first = sorted(plan.cases, key=lambda c: not report.judged(c.dtype, c.tokens))
    for number, case in enumerate(first, 1):
        if deadline is not None and time.monotonic() >= deadline:
            rows += [
                _row(n, mode, case, plan) | {"status": "not run: time budget spent"}
                for mode in case.modes
                for n in providers
            ]
            bar.update(len(case.modes))
            continue
        dtype = DTYPES[case.dtype]
        if case.dtype not in built:
            built.clear()  # one dtype's modules at a time
            gc.collect()
            built[case.dtype] = build_providers(Shapes(plan.d, plan.D), device, dtype, level=plan.level)
        mods = {n: m for n, m in built[case.dtype].items() if n in providers}
        x, u = make_tokens(case.tokens, plan.d, device, dtype)
        moe_mods = [getattr(m, "adapter", m) for n, m in mods.items() if n in MOE_PROVIDERS and not isinstance(m, str)]
        if moe_mods:
            set_router(moe_mods, u, x, case.routing)
        x.requires_grad_(True)
        for mode in case.modes:
            runnable = {n: m for n, m in mods.items() if not isinstance(m, str)}
            steps, errors = {}, {}
            auto_choice = None  # the candidate backend="auto" ran in this mode (chosen in its first call)
            for n, m in runnable.items():
                try:
                    steps[n] = make_step(m, x, mode)
                    steps[n]()
                    if n == "moe-auto" and (last := last_auto_choice()):
                        auto_choice = last[1]
                except Exception as exc:  # an OOM or unsupported case is reported, not fatal
                    errors[n] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                    steps.pop(n, None)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            params = [p for m in runnable.values() for p in m.parameters()] + [x]
            reset = functools.partial(_clear_grads, params)
            timings, peaks = {}, {}
            if events:
                for n, fn in steps.items():
                    timings[n] = time_gpu(fn, grad_to_none=params)
                    reset()
                    peaks[n] = peak_memory_gpu(fn)
                    reset()
            else:
                timings = time_cpu_interleaved(steps, reset=reset, budget_s=plan.case_budget_s())
            for n in providers:
                m = mods.get(n)
                row = _row(n, mode, case, plan)
                if isinstance(m, str) or m is None:
                    row["status"] = f"not run: {m or 'not selected'}"
                elif n in errors:
                    row["status"] = f"failed: {errors[n]}"
                else:
                    t = timings[n]
                    flops = adapter_flops(m, case.tokens, mode)
                    tflops = flops / (t.median_ms * 1e-3) / 1e12
                    row.update(
                        status="ok",
                        median_ms=t.median_ms,
                        p20_ms=t.p20_ms,
                        p80_ms=t.p80_ms,
                        reps=t.reps,
                        tokens_per_s=case.tokens / (t.median_ms * 1e-3),
                        tflops=tflops,
                        pct_datasheet=(100 * tflops / sheet[case.dtype]) if sheet else None,
                        pct_measured_mm=100 * tflops / ceilings["matmul_tflops"][case.dtype]
                        if case.dtype in ceilings["matmul_tflops"]
                        else None,
                        peak_mem_mb=peaks[n] / 2**20 if n in peaks else None,
                        saved_mb=saved_activation_bytes(m, x) / 2**20 if mode == "fwd+bwd" else None,
                        load_max_over_mean=_load_imbalance(m) if n in MOE_PROVIDERS else None,
                    )
                    if n == "moe-auto":
                        row["auto_choice"] = auto_choice
                rows.append(row)
            del steps
            bar.update(1)
        del x
        if on_case is not None:
            on_case(in_plan_order(rows, plan), number)
    bar.close()
    rows = in_plan_order(rows, plan)
    report.add_dense_ratios(rows)
    return rows


def in_plan_order(rows: list[dict], plan: Plan) -> list[dict]:
    """The rows sorted by their case's place in the plan (stable: modes and providers keep their order)."""
    place = {(c.dtype, c.routing, c.tokens): i for i, c in enumerate(plan.cases)}
    return sorted(rows, key=lambda r: place[(r["dtype"], r["routing"], r["tokens"])])


def unavailable_providers(providers: list[str], plan: Plan, device: torch.device) -> dict[str, str]:
    """{provider: why} for the selected providers that can run in none of the plan's dtypes on
    `device` (a provider that runs in some dtypes gets per-case 'not run' rows for the others)."""
    out = {}
    for n in providers:
        reasons = [unavailable_reason(n, device, DTYPES[dt]) for dt in sorted({c.dtype for c in plan.cases})]
        if reasons and all(reasons):
            out[n] = reasons[0]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--plan",
        choices=["gpu", "gpu-block", "cpu", "layouts", "smoke"],
        default=None,
        help="what to measure: gpu = paper shapes, bf16 + fp32, T 1k..64k (default on CUDA); gpu-block = the "
        "routed-expert block alone, bf16, fwd+bwd, T 8k..64k; "
        "cpu = paper shapes / 10, fp32 (default without CUDA); layouts = paper shapes, fp32, T 512, "
        "fwd+bwd (dense vs serial vs parallel MoE on a CPU, minutes); smoke = seconds, for tests",
    )
    p.add_argument(
        "--providers",
        nargs="+",
        choices=PROVIDERS,
        default=list(PROVIDERS),
        help="implementations to time (default: all)",
    )
    p.add_argument("--tokens", type=int, nargs="+", help="override the plan's token counts")
    p.add_argument(
        "--level",
        choices=LEVELS,
        default=None,
        help="time the whole adapter or only its routed-expert block (router, permutation, experts, combine); "
        "default: the plan's",
    )
    p.add_argument("--routing", choices=ROUTINGS, nargs="+", help="keep only these routing patterns")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel-level benchmarks (GPU)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results",
        help="folder for the CSV / JSON / markdown / PNG results",
    )
    p.add_argument(
        "--tag", default=None, help="results file name stem (default: device and date, numbered when already there)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run with this --tag")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="stop starting new measurements this many seconds after start; what did not start is "
        "reported as not run (results are also rewritten after every case, so a killed run keeps them)",
    )
    args = p.parse_args(argv)
    if args.tokens and min(args.tokens) <= 0:
        p.error(f"--tokens must all be > 0, got {args.tokens}")
    if args.budget_s is not None and not args.budget_s >= 0:  # 0: start nothing, report every case as not run
        p.error(f"--budget-s must be >= 0, got {args.budget_s}")
    try:  # before any measurement, not after minutes of them
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"--out {args.out}: cannot make the results folder ({exc.strerror or exc})")
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.plan in ("gpu", "gpu-block") and args.budget_s is None:
        p.error(
            f"--plan {args.plan} times the paper's shapes up to 65536 tokens: hours without CUDA; on "
            "this machine use --plan cpu or layouts, or bound it with --budget-s"
        )
    plan = _plan(args.plan or ("gpu" if device.type == "cuda" else "cpu"))
    if args.level:
        plan.level = args.level
    if args.tokens:
        seen, cases = set(), []
        for c in plan.cases:
            for t in args.tokens:
                key = (c.dtype, c.routing, t, c.modes)
                if key not in seen:
                    seen.add(key)
                    cases.append(Case(c.dtype, c.routing, t, c.modes))
        plan.cases = cases
    if args.routing:
        plan.cases = [c for c in plan.cases if c.routing in args.routing]
    if device.type == "cpu":
        plan.cases = [c for c in plan.cases if c.dtype == "float32"]  # CPU bf16 GEMMs are not representative

    info = environment(device)
    # A block-level run writes beside the adapter-level one, and no run over an earlier one unasked.
    try:
        tag = report.results_stem(args.out, info, args.tag, plan.level, args.overwrite)
    except ValueError as exc:
        p.error(str(exc))
    print(f"device: {info['device']} ({info['device_detail']}); torch {info['torch']}, triton {info['triton']}")
    unavailable = unavailable_providers(args.providers, plan, device)
    for name, why in unavailable.items():
        print(f"provider {name} cannot run here: {why}", flush=True)
    if len(unavailable) == len(args.providers):
        print("no selected provider can run on this machine: nothing to measure", file=sys.stderr)
        return 2
    dtypes = sorted({c.dtype for c in plan.cases})
    ceiling_s = plan.ceiling_budget_s()  # CPU only: GPU ceilings are timed with events
    ceilings = {
        "matmul_tflops": {dt: measured_matmul_tflops(device, DTYPES[dt], ceiling_s) for dt in dtypes},
        "copy_gbs": measured_copy_gbs(device, ceiling_s),
    }
    print(
        "measured ceilings:",
        {
            k: ({kk: round(vv, 1) for kk, vv in v.items()} if isinstance(v, dict) else round(v, 1))
            for k, v in ceilings.items()
        },
    )

    kernel_rows: list[dict] = []
    if plan.kernels and not args.no_kernels and device.type == "cuda":  # first: seconds, and target 3 needs them
        from benchmarks import kernels

        moe = Shapes(plan.d, plan.D).moe_config("triton")
        kernel_rows = kernels.run_kernel_benchmarks(
            moe.in_dim, moe.expert_dim, moe.num_experts, moe.top_k, (8192, 65536), device, ceilings, deadline=deadline
        )

    def write_partial(rows_so_far: list[dict], number: int) -> None:
        report.add_dense_ratios(rows_so_far)
        note = f"written after case {number} of {len(plan.cases)}; the run had not finished"
        report.write_all(args.out, tag, info, ceilings, plan, rows_so_far, kernel_rows, False, note)

    rows = run_adapter_benchmarks(
        plan, device, args.providers, ceilings, progress=not args.quiet, deadline=deadline, on_case=write_partial
    )
    paths = report.write_all(args.out, tag, info, ceilings, plan, rows, kernel_rows)
    print(report.text_table(rows))
    if kernel_rows:
        print(report.kernel_table(kernel_rows))
    print("\n".join(report.target_lines(rows, kernel_rows, device.type)))
    print("wrote", ", ".join(str(pth) for pth in paths))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
