"""persistent_gemm.py (MOE_ADAPTER_GEMM=persistent): the expert forward and backward through the
persistent TMA kernel against reference.expert_mlp + combine in float64, for fp32 and fp16; the
kernel really runs (a spy counts its launches) and falls back where TMA cannot read a weight."""

from types import SimpleNamespace

import pytest
import torch

from moe_kernels import gemm_config, grouped_gemm, persistent_gemm
from tests.moe_kernels.test_grouped_gemm import CASES, NAMES, _problem, _torch_path, _triton_path
from tests.utils import max_rel_error, three_way_check

# A sorted-order operand read through a TMA box may load rows past the routed pairs, which no
# kernel wrote (torch.empty: sometimes NaN bits); they land only in masked-out output rows, so the
# interpreter's numpy may warn of NaN in a matmul while every result is right
# (test_grouped_gemm.test_every_output_written_and_no_unwritten_row_read poisons them to prove it).
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")


@pytest.fixture
def launches(monkeypatch):
    """Run with the persistent schedule; the list collects (gather_a, epilogue) per launch."""
    monkeypatch.setenv("MOE_ADAPTER_GEMM", "persistent")
    seen = []
    real = persistent_gemm.launch

    def spy(*args, **kwargs):
        seen.append((kwargs["gather_a"], kwargs["epilogue"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(persistent_gemm, "launch", spy)
    return seen


# All four row GEMMs of a forward + backward: up (gathered z, SiLU), down (sorted G*act, scatter),
# down-dX (gathered dh, dSiLU, transposed W2), up-dX (sorted dpre, scatter, transposed W1).
ALL_FOUR = [(True, 0), (False, 1), (True, 2), (False, 1)]


@pytest.mark.parametrize("T,D,F,E,K,routing", CASES[1::2])  # k = E, skewed, empty experts, ...
def test_fp32_within_1e5_of_float64(launches, T, D, F, E, K, routing):
    z, w1, w2, w, perm, dh = _problem(T, D, F, E, K, routing, masked=True)
    ref = _torch_path(z, w1, w2, w, perm, dh, K)
    ours = _triton_path(z.float(), w1.float(), w2.float(), w.float(), perm, dh.float())
    assert launches == ALL_FOUR
    for name, a, b in zip(NAMES, ours, ref, strict=True):
        assert max_rel_error(a, b) <= 1e-5, f"{name}: {max_rel_error(a, b):.3g}"


# fp16 rows must be 16-byte aligned for TMA (D, F multiples of 8): one token; 129 tokens, skewed.
@pytest.mark.parametrize("T,D,F,E,K,routing", [CASES[0], (129, 72, 40, 8, 2, "skewed")])
def test_fp16_three_way(launches, T, D, F, E, K, routing):
    z, w1, w2, w, perm, dh = _problem(T, D, F, E, K, routing, masked=False)
    ref = _torch_path(z, w1, w2, w, perm, dh, K)
    half = [t.half() for t in (z, w1, w2)]
    torch16 = _torch_path(*half, w.float(), perm, dh.half(), K)
    ours = _triton_path(*half, w.float(), perm, dh.half())
    assert launches == ALL_FOUR
    for name, a, t, r in zip(NAMES, ours, torch16, ref, strict=True):
        three_way_check(a, t, r, atol=1e-3, name=name)


def test_reruns_bit_identical_and_close_to_tile_schedule(launches, monkeypatch):
    """Same inputs, same bits; the tile-per-program kernel walks the same K steps per output tile,
    so the two schedules agree to fp32 round-off (their tiles' accumulation order is the same, the
    interpreter's dot may still differ in the last bit)."""
    z, w1, w2, w, perm, dh = _problem(129, 72, 100, 8, 2, "skewed", masked=True)
    args = [*(t.float() for t in (z, w1, w2, w)), perm, dh.float()]
    first = _triton_path(*args)
    again = _triton_path(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    monkeypatch.setenv("MOE_ADAPTER_GEMM", "tiles")
    tiles = _triton_path(*args)
    for name, a, b in zip(NAMES, first, tiles, strict=True):
        assert max_rel_error(a, b) <= 1e-6, f"{name}: {max_rel_error(a, b):.3g}"


def test_weights_tma_cannot_read_fall_back_to_tiles(launches):
    """A weight whose rows are strided (every other column of a wider tensor) has no TMA
    descriptor, in either orientation: those GEMMs run the tile kernel, still correctly."""
    z, w1, w2, w, perm, dh = _problem(7, 40, 72, 3, 2, "uniform", masked=False)
    ref = _torch_path(z, w1, w2, w, perm, dh, K=2)
    w1_wide = torch.zeros(3, 40, 144)
    w1_wide[:, :, ::2] = w1.float()
    w1_strided = w1_wide[:, :, ::2]
    assert persistent_gemm.weight_descriptor(w1_strided, 64, 64) is None
    ours = _triton_path(z.float(), w1_strided, w2.float(), w.float(), perm, dh.float())
    assert launches == [(False, 1), (True, 2)], "only the W2 GEMMs can use TMA here"
    for name, a, b in zip(NAMES, ours, ref, strict=True):
        assert max_rel_error(a, b) <= 1e-5, f"{name}: {max_rel_error(a, b):.3g}"


def test_schedule_is_checked(monkeypatch):
    monkeypatch.setenv("MOE_ADAPTER_GEMM", "fast")
    with pytest.raises(ValueError, match="MOE_ADAPTER_GEMM must be one of .* got 'fast'"):
        gemm_config.default_schedule()
    monkeypatch.setenv("MOE_ADAPTER_GEMM", "persistent")
    monkeypatch.setenv("MOE_ADAPTER_WGRAD", "atomic")
    with pytest.raises(ValueError, match="MOE_ADAPTER_WGRAD must be one of .* got 'atomic'"):
        gemm_config.default_schedule()
    monkeypatch.setenv("MOE_ADAPTER_WGRAD", "nosplit")
    assert gemm_config.default_schedule() == gemm_config.Schedule("persistent", "nosplit")
    monkeypatch.delenv("MOE_ADAPTER_GEMM")
    monkeypatch.delenv("MOE_ADAPTER_WGRAD")
    assert gemm_config.default_schedule().name == "tiles+split"
    assert gemm_config.Schedule.parse("persistent+nosplit") == gemm_config.Schedule("persistent", "nosplit")
    for bad in ("persistent", "tiles+", "split+tiles", ""):
        with pytest.raises(ValueError, match="schedule must be one of"):
            gemm_config.Schedule.parse(bad)
    # The config follows the caller's schedule, never the environment (the weight gradients keep theirs).
    monkeypatch.setenv("MOE_ADAPTER_GEMM", "persistent")
    assert not gemm_config.gemm_config(torch.bfloat16, 100, 4, aligned=True).persistent
    assert gemm_config.gemm_config(torch.bfloat16, 100, 4, aligned=True, persistent=True).persistent
    assert grouped_gemm.EPI_DSILU == gemm_config.EPI_DSILU


@pytest.mark.gpu
@pytest.mark.parametrize("T,D,F,E,K,routing", [(129, 72, 40, 8, 2, "skewed"), (4096, 256, 192, 8, 4, "uniform")])
def test_bf16_three_way_on_gpu(launches, T, D, F, E, K, routing):
    """The compiled kernel (TMA, wgmma) on a GPU in bf16, against float64 and torch's own bf16."""
    from moe_kernels.reference import Permutation

    z, w1, w2, w, perm, dh = _problem(T, D, F, E, K, routing, masked=True)
    ref = _torch_path(z, w1, w2, w, perm, dh, K)
    perm_c = Permutation(*(t.cuda() for t in perm))
    bf = [t.cuda().bfloat16() for t in (z, w1, w2)]
    torch_bf = _torch_path(*bf, w.cuda().float(), perm_c, dh.cuda().bfloat16(), K)
    ours = _triton_path(*bf, w.cuda().float(), perm_c, dh.cuda().bfloat16())
    assert launches == ALL_FOUR
    for name, a, t, r in zip(NAMES, ours, torch_bf, ref, strict=True):
        three_way_check(a.cpu(), t.cpu(), r, atol=1e-2, name=name)


def test_persistent_only_where_tma_and_its_shared_memory_exist(monkeypatch):
    """The persistent schedule runs where TMA exists (sm_90 on) and a block may take the shared
    memory its tiles need; an A100 (sm_80: no TMA) and an RTX 50-series GPU (sm_120: TMA, but 99 KB
    per block, where the persistent tiles took 106,520 B) fall back to the tile kernel, as does a
    GPU whose properties lack the limit."""
    cuda = torch.device("cuda", 0)
    kib = 1024
    for major, shared, expected in (
        (8, 163 * kib, False),  # A100
        (9, 227 * kib, True),  # H100 / H200
        (10, 227 * kib, True),  # B200
        (12, 99 * kib, False),  # RTX 5090
        (9, None, False),  # no opt-in limit reported
    ):
        props = SimpleNamespace(major=major, minor=0)
        if shared is not None:
            props.shared_memory_per_block_optin = shared
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, p=props: p)
        assert gemm_config.runs_persistent.__wrapped__(cuda) is expected, (major, shared)
    assert gemm_config.runs_persistent(torch.device("cpu"))
