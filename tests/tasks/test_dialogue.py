"""Dialogue scoring as SirLLM specifies it, on a real tiny model whose next-token logits are forced
by a bigram table (hooks on its embedding and LM head), so every choice is known in advance."""

import numpy as np
import pytest
import torch
from tiny_models import byte_tokenizer, tiny_model

from streambench.engine.meter import Meter
from streambench.engine.session import StreamSession
from streambench.models.loading import LoadedModel
from streambench.policies.build import PolicySpec, build_policy
from streambench.tasks.base import NoProgress
from streambench.tasks.build import build_task
from streambench.tasks.dialogue.chat_format import Conversation
from streambench.tasks.dialogue.items import MOVES, generate_grocery, player_moves

END, NL = 257, 10  # <|im_end|>, "\n"


class Bigram:
    """Forces logits[t] = table[token t]: the next token depends only on the current one."""

    def __init__(self, model, vocab=258):
        self.table = torch.zeros(vocab, vocab)
        self.fed: list[int] = []  # every token the model was run on, in order
        self._ids = None
        model.model.embed_tokens.register_forward_pre_hook(self._capture)
        model.lm_head.register_forward_hook(self._force)

    def prefer(self, after: str | int, token: str | int, strength: float = 20.0):
        a = after if isinstance(after, int) else ord(after)
        b = token if isinstance(token, int) else ord(token)
        self.table[a, b] = strength

    def _capture(self, _module, args):
        self._ids = args[0]
        self.fed.extend(args[0][0].tolist())

    def _force(self, _module, _inputs, output):
        return self.table[self._ids].to(output.dtype)


def conversation(policy="streamingllm", budget=200, **args):
    model = tiny_model("llama", layers=2, vocab=258)
    stub = Bigram(model)
    session = StreamSession(LoadedModel.wrap(model, byte_tokenizer()), build_policy(PolicySpec(policy, args), budget))
    return Conversation(session, session.lm.tokenizer), stub


def test_greedy_match_wins_over_first_token_probability():
    conv, stub = conversation()
    # both replies start with "A"; greedy decoding continues A -> C -> <|im_end|> -> "\n"
    stub.prefer(NL, "A")
    stub.prefer("A", "C")
    stub.prefer("C", END)
    stub.prefer(END, NL)
    chosen, scored = conv.ask("pick", ["AB", "AC"])
    assert [c.greedy for c in scored] == [False, True]
    assert scored[0].logprob == pytest.approx(scored[1].logprob)
    assert chosen == 1  # the greedy match, although the log-probabilities tie (index 0 would win)


def test_first_token_probability_decides_without_a_greedy_match_and_always_in_rps():
    conv, stub = conversation()
    stub.prefer(NL, "B", 5.0)
    stub.prefer(NL, "C", 4.0)
    stub.prefer("C", END)
    stub.prefer(END, NL)  # "C" is a greedy match only if "C" were the argmax after "\n"; it is not
    chosen, scored = conv.ask("pick", ["A", "B", "C"])
    assert not any(c.greedy for c in scored) and chosen == 1
    stub.prefer(NL, "C", 9.0)  # now "C" is both greedy and most probable
    assert conv.ask("again", ["A", "B", "C"])[0] == 2
    stub.prefer(NL, "A", 9.5)  # RPS rule: first-token log-probability only
    stub.prefer("A", "x")
    before = conv.session.processed
    chosen, scored = conv.ask("rps", ["A", "B", "C"], by_greedy=False)
    assert chosen == 0 and all(c.greedy is None for c in scored)  # not computed: no branch forwards
    context = conv.encode(conv.fmt.user_turn("rps", first=False)).shape[1]
    assert conv.session.processed - before == context + conv._reply_ids("A").shape[1]


def test_the_chosen_reply_not_the_gold_one_enters_the_cache():
    conv, stub = conversation()
    stub.prefer(NL, "B")
    tok = conv.tokenizer
    chosen, _ = conv.ask("Which?", ["A", "B"])
    assert chosen == 1
    context = tok(conv.fmt.user_turn("Which?", first=True), add_special_tokens=False)["input_ids"]
    reply = tok(conv.fmt.reply("B"), add_special_tokens=False)["input_ids"]
    # the branches were rolled back: the stream is the context then the chosen reply, fed last
    assert conv.session.cache.length == len(context) + len(reply)
    assert stub.fed[-len(reply) :] == reply
    assert conv.session.fed == len(context) + len(reply)


