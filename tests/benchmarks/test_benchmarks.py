"""The benchmark code itself: FLOP formulas, routing patterns, providers computing the same
function, the entry point writing every output, and CPU-sized pytest-benchmark cases."""

import csv
import json

import pytest
import torch

from adapter import DenseAdapter, MoEAdapter, preset
from benchmarks import report, run
from benchmarks.providers import (
    PROVIDERS,
    Shapes,
    adapter_flops,
    build_providers,
    make_step,
    saved_activation_bytes,
)
from benchmarks.routing_patterns import make_tokens, set_router
from benchmarks.timing import time_cpu_interleaved
from tests.utils import max_rel_error


def test_flop_formulas_match_table4():
    with torch.device("meta"):
        dense, moe = DenseAdapter(preset("dense")), MoEAdapter(preset("moe-8c4"))
    d, D, H = 2560, 2048, 20480
    assert adapter_flops(dense, 1, "forward") == 2 * (d * H + H * D)
    assert adapter_flops(moe, 1, "forward") == 2 * (d * 8 + 4 * 2 * d * 1280 + d * 10240 + 10240 * D)
    assert adapter_flops(moe, 10, "fwd+bwd") == 3 * 10 * adapter_flops(moe, 1, "forward")
    assert round(adapter_flops(moe, 1, "forward") / adapter_flops(dense, 1, "forward"), 2) == 0.78  # issue 4
    with torch.device("meta"):
        par = MoEAdapter(preset("moe-8c4-parallel"))
    # Parallel reading: 4 experts d -> 1280 -> D plus the shared MLP d -> 10240 -> D (issue 15: 0.75x dense).
    assert adapter_flops(par, 1, "forward") == 2 * (d * 8 + 4 * (d + D) * 1280 + d * 10240 + 10240 * D)
    assert round(adapter_flops(par, 1, "forward") / adapter_flops(dense, 1, "forward"), 2) == 0.75


def test_other_moe_implementations_take_the_parallel_layout():
    """The eager loop and the grouped-mm provider on experts d -> f -> D (D != d)."""
    from benchmarks.providers import EagerLoopMoE, GroupedMMMoE

    cfg = preset("moe-8c4-parallel", 64, 48, backend="torch")
    ref = MoEAdapter(cfg)
    x, _ = make_tokens(50, 64, "cpu", torch.float32)
    for cls in (EagerLoopMoE, GroupedMMMoE):
        m = cls(cfg)
        m.load_state_dict(ref.state_dict())
        assert max_rel_error(m(x), ref(x)) < 1e-5, cls.__name__


def test_routing_patterns_give_the_intended_loads():
    mods = build_providers(Shapes(64, 48), torch.device("cpu"), torch.float32)
    m = mods["moe-torch"]
    x, u = make_tokens(2048, 64, "cpu", torch.float32)
    loads = {}
    for routing in ("uniform", "zipf", "one"):
        set_router([m], u, x, routing)
        m(x)
        loads[routing] = m.expert_counts.double()
    assert (loads["uniform"].max() / loads["uniform"].mean()) < 1.15
    assert loads["one"][0] == 2048  # every token picks expert 0
    z = loads["zipf"]
    assert z[0] > z[3] > z[7] and (z[0] / z.mean()) > 1.5


def test_providers_compute_the_same_adapter():
    mods = build_providers(Shapes(64, 48), torch.device("cpu"), torch.float32)
    assert isinstance(mods["moe-triton"], str) and "GPU only" in mods["moe-triton"]
    x, u = make_tokens(300, 64, "cpu", torch.float32)
    moe = [mods[n] for n in ("moe-torch", "moe-eager-loop", "moe-grouped-mm")]
    set_router(moe, u, x, "zipf")
    ref = moe[0](x)
    for m in moe[1:]:
        assert max_rel_error(m(x), ref) < 1e-5, type(m).__name__
        assert torch.equal(m.expert_counts, moe[0].expert_counts)


def test_layout_providers_are_the_two_readings_of_table_4():
    """moe-torch-parallel is preset moe-8c4-parallel (experts d -> f -> D beside the aggregation
    MLP), the dense adapter's size at the paper's dims; the serial providers are moe-8c4."""
    mods = build_providers(Shapes(64, 48), torch.device("cpu"), torch.float32)
    assert "GPU only" in mods["moe-triton-parallel"]
    par, ser = mods["moe-torch-parallel"], mods["moe-torch"]
    assert (par.config.layout, ser.config.layout) == ("parallel", "serial")
    assert tuple(par.w2.shape) == (8, 32, 48) and tuple(ser.w2.shape) == (8, 32, 64)
    x, u = make_tokens(300, 64, "cpu", torch.float32)
    set_router([ser, par], u, x, "zipf")
    assert par(x).shape == (300, 48) and ser(x).shape == (300, 48)
    assert torch.equal(par.expert_counts, ser.expert_counts)  # one router, one LayerNorm: one routing
    paper = Shapes(2560, 2048)
    dense, parallel = paper.dense_config().param_counts(), paper.moe_config("torch", "parallel").param_counts()
    assert abs(parallel.total - dense.total) / dense.total < 1e-3
    flops = adapter_flops(par, 1000, "forward") / adapter_flops(mods["dense"], 1000, "forward")
    assert flops < 1.0  # top-4 of 8 experts of width d/2 plus the shared MLP: less than dense's 8d


