"""dailydialog: next-utterance choice inside each DailyDialog conversation (SirLLM, Sec. 4)."""

from __future__ import annotations

from dataclasses import dataclass

from streambench.tasks import register_task
from streambench.tasks.base import TaskResult
from streambench.tasks.dialogue.base import DialogueTask, accuracy, conversation_for, play_items
from streambench.tasks.dialogue.items import check_local, dailydialog_from_hub, load_dailydialog, provenance


@register_task("dailydialog")
@dataclass
class DailyDialogTask(DialogueTask):
    """Each user turn quotes an utterance and asks for the best response among four (the true next
    utterance and three from other dialogues); the conversation grows turn by turn and the cache is
    reset at each new dialogue. SirLLM evaluates the first 2,000 records of its file (519
    dialogues). `data`: SirLLM's dailydialog.jsonl (path or URL); without it the test split is
    built from the hub with the same construction (needs network). `format`: see DialogueTask."""

    version = 1
    summary = "DailyDialog next-response choice within each dialogue (accuracy)"
    higher_is_better = {"accuracy": True}
    columns = (("items", "items"), ("dialogues", "dialogues"), ("accuracy", "accuracy"))
    quality = "accuracy"

    data: str | None = None
    limit: int | None = 2000

    def check_data(self) -> None:
        check_local(self.data)

    def items(self):
        items = load_dailydialog(self.data) if self.data else dailydialog_from_hub(seed=self.seed)
        return items[: self.limit] if self.limit else items

    def run(self, session, tokenizer, meter, progress) -> TaskResult:
        items = self.items()
        records = play_items(
            items, session, tokenizer, meter, progress, conversation=conversation_for(session, tokenizer, self.format)
        )
        dialogues = len({r["group"] for r in records})
        return TaskResult(
            metrics={"accuracy": accuracy(records), "items": len(records), "dialogues": dialogues},
            records=records,
            info={
                "data": self.data or "hub:li2017dailydialog/daily_dialog (test)",
                "format": self.format,
                "facts": "untagged: which earlier turns a DailyDialog answer depends on is not marked in the data",
                **({"data_file": provenance(self.data, "dailydialog.jsonl")} if self.data else {}),
            },
        )
