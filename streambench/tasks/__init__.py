"""Tasks, one per module, registered by name. Importing this package imports no torch."""
from streambench.registry import Registry
from streambench.tasks.base import Task, TaskResult

TASKS: Registry = Registry("task", Task, group="streambench.tasks")
register_task = TASKS.register

from streambench.tasks import dailydialog, grocery, lmeval_task, mtbench, needle, perplexity, rps  # noqa: E402,F401

__all__ = ["TASKS", "Task", "TaskResult", "register_task"]
