"""kvpress presses as policies (`--policy kvpress:<Press>`): built, listed and refused in one line;
the same keep-sets and NLL as the native policy where the two define the same thing; a press
that breaks is one error naming it. Exactness, chunks and rollbacks of every streaming press are
in the conformance matrix (tests/policies/test_conformance.py)."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tiny_models import tiny_model

kvpress = pytest.importorskip("kvpress", reason="kvpress is not installed (./install.sh kvpress)")

from streambench.cli.app import cli  # noqa: E402
from streambench.engine.session import StreamSession  # noqa: E402
from streambench.errors import ConfigError, PolicyContractError  # noqa: E402
from streambench.models.loading import LoadedModel  # noqa: E402
from streambench.policies import POLICIES  # noqa: E402
from streambench.policies import kvpress_bridge as bridge  # noqa: E402
from streambench.policies.build import PolicySpec, apply_overrides, build_policy, resolve_policy  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def stream(name, args, budget, n=48, seed=3, layers=2, distinct=False):
    """Per-token NLL and the positions kept per (layer, head) at the end. distinct: no token
    repeats (a repeated token's layer-0 key norm ties exactly, and ties fall as kvpress's topk
    lets them in a press, the newest first in a native policy)."""
    model = tiny_model("llama", layers=layers)
    session = StreamSession(LoadedModel.wrap(model), build_policy(PolicySpec(name, dict(args)), budget))
    generator = torch.Generator().manual_seed(seed)
    if distinct:
        ids = (torch.randperm(93, generator=generator)[:n] + 3)[None]
    else:
        ids = torch.randint(3, 96, (1, n), generator=generator)
    logits = torch.cat([session.feed(ids[:, t : t + 1]) for t in range(n - 1)], dim=1)
    nll = torch.nn.functional.cross_entropy(logits[0].float(), ids[0, 1:], reduction="none")
    heads = session.cache.kv_heads
    kept = np.sort(np.broadcast_to(session.held_positions(), (layers, heads, session.kv_tokens)), axis=-1)
    return nll, kept


def test_a_press_is_a_policy_with_its_own_fields_and_provenance():
    cls = POLICIES.get("kvpress:SnapKVPress")
    policy = build_policy(PolicySpec("kvpress:SnapKVPress", {"window_size": 8}), 64)
    assert policy.args() == {
        "budget": 64,
        "start_size": 0,
        "window": 256,
        "interval": None,
        "window_size": 8,
        "kernel_size": 5,
    }
    assert cls.summary.startswith("kvpress SnapKVPress: SnapKV")
    origin = POLICIES.origin("kvpress:SnapKVPress")
    assert origin["distribution"] == "kvpress" and origin["version"] == bridge.KVPRESS_VERSION
    spec = resolve_policy("kvpress:SnapKVPress", {})
    apply_overrides([spec], {"kvpress:SnapKVPress.window_size": 32})
    assert spec.args == {"window_size": 32}


@pytest.mark.parametrize(
    "name,message",
    [
        ("kvpress:CompactorPress", "scores a whole prefill at once"),
        ("kvpress:PerLayerCompressionPress", "needs its per-layer ratios"),
        ("kvpress:ComposedPress", "cannot be split between its stages"),
        ("kvpress:ThinKPress", "key channels"),
        ("kvpress:KVzipPress", "downloads"),
        ("kvpress:QFilterPress", "could not load what it needs for this model"),
        ("kvpress:DecodingPress", "-p interval=N"),
        ("kvpress:ScorerPress", "scores nothing"),
        ("kvpress:NoSuchPress", "has no 'NoSuchPress'"),
    ],
)
def test_a_press_that_does_not_run_in_the_stream_is_one_line(name, message, tmp_path):
    result = CliRunner().invoke(cli, ["run", "--policy", name, "--tokens", "16", "-q", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output


@pytest.mark.parametrize(
    "ratios,message",
    [
        ("[0.5,0.5]", "has 2 ratios for a model of 30 layers"),
        ("[0.5,1.5]", "holds 1.5, not a ratio in [0, 1)"),
        ("half", "must be a list of numbers"),
    ],
)
def test_per_layer_ratios_are_one_line_when_wrong(ratios, message, tmp_path):
    args = ["run", "--policy", "kvpress:PerLayerCompressionPress", "-p", f"compression_ratios={ratios}"]
    result = CliRunner().invoke(cli, [*args, "--budget", "128", "--tokens", "16", "-q", "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output


def test_press_arguments_are_checked_before_anything_loads():
    with pytest.raises(ConfigError, match="window_size must be an integer"):
        build_policy(PolicySpec("kvpress:SnapKVPress", {"window_size": "x"}), 64)
    with pytest.raises(ConfigError, match="interval 64 leaves no room"):
        build_policy(PolicySpec("kvpress:KnormPress", {"interval": 64}), 64)


def test_knorm_press_keeps_what_the_native_knorm_keeps():
    """KnormPress (-||k||) and streambench's knorm with no sinks define the same keep-set."""
    press, press_kept = stream("kvpress:KnormPress", {}, 16, distinct=True)
    native, native_kept = stream("knorm", {"start_size": 0}, 16, distinct=True)
    np.testing.assert_array_equal(press_kept, native_kept)
    torch.testing.assert_close(press, native, atol=1e-5, rtol=0)


