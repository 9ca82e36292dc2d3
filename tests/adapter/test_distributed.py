"""Data parallelism of the adapter on 2 CPU processes (gloo): the global balance loss equals one
process holding the global batch, and a swapped-in MoEAdapter trains inside a user's DDP- and
FSDP2-wrapped transformers model exactly as the unsharded model does on the global batch."""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from adapter import MoEAdapter, MoEAdapterConfig
from adapter.distributed import global_balance_loss
from tests.utils import assert_close, torchrun

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def two_process_results(module_tmp_path):
    out = module_tmp_path / "results.pt"
    cmd = [*torchrun(2), str(ROOT / "tests" / "adapter" / "dist_worker.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


BALANCE_CASES = ["torch/topk", "torch/softmax", "triton/topk", "triton/softmax", "torch/topk/empty-rank"]


@pytest.mark.slow
@pytest.mark.parametrize("case", BALANCE_CASES)
def test_global_balance_loss_equals_one_process_on_the_global_batch(two_process_results, case):
    r = two_process_results[f"balance/{case}"]
    # float64; the global sums are added in another order than one process adds them.
    assert_close(r["aux"], r["ref_aux"], rtol=1e-12, name="aux")
    for name, grad in r["grads"].items():
        assert_close(grad, r["ref_grads"][name], rtol=1e-10, atol=1e-15, name=name)
    # Eval mode: this rank's own tokens, as a local-scope module computes them.
    assert torch.equal(r["eval_aux"], r["own_aux"])
    if "empty" not in case:  # rank 0's own tokens balance differently from the global batch
        assert abs(float(r["aux"]) - float(r["own_aux"])) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_user_wrapped_model_trains_like_the_unsharded_one(two_process_results, wrap):
    r = two_process_results[f"user/{wrap}"]
    # float32: the global batch's loss and gradients are summed in another grouping (2 ranks).
    assert r["losses"] == pytest.approx(r["ref_losses"], rel=1e-5)
    assert r["weights"].keys() == r["ref_weights"].keys()
    for name, w in r["weights"].items():
        assert_close(w, r["ref_weights"][name], rtol=1e-4, atol=1e-5, name=name)


def test_global_scope_without_a_process_group_is_the_local_loss():
    torch.manual_seed(0)
    cfg = dict(in_dim=8, out_dim=6, expert_dim=5, num_experts=4, top_k=2, backend="torch")
    local = MoEAdapter(MoEAdapterConfig(**cfg))
    glob = MoEAdapter(MoEAdapterConfig(**cfg, balance_scope="global"))
    glob.load_state_dict(local.state_dict())
    x = torch.randn(3, 5, 8)
    local(x)
    glob(x)
    assert torch.equal(local.aux_loss, glob.aux_loss)
    with pytest.raises(ValueError, match="balance_scope must be one of"):
        MoEAdapterConfig(**cfg, balance_scope="world")
    with pytest.raises(ValueError, match=r"counts_E must have shape \(4,\)"):
        global_balance_loss(torch.zeros(4), torch.zeros(3), 0)


class _StandIn(torch.nn.Module):
    """What adapter.lalm.training.parallel.shard_model shards (llm, adapter, encoder), without the LALM's
    audio packages, which the lent GPU machines lack."""

    def __init__(self, backend="triton"):
        super().__init__()
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = Qwen3Config(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
        self.llm = Qwen3ForCausalLM(cfg)
        self.adapter = MoEAdapter(MoEAdapterConfig(in_dim=32, out_dim=64, expert_dim=16, backend=backend))
        self.encoder = torch.nn.Linear(8, 8).requires_grad_(False)

    def forward(self, x):
        return self.llm(inputs_embeds=self.adapter(x)).logits.float().logsumexp(-1).mean()


@pytest.mark.parametrize(
    ("device_type", "dtype"), [("cpu", torch.float16), pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)]
)
def test_lalm_sharding_computes_in_the_autocast_dtype_and_keeps_fp32_shards(tmp_path, device_type, dtype):
    """--fsdp under autocast (--bf16 on CUDA, --fp16 on any device): the units compute in that
    dtype, master weights and gradients stay fp32 (one rank)."""
    import torch.distributed as dist

    from adapter.lalm.training import parallel

    cuda = device_type == "cuda"
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=store, rank=0, world_size=1)
    try:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        torch.manual_seed(0)
        ref = _StandIn("triton" if cuda else "torch").to(device)
        model = _StandIn("triton" if cuda else "torch").to(device)
        model.load_state_dict(ref.state_dict())
        x = torch.randn(2, 7, 32, device=device)
        want = ref(x).item()
        parallel.shard_model(model, dtype)
        seen = []
        model.adapter.register_forward_pre_hook(lambda m, args: seen.append(m.w1.dtype))
        loss = model(x)
        loss.backward()
        assert seen == [dtype]
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
        assert model.encoder.weight.grad is None and not hasattr(model.encoder.weight, "placements")  # ignored
        assert loss.item() == pytest.approx(want, rel=2e-2)  # bf16 computes to about 3 significant digits
    finally:
        dist.destroy_process_group()
