"""backend.resolve_backend: the one place that picks triton, grouped_mm or torch, with clear refusals."""

import subprocess
import sys
import warnings

import pytest
import torch

from moe_kernels import backend, moe_ffn, platform, resolve_backend
from tests.utils import make_moe_inputs


@pytest.fixture
def gpu(monkeypatch):
    """A CUDA device as the backend sees it, on a machine without one: set the returned list's
    item to the compute capability the "GPU" reports (a Hopper by default). Dynamo may not trace
    the query (the real one initializes CUDA and reads device properties), as on a GPU."""
    capability = [(9, 0)]
    query = torch.compiler.disable(lambda device=None: capability[0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", query)
    monkeypatch.setattr(
        torch.cuda, "get_device_name", lambda device=None: "Tesla T4" if capability[0] < (8, 0) else "H100"
    )
    return capability


def test_auto_picks_torch_on_cpu_and_triton_on_cuda(gpu):
    assert resolve_backend("auto", torch.device("cpu"), 8) == "torch"
    assert resolve_backend("auto", torch.device("cuda", 0), 8) == "triton"
    assert resolve_backend("auto", torch.device("cuda", 0), 129) == "torch"  # past the router's limit
    assert resolve_backend("torch", torch.device("cuda", 0), 8) == "torch"


def test_triton_on_cpu_runs_the_interpreter_when_requested(monkeypatch):
    assert resolve_backend("triton", torch.device("cpu"), 8) == "triton"  # conftest sets TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="set TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"), 8)


@pytest.mark.parametrize(
    "capability,want", [((7, 0), "torch"), ((7, 5), "torch"), ((8, 0), "triton"), ((12, 0), "triton")]
)
def test_auto_runs_torch_where_triton_has_no_tensor_cores(gpu, capability, want):
    """Below sm_80 Triton's tl.dot is fp32 FMA (the sm_75 compile: 4096 FFMA, no HMMA; inspect_sm90
    --arch 75), so auto runs the reference's cuBLAS GEMMs on a T4 or V100 without timing Triton."""
    gpu[0] = capability
    assert resolve_backend("auto", torch.device("cuda", 0), 8) == want
    assert resolve_backend("triton", torch.device("cuda", 0), 8) == "triton"  # asked for: it runs
    assert platform.triton_has_tensor_cores(torch.device("cpu"))  # the interpreter: no such question


def test_asking_for_triton_without_tensor_cores_warns_once_and_names_the_way_out(gpu):
    gpu[0] = (7, 5)
    with pytest.warns(UserWarning, match=r"Tesla T4 \(sm_75\).*fp32 FMA.*backend='torch' or 'auto'") as seen:
        impl = backend.moe_ffn_implementation("triton", torch.device("cuda", 0), 8)
    assert impl is backend.implementation("triton") and len(seen) == 1
    assert backend.moe_ffn_implementation("auto", torch.device("cuda", 0), 8) is backend.implementation("torch")
    gpu[0] = (8, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.moe_ffn_implementation("triton", torch.device("cuda", 0), 8)  # an RTX 3090: no warning


def test_auto_resolves_inside_a_fullgraph_compile(gpu):
    """Under torch.compile the adapter resolves its backend while dynamo traces (custom_ops.custom_op_moe_ffn):
    the capability is read once, as a constant, without a graph break."""
    gpu[0] = (7, 5)
    cuda = torch.device("cuda", 0)

    @torch.compile(fullgraph=True, backend="eager")
    def pick(x):
        return x + 1 if resolve_backend("auto", cuda, 8) == "torch" else x - 1

    assert pick(torch.zeros(2)).tolist() == [1.0, 1.0]


def test_importing_the_kernels_leaves_dynamo_unloaded():
    """The capability query is marked constant for dynamo by its attribute, not by importing
    torch._dynamo (2.8 s of a 5.3 s import here): `import moe_kernels` stays light."""
    code = "import sys, moe_kernels; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_triton_on_cpu_refuses_a_broken_interpreter(monkeypatch):
    assert backend.installed_interpreter_incompatibility() is None  # else conftest would have stopped
    monkeypatch.setattr(backend, "installed_interpreter_incompatibility", lambda: "Triton 3.6.0's interpreter ...")
    with pytest.raises(ValueError, match="Triton 3.6.0's interpreter"):
        resolve_backend("triton", torch.device("cpu"), 8)
    assert resolve_backend("triton", torch.device("cuda", 0), 8) == "triton"  # compiled kernels are not affected


def test_resolving_reads_no_package_metadata(monkeypatch, gpu):
    """Which packages are installed is read once, at import: torch 2.11's dynamo will not trace
    importlib.util.find_spec, so a probe inside resolve_backend broke fullgraph compiles there."""

    def refuse(*_):
        raise AssertionError("resolve_backend probed the installed packages")

    monkeypatch.setattr(platform.importlib.util, "find_spec", refuse)
    monkeypatch.setattr(platform.importlib.metadata, "version", refuse)
    for name, device in [("auto", "cuda"), ("auto", "cpu"), ("triton", "cpu"), ("grouped_mm", "cuda")]:
        assert resolve_backend(name, torch.device(device), 8) in backend.BACKENDS


def test_refusals_name_values():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cuda", torch.device("cpu"), 8)
    with pytest.raises(ValueError, match="num_experts=200"):
        resolve_backend("triton", torch.device("cpu"), 200)
    with pytest.raises(ValueError, match="device meta"):
        resolve_backend("triton", torch.device("meta"), 8)


def test_moe_ffn_input_errors():
    z, wr, w1, w2 = make_moe_inputs(6, 8, 5, 4, dtype=torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="top_k=5, num_experts=4"):
        moe_ffn(z, wr, w1, w2, top_k=5)
    with pytest.raises(ValueError, match="z_TD must be 2-D"):
        moe_ffn(z[None], wr, w1, w2, top_k=2)
    with pytest.raises(ValueError, match="shape mismatch"):
        moe_ffn(z, wr, w1[:, :7], w2, top_k=2)
    with pytest.raises(ValueError, match="dtype mismatch outside autocast"):
        moe_ffn(z, wr, w1.double(), w2, top_k=2)
    with pytest.raises(ValueError, match=r"token_mask_T must be bool of shape \(6,\)"):
        moe_ffn(z, wr, w1, w2, top_k=2, token_mask_T=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="balance_p must be one of"):
        moe_ffn(z, wr, w1, w2, top_k=2, balance_p="gshard")


def test_public_names_are_never_shadowed_by_submodules():
    """Issue 20 item 9: once a Triton call has imported every kernel module, each public name of
    the package is still the op (a submodule of the same name used to replace `permute`)."""
    import importlib
    import importlib.util

    import moe_kernels

    for module in set(moe_kernels._TRITON_OPS.values()):
        importlib.import_module(module)
    for name, module in moe_kernels._TRITON_OPS.items():
        assert getattr(moe_kernels, name) is getattr(importlib.import_module(module), name), name
        assert callable(getattr(moe_kernels, name)) and not isinstance(getattr(moe_kernels, name), type(moe_kernels))
    # And no submodule may carry a public op's name in the first place.
    for name in moe_kernels._TRITON_OPS:
        assert importlib.util.find_spec(f"moe_kernels.{name}") is None, name
