"""Tasks, one per module, registered by name. Importing this package imports no torch."""

from streambench.registry import Registry
from streambench.tasks.base import Task, TaskResult

TASKS: Registry = Registry("task", Task, group="streambench.tasks")
register_task = TASKS.register

from streambench.tasks import kvpress_eval, mtbench, needle, perplexity  # noqa: E402,F401
from streambench.tasks.dialogue import dailydialog, grocery, rps  # noqa: E402,F401
from streambench.tasks.lm_eval import task as lm_eval_task  # noqa: E402,F401

__all__ = ["TASKS", "Task", "TaskResult", "register_task"]
