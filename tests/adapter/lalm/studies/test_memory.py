"""The memory table's parameter counts are those of the real modules; its byte model is consistent."""

import pytest

from adapter.lalm.assemble import tiny_qwen3
from adapter.lalm.studies import memory
from adapter.presets import preset


def test_llm_counts_match_a_materialized_model():
    llm = tiny_qwen3(vocab_size=500, hidden=64, layers=3)
    root, layer, layers = memory.count_llm(llm.config)
    assert root + layers == sum(p.numel() for p in llm.parameters())
    assert layer == sum(p.numel() for p in llm.model.layers[0].parameters()) and layers == 3 * layer
    assert root == sum(p.numel() for p in llm.model.embed_tokens.parameters()) + llm.config.hidden_size  # tied head


def test_paper_counts_and_byte_model():
    c = memory.count_lalm("Qwen3-1.7B")
    assert c.adapter == preset("moe-8c4-parallel", 2560, 2048).param_counts().total  # 94.41M, the paper's
    assert 1.70e9 < c.llm < 1.75e9  # Qwen3-1.7B
    for train_llm in (True, False):
        ddp = memory.per_gpu_bytes(c, "ddp", 1, train_llm)
        one = memory.per_gpu_bytes(c, "fsdp", 1, train_llm)
        eight = memory.per_gpu_bytes(c, "fsdp", 8, train_llm)
        assert one["state"] == ddp["state"]  # FSDP over one GPU shards nothing
        assert eight["state"] - 4 * c.encoder == pytest.approx((one["state"] - 4 * c.encoder) / 8)
    full = memory.per_gpu_bytes(c, "ddp", 8, True)["state"]
    assert full == 16 * (c.llm + c.adapter + c.fusion) + 4 * c.encoder
    with pytest.raises(ValueError, match="mode must be"):
        memory.per_gpu_bytes(c, "zero3", 8, True)


def test_cli_prints_the_table(capsys):
    assert memory.main(["--llm", "Qwen3-1.7B", "--gpus", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("| LLM |") and len(out) == 2 + 4 and "FSDP x4" in out[3]
