"""`streambench list`: policies, tasks, presets and models, with where each comes from."""

from __future__ import annotations

import click

from streambench.cli.exits import user_errors
from streambench.errors import StreambenchError


@click.command(name="list")
@click.argument("what", type=click.Choice(["all", "policies", "presses", "tasks", "presets", "models"]), default="all")
@click.option("--markdown", is_flag=True, help="presses: the README's table (generated from kvpress's code).")
@user_errors
def list_command(what, markdown):
    """List policies, tasks, presets and the model families streambench supports.

    \b
    Examples:
        streambench list
        streambench list policies
        streambench list presses
        streambench list presses --markdown
        streambench list models
    """
    import dataclasses

    from streambench.policies import POLICIES
    from streambench.presets import list_presets, load_preset
    from streambench.tasks import TASKS

    if what in ("all", "policies"):
        click.echo("Policies:")
        broken = POLICIES.load_plugins()
        for name, cls in _unique(POLICIES):
            fields = ", ".join(f.name for f in dataclasses.fields(cls) if f.init and f.name != "budget")
            click.echo(f"  {name:<18} {cls.summary}" + (f"  [{fields}]" if fields else "") + _from(POLICIES, name))
        for name, problem in broken.items():
            click.echo(f"  {name:<18} BROKEN: {problem}")
    if what == "presses" and markdown:
        from streambench.policies import kvpress_bridge

        click.echo(kvpress_bridge.status_table())
        return
    if what in ("all", "presses"):
        _list_presses()
    if what in ("all", "tasks"):
        click.echo("Tasks:")
        broken = TASKS.load_plugins()
        for name, cls in _unique(TASKS):
            click.echo(f"  {name:<18} {cls.summary} (v{cls.version})" + _from(TASKS, name))
        for name, problem in broken.items():
            click.echo(f"  {name:<18} BROKEN: {problem}")
    if what in ("all", "presets"):
        for kind in ("policies", "tasks"):
            presets = list_presets(kind)
            click.echo(f"Presets ({kind}/):")
            for name, path in presets.items():
                try:
                    data = load_preset(path)
                    desc = data.get("description") or ", ".join(
                        f"{k}={v}" for k, v in data.items() if k not in ("version", "description")
                    )
                except StreambenchError as exc:
                    desc = f"INVALID: {exc}"
                click.echo(f"  {name:<18} {desc}")
    if what in ("all", "models"):
        _list_models()


def _list_presses() -> None:
    """kvpress's presses (`--policy kvpress:<Press>`), each with what it does or why it does not run."""
    from streambench.policies import kvpress_bridge as bridge

    try:
        presses = bridge.press_classes()
    except StreambenchError as exc:
        click.echo(f"kvpress presses: {exc}")
        return
    statuses = {name: bridge.press_status(cls) for name, cls in presses.items()}
    count = {kind: sum(s == kind for s, _ in statuses.values()) for kind in bridge.RUNS}
    click.echo(
        f"kvpress presses ({count['streaming']} of {len(presses)} run in the stream as --policy kvpress:<Press>, "
        f"{count['hub']} more once their download is reachable, {count['prefill only']} in compress-once only):"
    )
    for name, cls in presses.items():
        status, why = statuses[name]
        click.echo(f"  {'kvpress:' + name:<40} {status:<14} {why or bridge.first_line(cls)}")


def _list_models() -> None:
    from tabulate import tabulate

    from streambench.models.architecture import FAMILIES, REFUSED

    click.echo("Model families (each tested by tests/test_exactness.py on the tiny config shown):")
    rows = []
    for family in FAMILIES.values():
        tiny = ", ".join(f"{k}={v}" for k, v in family.tiny.items() if v is not None)
        rows.append([family.model_type, ", ".join(family.needs) or "-", family.example, tiny or "-"])
    click.echo(
        tabulate(rows, headers=["model type", "needs", "for example", "tiny config (+ hidden 64, 4 heads, 2 KV heads)"])
    )
    click.echo("\nRefused, with the reason:")
    click.echo(tabulate([list(r) for r in REFUSED], headers=["kind", "model types", "why"]))


def _from(registry, name: str) -> str:
    """Where a plugin entry came from (nothing for streambench's own)."""
    origin = registry.origin(name)
    if origin["kind"] == "builtin":
        return ""
    if origin["kind"] == "entry-point":
        return f"  (plugin: {origin.get('distribution', '?')} {origin.get('version', '')}, {origin['value']})"
    return f"  (plugin: {origin.get('path') or origin.get('module')})"


def _unique(registry):
    seen = set()
    for name, cls in registry.items():
        if cls not in seen and cls.name == name:
            seen.add(cls)
            yield name, cls
