"""The house's layout, as CONTRIBUTING.md describes it."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_one_ci_folder_reached_by_the_ci_service_as_dot_ci():
    """The CI service runs `.ci/run`; the house keeps its CI in `ci/` and links `.ci` to it."""
    assert (ROOT / ".ci").is_symlink() and os.readlink(ROOT / ".ci") == "ci"
    assert (ROOT / ".ci" / "run").resolve() == (ROOT / "ci" / "run").resolve()
    assert os.access(ROOT / "ci" / "run", os.X_OK)


def test_the_public_plugin_imports_still_resolve():
    """What a policy or task file imports today keeps working after the moves."""
    from streambench.engine.cache import StreamCache  # noqa: F401
    from streambench.engine.session import StreamSession  # noqa: F401
    from streambench.policies import register_policy  # noqa: F401
    from streambench.policies.base import Band, CachePolicy, CacheView, ScoredPolicy  # noqa: F401
    from streambench.tasks import register_task  # noqa: F401
    from streambench.tasks.base import Task, TaskResult  # noqa: F401