def test_entry_point_writes_every_output(tmp_path):
    assert run.main(["--plan", "smoke", "--out", str(tmp_path), "--tag", "smoke", "--quiet"]) == 0
    rows = list(csv.DictReader((tmp_path / "smoke.csv").read_text().splitlines()))
    assert {r["provider"] for r in rows} == set(PROVIDERS)
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok and all(float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["p80_ms"]) for r in ok)
    assert {r["reps"] for r in ok} == {"5"}  # the smoke plan times the CPU timer's minimum rounds, no more
    assert all(r["status"].startswith("not run: GPU only") for r in rows if r["provider"] == "moe-triton")
    dense = [r for r in ok if r["provider"] == "dense"]
    assert all(float(r["time_vs_dense"]) == 1.0 for r in dense)
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert data["info"]["torch"] == torch.__version__ and data["info"]["device"].startswith("CPU")
    md = (tmp_path / "smoke.md").read_text()
    assert "| moe-torch | fwd+bwd | 256 |" in md and "GPU targets: not measured" in md
    assert (tmp_path / "smoke.png").stat().st_size > 1000


@pytest.mark.parametrize("provider", ["moe-torch", "moe-eager-loop", "moe-grouped-mm", "dense"])
def test_cpu_fwd_bwd_benchmark(benchmark, provider):
    """CPU-sized pytest-benchmark case (CI keeps it short: 5 rounds)."""
    mods = build_providers(Shapes(128, 96), torch.device("cpu"), torch.float32)
    x, u = make_tokens(1024, 128, "cpu", torch.float32)
    if provider != "dense":
        set_router([mods[provider]], u, x, "uniform")
    x.requires_grad_(True)
    step = make_step(mods[provider], x, "fwd+bwd")
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    assert all(p.grad is not None for p in mods[provider].parameters())


def test_kernel_benchmarks_code_path_on_cpu(monkeypatch):
    """The kernel-level benchmarks time on a GPU only; here their code runs once per case on CPU
    tensors (Triton interpreter, tiny sizes) with a stub timer, so a GPU session finds no bugs."""
    from benchmarks import kernels
    from benchmarks.timing import Timing
    from moe_kernels import persistent_gemm

    calls = []

    def fake_time(fn, **_):
        fn()
        calls.append(1)
        return Timing(1.0, 0.9, 1.1, 1)

    monkeypatch.setattr(kernels, "time_gpu", fake_time)
    persistent = []
    real_launch = persistent_gemm.launch
    monkeypatch.setattr(persistent_gemm, "launch", lambda *a, **k: persistent.append(1) or real_launch(*a, **k))
    rows = kernels.run_kernel_benchmarks(
        40, 24, 4, 2, (33,), torch.device("cpu"), {"copy_gbs": 100.0}, dtype=torch.float32
    )
    names = [r["kernel"] for r in rows]
    assert names[:2] == ["router+balance", "permutation"] and len(rows) == 14
    assert sum(n.endswith("[persistent]") for n in names) == 4 and names[-1] == "dW2 [no split]"
    assert len(persistent) == 4  # the [persistent] rows, and only they, ran the persistent kernel
    assert all(r["median_ms"] == 1.0 for r in rows) and all("vs_dense_matmul" in r for r in rows[2:])
    assert rows[0]["pct_copy_bw"] == pytest.approx(100 * rows[0]["gbs"] / 100.0) and rows[0]["pct_datasheet_bw"] is None
    table = report.kernel_table(rows).splitlines()
    assert len(table) == 1 + len(rows) and table[1].startswith("router+balance") and "%HBM" in table[0]


