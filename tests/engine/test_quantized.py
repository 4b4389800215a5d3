"""Quantized KV (engine/cache/quant.py): what the cache holds is codes, scales and zeros; attention
reads exactly those, dequantized (keys rotated at their rank + offset), and a forward's own tokens
in full precision. Exactness is defined against what is held: the independent reference holds
every token quantized by its own code (reference.fake_quantize)."""

import pytest
import torch
from reference import ReferenceStream, fake_quantize
from tiny_models import tiny_model

from streambench.engine.cache.quant import KVQuant, dequantize, pack, parse_bits, quantize, unpack
from streambench.engine.session import StreamSession
from streambench.errors import ConfigError
from streambench.models.loading import LoadedModel
from streambench.policies.build import PolicySpec, build_policy

BUDGET = 12


def stream_ids(n, seed):
    return torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def policy(name, args=None, budget=BUDGET):
    return build_policy(PolicySpec(name, dict(args or {})), budget)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("group", [8, 16, 32])
def test_round_trip_error_is_within_half_a_step_of_each_group(bits, group):
    x = torch.randn(3, 5, 7, 32, generator=torch.Generator().manual_seed(bits * group)) * 3
    codes, scale, zero = quantize(x, bits, group)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 32 * bits // 8
    assert scale.shape[-1] == zero.shape[-1] == 32 // group
    back = dequantize(codes, scale, zero, bits, x.dtype)
    step = scale.repeat_interleave(group, dim=-1)
    assert ((back - x).abs() <= step / 2 + 1e-5).all()
    g = x.reshape(*x.shape[:-1], -1, group)  # each group's minimum and maximum are held exactly
    torch.testing.assert_close(back.reshape(g.shape).amin(-1), g.amin(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(back.reshape(g.shape).amax(-1), g.amax(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(back, fake_quantize(x, bits, group), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_packing_is_lossless(bits):
    codes = torch.randint(0, 2**bits, (4, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape[-1] == 64 * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


def test_a_constant_group_comes_back_exactly():
    x = torch.full((2, 16), 0.75)
    torch.testing.assert_close(dequantize(*quantize(x, 2, 8), 2, x.dtype), x)


def test_the_arithmetic_is_optimum_quantos():
    """The same codes and dequantized values as quanto's MaxOptimizer + quantize_affine with
    axis=0 (per-token groups), what transformers' QuantizedCache calls."""
    quanto = pytest.importorskip(
        "optimum.quanto", reason="optimum-quanto not installed: pip install 'streambench[quant]'"
    )
    x = torch.randn(2, 3, 9, 64, generator=torch.Generator().manual_seed(0))
    for bits, qtype in ((4, quanto.qint4), (2, quanto.qint2)):
        scale, shift = quanto.MaxOptimizer()(x, qtype, 0, 32)
        theirs = quanto.quantize_weight(x, qtype, 0, scale, shift, 32).dequantize()
        ours = dequantize(*quantize(x, bits, 32), bits, x.dtype)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "name,args",
    [
        ("dense", {}),
        ("streamingllm", {"start_size": 4}),
        ("h2o", {}),
        ("knorm", {"start_size": 1, "recent_size": 2}),
        ("snapkv", {"window": 4, "kernel": 3, "interval": 3}),
        ("pyramidkv", {}),
    ],
)
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("method,group,residual", [("token", 8, 0), ("token", 8, 5), ("kivi", 4, 3), ("kivi", 8, 0)])
def test_quantized_cache_equals_a_reference_holding_quantized_tokens(name, args, bits, method, group, residual):
    """Three layers, token by token: the logits of a DynamicCache rebuilt every step from the kept
    tokens' quantized-then-dequantized states (keys re-rotated at their ranks), the new token in
    full precision; with a residual, the last tokens in full precision; KIVI, keys quantized per
    channel over each completed block of `group` stream positions, from the tokens each head still
    keeps (eviction inside a block: its scale and zero come from the survivors). Covers
    re-indexing without re-rotation (a position per key), per-head and per-layer keep-sets, and an
    offset renormalisation (a stream three times the capacity)."""
    model = tiny_model("llama", layers=3)
    quant = KVQuant(bits, method=method, group=group, residual=residual)
    session = StreamSession(LoadedModel.wrap(model), policy(name, args), quant=quant)
    reference = ReferenceStream(model, policy(name, args), quant=(bits, group, method, residual))
    replay = bool(session.policy.observes - {"logits"})
    ids = stream_ids(40, seed=bits)
    for t in range(ids.shape[1]):
        got = session.feed(ids[:, t : t + 1])
        want = reference.feed(ids[:, t : t + 1], keep_positions=session.cache.positions[..., :-1] if replay else None)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    for shard in session.cache.shards:  # no float copy held beside the codes
        assert shard.k is None and shard.v is None and shard.k_pre is None and shard.kq is not None


def test_attention_reads_the_held_codes():
    """One layer: the next logits equal a forward over a DynamicCache holding exactly the cache's
    own held tensors, dequantized from its codes and rotated at ranks 0..n-1 by the model's rope
    (streamingllm: its sinks' positions were rewritten at every eviction, never re-rotated)."""
    from transformers import DynamicCache

    model = tiny_model("llama", layers=1)
    session = StreamSession(LoadedModel.wrap(model), policy("streamingllm"), quant=KVQuant(4, group=16))
    ids = stream_ids(30, seed=3)
    session.feed(ids[:, :29], exact=True)
    session.reserve(1)  # (the eviction before the next token, done now)
    cache = session.cache
    pre, values = cache.ranked_pre_keys(0), cache.ranked_values(0)  # (L, H, n, D), per head's ranks
    n = cache.length
    rotary = model.model.rotary_emb
    cos, sin = rotary(pre, position_ids=torch.arange(n)[None])
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    keys, _ = apply_rotary_pos_emb(pre[0][None], pre[0][None], cos, sin)
    rebuilt = DynamicCache(config=model.config)
    rebuilt.update(keys, values[0][None], 0)
    with torch.no_grad():
        want = model(input_ids=ids[:, 29:], position_ids=torch.tensor([[n]]), cache=rebuilt).logits
    torch.testing.assert_close(session.feed(ids[:, 29:]), want, atol=1e-5, rtol=0)


def test_batched_streams_and_chunks_equal_their_single_runs():
    """Two streams in one batch (each evicting its own tokens), chunks of 1-5 tokens: each stream's
    logits equal its run alone."""
    model = LoadedModel.wrap(tiny_model("llama", layers=2))
    ids = torch.cat([stream_ids(45, seed=4), stream_ids(45, seed=5)])
    batch = StreamSession(model, policy("h2o"), batch_size=2, quant=KVQuant(4, group=8))
    alone = [StreamSession(model, policy("h2o"), quant=KVQuant(4, group=8)) for _ in range(2)]
    at = 0
    for size in [1, 3, 5, 2, 4] * 3:
        chunk = ids[:, at : at + size]
        got = batch.feed(chunk)
        for b in range(2):
            torch.testing.assert_close(got[b : b + 1], alone[b].feed(chunk[b : b + 1]), atol=1e-5, rtol=0)
        at += size


@pytest.mark.parametrize("quant", [KVQuant(2, group=8), KVQuant(2, method="kivi", group=4, residual=2)], ids=str)
def test_a_rollback_returns_the_quantized_stream_to_where_it_was(quant):
    """A branch's tokens leave no trace, KIVI's frontier included: blocks the branch completed are
    back in full precision in the ring (their codes are written again when the stream passes)."""
    model = LoadedModel.wrap(tiny_model("llama", layers=2))
    ids = stream_ids(40, seed=7)
    straight = StreamSession(model, policy("streamingllm"), quant=quant)
    branched = StreamSession(model, policy("streamingllm"), quant=quant)
    for session in (straight, branched):
        session.feed(ids[:, :30])
        session.reserve(4)
    saved = branched.checkpoint()
    branched.feed(ids[:, 30:34].flip(-1))
    branched.rollback(saved)
    torch.testing.assert_close(branched.feed(ids[:, 30:34]), straight.feed(ids[:, 30:34]), atol=1e-6, rtol=0)


def test_exact_feeding_goes_token_by_token():
    """A forward's own tokens attend in full precision, held ones quantized: a chunk fed exactly
    equals the same tokens one at a time (dense included, whose chunked prefill would not)."""
    model = LoadedModel.wrap(tiny_model("llama", layers=2))
    ids = stream_ids(24, seed=9)
    for name in ("dense", "streamingllm"):
        chunked = StreamSession(model, policy(name), quant=KVQuant(4, group=8))
        single = StreamSession(model, policy(name), quant=KVQuant(4, group=8))
        assert chunked.exact_chunks is not None
        got = chunked.feed(ids, exact=True)
        want = torch.cat([single.feed(ids[:, t : t + 1]) for t in range(24)], dim=1)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_kv_bytes_count_the_held_tensors(bits):
    """Logical KV bytes = kept tokens x (codes + scales + zeros) per lane, counted from the
    tensors the cache holds; per-head eviction (h2o) and a ragged one (pyramidkv) alike."""
    model = LoadedModel.wrap(tiny_model("llama", layers=3))
    for name in ("streamingllm", "h2o", "pyramidkv"):
        session = StreamSession(model, policy(name), quant=KVQuant(bits, group=8))
        session.feed(stream_ids(30, seed=1))
        cache = session.cache
        per_lane = 0
        for part in "kv":
            for suffix in "qsz":
                t = getattr(cache.shards[0], part + suffix)
                per_lane += t.shape[-1] * t.element_size()
        assert session.kv_bytes == int(cache.lane_counts().sum()) * per_lane
        head_dim = cache.head_dim
        assert per_lane == 2 * (head_dim * bits // 8 + 2 * (head_dim // 8) * 4)  # fp32 scales and zeros
        unquantized = StreamSession(model, policy(name))
        unquantized.feed(stream_ids(30, seed=1))
        assert session.kv_bytes * (2 * head_dim * 4) == unquantized.kv_bytes * per_lane


def test_longmem_bank_round_trips_through_the_quantized_cache():
    """Retrieval takes tokens out (dequantized: what attention read) and splices them back
    (quantized again: the codes of a dequantized vector are its codes)."""
    model = LoadedModel.wrap(tiny_model("llama", layers=2))
    args = {"start_size": 2, "block_size": 2, "top_k": 1, "refresh": 3, "bank_tokens": 16}
    session = StreamSession(model, policy("longmem", args), quant=KVQuant(4, group=8))
    ids = stream_ids(60, seed=2)
    logits = session.feed(ids, exact=True)
    assert torch.isfinite(logits).all() and session.cache.length <= BUDGET


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="one of 16, 8, 4, 2"):
        KVQuant(3)
    with pytest.raises(ConfigError, match="is not one of"):
        parse_bits("16,3")
    assert parse_bits("16, 4,2,4") == [16, 4, 2]
    model = LoadedModel.wrap(tiny_model("llama", layers=1))
    with pytest.raises(ConfigError, match="does not divide the model's head size"):
        StreamSession(model, policy("h2o"), quant=KVQuant(4, group=12))
    with pytest.raises(ConfigError, match="holds no cache to quantize"):
        StreamSession(model, policy("recompute-window"), quant=KVQuant(4, group=8))


def test_eviction_inside_a_kivi_key_block_keeps_the_survivors_codes_and_scales():
    """StreamingLLM evicts the oldest window token every step, one member of a quantized key
    block at a time: the block's survivors read back exactly as before (their codes and their
    block's per-channel scale and zero stay), until the last one leaves and its entry is reused."""
    model = LoadedModel.wrap(tiny_model("llama", layers=2))
    quant = KVQuant(2, method="kivi", group=4, residual=2)
    session = StreamSession(model, policy("streamingllm", {"start_size": 2}, budget=14), quant=quant)
    ids = stream_ids(60, seed=11)
    session.feed(ids[:, :30], exact=True)
    cache = session.cache
    before = dict(zip(cache.positions.tolist(), cache.ranked_pre_keys(0).unbind(2)))
    session.feed(ids[:, 30:31])
    after = dict(zip(cache.positions.tolist(), cache.ranked_pre_keys(0).unbind(2)))
    front = quant.frontiers(30)[0]
    survivors = [p for p in after if p in before and p < front]
    partial = [p for p in survivors if p >= 2 and (p // 4) * 4 < min(q for q in survivors if q >= 2) + 4]
    assert partial, "the window's oldest block should be partly evicted"
    for p in survivors:
        torch.testing.assert_close(after[p], before[p], atol=0, rtol=0)
    shard = cache.shards[0]
    assert shard.kgs.shape[3] <= 14 // 4 + 4 + 2  # entries of emptied blocks are reused


@pytest.mark.parametrize("method,residual", [("token", 6), ("kivi", 3)])
def test_windowed_kv_bytes_count_the_held_tensors(method, residual):
    """Residual tokens at the model's dtype, quantized ones their codes and per-token scales or
    (KIVI keys) a scale and a zero per channel per block a held key refers to, counted from the
    cache's own tensors (stream positions, block ids), per-head keep-sets included."""
    model = LoadedModel.wrap(tiny_model("llama", layers=3))
    quant = KVQuant(4, method=method, group=4, residual=residual)
    for name in ("streamingllm", "h2o", "pyramidkv"):
        session = StreamSession(model, policy(name), quant=quant)
        session.feed(stream_ids(37, seed=2))
        cache, total = session.cache, 0
        keys_front, values_front = quant.frontiers(cache._fed)
        d = cache.head_dim
        for shard in cache.shards:
            m = cache._len[shard.start]
            held = torch.ones_like(shard.spos[..., :m], dtype=torch.bool)
            if shard.allowed is not None:
                held &= shard.allowed[..., :m]
            spos = shard.spos[..., :m]
            recent_k, recent_v = held & (spos >= keys_front), held & (spos >= values_front)
            total += int(recent_k.sum() + recent_v.sum()) * d * 4
            total += int((held & ~recent_v).sum()) * (shard.vq.shape[-1] + 2 * shard.vs.shape[-1] * 4)
            quantized_k = held & ~recent_k
            total += int(quantized_k.sum()) * shard.kq.shape[-1]
            if method == "kivi":
                gid = shard.kgid[..., :m]
                for lane_gid, lane_q in zip(gid.reshape(-1, m), quantized_k.reshape(-1, m)):
                    total += len(lane_gid[lane_q].unique()) * 2 * d * 4
            else:
                total += int(quantized_k.sum()) * 2 * shard.ks.shape[-1] * 4
        assert session.kv_bytes == total, name


@pytest.mark.parametrize("method,group,residual", [("token", 8, 0), ("kivi", 4, 3)], ids=["token", "kivi"])
@pytest.mark.parametrize("arch", __import__("tiny_models").ARCHITECTURES)
def test_every_architecture_holds_its_quantized_tokens_exactly(arch, method, group, residual):
    """Every supported family (partial rotary, interleaved RoPE, GQA, hybrid sliding layers, which
    stay in the model's dtype): streamingllm then h2o, token by token, against the reference."""
    model = tiny_model(arch, layers=3)
    head_dim = LoadedModel.wrap(model).info.head_dim
    if head_dim % group:
        group = head_dim
    quant = KVQuant(4, method=method, group=group, residual=residual)
    for name in ("streamingllm", "h2o"):
        lm = LoadedModel.wrap(model)
        from streambench.engine.observe import CAPTURED

        made = policy(name)
        if not lm.layout.routable and made.observes & CAPTURED:
            continue  # (Falcon refuses attention observers: tested in test_exactness.py)
        session = StreamSession(lm, made, quant=quant)
        reference = ReferenceStream(model, policy(name), quant=(4, group, method, residual))
        replay = bool(session.policy.observes - {"logits"})
        ids = stream_ids(30, seed=12)
        for t in range(ids.shape[1]):
            got = session.feed(ids[:, t : t + 1])
            want = reference.feed(
                ids[:, t : t + 1], keep_positions=session.cache.positions[..., :-1] if replay else None
            )
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method,group,residual", [("token", 8, 0), ("kivi", 4, 3)], ids=["token", "kivi"])
def test_greedy_generation_reads_the_quantized_cache(method, group, residual):
    """Generation (chat, mtbench, lm-eval's generate_until) decodes through the quantized cache:
    the prompt as one chunk, then every greedy token the argmax of the reference holding the
    same quantized tokens."""
    from streambench.engine.generation import generate

    model = tiny_model("llama", layers=2)
    quant = KVQuant(4, method=method, group=group, residual=residual)
    session = StreamSession(LoadedModel.wrap(model), policy("streamingllm"), quant=quant)
    ids = stream_ids(10, seed=13)
    written = generate(session, prompt=ids, max_new_tokens=20)
    assert len(written.tokens) == 20
    reference = ReferenceStream(model, policy("streamingllm"), quant=(4, group, method, residual))
    logits = reference.feed(ids)
    for token in written.tokens:
        assert int(logits[0, -1].argmax()) == token
        logits = reference.feed(torch.tensor([[token]]))


def test_dense_int4_equals_transformers_quantized_cache_holding_pre_rope_keys():
    """The cross-check (bench/quant_crosscheck.py) on a tiny model: under dense, per-token int4
    and int2 give the per-token NLL of transformers' QuantizedCache (optimum-quanto, residual 1)
    whose layers hold keys before RoPE as streambench does; with keys after RoPE (transformers'
    own layout) they differ by more than float noise."""
    pytest.importorskip("optimum.quanto", reason="optimum-quanto not installed: pip install 'streambench[quant]'")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "quant_crosscheck.py"
    spec = importlib.util.spec_from_file_location("quant_crosscheck", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = tiny_model("llama", layers=2)
    ids = stream_ids(40, seed=14)
    for bits in (4, 2):
        session = StreamSession(LoadedModel.wrap(model), policy("dense", budget=None), quant=KVQuant(bits, group=8))
        ours = bench.nll_per_token(session.feed(ids, exact=True), ids)
        pre = bench.nll_per_token(bench.hf_run(model, ids, bits, 8, pre_rope=True), ids)
        post = bench.nll_per_token(bench.hf_run(model, ids, bits, 8, pre_rope=False), ids)
        torch.testing.assert_close(ours, pre, atol=1e-5, rtol=0)
        assert (ours - post).abs().max() > 1e-4
