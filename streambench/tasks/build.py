"""From a task name or preset and its arguments to a built task. A preset named like a registered
task holds that task's defaults (`tasks/mtbench.yaml` for `--task mtbench`); `-t` and the task
flags override it."""

from __future__ import annotations

import dataclasses
from typing import Any

from streambench.errors import ConfigError
from streambench.presets import PRESET_META, find_preset, load_preset, same_name_defaults
from streambench.values import check_field_types


def build_task(name: str, args: dict[str, Any], defaults: dict[str, Any] | None = None):
    """The task `name` (registered, or a preset) with `args` over a same-name preset over
    `defaults` (the task's `run_defaults`, for `streambench run`) over its fields' defaults."""
    from streambench.tasks import TASKS

    data: dict[str, Any] = {}
    if name in TASKS:
        data = same_name_defaults(name, "tasks", "task", TASKS.get(name).name)
    else:
        preset = find_preset(name, "tasks")
        if preset is None:
            TASKS.get(name)  # raises with a did-you-mean hint
            raise ConfigError(f"unknown task '{name}'")
        data = load_preset(preset)
        name = data.get("task") or TASKS.get(name)
    cls = TASKS.get(name)
    merged = dict(defaults or {})
    merged.update({k: v for k, v in data.items() if k not in PRESET_META})
    merged.update(args)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, merged)) - fields)
    if unknown:
        raise ConfigError(f"{cls.name}: unknown argument(s) {', '.join(unknown)} (takes {', '.join(sorted(fields))})")
    check_field_types(cls, merged, cls.name)
    return cls(**merged)