def test_streamingllm_press_keeps_sinks_and_the_recent_window():
    """StreamingLLMPress(n_sink=4) in the stream is StreamingLLM: 4 sinks + the most recent."""
    press, press_kept = stream("kvpress:StreamingLLMPress", {"n_sink": 4}, 16)
    native, native_kept = stream("streamingllm", {"start_size": 4}, 16)
    np.testing.assert_array_equal(press_kept, native_kept)
    torch.testing.assert_close(press, native, atol=1e-5, rtol=0)


def test_snapkv_press_keeps_what_the_native_snapkv_keeps_at_interval_one():
    """SnapKVPress re-projects its window's queries from hidden states; snapkv reuses the queries
    the forward computed: the same window attention, pooled and grouped alike."""
    press, press_kept = stream("kvpress:SnapKVPress", {"window_size": 4, "kernel_size": 3}, 16)
    native, native_kept = stream("snapkv", {"window": 4, "kernel": 3, "interval": 1}, 16)
    np.testing.assert_array_equal(press_kept, native_kept)
    torch.testing.assert_close(press, native, atol=1e-5, rtol=0)


def test_tova_press_keeps_the_newest_token_where_tova_lets_it_compete():
    _, press_kept = stream("kvpress:TOVAPress", {}, 16)
    _, native_kept = stream("tova", {}, 16)
    assert not np.array_equal(press_kept, native_kept)  # the definitions differ (docs/policies.md)
    assert (press_kept == 46).any(axis=-1).all()  # the newest fed token stays in every head


def test_interval_compresses_every_n_tokens_to_budget_less_n():
    """interval=N (kvpress DecodingPress): the cache runs from budget - N up to budget."""
    model = LoadedModel.wrap(tiny_model("llama", layers=1))
    session = StreamSession(model, build_policy(PolicySpec("kvpress:KnormPress", {"interval": 4}), 16))
    ids = torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(1))
    sizes = []
    for t in range(40):
        session.feed(ids[:, t : t + 1])
        sizes.append(session.kv_tokens)
    assert max(sizes) == 16 and sizes[16:] == [13, 14, 15, 16] * 6  # evicted to 12, then 4 tokens fed


def test_a_broken_press_is_one_error_naming_it(tmp_path):
    plugin = tmp_path / "presses.py"
    plugin.write_text(
        "import torch\n"
        "from dataclasses import dataclass\n"
        "from kvpress import ScorerPress\n"
        "@dataclass\n"
        "class Raises(ScorerPress):\n"
        "    def score(self, module, hidden_states, keys, values, attentions, kwargs):\n"
        "        raise ValueError('boom')\n"
        "@dataclass\n"
        "class Flat(ScorerPress):\n"
        "    def score(self, module, hidden_states, keys, values, attentions, kwargs):\n"
        "        return keys.norm(dim=-1)[0]\n"
        "@dataclass\n"
        "class NaNs(ScorerPress):\n"
        "    def score(self, module, hidden_states, keys, values, attentions, kwargs):\n"
        "        return keys.norm(dim=-1) * float('nan')\n"
    )
    model = LoadedModel.wrap(tiny_model("llama", layers=1))
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(1))
    for cls, message in (
        ("Raises", "score\\(\\) failed: ValueError: boom"),
        ("Flat", "score\\(\\) returned \\(\\d+, 8\\), not \\(1, \\d+, 8\\)"),
        ("NaNs", "score\\(\\) returned NaN scores"),
    ):
        policy = build_policy(PolicySpec(f"{plugin}:{cls}"), 8)
        session = StreamSession(model, policy)
        with pytest.raises(PolicyContractError, match=f"policy {re.escape(str(plugin))}:{cls}: the press's {message}"):
            for t in range(20):
                session.feed(ids[:, t : t + 1])


