"""Cache policies, one per module, registered by name. Importing this package imports no torch."""

from streambench.policies.base import Band, BandPolicy, CachePolicy, CacheView, ScoredPolicy, check_declarations
from streambench.registry import Registry


def _kvpress() -> tuple:
    from streambench.policies import kvpress_bridge  # (imports kvpress only when a press is asked for)

    return kvpress_bridge.import_kvpress, kvpress_bridge.adapt


POLICIES: Registry = Registry(
    "policy",
    CachePolicy,
    group="streambench.policies",
    check=check_declarations,
    adapters={"kvpress": (lambda: _kvpress()[0](), lambda obj: _kvpress()[1](obj))},
)
register_policy = POLICIES.register

# Registration happens on import; keep this list in sync with the modules in this folder.
from streambench.policies import (  # noqa: E402,F401
    adakv,
    dense,
    duo,
    h2o,
    knorm,
    longmem,
    pyramidkv,
    random_keep,
    recompute_window,
    sirllm,
    snapkv,
    streamingllm,
    tova,
    window,
)

__all__ = ["Band", "BandPolicy", "CachePolicy", "CacheView", "POLICIES", "ScoredPolicy", "register_policy"]
