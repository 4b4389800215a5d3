"""kvpress's compress-once protocol through streambench against kvpress itself.

kvpress's own hook (`BasePress.forward_hook`) does not run on transformers 5.24 as it is: it reads
`kwargs["past_key_values"]` and `kwargs["cache_position"]`, which 5.24's attention modules no
longer receive (the cache comes as `cache=`; there is no cache_position). `kvpress_prefill` runs
that very hook with those two names supplied, which is all it lacks, so the comparison is with
kvpress's own `compress` (scores, top-k, gather) and its positions (the kept keys keep their
rotation; the question continues at the context's length)."""

import numpy as np
import pytest
import torch
from transformers import DynamicCache

kvpress = pytest.importorskip("kvpress", reason="kvpress is not installed (./install.sh kvpress)")

from streambench.engine.session import StreamSession  # noqa: E402
from streambench.models.loading import LoadedModel  # noqa: E402
from streambench.policies.build import PolicySpec, build_policy  # noqa: E402
from streambench.policies.kvpress_bridge import import_kvpress, inner_press  # noqa: E402


def kvpress_prefill(model, press, context: torch.Tensor, read_back: bool = True):
    """kvpress's prefill with its press hooked on every attention layer; returns the cache and,
    per layer, the (H, kept) indices its compress kept (read back from the compressed keys; not
    for a press that re-rotates them)."""
    import_kvpress()
    cache = DynamicCache(config=model.config)
    chosen = {}
    press.post_init_from_model(model)
    hooks = []

    def hook(module, args, kwargs, output):
        kw = dict(kwargs)
        kw["past_key_values"] = kw.get("cache")
        kw["cache_position"] = torch.arange(kw["hidden_states"].shape[1])
        layer = kw["past_key_values"].layers[module.layer_idx]
        before = layer.keys.clone()
        result = press.forward_hook(module, args, kw, output)
        if not read_back:
            return result
        # which tokens its compress kept: each kept key is one of the keys before (positions differ: unique)
        match = (layer.keys[0][:, :, None, :] == before[0][:, None, :, :]).all(-1)  # (H, kept, n)
        assert (match.sum(-1) == 1).all()
        chosen[module.layer_idx] = np.sort(match.float().argmax(-1).numpy(), axis=-1)
        return result

    for layer in model.model.layers:
        layer.self_attn.rotary_emb = model.model.rotary_emb
        hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=context, cache=cache, use_cache=True)
    finally:
        for h in hooks:
            h.remove()
        for layer in model.model.layers:
            layer.self_attn.__dict__.pop("rotary_emb", None)
            layer.self_attn._modules.pop("rotary_emb", None)
    return cache, chosen


