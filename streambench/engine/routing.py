"""Route a model's attention through a function registered with transformers' `AttentionInterface`
for one `with` block: observe.py's recording attention, exact.py's per-query masked chunks.

The model picks its attention function by `config._attn_implementation`; switching it on every
config the layers read (and back, even after an error) routes one forward without touching the
shared model otherwise. `active` is the module's stack of the objects the function reads."""

from __future__ import annotations

_REGISTERED: set[str] = set()


def register(name: str, function) -> None:
    """Register `function` with transformers' AttentionInterface as `name`, once per process, with
    the model's own SDPA mask builder (the function uses the mask it is given, or its own)."""
    if name in _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)
    _REGISTERED.add(name)


class AttentionRoute:
    def __init__(self, model, name: str, active: list):
        from streambench.errors import ConfigError
        from streambench.models.architecture import layout_of

        layout = layout_of(model)
        if not layout.routable:
            raise ConfigError(
                f"model type '{layout.model_type}' computes attention in its own code, not through transformers' "
                "AttentionInterface: attention observations and exact chunks cannot run on it"
            )
        configs = [getattr(a, "config", model.config) for a in layout.attentions] + [model.config]
        self._configs = list({id(c): c for c in configs}.values())
        self._name, self._active = name, active

    def __enter__(self):
        self._saved = [c._attn_implementation for c in self._configs]
        for c in self._configs:
            c._attn_implementation = self._name
        self._active.append(self)
        return self

    def __exit__(self, *exc):
        self._active.remove(self)
        for c, impl in zip(self._configs, self._saved):
            c._attn_implementation = impl
