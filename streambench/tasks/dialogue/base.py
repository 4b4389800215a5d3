"""The loop the dialogue-memory tasks share: items in order, one conversation per group (the
cache is reset when the group changes, as SirLLM does per dialogue or episode), one record each."""

from __future__ import annotations

from dataclasses import dataclass

from streambench.tasks.base import Task
from streambench.tasks.dialogue.items import MCItem

FORMATS = ("template", "plain", "sirllm", "sirllm-released")
# `format`: how turns are rendered. `template` (default): the model's chat template, its
# default system prompt included, one prompt for every policy. `sirllm`: the released SirLLM
# code's strings (ChatML without a system prompt for ChatML models, as it renders Yi-Chat; the
# question's trailing space moved onto the answer; "USER: ...\n\nASSISTANT:" otherwise).
# `sirllm-released`: that, and grocery under sirllm in the plain USER/ASSISTANT wrapping, as the
# released code's token-entropy path renders it for every model. `plain`: USER/ASSISTANT for
# every model (what the released code feeds any model not named Yi-Chat).


def check_format(task) -> None:
    task._require(task.format in FORMATS, f"format must be one of {', '.join(FORMATS)}, got {task.format!r}")


@dataclass
class DialogueTask(Task):
    """The dialogue-memory tasks SirLLM evaluates (Yao et al. 2024, Sec. 4): items in order, one
    conversation per group, the cache reset when the group changes. Their shared fields, checked
    once: `limit` (items, episodes or rounds per player: each task says), `seed`, and `format`,
    how turns are rendered: template (default: the model's chat template, its default system
    prompt included, one prompt for every policy), sirllm (the released SirLLM code's strings),
    sirllm-released, plain (see FORMATS above)."""

    batchable = True  # --batch-size B: B conversations at a time, one ragged batch (engine/lanes.py)
    lanes = True

    limit: int | None = 20
    seed: int = 0
    format: str = "template"

    def lanes_refusal(self) -> str | None:
        if self.format != "template":
            return f"format {self.format} feeds each turn again after rolling its question back (one conversation at a time)"
        return None

    def configure(self) -> None:
        self._check_limit()
        check_format(self)
        self.check_data()

    def check_data(self) -> None:
        """The task's own data and arguments, checked before the model loads."""


def memory_curves(conversation) -> dict:
    """What a run's conversations kept: retention against age, and the cache map of the first."""
    curves = conversation.retention.curves()
    cache_map = conversation.cache_map.curve()
    if cache_map:
        curves["cache_map"] = cache_map
    return curves


def conversation_for(session, tokenizer, fmt: str = "template"):
    from streambench.tasks.dialogue.chat_format import ChatFormat, Conversation

    return Conversation(session, tokenizer, ChatFormat.named(tokenizer, fmt), joined=fmt != "template")


def play_items(
    items: list[MCItem], session, tokenizer, meter, progress, before=None, after=None, conversation=None
) -> list[dict]:
    """`before(conversation, item)` and `after(conversation, item)` may add fields to an item's
    record (grocery's free recall on the side, the key's retention when it is asked for). An
    item's `meta["facts"]`, (name, substring of the question) pairs, are tagged for retention.
    A group session (--batch-size): the conversations are dealt to its streams and played as
    one ragged batch (engine/lanes.py), each item's record what it is alone."""
    from streambench.tasks.dialogue.chat_format import Conversation  # torch: loaded when a run starts, not on listing

    conversation = conversation or Conversation(session, tokenizer)
    progress.total(len(items), "item")
    if session.group is None:
        meter.start(session)
        return _play(items, conversation, meter, progress, before, after)
    talks: list[list[MCItem]] = []
    for item in items:
        if not talks or item.group != talks[-1][-1].group:
            talks.append([])
        talks[-1].append(item)
    played = play_lanes(
        session,
        conversation,
        meter,
        [lambda talk, c: _play(talk, c, meter, progress, before, after) for _ in talks],
        talks,
    )
    return [record for records in played for record in records]


def play_lanes(session, conversation, meter, jobs, inputs) -> list:
    """`jobs[i](inputs[i], conversation_i)` for each conversation i, dealt to the streams of the
    group `session` (stream b plays conversations b, b + B, ...), each on a Conversation like
    `conversation` over its stream; results in the order of `inputs`. What the lanes' caches
    kept (retention, the first stream's cache map) is merged into `conversation`."""
    from streambench.engine.lanes import Lanes, LanesGauge

    lanes, width = Lanes(session), min(session.batch, len(inputs))
    talks = [conversation.like(None) for _ in range(width)]

    def lane_job(b: int):
        def run(lane):
            talks[b].session = lane
            return [jobs[i](inputs[i], talks[b]) for i in range(b, len(inputs), width)]

        return run

    meter.start(LanesGauge(session))
    out = lanes.run([lane_job(b) for b in range(width)])
    for talk in talks:
        conversation.retention.absorb(talk.retention)
    conversation.cache_map = talks[0].cache_map
    return [out[i % width][i // width] for i in range(len(inputs))]


def _play(items: list[MCItem], conversation, meter, progress, before, after) -> list[dict]:
    records, group = [], None
    for item in items:
        if item.group != group:
            conversation.reset()
            group = item.group
        extra = before(conversation, item) if before else {}
        chosen, scored = conversation.ask(item.question, item.replies, facts=item.meta.get("facts", ()))
        if after:
            extra.update(after(conversation, item))
        meter.step()
        progress(1)
        records.append(
            {
                "id": item.id,
                "group": item.group,
                "kind": item.kind,
                "turn": conversation.turns,
                "chosen": chosen,
                "answer": item.answer,
                "correct": chosen == item.answer,
                "greedy": [c.greedy for c in scored],
                "first_token_logprob": [round(c.logprob, 4) for c in scored],
                "kv_tokens": conversation.session.kv_tokens,
                **extra,
            }
        )
    return records


def accuracy(records: list[dict], kind: str | None = None) -> float:
    chosen = [r["correct"] for r in records if kind is None or r["kind"] == kind]
    return sum(chosen) / len(chosen) if chosen else float("nan")
