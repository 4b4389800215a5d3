"""One endless conversation: chat formatting and SirLLM's multiple-choice scoring.

Each user turn is formatted with the model's chat template (split into per-turn pieces, so the
stream is exactly the template's rendering of the whole conversation), fed into the session, and
the model answers by choosing among fixed replies, scored as Zoeyyao27/SirLLM
`sir_llm/eval_utils.py` does: a reply wins if greedy decoding would produce it exactly (the first
such reply), otherwise the reply whose first token is most probable. The chosen reply, not the
gold one, is fed into the cache as the model's turn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_U1, _A1, _U2 = "\x00user-one\x00", "\x00assistant-one\x00", "\x00user-two\x00"


@dataclass(frozen=True)
class ChatFormat:
    preamble: str  # once per conversation (e.g. a default system prompt)
    user_prefix: str
    user_suffix: str  # ends the user turn and opens the assistant's
    assistant_suffix: str  # closes the assistant's turn; part of every scored reply
    reply_prefix: str = ""  # SirLLM's plain format moves the space after "ASSISTANT:" onto the reply
    move_trailing: bool = False  # a question's trailing whitespace moves onto the reply (SirLLM's _encode_pair)

    @classmethod
    def named(cls, tokenizer, name: str = "template") -> ChatFormat:
        """`template`: the tokenizer's chat template, default system prompt included (one prompt
        for every policy). `plain`: SirLLM's "USER: ...\n\nASSISTANT:" for any model (what the
        released code feeds every model not named Yi-Chat). `sirllm`: the released code's strings
        as it feeds chat models (its Yi-Chat branch): ChatML without a system prompt where the
        template is ChatML, and the question's trailing space moved onto the answer
        (Zoeyyao27/SirLLM sir_llm/eval_utils.py `_encode_pair`, `_construct_chat_template`);
        plain for other models."""
        if name == "plain":
            return cls.plain()
        if name in ("sirllm", "sirllm-released"):
            if "<|im_start|>" in str(getattr(tokenizer, "chat_template", "") or ""):
                return cls(
                    "", "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n", move_trailing=True
                )
            return cls.plain()
        return cls.for_tokenizer(tokenizer)

    @classmethod
    def plain(cls) -> ChatFormat:
        return cls(
            preamble="", user_prefix="USER: ", user_suffix="\n\nASSISTANT:", assistant_suffix="", reply_prefix=" "
        )

    @classmethod
    def for_tokenizer(cls, tokenizer) -> ChatFormat:
        """Pieces of the tokenizer's chat template; SirLLM's plain format when it has none."""
        if getattr(tokenizer, "chat_template", None):
            try:
                return cls._from_template(tokenizer)
            except (ValueError, IndexError):
                pass
        return cls.plain()

    @classmethod
    def _from_template(cls, tokenizer) -> ChatFormat:
        render = tokenizer.apply_chat_template
        full = render(
            [{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}],
            tokenize=False,
            add_generation_prompt=True,
        )
        single = render([{"role": "user", "content": _U1}], tokenize=False, add_generation_prompt=False)
        head, rest = full.split(_U1)
        user_suffix, rest = rest.split(_A1)
        between, tail = rest.split(_U2)
        turn_end = single.split(_U1)[1]  # what closes a turn (ChatML: "<|im_end|>\n")
        assistant_suffix = turn_end if turn_end and between.startswith(turn_end) else ""
        user_prefix = between[len(assistant_suffix) :]
        if not head.endswith(user_prefix) or tail != user_suffix:
            raise ValueError("chat template is not turn-regular")
        return cls(head[: len(head) - len(user_prefix)], user_prefix, user_suffix, assistant_suffix)

    def user_turn(self, text: str, first: bool) -> str:
        if self.move_trailing:
            text = text.rstrip()
        return (self.preamble if first else "") + self.user_prefix + text + self.user_suffix

    def reply(self, text: str, question: str = "") -> str:
        moved = question[len(question.rstrip()) :] if self.move_trailing else ""
        return self.reply_prefix + moved + text + self.assistant_suffix


@dataclass
class Choice:
    index: int
    logprob: float  # log-probability of the reply's first token
    greedy: bool | None  # greedy decoding would produce the reply exactly (None: not computed)


class Conversation:
    """Feeds user turns and chosen replies of one conversation into a StreamSession, and tracks
    what the cache keeps of the facts its turns tag (streambench/tasks/retention.py)."""

    def __init__(self, session, tokenizer, fmt: ChatFormat | None = None, joined: bool = False):
        from streambench.tasks.retention import CacheMap, Retention

        self.session, self.tokenizer = session, tokenizer
        self.fmt = fmt or ChatFormat.for_tokenizer(tokenizer)
        # joined: each turn enters the cache as one forward of question + chosen reply, as the
        # released SirLLM code feeds it (its per-forward token-entropy scores depend on that);
        # costs one more forward of the question per turn
        self.joined = joined
        self.turns = 0
        self._reply_cache: dict[str, torch.Tensor] = {}
        self.retention, self.cache_map = Retention(), CacheMap()
        self._stops = None

    def like(self, session) -> Conversation:
        """A new conversation in this one's format over `session` (another stream of a batch)."""
        return Conversation(session, self.tokenizer, self.fmt, self.joined)

    def reset(self) -> None:
        self.session.reset()
        self.retention.reset()
        self.cache_map.end_stream()
        self.turns = 0

    def _context(self, question: str, facts) -> torch.Tensor:
        """The user turn's ids; the tokens of each (name, substring of the question) fact are tagged."""
        from streambench.tasks.retention import tokens_of

        text = self.fmt.user_turn(question, first=self.turns == 0)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if facts:
            shown = question.rstrip() if self.fmt.move_trailing else question
            head = len(text) - len(shown) - len(self.fmt.user_suffix)
            for name, part in facts:
                at = question.find(part)
                if at < 0 or not part:
                    raise ValueError(f"fact {part!r} is not in the question {question!r}")
                index = np.asarray(
                    tokens_of(self.tokenizer, text, (head + at, head + at + len(part)), ids), dtype=np.int64
                )
                positions = self.session.fed + index
                self.retention.tag(name, positions, self.turns)
                self.cache_map.tag(positions)
        return torch.tensor([ids], device=self.session.device)

    def _observe(self) -> None:
        """After a user turn is fed: what the cache holds of the tagged facts, and of the stream."""
        held = self.session.held_positions()
        self.retention.sample(held, self.session.fed, self.turns)
        self.cache_map.record(held, self.session.fed)

    def encode(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor([ids], device=self.session.device)

    def _reply_ids(self, text: str, question: str = "") -> torch.Tensor:
        key = (text, question[len(question.rstrip()) :] if self.fmt.move_trailing else "")
        ids = self._reply_cache.get(key)
        if ids is None:
            ids = self._reply_cache[key] = self.encode(self.fmt.reply(text, question))
        return ids

    @torch.no_grad()
    def ask(self, question: str, replies: list[str], by_greedy: bool = True, facts=()) -> tuple[int, list[Choice]]:
        """One user turn and the model's choice among `replies`; the chosen reply enters the cache.
        `facts`: (name, substring of the question) pairs whose tokens are tagged for retention.

        `by_greedy=False` (RPS) picks by first-token log-probability alone, which the context's
        forward already gives: no reply is fed as a branch, so a round costs two forwards, not 2 + N."""
        session = self.session
        if self.turns:
            session.new_round()  # SirLLM decays stored scores once per user turn
        context = self._context(question, facts)
        options = [self._reply_ids(r, question) for r in replies]
        session.reserve(context.shape[1] + max(o.shape[1] for o in options))
        before = session.checkpoint() if self.joined else None
        last = session.feed(context)[0, -1]
        self._observe()
        if not by_greedy:
            logprobs = torch.log_softmax(last.float(), -1)
            scored = [Choice(i, logprobs[option[0, 0]].item(), None) for i, option in enumerate(options)]
            chosen = max(scored, key=lambda c: c.logprob).index
            self._commit(before, context, options[chosen])
            return chosen, scored
        scored = []
        first = torch.log_softmax(last.float(), -1)
        # every reply from the state after the question: one tree forward where the session can
        for i, (option, logits) in enumerate(zip(options, session.score_branches(options))):
            predicted = torch.cat([last[None], logits[0, :-1]]).argmax(-1)
            scored.append(Choice(i, first[option[0, 0]].item(), self._same_text(predicted, option[0])))
        chosen = next((c.index for c in scored if c.greedy), None)
        if chosen is None:
            chosen = max(scored, key=lambda c: c.logprob).index
        self._commit(before, context, options[chosen])
        return chosen, scored

    def _commit(self, before, context: torch.Tensor, reply: torch.Tensor) -> None:
        """The chosen reply enters the cache (joined: the turn again, question and reply in one forward)."""
        if before is not None:
            self.session.rollback(before)
            self.session.feed(torch.cat([context, reply], dim=1))
        else:
            self.session.feed(reply)
        self.turns += 1

    @torch.no_grad()
    def free_answer(self, question: str, target: str, max_new_tokens: int = 16) -> tuple[list[float], str]:
        """Ask `question` on the side (session.fork: the conversation goes on as if it had not
        been asked) and return the per-token NLL of `target` as the model's reply, and the reply
        it writes by greedy decoding (at most `max_new_tokens`, ending at its turn's end)."""
        import torch.nn.functional as F

        session = self.session
        with session.fork():
            if self.turns:
                session.new_round()
            context = self.encode(self.fmt.user_turn(question, first=self.turns == 0))
            answer = self.encode(self.fmt.reply_prefix + target)
            session.reserve(context.shape[1] + max(answer.shape[1], max_new_tokens))
            last = session.feed(context)[0, -1]
            state = session.checkpoint()
            logits = session.feed(answer)[0]
            predicted = torch.cat([last[None], logits[:-1]]).float()
            nll = F.cross_entropy(predicted, answer[0], reduction="none").tolist()
            session.rollback(state)
            written = []
            for _ in range(max_new_tokens):
                token = int(last.argmax())
                if token in self._stop_ids():
                    break
                written.append(token)
                last = session.feed(torch.tensor([[token]], device=session.device))[0, -1]
        return nll, self.tokenizer.decode(written, skip_special_tokens=True)

    @torch.no_grad()
    def reply(
        self, question: str, max_new_tokens: int, sampling=None, on_token=None, interrupted=None, score: bool = False
    ):
        """The user says `question`; the model writes its reply (streambench/engine/generation.py), which
        stays in the stream, closed by the format's turn end. Room for the turn and the longest
        reply is made once, before it (streaming-llm's `evict_for_space`), so the policy evicts
        once per turn. Returns the Generation (tokens without the stop token)."""
        from streambench.engine.generation import generate

        session = self.session
        if self.turns:
            session.new_round()
        context = self._context(question, ())
        suffix = self.encode(self.fmt.assistant_suffix) if self.fmt.assistant_suffix else None
        closing = suffix.shape[1] if suffix is not None else 0
        session.reserve(context.shape[1] + max_new_tokens + closing)
        written = generate(
            session,
            prompt=context,
            max_new_tokens=max_new_tokens,
            stop_ids=self._stop_ids(),
            sampling=sampling,
            on_token=on_token,
            interrupted=interrupted,
            score=score,
        )
        if written.tokens and written.stop in ("limit", "string"):  # its last token was chosen, not fed
            session.feed(torch.tensor([written.tokens[-1:]], device=session.device))
        if suffix is not None:
            session.feed(suffix)
        self.turns += 1
        return written

    @torch.no_grad()
    def replay(self, question: str, tokens: list[int]) -> float | None:
        """The user says `question` and the reply is given (`tokens`, another session's answer):
        both enter this stream, closed by the turn end. Returns the reply's mean NLL here (None
        for an empty reply): mtbench scores a policy's answers under a dense twin this way."""
        import torch.nn.functional as F

        session = self.session
        last = session.feed(self._context(question, ()))[0, -1]
        nll = None
        if tokens:
            answer = torch.tensor([tokens], device=session.device)
            logits = torch.cat([last[None], session.feed(answer)[0, :-1]]).float()
            nll = F.cross_entropy(logits, answer[0]).item()
        if self.fmt.assistant_suffix:
            session.feed(self.encode(self.fmt.assistant_suffix))
        self.turns += 1
        return nll

    def _stop_ids(self) -> set[int]:
        if self._stops is None:
            stops = {self.tokenizer.eos_token_id}
            if self.fmt.assistant_suffix:
                stops.add(self.encode(self.fmt.assistant_suffix)[0, 0].item())
            self._stops = {s for s in stops if s is not None}
        return self._stops

    def _same_text(self, predicted: torch.Tensor, target: torch.Tensor) -> bool:
        """SirLLM compares decoded strings with spaces removed."""
        if torch.equal(predicted, target):
            return True
        decode = self.tokenizer.decode
        return decode(predicted.tolist()).replace(" ", "") == decode(target.tolist()).replace(" ", "")
