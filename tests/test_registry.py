import sys

import pytest

from streambench.errors import UnknownNameError
from streambench.registry import Registry


class Base:
    name = ""


def test_register_names_aliases_and_subclasses():
    reg = Registry("thing", Base)

    @reg.register("alpha", "a")
    class Alpha(Base):
        pass

    @reg.register("beta")
    class Beta(Alpha):  # inherits from a registered class but gets its own name
        pass

    assert reg.get("a") is Alpha and Alpha.name == "alpha" and Beta.name == "beta"
    with pytest.raises(UnknownNameError, match="unknown thing 'alpah'; did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="already taken"):
        reg.register("beta")(type("Other", (Base,), {}))
    with pytest.raises(TypeError, match="must subclass Base"):
        reg.register("gamma")(type("Loose", (), {}))


def test_listing_policies_and_tasks_imports_no_torch():
    import subprocess

    code = (
        "import sys; from streambench.policies import POLICIES; from streambench.tasks import TASKS; "
        "POLICIES.names(); TASKS.names(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