def test_rps_win_tie_loss_counts_are_exact():
    """A model forced to answer B (paper) every round: wins exactly when the player threw rock."""
    model = tiny_model("llama", layers=2, vocab=258)
    stub = Bigram(model)
    stub.prefer(NL, "B")
    lm = LoadedModel.wrap(model, byte_tokenizer())
    task = build_task("rps", {"players": "rock,switch", "limit": 30, "seed": 3})
    session = StreamSession(lm, build_policy(PolicySpec("streamingllm"), 400))
    result = task.run(session, lm.tokenizer, Meter(session.device), NoProgress())
    for tag in ("rock", "switch"):
        user = np.array(player_moves(tag, 30, seed=3 + (0 if tag == "rock" else 1000)))
        assert result.metrics[f"win_rate_{tag}"] == pytest.approx(np.mean(user == 0))
        assert result.metrics[f"tie_rate_{tag}"] == pytest.approx(np.mean(user == 1))
        assert result.metrics[f"loss_rate_{tag}"] == pytest.approx(np.mean(user == 2))
    assert result.metrics["rounds"] == 60
    assert result.metrics["model_moves"] == "0/100/0"
    assert {r["model"] for r in result.records} == {"paper"}
    # the next round's prompt reveals the previous move
    assert "I chose [" + MOVES[player_moves("rock", 30, seed=3)[0]] + "]" in lm.tokenizer.decode(stub.fed)


def test_grocery_accuracy_and_key_accuracy_are_exact():
    model = tiny_model("llama", layers=2, vocab=258)
    stub = Bigram(model)
    stub.prefer(NL, "A")
    stub.prefer("A", END)
    stub.prefer(END, NL)
    lm = LoadedModel.wrap(model, byte_tokenizer())
    task = build_task("grocery", {"limit": 3, "seed": 1})
    session = StreamSession(lm, build_policy(PolicySpec("sirllm", {"decay": 0.9}), 256))
    result = task.run(session, lm.tokenizer, Meter(session.device), NoProgress())
    items = generate_grocery(3, seed=1)
    fillers = [i for i in items if i.kind == "filler"]
    recalls = [i for i in items if i.kind == "recall"]
    assert result.metrics["accuracy"] == pytest.approx(np.mean([i.answer == 0 for i in fillers]))
    assert result.metrics["key_accuracy"] == pytest.approx(np.mean([i.answer == 0 for i in recalls]))
    assert result.metrics["episodes"] == 3 and len(result.records) == 3 * 22
    # "OK" is the only reply to a request, and "A" greedily matches every other question
    assert all(r["chosen"] == 0 and any(r["greedy"]) for r in result.records if r["kind"] != "key")


@pytest.mark.parametrize("decay,kept", [(1.0, True), (0.5, False)])
def test_sirllm_decay_forgets_old_key_tokens_across_rounds(decay, kept):
    """A planted key token (score 50) survives 30 rounds at decay 1 and is forgotten at decay 0.5,
    once 50 * 0.5**k falls below the surprisal of newer tokens."""
    model = tiny_model("llama", layers=1, vocab=96)
    policy = build_policy(PolicySpec("sirllm", {"start_size": 2, "recent_size": 4, "decay": decay}), 16)
    session = StreamSession(LoadedModel.wrap(model), policy)
    ids = torch.randint(3, 96, (1, 200), generator=torch.Generator().manual_seed(0))
    session.feed(ids[:, :10])
    session.cache.scores[5] = 50.0  # the key token: position 5
    for r in range(30):
        session.new_round()
        session.feed(ids[:, 10 + 3 * r : 13 + 3 * r])
    assert (5 in session.cache.positions) is kept


def test_turn_larger_than_the_budget_is_a_clear_error():
    conv, _ = conversation(budget=16)
    from streambench.errors import ConfigError

    with pytest.raises(ConfigError, match="does not fit in budget 16"):
        conv.ask("a question far longer than sixteen tokens", ["A", "B"])


