"""longmem: the memory bank, retrieval, and the memory bounds over a long stream."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from streambench.engine.session import StreamSession
from streambench.errors import ConfigError
from streambench.models.loading import LoadedModel
from streambench.policies import POLICIES
from streambench.policies.build import PolicySpec, build_policy
from streambench.policies.memory_bank import MemoryBank

LongMem = POLICIES.get("longmem")


def bank_with_blocks(n_blocks, block=4, layers=2, heads=2, dim=8, capacity=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = MemoryBank(layers, heads, dim, block, capacity or n_blocks * block, torch.float32)
    for b in range(n_blocks):
        bank.add(
            np.arange(b * block, (b + 1) * block),
            torch.randn(layers, heads, block, dim, generator=g),
            torch.randn(layers, heads, block, dim, generator=g),
        )
    return bank


def test_a_planted_block_is_retrieved_first():
    bank = bank_with_blocks(10, capacity=64)
    query = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(9))
    planted = query[:, :, None, :].expand(2, 2, 4, 8) * 5  # keys aligned with the query
    bank.add(np.arange(100, 104), planted, torch.zeros(2, 2, 4, 8))
    assert bank.blocks == 11
    best = bank.search(query, 3)
    assert bank.pos[best[0]].tolist() == [100, 101, 102, 103]
    assert bank.pos[bank.search(-query, 1)[0]].tolist() != [100, 101, 102, 103]
    assert bank.pos[bank.search(query, 2, exclude={best[0]})[0]].tolist() != [100, 101, 102, 103]


def test_faiss_index_gives_the_exact_ranking():
    pytest.importorskip("faiss", reason="faiss-cpu is an optional extra (pip install streambench[faiss])")
    exact = bank_with_blocks(60, capacity=1000, seed=3)
    indexed = bank_with_blocks(60, capacity=1000, seed=3)
    indexed.index = "faiss"
    query = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(5))
    assert indexed.search(query, 5) == exact.search(query, 5)
    assert indexed.search(query, 5, exclude={exact.search(query, 1)[0]}) == exact.search(query, 6)[1:]


def test_partial_blocks_wait_and_the_oldest_block_goes_first():
    bank = MemoryBank(1, 1, 4, block_size=4, capacity_tokens=12, dtype=torch.float32)
    bank.add(np.arange(0, 3), torch.ones(1, 1, 3, 4), torch.ones(1, 1, 3, 4))
    assert bank.blocks == 0  # 3 tokens: no full block yet
    for start in range(3, 23, 5):  # 20 more tokens in uneven pieces
        bank.add(np.arange(start, start + 5), torch.ones(1, 1, 5, 4), torch.ones(1, 1, 5, 4))
    assert bank.count == 5 and bank.blocks == 3 and bank.tokens == 12  # the limit holds
    assert sorted(bank.pos[:, 0].tolist()) == [8, 12, 16]  # blocks 0-3 and 4-7 were overwritten
    assert bank.bytes() == 3 * 2 * 4 * 4 * 4


def test_memory_stays_bounded_over_a_long_stream():
    model = tiny_model("llama", layers=2)
    policy = build_policy(PolicySpec("longmem", {"block_size": 4, "top_k": 2, "refresh": 4, "bank_tokens": 64}), 24)
    session = StreamSession(LoadedModel.wrap(model), policy)
    ids = torch.randint(3, 96, (1, 1500), generator=torch.Generator().manual_seed(1))
    bank_bytes = []
    for t in range(1500):
        session.feed(ids[:, t : t + 1])
        assert session.cache.length <= 24
        assert policy.bank is None or policy.bank.tokens <= 64
        if t > 200:
            bank_bytes.append(policy.bank.bytes())
    assert session.cache.capacity == 24 and len(set(bank_bytes)) == 1
    assert len(policy.bank.pos) == 16  # storage grew to the limit (64 tokens / 4), not beyond
    assert len(policy.stats()) and policy.stats()["bank_tokens"] == 64


def test_sizes_and_validation():
    policy = LongMem(budget=256)
    assert (policy.block_size, policy.top_k, policy.recent_size, policy.refresh) == (8, 8, 188, 4)
    assert (LongMem(budget=128).block_size, LongMem(budget=8192).block_size) == (4, 128)
    assert LongMem(start_size=4, block_size=8, top_k=2, recent_size=100).budget == 120
    with pytest.raises(ConfigError, match="must exceed start_size"):
        LongMem(budget=20, block_size=8, top_k=2)
    with pytest.raises(ConfigError, match="index must be exact or faiss"):
        LongMem(budget=256, index="hnsw")
    with pytest.raises(ConfigError, match="bank_tokens must be >= 8"):
        LongMem(budget=256, bank_tokens=4)


@pytest.mark.slow
def test_passkey_is_retrieved_and_helps_on_the_embedded_model(embedded):
    """The passkey preset (tasks/passkey.yaml: a key at ~14% of a 715-token filler stream, asked
    for at the end), budget 128: streamingllm has none of the needle in its cache, longmem
    (4-token blocks, 8 retrieved, refresh every token) retrieves part of it back and the key's
    NLL drops by more than 1 nat."""
    from streambench.engine.meter import Meter
    from streambench.policies.build import PolicySpec, build_policy
    from streambench.tasks.base import NoProgress
    from streambench.tasks.build import build_task

    def run_task(lm, task, name, budget, **args):
        session = StreamSession(lm, build_policy(PolicySpec(name, args), budget))
        return task.run(session, lm.tokenizer, Meter(session.device), NoProgress())

    task = build_task("passkey", {})
    sinks = run_task(embedded, task, "streamingllm", 128)
    memory = run_task(embedded, task, "longmem", 128, block_size=4, top_k=8, refresh=1)
    assert sinks.records[0]["needle_retention"] == 0
    assert memory.records[0]["needle_retention"] >= 0.3
    assert memory.metrics["answer_nll"] < sinks.metrics["answer_nll"] - 1.0


def test_bank_storage_follows_the_stream_not_the_limit():
    bank = MemoryBank(2, 2, 8, block_size=4, capacity_tokens=65536, dtype=torch.float32)
    bank.add(np.arange(40), torch.zeros(2, 2, 40, 8), torch.zeros(2, 2, 40, 8))
    assert bank.blocks == 10 and len(bank.pos) == 16 and bank.keys.shape[0] == 16  # not 16384
