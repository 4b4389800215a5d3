"""duo: retrieval heads keep a long cache, streaming heads only sinks and recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from streambench.errors import ConfigError
from streambench.policies import register_policy
from streambench.policies.allocation import fill, recent_mask
from streambench.policies.base import CachePolicy, CacheView


@register_policy("duo")
@dataclass
class DuoPolicy(CachePolicy):
    """DuoAttention (Xiao et al., arXiv:2410.10819): only a fraction of heads ("retrieval heads")
    need the whole context; the others ("streaming heads") attend to attention sinks and recent
    tokens alone. A `retrieval_share` of the (layer, KV head) lanes are retrieval heads; streaming
    heads keep `sink_size` sinks and the most recent tokens, `streaming_size` keys in all (the
    query included, as every budget here); retrieval heads share what the budget leaves (the
    budget is the mean over lanes), each keeping its sinks and its most recent tokens up to that
    cap (the paper keeps everything: with a budget there is a cap).

    Which heads: `pattern` names DuoAttention's released pattern (`full_attention_heads.tsv`, one
    row per layer, one column per KV head, a gate value in [0, 1]; a file or its folder, values
    clipped as duo_attn.utils.load_attn_pattern); the highest values are retrieval heads. Without
    one, heads are identified on the fly once per stream, at its first eviction (the first
    `budget` tokens): each lane's share of attention, over the last `window` queries, that falls
    outside what a streaming head would keep (sinks plus each query's recent window): a head that
    reads far needs the context. The paper trains its gates on synthetic passkey retrieval; this is
    a cheaper proxy from the stream itself, and the split is then fixed for the stream."""

    summary = "retrieval heads keep a long cache, streaming heads sinks + recent (DuoAttention)"
    uneven: ClassVar[bool] = True
    observes: ClassVar[frozenset] = frozenset({"window_attention"})  # (none with a pattern file)

    retrieval_share: float = 0.5
    sink_size: int = 4
    streaming_size: int | None = None
    window: int | None = None
    pattern: str | None = None

    def configure(self) -> None:
        self._require(self.budget is not None, "needs a budget")
        budget = int(self.budget)
        share = self.retrieval_share
        self._require(
            isinstance(share, (int, float)) and not isinstance(share, bool) and 0 <= share <= 1,
            f"retrieval_share must be a number in [0, 1], got {share!r}",
        )
        self._check_int("sink_size", 0)
        if self.streaming_size is None:
            self.streaming_size = min(budget, self.sink_size + max(budget // 4, 1))
        self._check_int("streaming_size", 1)
        self._require(
            self.sink_size < self.streaming_size <= budget,
            f"streaming_size must be above sink_size {self.sink_size} and at most the budget {budget}, "
            f"got {self.streaming_size}",
        )
        if self.window is None:
            self.window = min(64, max(1, budget // 4))
        self._check_int("window", 1)
        self._gates: np.ndarray | None = None
        if self.pattern is not None:
            self._gates = load_pattern(self.pattern)
        self._decided(None)

    @property
    def observation_window(self) -> int:  # type: ignore[override]
        return 0 if self.pattern is not None else int(self.window or 0)

    @property
    def max_incoming(self) -> int:
        """A chunk may take every place but the sinks' (a streaming lane then holds its sinks and
        the chunk; the retrieval lanes make up the mean)."""
        return int(self.budget) - self.sink_size

    def lane_limits(self, view: CacheView) -> tuple[int | None, int | None]:
        """Every lane keeps its sinks (checked by the engine at every eviction)."""
        return self.sink_size, None

    def bind(self, model) -> None:
        """A pattern for another model is refused before anything runs (where the config names
        its KV heads; `select` checks the shape again on the cache itself)."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        kinds = getattr(config, "layer_types", None) or ["full_attention"] * int(config.num_hidden_layers)
        heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
        if self._gates is not None and heads is not None:
            self._check_shape(sum(kind != "sliding_attention" for kind in kinds), int(heads))

    def _check_shape(self, layers: int, heads: int) -> None:
        gates = self._gates
        if gates is not None and gates.shape != (layers, heads):
            raise ConfigError(
                f"duo: pattern {self.pattern} has {gates.shape[0]} layers x {gates.shape[1]} heads; "
                f"this model has {layers} full-attention layers x {heads} KV heads"
            )

    def reset(self) -> None:
        self._decided(None)

    def state(self):
        return self._retrieval

    def restore(self, state) -> None:
        self._decided(state)

    def _decided(self, retrieval: np.ndarray | None) -> None:
        """Once the heads are split, nothing more is read: the session stops computing the window
        attention at every eviction (the split is fixed for the stream)."""
        self._retrieval = retrieval
        own = frozenset() if self.pattern is not None or retrieval is not None else type(self).observes
        self.observes = own  # type: ignore[misc]

    def stats(self) -> dict[str, float]:
        if self._retrieval is None:
            return {}
        return {"retrieval_heads": float(self._retrieval.sum()), "lanes": float(self._retrieval.size)}

    def split(self, gates: np.ndarray) -> np.ndarray:
        """Retrieval lanes: the round(share x lanes) highest gates (ties: the earlier lane)."""
        count = round(gates.size * float(self.retrieval_share))
        chosen = np.argsort(-gates, axis=None, kind="stable")[:count]
        retrieval = np.zeros(gates.size, dtype=bool)
        retrieval[chosen] = True
        return retrieval.reshape(gates.shape)

    def far_attention(self, view: CacheView) -> np.ndarray | None:
        """(L, H): the share of the window's attention a streaming head would not see."""
        attn = view.observed.get("window_attention")
        if attn is None:
            return None
        import torch

        n, w = view.length, attn.shape[-2]
        ranks = torch.arange(n, device=attn.device)
        query = torch.arange(n - w, n, device=attn.device)[:, None]  # each window query's rank
        recent = int(self.streaming_size) - self.sink_size
        seen = (ranks[None] < self.sink_size) | (ranks[None] > query - recent)  # (w, n)
        far = attn.masked_fill(seen, 0).sum(-1)  # (L, H, groups, w)
        return far.mean(dim=(2, 3)).cpu().numpy()

    def select(self, view: CacheView) -> np.ndarray:
        L, H = view.num_layers, view.kv_heads
        if self._retrieval is None:
            self._check_shape(L, H)
            gates = self._gates if self._gates is not None else self.far_attention(view)
            if gates is None:  # (no query seen yet: every lane streams this once)
                gates = np.zeros((L, H))
            self._decided(self.split(gates))
        assert self._retrieval is not None
        held = view.held
        streaming = np.minimum(held, max(int(self.streaming_size) - view.incoming, self.sink_size))
        counts = np.where(self._retrieval, 0, streaming)
        spare = view.target * L * H - int(counts.sum())
        lanes = self._retrieval.ravel()
        if lanes.any():
            share = spare // int(lanes.sum())
            desired = np.full(int(lanes.sum()), share)
            counts.ravel()[lanes] = fill(desired, held.ravel()[lanes], spare)
        return recent_mask(view, counts, self.sink_size)


def load_pattern(path: str) -> np.ndarray:
    """DuoAttention's released head pattern: a tab-separated (layers x KV heads) table of gate
    values (`full_attention_heads.tsv`, or the folder holding it), clipped to [0, 1]."""
    where = Path(path)
    if where.is_dir():
        where = where / "full_attention_heads.tsv"
    try:
        gates = np.loadtxt(where, dtype=float, delimiter="\t", ndmin=2)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
        raise ConfigError(f"duo: cannot read the head pattern {path}: {reason}") from None
    if gates.size == 0 or not np.isfinite(gates).all():
        raise ConfigError(f"duo: the head pattern {path} must be a table of finite numbers (layers x KV heads)")
    return np.clip(gates, 0, 1)
