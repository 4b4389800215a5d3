"""The loop the dialogue-memory tasks share: items in order, one conversation per group (the
cache is reset when the group changes, as SirLLM does per dialogue or episode), one record each."""
from __future__ import annotations

from streambench.dialogue_data import MCItem


def play_items(items: list[MCItem], session, tokenizer, meter, progress) -> list[dict]:
    from streambench.dialogue import Conversation  # torch: loaded when a run starts, not on listing

    conversation = Conversation(session, tokenizer)
    records, group = [], None
    progress.total(len(items), "item")
    meter.start()
    for item in items:
        if item.group != group:
            conversation.reset()
            group = item.group
        before = session.processed
        chosen, scored = conversation.ask(item.question, item.replies)
        meter.step(session.processed - before, session.kv_tokens, session.kv_bytes)
        progress(1)
        records.append({
            "id": item.id,
            "group": item.group,
            "kind": item.kind,
            "turn": conversation.turns,
            "chosen": chosen,
            "answer": item.answer,
            "correct": chosen == item.answer,
            "greedy": [c.greedy for c in scored],
            "first_token_logprob": [round(c.logprob, 4) for c in scored],
            "kv_tokens": session.kv_tokens,
        })
    return records


def accuracy(records: list[dict], kind: str | None = None) -> float:
    chosen = [r["correct"] for r in records if kind is None or r["kind"] == kind]
    return sum(chosen) / len(chosen) if chosen else float("nan")
