"""Presets: flat YAML files whose keys are the fields of a policy or task.

    # streambench/presets/policies/streamingllm.yaml
    policy: streamingllm
    version: 1
    start_size: 4

`include: other.yaml` (relative to the file) loads another preset first, so a variant is a few
lines. Presets are looked up by name in `./policies` (or `./tasks`) where streambench runs (the
user's own, which win), then in the ones shipped as package data next to this file (found
without a repository: a wheel carries them), then as a file path. A preset named like a task
(`tasks/mtbench.yaml`) holds that task's defaults and is read by `--task mtbench`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from streambench.errors import ConfigError

PRESET_META = ("policy", "task", "version", "include", "description")
SHIPPED = Path(__file__).resolve().parent


def preset_dirs(kind: str) -> list[Path]:
    """Where presets of a kind ("policies", "tasks") are looked up, first hit wins: the user's own
    `./policies` or `./tasks` where streambench runs, then the ones shipped in the package."""
    return [Path.cwd() / kind, SHIPPED / kind]


def list_presets(kind: str) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder in reversed(preset_dirs(kind)):  # cwd wins
        if folder.is_dir():
            for f in sorted(folder.glob("*.yaml")):
                found[f.stem] = f
    return found


def find_preset(name_or_path: str, kind: str) -> Path | None:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"preset file not found: {name_or_path}")
        return path
    return list_presets(kind).get(name_or_path)


def load_preset(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a preset, resolving `include:` chains (cycles are an error)."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"preset include cycle: {' -> '.join(p.name for p in (*_seen, path))}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in preset {path.name}: {str(exc).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read preset {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path.name} must be a mapping of keys to values")
    if not all(isinstance(k, str) for k in data):
        raise ConfigError(
            f"preset {path.name}: keys must be strings, got {[k for k in data if not isinstance(k, str)][:3]}"
        )
    for key in ("policy", "task", "include", "description"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"preset {path.name}: '{key}' must be a string, got {data[key]!r}")
    if "version" in data and (isinstance(data["version"], bool) or not isinstance(data["version"], int)):
        raise ConfigError(f"preset {path.name}: 'version' must be an integer, got {data['version']!r}")
    base: dict[str, Any] = {}
    if "include" in data:
        base = load_preset(path.parent / data["include"], (*_seen, path))
    base.update({k: v for k, v in data.items() if k != "include"})
    return base


def same_name_defaults(name: str, kind: str, key: str, registered: str) -> dict[str, Any]:
    """The preset named like a registered policy or task (`./tasks/mtbench.yaml` for `--task
    mtbench`): that name's defaults, read every time the name is used; {} when there is none. It
    must run what it is named after (a `tasks/perplexity.yaml` that says `task: needle` is refused,
    not silently obeyed or ignored)."""
    path = list_presets(kind).get(name)
    if path is None:
        return {}
    data = load_preset(path)
    if data.get(key, registered) != registered:
        raise ConfigError(
            f"preset {path} is named after the {key} '{name}' but says {key}: {data[key]}; "
            f"rename the file or make it {key}: {registered}"
        )
    return data