def released_chatml(user: str, assistant: str) -> str:
    """Zoeyyao27/SirLLM `_encode_pair` + `_construct_chat_template` (its Yi-Chat branch): the
    context's trailing spaces move onto the continuation; ChatML, no system prompt."""
    spaces = len(user) - len(user.rstrip())
    if spaces:
        assistant, user = user[-spaces:] + assistant, user[:-spaces]
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}<|im_end|>\n"


def committed(session):
    """Record the stream as the cache holds it: what was fed, minus what was rolled back."""
    stream, feed = [], session.feed

    def recording(ids, exact=False):
        del stream[session.fed :]
        stream.extend(ids[0].tolist())
        return feed(ids, exact)

    session.feed = recording
    return stream


def test_sirllm_format_renders_the_released_strings():
    """format=sirllm: the stream is the released code's (ChatML, no system prompt, round 0's
    trailing space moved onto " A"), each turn entering the cache as one forward of question +
    reply as the released code feeds it."""
    from streambench.tasks.dialogue.rps import FIRST_RELEASED, NEXT

    model = tiny_model("llama", layers=2, vocab=258)
    stub = Bigram(model)
    stub.prefer(NL, "A")
    lm = LoadedModel.wrap(model, byte_tokenizer())
    task = build_task("rps", {"players": "rock", "limit": 3, "format": "sirllm"})
    session = StreamSession(lm, build_policy(PolicySpec("dense"), None))
    stream = committed(session)
    result = task.run(session, lm.tokenizer, Meter(session.device), NoProgress())
    moves = [r["user"] for r in result.records]
    turns = [released_chatml(FIRST_RELEASED, "A")] + [
        released_chatml(NEXT.format(move=moves[r - 1]), "A") for r in (1, 2)
    ]
    assert lm.tokenizer.decode(stream) == "".join(turns)  # no system prompt, " A" after round 0's space
    assert "You are a test model" not in lm.tokenizer.decode(stream)
    fed = lm.tokenizer.decode(stub.fed)  # every forward: question alone (to choose), then question + reply
    last = turns[-1]
    assert fed.endswith(last[: last.index("assistant\n") + len("assistant\n")] + last)
    plain = build_task("rps", {"players": "rock", "limit": 1, "format": "plain"})
    session = StreamSession(lm, build_policy(PolicySpec("dense"), None))
    stream = committed(session)
    plain.run(session, lm.tokenizer, Meter(session.device), NoProgress())
    assert lm.tokenizer.decode(stream) == "USER: " + FIRST_RELEASED + "\n\nASSISTANT: A"  # the released non-Yi path


def test_sirllm_released_wraps_grocery_plainly_under_sirllm_only():
    lm = LoadedModel.wrap(tiny_model("llama", layers=2, vocab=258), byte_tokenizer())
    task = build_task("grocery", {"limit": 1, "format": "sirllm-released", "recall_tokens": 1})
    infos = {}
    for name in ("sirllm", "streamingllm"):
        session = StreamSession(lm, build_policy(PolicySpec(name), 2000))
        infos[name] = task.run(session, lm.tokenizer, Meter(session.device), NoProgress()).info["format"]
    assert infos == {"sirllm": "plain", "streamingllm": "sirllm-released"}
    with pytest.raises(Exception, match="format must be one of"):
        build_task("rps", {"format": "chatml"})


@pytest.mark.slow
def test_sirllm_format_reproduces_the_released_code_on_its_player_file(embedded, shared_data):
    """SirLLM's rock player, budget 256, sirllm score=upstream decay=0.9, format=sirllm on the
    embedded model: round 1's log-probability of "A" is the released code's -1.6424 (the template
    format gives -1.9076: the system prompt), and the model switches from rock to paper at round
    9, as the released code does (round 11 under the template format)."""
    player = shared_data / "sirllm" / "data" / "rock_paper_scissors" / "rock_paper_scissors_dominant_rock.jsonl"
    task = build_task("rps", {"players": str(player), "limit": 12, "format": "sirllm"})
    session = StreamSession(embedded, build_policy(PolicySpec("sirllm", {"score": "upstream", "decay": 0.9}), 256))
    records = task.run(session, embedded.tokenizer, Meter(session.device), NoProgress()).records
    assert records[1]["logprobs"][0] == pytest.approx(-1.6424, abs=1e-4)
    assert [r["model"] for r in records] == ["rock"] * 9 + ["paper"] * 3
