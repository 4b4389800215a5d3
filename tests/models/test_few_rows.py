"""A session's linears on a CPU (models/few_rows.py): a batch's take W @ x^T for a few rows (the
same products as nn.Linear to float rounding), a group's and a stream alone's one-token steps
take products of 2-3 columns that give each row the same bits wherever it sits (proven per
weight shape), and nn.Linear's own bits outside a session's forward."""

import pytest
import torch
from tiny_models import tiny_model

from streambench.engine.session import StreamSession
from streambench.models import few_rows
from streambench.models.few_rows import EXACT_ROWS, MAX_ROWS, FewRowsLinear, exact_steps, few_rows_linears, install
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
    with few_rows_linears("few"):
        got = swapped(x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    taken = []
    for name in ("mm", "addmm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, real=real: taken.append(a[-2] is swapped.weight) or real(*a))
    with few_rows_linears("few"):
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
        with few_rows_linears("exact"):
            assert few_rows._mode == "exact"
            raise KeyError
    assert few_rows._mode is None
    with few_rows_linears("few"), few_rows_linears(None):
        assert few_rows._mode == "few"  # (an inner block without a mode keeps the outer one's)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(40, 24), (7, 33), (96, 64)])
def test_exact_steps_give_each_row_the_bits_it_has_alone(shape, bias):
    """Each row of a forward of 1..EXACT_ROWS rows, in "exact", has the bits that row has in "one"
    alone (the products a group's step and a stream's step take), whatever its neighbours."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(shape[1], shape[0], bias=bias)
    install(linear)
    if not linear.exact:
        pytest.skip("this CPU's GEMM does not compute a column alike in 2- and 3-column products")
    x = torch.randn(EXACT_ROWS + 1, 1, shape[1])
    with torch.no_grad():
        with few_rows_linears("one"):
            alone = [linear(x[i : i + 1]) for i in range(len(x))]
            assert torch.equal(linear(x[:2]), torch.nn.functional.linear(x[:2], linear.weight, linear.bias))
        for rows in range(1, EXACT_ROWS + 2):
            with few_rows_linears("exact"):
                out = linear(x[:rows])
            assert out.shape == (rows, 1, shape[0]) and out.is_contiguous()
            if rows <= EXACT_ROWS:
                for i in range(rows):
                    assert torch.equal(out[i : i + 1], alone[i]), (rows, i)
            torch.testing.assert_close(out, torch.nn.functional.linear(x[:rows], linear.weight, linear.bias))


def test_a_gemm_that_fails_the_proof_keeps_nothing_exact(monkeypatch):
    """Where a column's bits depend on its neighbours, install proves it, no weight is exact and
    the session's groups take the few-rows layout (knorm then runs alone: runs/grouping.py)."""
    real_mm, real_addmm = torch.mm, torch.addmm
    monkeypatch.setattr(few_rows, "_proven", {})
    monkeypatch.setattr(torch, "mm", lambda a, b: real_mm(a, b) + 1e-3 * b.sum())  # (the neighbours count)
    monkeypatch.setattr(torch, "addmm", lambda c, a, b: real_addmm(c, a, b) + 1e-3 * b.sum())
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8, bias=False))
    assert install(model) and not model[0].exact and not model[1].exact and not exact_steps(model)
    monkeypatch.setattr(torch, "mm", real_mm)
    monkeypatch.setattr(torch, "addmm", real_addmm)
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    monkeypatch.setattr(few_rows, "_proven", {key: False for key in few_rows._proven} | _failing(lm.model))
    for module in lm.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.__class__ = torch.nn.Linear  # (installed afresh by the session)
    group = [build_policy(PolicySpec(name), 8) for name in ("h2o", "tova")]
    with StreamSession(lm, group[0], group=group) as together:
        assert together._few_rows == "few"


def _failing(model) -> dict:
    """`_proven` keys of every linear of `model`, marked failed."""
    keys = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            keys[(*m.weight.shape, m.bias is not None, torch.get_num_threads())] = False
    return keys


def _seen_in_forwards(session, ids):
    """(the head is FewRowsLinear, the mode) of each forward of `session.feed(ids)`."""
    seen = []
    head = session.model.lm_head
    handle = head.register_forward_hook(lambda *_: seen.append((type(head) is FewRowsLinear, few_rows._mode)))
    try:
        session.feed(ids)
    finally:
        handle.remove()
    return seen


def test_each_session_takes_its_mode():
    """A stream alone: "one"; a group: "exact" where proven; batched texts: "few"; and nothing
    outside a session's forward (the class stays, the switch is off)."""
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    ids = torch.arange(3, 13)[None]
    with StreamSession(lm, build_policy(PolicySpec("h2o"), 8)) as alone:
        assert _seen_in_forwards(alone, ids[:, :1]) == [(True, "one")]
    exact = "exact" if exact_steps(lm.model) else "few"
    group = [build_policy(PolicySpec(name), 8) for name in ("h2o", "tova")]
    with StreamSession(lm, group[0], group=group) as together:
        assert _seen_in_forwards(together, ids[:, :1].expand(2, -1)) == [(True, exact)]
    with StreamSession(lm, build_policy(PolicySpec("streamingllm"), 8), batch_size=3) as texts:
        assert all(mode == "few" for _, mode in _seen_in_forwards(texts, ids.expand(3, -1)))
    seen = []
    handle = lm.model.lm_head.register_forward_hook(lambda *_: seen.append(few_rows._mode))
    lm.model(input_ids=ids)
    handle.remove()
    assert seen == [None]


def test_a_batched_stream_matches_it_alone_through_the_few_rows_path():
    """One-token steps of three streams (the few-rows path) against each alone (its exact
    steps): the logits of a 2-layer model, through evictions."""
    lm = LoadedModel.wrap(tiny_model("llama", layers=2))
    ids = torch.randint(3, 96, (3, 30), generator=torch.Generator().manual_seed(1))
    with StreamSession(lm, build_policy(PolicySpec("streamingllm"), 12), batch_size=3) as batched:
        together = torch.cat([batched.feed(ids[:, i : i + 1]) for i in range(ids.shape[1])], dim=1)
    for b in range(3):
        with StreamSession(lm, build_policy(PolicySpec("streamingllm"), 12)) as alone:
            single = torch.cat([alone.feed(ids[b : b + 1, i : i + 1]) for i in range(ids.shape[1])], dim=1)
        torch.testing.assert_close(together[b : b + 1], single, atol=2e-5, rtol=0)
