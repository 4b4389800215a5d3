"""A batched session's linears take W @ x^T for a few rows (models/few_rows.py): the same
products as nn.Linear to float rounding, nn.Linear's own bits outside a batched forward, and
only the batched sessions' forwards take it."""

import pytest
import torch
from tiny_models import tiny_model

from streambench.engine.session import StreamSession
from streambench.models import few_rows
from streambench.models.few_rows import MAX_ROWS, FewRowsLinear, few_rows_linears, install
from streambench.models.loading import LoadedModel
from streambench.policies.build import PolicySpec, build_policy


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 24), (2, 24), (5, 1, 24), (3, 4, 24), (MAX_ROWS, 24), (MAX_ROWS + 1, 24)])
def test_the_few_rows_product_is_the_linear_one(shape, bias, monkeypatch):
    torch.manual_seed(0)
    plain = torch.nn.Linear(24, 40, bias=bias)
    swapped = torch.nn.Linear(24, 40, bias=bias)
    swapped.load_state_dict(plain.state_dict())
    assert install(swapped) and type(swapped) is FewRowsLinear
    x = torch.randn(*shape)
    want = plain(x)
    assert torch.equal(swapped(x), want)  # outside the block: nn.Linear's own call, bit for bit
    with few_rows_linears(True):
        got = swapped(x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    taken = []
    for name in ("mm", "addmm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, real=real: taken.append(a[-2] is swapped.weight) or real(*a))
    with few_rows_linears(True):
        swapped(x)
    rows = x.numel() // x.shape[-1]
    assert taken == ([True] if 2 <= rows <= MAX_ROWS else [])  # (W @ x^T exactly where it pays)


def test_only_plain_fp32_cpu_linears_are_swapped():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4).to(torch.bfloat16), torch.nn.ReLU())

    class Special(torch.nn.Linear):
        pass

    model.append(Special(4, 4))
    assert install(model)
    assert [type(m) for m in model] == [FewRowsLinear, torch.nn.Linear, torch.nn.ReLU, Special]
    assert install(model)  # (twice: the same)
    assert not install(torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.bfloat16)))


def test_the_block_restores_the_switch_however_it_ends():
    with pytest.raises(KeyError):
        with few_rows_linears(True):
            assert few_rows._active
            raise KeyError
    assert not few_rows._active
    with few_rows_linears(True), few_rows_linears(False):
        assert few_rows._active  # (an inner session alone inside a batched one's block)


def _seen_in_forwards(session, ids):
    """Whether each forward of `session.feed(ids)` ran with the few-rows switch on."""
    seen = []
    head = session.model.lm_head
    handle = head.register_forward_hook(lambda *_: seen.append((type(head) is FewRowsLinear, few_rows._active)))
    try:
        session.feed(ids)
    finally:
        handle.remove()
    return seen


def test_batched_sessions_take_it_and_a_stream_alone_does_not():
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    ids = torch.arange(3, 13)[None]
    with StreamSession(lm, build_policy(PolicySpec("h2o"), 8)) as alone:
        assert all(not on for _, on in _seen_in_forwards(alone, ids[:, :1]))
    group = [build_policy(PolicySpec(name), 8) for name in ("h2o", "tova")]
    with StreamSession(lm, group[0], group=group) as together:
        assert _seen_in_forwards(together, ids[:, :1].expand(2, -1)) == [(True, True)]
    with StreamSession(lm, build_policy(PolicySpec("h2o"), 8)) as after:  # (the class stays; the switch is off)
        assert _seen_in_forwards(after, ids[:, 1:2]) == [(True, False)]
    with StreamSession(lm, build_policy(PolicySpec("streamingllm"), 8), batch_size=3) as texts:
        assert all(on for _, on in _seen_in_forwards(texts, ids.expand(3, -1)))


def test_a_batched_stream_matches_it_alone_through_the_few_rows_path():
    """One-token steps of three streams (the few-rows path) against each alone (nn.Linear's
    GEMV): the logits of a 2-layer model, through evictions."""
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    ids = torch.randint(3, 96, (3, 30), generator=torch.Generator().manual_seed(1))
    with StreamSession(lm, build_policy(PolicySpec("streamingllm"), 12), batch_size=3) as batched:
        together = torch.cat([batched.feed(ids[:, i : i + 1]) for i in range(ids.shape[1])], dim=1)
    for b in range(3):
        with StreamSession(lm, build_policy(PolicySpec("streamingllm"), 12)) as alone:
            single = torch.cat([alone.feed(ids[b : b + 1, i : i + 1]) for i in range(ids.shape[1])], dim=1)
        torch.testing.assert_close(together[b : b + 1], single, atol=2e-5, rtol=0)
