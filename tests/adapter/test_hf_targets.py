"""Each known transformers audio LLM, built small and random (no download): the projector is found by
name, swapped, and the model runs a forward and a training step with the balance loss in the loss."""

import pytest
import torch

from adapter import MoEAdapter, swap_adapter, with_aux_loss
from adapter.hf_targets import BUILDERS, make_batch
from adapter.serialization import load_swapped, save_swapped


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_swap_then_train_one_step(name):
    torch.manual_seed(0)
    model, tokens = BUILDERS[name]()
    batch = make_batch(name, tokens)
    handle = swap_adapter(model, adapter="moe-8c4", backend="torch")
    (swap,) = handle
    assert swap.path.endswith("multi_modal_projector") and isinstance(model.get_submodule(swap.path), MoEAdapter)
    adapter = model.get_submodule(swap.path)
    before = {n: p.detach().clone() for n, p in adapter.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    out = model(**batch)
    loss = with_aux_loss(out.loss, model, weight=0.01)
    assert torch.isfinite(loss) and loss > out.loss  # L_aux >= 1 for any routing with p = G
    assert int(adapter.expert_counts.sum()) == 2 * tokens * adapter.config.top_k  # every audio token routed
    loss.backward()
    assert adapter.router.weight.grad.abs().sum() > 0 and adapter.w1.grad.abs().sum() > 0
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in adapter.named_parameters())
    handle.undo()
    assert not isinstance(model.get_submodule(swap.path), MoEAdapter)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_upcycled_swap_keeps_the_models_outputs(name):
    torch.manual_seed(0)
    model, tokens = BUILDERS[name]()
    batch = make_batch(name, tokens)
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
        swap_adapter(model, upcycle=True, backend="torch")
        got = model(**batch).logits
    err = (got - want).abs().max().item()
    assert err < 2e-6, err  # float32; measured 0.9e-7 to 1.7e-7 on this CPU


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_swapped_model_round_trips_through_safetensors(name, tmp_path):
    torch.manual_seed(0)
    model, tokens = BUILDERS[name]()
    swap_adapter(model, adapter="moe-4c2", backend="torch", num_shared_experts=1)
    batch = make_batch(name, tokens)
    model.eval()
    with torch.no_grad():
        want = model(**batch).logits
    save_swapped(model, tmp_path / "model.safetensors")
    torch.manual_seed(1)  # a different random init: everything must come from the file
    fresh, _ = BUILDERS[name]()
    load_swapped(fresh, tmp_path / "model.safetensors").eval()
    adapter = fresh.get_submodule("model.multi_modal_projector")
    assert (
        isinstance(adapter, MoEAdapter) and adapter.config.num_experts == 4 and adapter.config.num_shared_experts == 1
    )
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, want)


@pytest.mark.parametrize("name", ["qwen2-audio", "audio-flamingo-3"])
def test_padding_frames_are_no_tokens_of_the_balance_loss(name):
    """Issue 39 item 7: these models call the projector on every encoder frame, padding included;
    the swapped adapter routed the padding and counted it in aux_loss and the loads (20 tokens
    routed, 14 real, for a short second clip here). Now the model's own lengths mask it."""
    from moe_kernels import reference

    torch.manual_seed(0)
    model, tokens = BUILDERS[name]()
    handle = swap_adapter(model, adapter="moe-8c4", backend="torch")
    adapter = model.get_submodule(handle.swaps[0].path)
    batch = make_batch(name, tokens)
    mel_mask = next(v for k, v in batch.items() if k in ("feature_attention_mask", "input_features_mask"))
    mel_mask[1, 16:] = 0  # the second clip: 16 of 40 mel frames real -> 4 of 10 projector frames
    audio = (batch["input_ids"][1] == 100).nonzero()[:, 0]  # its prompt then holds 4 placeholders
    batch["input_ids"][1, audio[4:]] = 7
    seen = {}
    adapter.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach()))
    model(**{k: v for k, v in batch.items() if k != "labels"})
    real = torch.tensor([10, 4])
    assert int(adapter.expert_counts.sum()) == int(real.sum()) * adapter.config.top_k  # 14 tokens, not 20
    rows = torch.cat([seen["x"][b, : int(n)] for b, n in enumerate(real)])
    z = adapter.norm_in(rows)
    logits = adapter.router(z)
    idx, weight = reference.topk_route(logits, adapter.config.top_k)
    want = reference.balance_loss(logits, idx, weight, adapter.config.num_experts, adapter.config.balance_p)
    torch.testing.assert_close(adapter.aux_loss, want, rtol=1e-6, atol=1e-7)  # float32, the same tokens


class TwoChunks(torch.nn.Module):
    """A model that calls its projector once per chunk of its input, twice per forward."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 6))

    def forward(self, x, skip=False):
        if skip:  # a text-only step: the projector never runs
            return x.new_zeros(()) + 0.0
        return torch.cat([self.proj(x[:, :5]), self.proj(x[:, 5:])], 1).pow(2).mean()


def test_the_balance_loss_covers_every_call_of_one_forward_and_no_stale_one():
    """Issue 39 item 7: total_aux_loss kept only the last call of a forward that called the adapter
    per chunk, and after a forward that skipped the adapter it added the previous step's freed
    graph ("backward through the graph a second time")."""
    torch.manual_seed(0)
    model = TwoChunks().double()
    handle = swap_adapter(model, "proj", "moe-8c4", backend="torch")
    adapter = model.proj
    x = torch.randn(3, 12, 8, dtype=torch.float64)
    loss = with_aux_loss(model(x), model, weight=0.01)
    joint = adapter.aux_loss
    single = MoEAdapter(adapter.config).double()
    single.load_state_dict(adapter.state_dict())
    single(torch.cat([x[:, :5].reshape(-1, 8), x[:, 5:].reshape(-1, 8)]))
    torch.testing.assert_close(joint, single.aux_loss, rtol=1e-12, atol=1e-14)  # one loss over both chunks' tokens
    assert int(adapter.expert_counts.sum()) == 3 * 12 * adapter.config.top_k
    assert adapter.last_topk_idx.shape == (36, adapter.config.top_k)
    loss.backward()
    grad = adapter.router.weight.grad.clone()
    assert grad.abs().sum() > 0
    anchor = sum(p.sum() for p in model.parameters()) * 0  # a graph that does not pass the adapter's forward
    skipped = with_aux_loss(model(x, skip=True) + anchor, model, weight=0.01)
    assert adapter.aux_loss is None and skipped.grad_fn is not None
    skipped.backward()  # no stale graph from the step before
    handle.undo()
    assert not model._forward_pre_hooks and not model._forward_hooks