@pytest.mark.slow
@pytest.mark.parametrize(
    "press,args",
    [
        ("KnormPress", {}),
        ("SnapKVPress", {"window_size": 16}),
        ("ExpectedAttentionPress", {"n_future_positions": 64}),
        ("TOVAPress", {}),
        ("StreamingLLMPress", {"n_sink": 4}),
        ("KeyDiffPress", {}),
        ("ObservedAttentionPress", {}),  # (kvpress given eager attention's matrix; streambench its sums)
        ("CriticalKVPress", {"press": "SnapKVPress(window_size=16)"}),  # (a wrapper)
        ("LeverageScorePress", {}),  # (prefill-only presses: compress-once only)
        ("NonCausalAttnPress", {}),
        ("CompactorPress", {}),
        ("ChunkPress", {"press": "KeyDiffPress", "chunk_length": 60}),  # (a wrapper that compresses per chunk)
        ("ChunkPress", {"press": "SnapKVPress(window_size=16)", "chunk_length": 60}),
        ("BlockPress", {"press": "KeyDiffPress", "block_size": 32}),  # (blocks scored in turn with the kept)
        ("BlockPress", {"press": "SnapKVPress(window_size=16)", "block_size": 32}),
        ("KeyRerotationPress", {"press": "SnapKVPress(window_size=16)"}),  # (kept keys re-indexed to ranks)
    ],
)
def test_compress_once_equals_kvpress_on_the_embedded_model(embedded, press, args):
    """The same kept tokens per layer and head, and the question's log-probs to 1e-4."""
    from streambench.tasks.texts import DEFAULT_TEXT, load_text

    ids = torch.tensor([embedded.tokenizer(load_text(DEFAULT_TEXT))["input_ids"][:200]])
    context, question = ids[:, :180], ids[:, 180:]
    ratio = 0.5
    inner = None
    if "press" in args:  # a wrapper, given its press as kvpress's constructor syntax
        inner = inner_press(args["press"], "test")
        inner.compression_ratio = ratio
        theirs = getattr(kvpress, press)(inner, **{k: v for k, v in args.items() if k != "press"})
    else:
        theirs = getattr(kvpress, press)(compression_ratio=ratio, **args)
    rerotates = press == "KeyRerotationPress"
    eager = press == "ObservedAttentionPress"  # kvpress's own run needs the attention matrix returned
    before = embedded.model.config._attn_implementation
    if eager:
        embedded.model.set_attn_implementation("eager")
    try:
        torch.manual_seed(0)  # (Leverage and Compactor draw a Gaussian sketch per layer, in layer order)
        cache, chosen = kvpress_prefill(embedded.model, theirs, context, read_back=not rerotates)
        if rerotates:  # (its keys are re-rotated: which it kept is read from its press's run alone)
            _, chosen = kvpress_prefill(embedded.model, inner, context)
    finally:
        embedded.model.set_attn_implementation(before)
    with torch.no_grad():
        # kvpress's pipeline answers at the context's length, or at the compressed one after KeyRerotation
        start = 90 if rerotates else 180
        positions = torch.arange(start, start + 20)[None]
        want = embedded.model(input_ids=question, cache=cache, position_ids=positions, use_cache=True).logits

    policy = build_policy(PolicySpec(f"kvpress:{press}", dict(args)), 256)
    with StreamSession(embedded, policy) as session, session.unbounded():
        session.feed(context)
        torch.manual_seed(0)
        session.compress(int(180 * (1 - ratio)))
        held = np.sort(np.broadcast_to(session.held_positions(), (30, 3, 90)), axis=-1)
        got = session.feed(question)
    for layer, indices in chosen.items():
        np.testing.assert_array_equal(held[layer], indices, err_msg=f"{press}: layer {layer}")
    torch.testing.assert_close(
        torch.log_softmax(got.float(), -1), torch.log_softmax(want.float(), -1), atol=1e-4, rtol=0
    )


