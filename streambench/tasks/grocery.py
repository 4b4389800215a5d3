"""grocery: remember one requested grocery through twenty unrelated questions (SirLLM, Sec. 4)."""
from __future__ import annotations

from dataclasses import dataclass

from streambench.dialogue_data import check_local, provenance, generate_grocery, load_grocery
from streambench.tasks import register_task
from streambench.tasks.base import Task, TaskResult
from streambench.tasks.conversation import accuracy, play_items


@register_task("grocery")
@dataclass
class GroceryTask(Task):
    """An episode: "I want you to buy the GROCERY: [x]." (the model answers "OK"), twenty
    multiple-choice questions, then "Which one is the GROCERY that I want you to buy earlier?".
    `key_accuracy` over the recall questions measures memory; `accuracy` over the filler questions
    measures whether the model still answers what is in front of it. The cache is reset per
    episode; `limit` counts episodes. `data`: SirLLM's keys.jsonl (548 episodes, CommonsenseQA
    fillers); without it, seeded episodes of our own (arithmetic and capitals fillers)."""

    version = 1
    summary = "recall a requested grocery after 20 filler questions (key_accuracy, accuracy)"
    higher_is_better = {"key_accuracy": True, "accuracy": True}
    columns = (("episodes", "episodes"), ("key accuracy", "key_accuracy"), ("accuracy", "accuracy"))

    data: str | None = None
    limit: int | None = 20
    seed: int = 0

    def configure(self) -> None:
        self._check_limit()
        check_local(self.data)

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
        records = play_items(self.items(), session, tokenizer, meter, progress)
        episodes = len({r["group"] for r in records})
        return TaskResult(
            metrics={"key_accuracy": accuracy(records, "recall"), "accuracy": accuracy(records, "filler"), "episodes": episodes},
            records=records,
            info={"data": self.data or f"generated (seed {self.seed})",
                  **({"data_file": provenance(self.data, "keys.jsonl")} if self.data else {})},
        )
