"""lm-eval: any lm-evaluation-harness task run under the policy, results in streambench's schema.

Task names are lm-eval's (hub tasks such as arc_easy, hellaswag, wikitext need network for their
data) or the offline tasks shipped in `tasks/lm-eval/` (streambench_mc: multiple choice;
streambench_ppl: rolling perplexity), or YAML tasks of your own under `include_path`. `stream`
feeds all items into one endless stream (StreamingLLM's streaming evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from streambench.presets import preset_dirs
from streambench.run_fields import budget_text, label
from streambench.tasks import register_task
from streambench.tasks.base import Task, TaskResult


def shipped_task(name: str) -> dict | None:
    """A YAML task from tasks/lm-eval/, its data files made absolute (lm-eval reads them from cwd)."""
    for folder in preset_dirs("tasks"):
        path = folder / "lm-eval" / f"{name}.yaml"
        if path.is_file():
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
            files = config.get("dataset_kwargs", {}).get("data_files", {})
            for split, file in files.items():
                files[split] = str((path.parent / file).resolve())
            return config
    return None


@register_task("lm-eval")
@dataclass
class LMEvalTask(Task):
    version = 1
    summary = "any lm-eval task under the policy (offline: streambench_mc, streambench_ppl); stream=true for one stream"
    default_budget = 256

    tasks: str = "streambench_mc,streambench_ppl"
    limit: int | None = None
    num_fewshot: int | None = None
    stream: bool = False
    include_path: str | None = None

    def configure(self) -> None:
        self._check_limit()
        self._require(bool(self.task_list()), "needs at least one lm-eval task")
        self._require(isinstance(self.stream, bool), f"stream must be true or false, got {self.stream!r}")

    def task_list(self) -> list[str]:
        return [t.strip() for t in str(self.tasks).split(",") if t.strip()]

    @classmethod
    def columns_for(cls, results: list[dict]) -> tuple[tuple[str, str], ...]:
        names = sorted({k for r in results for k in r.get("higher_is_better", {}) if "/" in k})
        return tuple((name, name) for name in names)

    def run(self, session, tokenizer, meter, progress) -> TaskResult:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from streambench.errors import DataError
        from streambench.tasks.lm_eval.model import StreambenchLM

        evaluator = StreambenchLM(lm=session.lm, policy=session.policy, stream=self.stream)
        specs = [shipped_task(name) or name for name in self.task_list()]
        manager = TaskManager(include_path=self.include_path) if self.include_path else None
        meter.start()
        try:
            out = lm_eval.simple_evaluate(
                model=evaluator,
                tasks=specs,
                limit=self.limit,
                num_fewshot=self.num_fewshot,
                task_manager=manager,
                bootstrap_iters=0,
                log_samples=False,
            )
        except (KeyError, ValueError, FileNotFoundError, ConnectionError) as exc:
            raise DataError(
                f"lm-eval could not run {self.tasks}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
        finally:
            evaluator.close()  # its sessions' hooks leave the shared model
        meter.step(max(evaluator.tokens, 1), evaluator.kv_tokens_peak, evaluator.kv_bytes_peak)
        progress(1)
        metrics, directions = {}, {}
        for task, values in out["results"].items():
            for key, value in values.items():
                metric = key.split(",")[0]
                if isinstance(value, (int, float)) and not metric.endswith("_stderr"):
                    metrics[f"{task}/{metric}"] = float(value)
                    higher = out.get("higher_is_better", {}).get(task, {}).get(metric)
                    if higher is not None:
                        directions[f"{task}/{metric}"] = bool(higher)
        from lm_eval.utils import make_table

        versions = {t: str(v) for t, v in out.get("versions", {}).items()}
        return TaskResult(
            metrics=metrics,
            info={
                "lm_eval_tasks": self.task_list(),
                "versions": versions,
                "n_samples": out.get("n-samples", {}),
                "stream": self.stream,
                "lm_eval_table": make_table(out),
            },
            higher_is_better=directions,  # per run: whatever the lm-eval tasks declare
        )

    @classmethod
    def notes(cls, results: list[dict]) -> str:
        """lm-eval's own results table, per policy."""
        parts = []
        for r in results:
            parts.append(f"{label(r)} (budget {budget_text(r)}):\n{r['info'].get('lm_eval_table', '')}")
        return "\n".join(parts)