def test_compress_once_keeps_original_positions_exactly_and_then_evicts_no_more():
    """After a compress keeping positions, the next token's logits are a fresh forward's over
    exactly the kept tokens at their original positions (1 layer); a later eviction is refused."""
    from tiny_models import tiny_model

    model = tiny_model("llama", layers=1)
    ids = torch.randint(3, 96, (1, 41), generator=torch.Generator().manual_seed(4))
    session = StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec("streamingllm", {"start_size": 2}), 64))
    with session.unbounded():
        session.feed(ids[:, :40])
        session.compress(12)
        got = session.feed(ids[:, 40:41])[0, -1]
    kept = np.concatenate([[0, 1], np.arange(30, 41)])
    with torch.no_grad():
        want = model(input_ids=ids[:, kept], position_ids=torch.as_tensor(kept)[None]).logits[0, -1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert session.cache.frozen
    with pytest.raises(RuntimeError, match="evicts no more"):
        session.cache.evict(np.arange(4))


def test_needle_runs_in_both_protocols_from_the_cli(tiny_model_dir, small_text, tmp_path):
    import json

    from click.testing import CliRunner

    from streambench.cli.app import cli

    base = ["run", "-q", "--model", str(tiny_model_dir), "--task", "needle", "--text", str(small_text)]
    base += ["-t", "lengths=128", "-t", "depths=50", "-t", "answer_tokens=2", "--budget", "48"]
    for protocol in (["-t", "protocol=compress-once", "-t", "compression_ratio=0.5"], []):
        result = CliRunner().invoke(
            cli, base + protocol + ["--policy", "kvpress:KnormPress,streamingllm,dense", "--out", str(tmp_path)]
        )
        assert result.exit_code == 0, result.output
    results = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert len(results) == 6
    once = [r for r in results if r["info"]["protocol"] == "compress-once"]
    assert len(once) == 3 and all(r["config"]["task"]["args"]["compression_ratio"] == 0.5 for r in once)
    for r in once:  # half the context kept, whatever the policy's budget; dense keeps it all
        (record,) = r["records"]
        context = record["context_tokens"]
        assert record["compressed_to"] == (context if r["label"] == "dense" else int(context * 0.5))
    streamed = [r for r in results if r["info"]["protocol"] == "stream"]
    assert all("protocol" not in r["config"]["task"]["args"] for r in streamed)  # (hashes as before)


def test_hidden_states_survive_a_branch_that_grew_them():
    """A fork inside a prefill may enlarge the hidden-state rings; leaving it restores the rings
    and their size together (compress-once's teacher-forced answer runs on such a fork)."""
    from tiny_models import tiny_model

    model = tiny_model("llama", layers=1)
    policy = build_policy(PolicySpec("kvpress:SnapKVPress", {"window_size": 2, "window": 4}), 64)
    session = StreamSession(LoadedModel.wrap(model), policy)
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(5))
    with session.unbounded():
        session.feed(ids[:, :6])  # past the window of 4: the rings grow
        with session.fork():
            session.feed(ids[:, 6:30])  # and grow again inside the branch
        session.feed(ids[:, 6:8])
    (hidden,) = session.hidden.last()
    assert hidden.shape[1] == 8
    torch.testing.assert_close(hidden[0, -1], session.hidden.last(count=1)[0][0, -1])


def test_a_prefill_only_press_runs_in_compress_once_and_is_refused_in_a_stream(tiny_model_dir, small_text, tmp_path):
    """LeverageScore scores a whole context at once (one query per key): the needle's compress-once
    runs it; the stream protocol refuses it in one line before the model loads."""
    import json

    from click.testing import CliRunner

    from streambench.cli.app import cli

    base = ["run", "-q", "--model", str(tiny_model_dir), "--task", "needle", "--text", str(small_text)]
    base += ["-t", "lengths=128", "-t", "depths=50", "-t", "answer_tokens=2", "--budget", "48"]
    base += ["--policy", "kvpress:LeverageScorePress", "--out", str(tmp_path)]
    refused = CliRunner().invoke(cli, base)
    assert refused.exit_code == 2 and "scores a whole prefill at once" in refused.output, refused.output
    assert len([line for line in refused.output.splitlines() if line.strip()]) == 1
    result = CliRunner().invoke(cli, base + ["-t", "protocol=compress-once"])
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("*.json")
    (record,) = json.loads(path.read_text())["records"]
    assert record["compressed_to"] == 48