def test_entry_point_says_why_nothing_can_run(tmp_path, capsys, monkeypatch):
    """Issue 20 item 13: only unavailable providers (the Triton kernels on CPU without the
    interpreter) end with a reason, not a ZeroDivisionError; bad sizes fail up front."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert run.main(["--plan", "smoke", "--providers", "moe-triton", "--out", str(tmp_path), "--quiet"]) == 2
    out = capsys.readouterr()
    assert "provider moe-triton cannot run here" in out.out and "nothing to measure" in out.err
    for bad in (["--tokens", "-5"], ["--tokens", "0"], ["--budget-s", "-1"], ["--budget-s", "nan"]):
        with pytest.raises(SystemExit):
            run.main(["--plan", "smoke", "--out", str(tmp_path), *bad])
        assert "must" in capsys.readouterr().err
    if not torch.cuda.is_available():  # the GPU plans on a CPU: hours, unless bounded
        for plan in ("gpu", "gpu-block"):
            with pytest.raises(SystemExit):
                run.main(["--plan", plan, "--out", str(tmp_path)])
            assert f"--plan {plan} times the paper's shapes" in capsys.readouterr().err
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(SystemExit):  # a results folder that cannot be made: before any measurement
        run.main(["--plan", "smoke", "--out", str(blocked / "results")])
    out = capsys.readouterr()
    assert f"--out {blocked / 'results'}: cannot make the results folder" in out.err
    assert "measured ceilings" not in out.out
    assert time_cpu_interleaved({}) == {}


def test_saved_activation_bytes_counts_what_the_backward_keeps():
    """Dense adapter, fp32, T tokens: the backward keeps LN(x) (d), up's output and SiLU's output
    (8d each), down's output (D) and two LayerNorms' per-token mean and rstd (4 floats): the count
    must be exactly that (the input x and the weights are left out). It grows linearly with T."""
    mods = build_providers(Shapes(64, 48), torch.device("cpu"), torch.float32)
    for T in (100, 300):
        x = torch.randn(T, 64, requires_grad=True)
        assert saved_activation_bytes(mods["dense"], x) == 4 * T * (64 + 8 * 64 + 8 * 64 + 48 + 4)
    x = torch.randn(300, 64, requires_grad=True)
    serial, parallel = (saved_activation_bytes(mods[n], x) for n in ("moe-torch", "moe-torch-parallel"))
    assert serial > 0 and parallel > 0
    with torch.no_grad():
        assert saved_activation_bytes(mods["dense"], x) == 0  # nothing is saved without a graph


def test_the_triton_path_saves_pre_and_gated_act_per_pair_and_no_copies():
    """What the fused forward keeps for its backward (issue 16, item 1), counted exactly, fp32, T
    tokens: per routed pair only pre and G * act (f each; no act, no gathered copy of z, no
    expert outputs), the router's logits, top-k ids and weights, the permutation (int32) and
    E-sized counts; around it the LayerNorms' and the aggregation MLP's usual tensors. At the
    paper's widths (d = 2560, D = 2048, fp32, interpreter, T = 64; AMD EPYC, 2026-12-04) this is
    161,914 B per token serial and 151,674 parallel against dense's 182,288: 0.89x / 0.83x. The
    torch reference keeps more (its gathered rows and per-pair outputs)."""
    shapes = Shapes(64, 48)  # the providers' moe-triton rows are GPU-only: the same modules, in the interpreter
    serial_m, parallel_m = (MoEAdapter(shapes.moe_config("triton", layout)) for layout in ("serial", "parallel"))
    c = serial_m.config
    d, D, E, K, f, A = c.in_dim, c.out_dim, c.num_experts, c.top_k, c.expert_dim, c.aggregation_dim
    for T in (30, 129):
        x = torch.randn(T, d, requires_grad=True)
        norm_in = 2 * T + T * d  # mean and rstd, z
        routed = T * E + 2 * T * K + 2 * E + (E + 1) + 2 * T * K + 2 * T * K * f
        mlp = 2 * T + T * d + 2 * T * A + T * D + 2 * T  # its LayerNorm, up's pre and SiLU, norm_out's input and stats
        serial = norm_in + routed + T * d + mlp  # the serial MLP also keeps its input, the experts' sum
        parallel = norm_in + routed + mlp  # the parallel one reads z, already kept
        assert saved_activation_bytes(serial_m, x) == 4 * serial
        assert saved_activation_bytes(parallel_m, x) == 4 * parallel
        torch_m = MoEAdapter(shapes.moe_config("torch"))
        assert saved_activation_bytes(torch_m, x) > 4 * serial


def test_a_second_run_never_overwrites_the_first_unasked(tmp_path, capsys):
    """Issue 39 item 12: two runs on one device on one day wrote the same files (even one that
    measured nothing)."""
    argv = ["--plan", "smoke", "--out", str(tmp_path), "--quiet", "--budget-s", "0", "--providers", "dense"]
    assert run.main(argv) == 0 and run.main(argv) == 0
    stems = sorted(p.stem for p in tmp_path.glob("*.json"))
    assert len(stems) == 2 and stems[1] == stems[0] + "-2"
    assert run.main([*argv, "--tag", "mine"]) == 0
    with pytest.raises(SystemExit):
        run.main([*argv, "--tag", "mine"])
    assert "holds results named mine already: --overwrite" in capsys.readouterr().err
    assert run.main([*argv, "--tag", "mine", "--overwrite"]) == 0
