"""grocery: remember one requested grocery through twenty unrelated questions (SirLLM, Sec. 4)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streambench.tasks import register_task
from streambench.tasks.base import TaskResult
from streambench.tasks.dialogue.base import DialogueTask, accuracy, conversation_for, memory_curves, play_items
from streambench.tasks.dialogue.items import check_local, generate_grocery, load_grocery, provenance


@register_task("grocery")
@dataclass
class GroceryTask(DialogueTask):
    """An episode: "I want you to buy the GROCERY: [x]." (the model answers "OK"), twenty
    multiple-choice questions, then "Which one is the GROCERY that I want you to buy earlier?".
    `key_accuracy` over the recall questions measures memory as SirLLM scores it; `accuracy` over
    the filler questions measures whether the model still answers what is in front of it. The
    cache is reset per episode; `limit` counts episodes. `data`: SirLLM's keys.jsonl (548
    episodes, CommonsenseQA fillers); without it, seeded episodes of our own (arithmetic and
    capitals fillers).

    Additions (SirLLM's metrics are unchanged): the item's tokens in the key statement are tagged,
    and at the recall question `key_retention` is the share of them the cache still holds (per
    layer and head for policies whose keep-sets differ there). Before the multiple-choice recall,
    the question is also asked without options on the side (`StreamSession.fork`: the episode goes
    on as if it had not been): `key_nll` is the mean per-token NLL of the item as the reply,
    `key_recall` whether the greedy reply (`recall_tokens` at most) names it. `format`: see
    DialogueTask."""

    version = 1
    summary = "recall a requested grocery after 20 filler questions (key_accuracy, key_nll, key_retention)"
    higher_is_better = {
        "key_accuracy": True,
        "accuracy": True,
        "key_nll": False,
        "key_recall": True,
        "key_retention": True,
    }
    columns = (
        ("episodes", "episodes"),
        ("key accuracy", "key_accuracy"),
        ("accuracy", "accuracy"),
        ("key NLL", "key_nll"),
        ("key recall", "key_recall"),
        ("key retention", "key_retention"),
    )
    quality = "key_nll"

    data: str | None = None
    recall_tokens: int = 16

    def check_data(self) -> None:
        self._require(
            isinstance(self.recall_tokens, int)
            and not isinstance(self.recall_tokens, bool)
            and self.recall_tokens >= 1,
            f"recall_tokens must be an integer >= 1, got {self.recall_tokens!r}",
        )
        check_local(self.data)

    def conversations(self) -> int | None:
        return self.limit if self.limit else None if self.data else 548

    def items(self):
        if not self.data:
            return generate_grocery(self.limit or 548, seed=self.seed)
        items = load_grocery(self.data)
        if self.limit:
            groups = list(dict.fromkeys(i.group for i in items))[: self.limit]
            keep = set(groups)
            items = [i for i in items if i.group in keep]
        return items

    def run(self, session, tokenizer, meter, progress) -> TaskResult:
        fmt = self.format
        if fmt == "sirllm-released" and "logits" in session.policy.observes:
            fmt = "plain"  # the released streaming_inference_token_entropy_for_keys (the path of a policy
            # that scores tokens from their logits, SirLLM's token entropy) wraps every model so
        conversation = conversation_for(session, tokenizer, fmt)
        records = play_items(
            self.items(), session, tokenizer, meter, progress, self._free_recall, _key_kept, conversation
        )
        recalls = [r for r in records if r["kind"] == "recall"]
        metrics = {
            "key_accuracy": accuracy(records, "recall"),
            "accuracy": accuracy(records, "filler"),
            "episodes": len({r["group"] for r in records}),
        }
        for key in ("key_nll", "key_recall", "key_retention"):
            values = [r[key] for r in recalls if key in r]
            metrics[key] = float(np.mean(values)) if values else float("nan")
        curves = memory_curves(conversation)
        return TaskResult(
            metrics=metrics,
            records=records,
            curves=curves,
            info={
                "data": self.data or f"generated (seed {self.seed})",
                "facts": "the requested item in each key statement",
                "format": fmt,
                **({"data_file": provenance(self.data, "keys.jsonl")} if self.data else {}),
            },
        )

    def _free_recall(self, conversation, item) -> dict:
        if item.kind != "recall" or "free" not in item.meta:
            return {}
        target = item.meta["answer_text"]
        nll, written = conversation.free_answer(item.meta["free"], target, self.recall_tokens)
        return {
            "key_nll": round(float(np.mean(nll)), 4),
            "free_answer": written,
            "key_recall": target.lower() in written.lower(),
        }


def _key_kept(conversation, item) -> dict:
    """The share of the item's tokens cached when the recall question was fed."""
    if item.kind != "recall" or "key" not in conversation.retention.facts:
        return {}
    return {"key_retention": round(conversation.retention.share("key"), 4)}