@pytest.mark.slow
@pytest.mark.parametrize("press", ["AdaKVPress", "CriticalAdaKVPress"])
def test_adakv_press_compress_once_equals_kvpress_masking_heads_apart(embedded, press):
    """AdaKVPress (and CriticalAdaKVPress, its two stages weighting by |W_o V|) over SnapKV:
    kvpress keeps the whole cache and masks each head's pruned keys in attention (a fake key
    whose weight underflows to zero); streambench evicts them, each head keeping its own count.
    The same tokens per layer and head, the question's log-probs to 1e-4."""
    from streambench.tasks.texts import DEFAULT_TEXT, load_text

    ids = torch.tensor([embedded.tokenizer(load_text(DEFAULT_TEXT))["input_ids"][:200]])
    context, question = ids[:, :180], ids[:, 180:]
    inner = inner_press("SnapKVPress(window_size=16)", "test")
    theirs = getattr(kvpress, press)(inner, alpha_safeguard=0.2)
    theirs.compression_ratio = 0.5
    from kvpress.attention_patch import patch_attention_functions
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    # kvpress's masking lives in its attention patch, which the bridge takes back when it imports
    # kvpress (it masks nothing itself): applied here for kvpress's own run alone
    saved = dict(ALL_ATTENTION_FUNCTIONS.items())
    patch_attention_functions()
    try:
        cache, _ = kvpress_prefill(embedded.model, theirs, context, read_back=False)
        layers = embedded.model.model.layers
        pruned = [layer.self_attn.masked_key_indices for layer in layers]
        with torch.no_grad():
            want = embedded.model(
                input_ids=question, cache=cache, position_ids=torch.arange(180, 200)[None], use_cache=True
            ).logits
    finally:
        for name, func in saved.items():
            ALL_ATTENTION_FUNCTIONS[name] = func
    for layer in layers:
        layer.self_attn.__dict__.pop("masked_key_indices", None)
    policy = build_policy(
        PolicySpec(f"kvpress:{press}", {"press": "SnapKVPress(window_size=16)", "alpha_safeguard": 0.2}), 256
    )
    with StreamSession(embedded, policy) as session, session.unbounded():
        session.feed(context)
        session.compress(90)
        held = session.held_positions()
        got = session.feed(question)
    assert session.cache.ragged  # (heads really kept different counts)
    for i, (_, heads, seq) in enumerate(pruned):
        theirs_kept = np.ones((3, 180), dtype=bool)
        theirs_kept[heads.numpy(), seq.numpy()] = False
        for h in range(3):
            mine = np.sort(held[i, h][held[i, h] >= 0])
            np.testing.assert_array_equal(mine, np.flatnonzero(theirs_kept[h]), err_msg=f"layer {i} head {h}")
    torch.testing.assert_close(
        torch.log_softmax(got.float(), -1), torch.log_softmax(want.float(), -1), atol=1e-4, rtol=0
    )


@pytest.mark.slow
def test_pyramidkv_press_compress_once_keeps_kvpress_layer_budgets(embedded):
    """PyramidKVPress: each layer keeps kvpress's own get_layer_budget of the context, by
    SnapKV's scores (a total kvpress rounds off the mean is evened by one token where needed),
    the same tokens where the counts agree."""
    from streambench.tasks.texts import DEFAULT_TEXT, load_text

    ids = torch.tensor([embedded.tokenizer(load_text(DEFAULT_TEXT))["input_ids"][:200]])
    context = ids[:, :180]
    theirs = kvpress.PyramidKVPress(compression_ratio=0.5, window_size=16)
    _, chosen = kvpress_prefill(embedded.model, theirs, context)
    policy = build_policy(PolicySpec("kvpress:PyramidKVPress", {"window_size": 16}), 256)
    with StreamSession(embedded, policy) as session, session.unbounded():
        session.feed(context)
        session.compress(90)
        held = session.held_positions()
    counts = (held >= 0).sum(-1)[:, 0]
    theirs_counts = np.array([chosen[i].shape[-1] for i in range(30)])
    assert counts.sum() == 90 * 30 and np.abs(counts - theirs_counts).max() <= 1
    assert (np.diff(theirs_counts) <= 0).all() and theirs_counts[0] > 2 * theirs_counts[-1]
    same = np.flatnonzero(counts == theirs_counts)
    assert len(same) >= 25
    for i in same:
        mine = np.sort(np.where(held[i] >= 0, held[i], 10**6), axis=-1)[:, : counts[i]]
        np.testing.assert_array_equal(mine, chosen[i], err_msg=f"layer {i}")