def test_the_readme_press_table_is_the_generated_one():
    """The README's table of presses is generated from kvpress's code (`bridge.status_table()`)."""
    readme = (ROOT / "README.md").read_text()
    assert bridge.status_table() in readme, (
        "regenerate: python -c 'from streambench.policies import kvpress_bridge as b; print(b.status_table())'"
    )


def test_list_presses_names_each_with_its_status():
    result = CliRunner().invoke(cli, ["list", "presses"])
    assert result.exit_code == 0, result.output
    assert "kvpress:SnapKVPress" in result.output and "streaming" in result.output
    assert re.search(r"kvpress:ThinKPress\s+refused\s+prunes key channels", result.output)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("Foo", "kvpress has no press 'Foo'"),
        ("KnormPress(x=1)", "KnormPress refused its arguments"),
        ("AdaKVPress", "AdaKVPress cannot be rescored"),
        ("CriticalKVPress", "itself a wrapper"),
        ("SnapKVPress(window_size=foo)", "values must be literals"),
        ("SnapKVPress(4)", "as Name or Name(arg=value)"),
        ("__import__('os')", "as Name or Name(arg=value)"),
    ],
)
def test_a_wrapper_is_given_its_press_by_name_and_a_bad_one_is_one_line(spec, message, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["run", "--policy", "kvpress:CriticalKVPress", "-p", f"kvpress:CriticalKVPress.press={spec}"]
        + ["--tokens", "16", "--budget", "64", "-q", "--out", str(tmp_path)],
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not list(tmp_path.iterdir())


def test_a_wrapper_collects_what_its_press_reads():
    """CriticalKV over Knorm needs no hidden states; over SnapKV it does; the wrapped press's
    window is checked against the budget like a bridged press's own."""
    knorm = build_policy(PolicySpec("kvpress:CriticalKVPress", {"press": "KnormPress"}), 64)
    assert "hidden_states" not in knorm.observes and type(knorm._press.press).__name__ == "KnormPress"
    snap = build_policy(PolicySpec("kvpress:CriticalKVPress", {"press": "SnapKVPress(window_size=16)"}), 64)
    assert "hidden_states" in snap.observes and snap._press.press.window_size == 16
    with pytest.raises(
        ConfigError, match=r"window_size 64 must be below the budget 64.*press=SnapKVPress\(window_size"
    ):
        build_policy(PolicySpec("kvpress:CriticalKVPress", {}), 64)
    observed = build_policy(PolicySpec("kvpress:ObservedAttentionPress", {}), 64)
    assert "attention_sum" in observed.observes and "hidden_states" not in observed.observes
    # values are gathered for a press whose score() reads them, and for a wrapper that does
    for name, args, reads in [
        ("kvpress:KnormPress", {}, False),
        ("kvpress:SnapKVPress", {"window_size": 16}, False),
        ("kvpress:ExpectedAttentionPress", {}, True),  # (its value norms)
        ("kvpress:CriticalKVPress", {"press": "KnormPress"}, True),  # (the wrapper's own projection)
    ]:
        assert ("values" in build_policy(PolicySpec(name, args), 64).observes) == reads, name


@pytest.mark.parametrize("wrapper", ["BlockPress", "KeyRerotationPress"])
def test_a_wrapper_that_only_chooses_differently_is_its_press_in_a_stream(wrapper):
    """Fed token by token, an eviction is one block (BlockPress scores the kept and the new
    together, its press's top-k) and the engine re-indexes every eviction anyway (what
    KeyRerotationPress adds to a prefill's): both keep what their press alone keeps."""
    args = {"press": "SnapKVPress(window_size=4, kernel_size=3)"}
    if wrapper == "BlockPress":
        args["block_size"] = 8
    wrapped, wrapped_kept = stream(f"kvpress:{wrapper}", args, 16, n=60, distinct=True)
    plain, plain_kept = stream("kvpress:SnapKVPress", {"window_size": 4, "kernel_size": 3}, 16, n=60, distinct=True)
    np.testing.assert_array_equal(wrapped_kept, plain_kept)
    torch.testing.assert_close(wrapped, plain, atol=1e-5, rtol=0)


def test_block_press_over_a_press_reading_hidden_states_evicts_one_block_at_a_time():
    with pytest.raises(ConfigError, match=r"interval 40 must not exceed block_size 32"):
        build_policy(
            PolicySpec("kvpress:BlockPress", {"press": "SnapKVPress(window_size=8)", "block_size": 32, "interval": 40}),
            128,
        )
    # over a press of keys alone, blocks need no hidden states: any interval
    policy = build_policy(PolicySpec("kvpress:BlockPress", {"press": "KnormPress", "block_size": 4, "interval": 8}), 32)
    assert "hidden_states" not in policy.observes


def test_tova_press_given_the_newest_querys_attention_keeps_what_its_reprojection_keeps(monkeypatch):
    """TOVAPress scores from `attentions[..., -1:, :-1]` when kvpress has eager attention and
    re-projects the newest query from hidden states otherwise; given the engine's row of that
    attention (`attention_last`, ATTENTION_ROWS) it keeps what the re-projection keeps, and needs
    no hidden states."""
    policy = build_policy(PolicySpec("kvpress:TOVAPress", {}), 16)
    assert "attention_last" in policy.observes and "hidden_states" not in policy.observes
    given, given_kept = stream("kvpress:TOVAPress", {}, 16, n=60, distinct=True)
    monkeypatch.setattr(bridge, "ATTENTION_ROWS", {})
    monkeypatch.setitem(bridge.KEY_FRAMES, "TOVAPress", "held")
    policy = build_policy(PolicySpec("kvpress:TOVAPress", {}), 16)
    assert "hidden_states" in policy.observes and "attention_last" not in policy.observes
    projected, projected_kept = stream("kvpress:TOVAPress", {}, 16, n=60, distinct=True)
    np.testing.assert_array_equal(given_kept, projected_kept)
    torch.testing.assert_close(given, projected, atol=1e-5, rtol=0)


FRAME_ARGS = {
    "SnapKVPress": {"window_size": 4, "kernel_size": 3},
    "StreamingLLMPress": {"n_sink": 2},
    "RandomPress": {"seed": 0},
}


@pytest.mark.parametrize("press", sorted(bridge.KEY_FRAMES))
def test_a_press_given_keys_as_held_keeps_what_it_keeps_given_keys_at_ranks(press, monkeypatch):
    """KEY_FRAMES' claim, press by press: the keys as the cache holds them (rank + offset, the
    window's positions moved with them) or their shape alone give the keep-sets and NLL of keys
    turned back to ranks 0..n-1 (what every other press gets), over a stream whose offset moves."""
    name, args = f"kvpress:{press}", FRAME_ARGS.get(press, {})
    frame = bridge.KEY_FRAMES[press]
    assert bridge.KEY_OBSERVATION[frame] in build_policy(PolicySpec(name, dict(args)), 16).observes
    cheap, cheap_kept = stream(name, args, 16, n=60, distinct=True)
    monkeypatch.setitem(bridge.KEY_FRAMES, press, "ranks")
    assert "keys" in build_policy(PolicySpec(name, dict(args)), 16).observes
    ranks, ranks_kept = stream(name, args, 16, n=60, distinct=True)
    np.testing.assert_array_equal(cheap_kept, ranks_kept)
    torch.testing.assert_close(cheap, ranks, atol=1e-5, rtol=0)


def test_a_press_that_learned_per_model_is_bound_to_the_model_once(tmp_path):
    """kvpress's post_init_from_model runs when a session starts on a model (once per model), as
    BasePress.__call__ runs it; what it loads is then there when the press scores."""
    seen = []

    @dataclasses.dataclass
    class LearnedKnorm(kvpress.KnormPress):
        def post_init_from_model(self, model):
            seen.append(model)

    policy = bridge.adapt(LearnedKnorm)(budget=24)
    model = tiny_model("llama", layers=2)
    lm = LoadedModel.wrap(model)
    with StreamSession(lm, policy) as session:
        session.feed(torch.randint(3, 96, (1, 40), generator=torch.Generator().manual_seed(0)))
    with StreamSession(lm, policy) as session:  # a second session on the same model: already bound
        session.feed(torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(1)))
    assert seen == [model]
