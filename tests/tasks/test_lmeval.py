"""The lm-eval bridge against lm-eval's own `hf` model and streambench's own perplexity."""

import math

import pytest
import torch
from lm_eval.api.instance import Instance

from streambench.tasks.lm_eval.model import StreambenchLM, register


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=1)


@pytest.fixture(scope="module")
def bridge(tiny_model_dir):
    return lambda **kw: StreambenchLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", **kw)


PAIRS = [
    ("The capital of France is", " Paris"),
    ("It was the best of times, it was the", " worst of times"),
    ("Question: 2 + 2 = ", "4"),
    ("", "An empty context"),
]


def test_dense_loglikelihoods_equal_lm_evals_hf_model(hf_model, bridge):
    requests = [req("loglikelihood", c, x) for c, x in PAIRS]
    ours = bridge(policy="dense").loglikelihood(requests)
    theirs = hf_model.loglikelihood(requests)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def test_rolling_loglikelihood_equals_streaming_perplexity(bridge, tiny_model_dir, small_text):
    """Budget 8 over 120 tokens: many evictions; the bridge's rolling loglikelihood is exactly the
    session's token-by-token NLL over [prefix] + text."""
    from streambench.engine.session import StreamSession
    from streambench.models import loading as models
    from streambench.policies.build import PolicySpec, build_policy

    text = small_text.read_text()[:120]
    bridged = bridge(policy="streamingllm", budget=8, start_size=2)
    got = bridged.loglikelihood_rolling([req("loglikelihood_rolling", text)])[0]
    lm = models.load(str(tiny_model_dir), "cpu", "float32")
    ids = torch.tensor([[bridged.prefix_token_id] + lm.tokenizer.encode(text)])
    session = StreamSession(lm, build_policy(PolicySpec("streamingllm", {"start_size": 2}), 8))
    nll = sum(
        torch.nn.functional.cross_entropy(session.feed(ids[:, t : t + 1])[0, -1:].float(), ids[0, t + 1 : t + 2]).item()
        for t in range(ids.shape[1] - 1)
    )
    assert got == pytest.approx(-nll, abs=1e-3)
    for chunk in (1, 5, 200):  # exact chunks of any size (the default: 64)
        again = bridge(policy="streamingllm", budget=8, start_size=2, chunk_size=chunk)
        assert again.loglikelihood_rolling([req("loglikelihood_rolling", text)])[0] == pytest.approx(-nll, abs=1e-3)
    dense = bridge(policy="dense").loglikelihood_rolling([req("loglikelihood_rolling", text)])[0]
    assert dense != pytest.approx(got, abs=1e-2)  # the budget changed something
    assert math.isfinite(got)


def test_generate_until_stops_at_until(bridge):
    """Logits forced to cycle a -> b -> c -> d -> e -> a (a bigram table on the real tiny model)."""
    from test_dialogue import Bigram

    lm = bridge(policy="window", budget=16)
    stub = Bigram(lm.loaded.model)
    for a, b in zip("eabcd", "abcde"):
        stub.prefer(a, b)
    ask = lambda kwargs: lm.generate_until([req("generate_until", "Once upon a time", kwargs)])[0]  # noqa: E731
    assert ask({"until": [], "max_gen_toks": 12}) == "abcdeabcdeab"  # stops at max_gen_toks, window evicting
    assert ask({"until": ["d"], "max_gen_toks": 12}) == "abc"
    assert ask({"until": ["ea", "q"], "max_gen_toks": 50}) == "abcd"
    stub.prefer("c", lm.eot_token_id, 50.0)
    assert ask({"until": ["zz"], "max_gen_toks": 50}) == "abc"  # the end-of-text token stops it


def test_registered_for_lm_eval_by_name(tiny_model_dir):
    from lm_eval.api.registry import get_model

    register()
    cls = get_model("streambench")
    assert cls is StreambenchLM and get_model("hf") is not None
    lm = cls.create_from_arg_string(
        f"pretrained={tiny_model_dir},policy=streamingllm,budget=16,start_size=2,device=cpu,dtype=float32"
    )
    assert lm.spec.args == {"start_size": 2} and lm.budget == 16


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_shipped_offline_task_end_to_end_under_two_policies(tiny_model_dir, tmp_path, stream):
    import json

    from click.testing import CliRunner

    from streambench.cli.app import cli

    args = [
        "lm-eval",
        "-q",
        "--model",
        str(tiny_model_dir),
        "--policy",
        "window,streamingllm",
        "--budget",
        "200",
        "--limit",
        "5",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ] + (["--stream"] if stream else [])
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "streambench_mc/acc" in result.output and "streambench_ppl/word_perplexity" in result.output
    assert "window (budget 200):" in result.output and "|streambench_mc " in result.output  # lm-eval's table
    runs = [json.loads(f.read_text()) for f in tmp_path.glob("*.json")]
    assert len(runs) == 2
    for r in runs:
        m = r["metrics"]
        assert 0 <= m["streambench_mc/acc"] <= 1 and m["streambench_ppl/word_perplexity"] > 1
        assert r["higher_is_better"]["streambench_mc/acc"] is True
        assert r["higher_is_better"]["streambench_ppl/word_perplexity"] is False
        assert r["config"]["task"]["args"]["stream"] is stream and r["info"]["n_samples"]


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_sessions_remove_their_hooks_after_requests_and_runs(tmp_path, tiny_model_dir, small_text):
    """longmem's query taps leave the shared model when a session closes: after 100 lm-eval
    requests (one session each), in streaming mode, and after a sweep of runs."""
    from types import SimpleNamespace

    from streambench.models import loading as models
    from streambench.tasks.lm_eval.model import StreambenchLM

    lm = models.load(str(tiny_model_dir), device="cpu", dtype="float32")
    before = hook_count(lm.model)
    args = {"start_size": 2, "block_size": 2, "top_k": 1, "refresh": 3, "bank_tokens": 16}
    model = StreambenchLM(lm=lm, policy="longmem", budget=12, **args)
    requests = [SimpleNamespace(args=("ab" * (3 + i % 5), "cd")) for i in range(100)]
    model.loglikelihood(requests)
    model.loglikelihood_rolling([SimpleNamespace(args=("hello world " * 3,))])
    assert hook_count(lm.model) == before
    streaming = StreambenchLM(lm=lm, policy="longmem", budget=64, stream=True, start_size=2, block_size=2, top_k=2)
    streaming.loglikelihood(requests[:10])
    assert hook_count(lm.model) == before + lm.info.num_layers  # the one endless stream holds its taps
    streaming.close()
    assert hook_count(lm.model) == before

    from streambench.policies.build import resolve_policy
    from streambench.runs import runner
    from streambench.runs.config import RunConfig

    config = RunConfig(
        model=str(tiny_model_dir),
        device="cpu",
        dtype="float32",
        budget=96,
        out=str(tmp_path),
        policies=[resolve_policy("longmem", {}), resolve_policy("longmem-paper", {})],
        task_args={"text": str(small_text), "tokens": 160},
    )
    assert len(list(runner.run(config, lm=lm))) == 2
    assert hook_count(lm.model) == before
