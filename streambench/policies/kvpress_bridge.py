"""kvpress presses as streambench policies: `--policy kvpress:SnapKVPress`.

NVIDIA kvpress (PyPI `kvpress`) holds the field's KV-compression methods as "presses"; its
`ScorerPress` subclasses answer one question, `score(module, hidden_states, keys, values,
attentions, kwargs) -> (B, H_kv, n)`, and its `compress` keeps the top-scored pairs of every head
once, after a prefill (`ScorerPress.compress`), or every `compression_interval` decoding steps
(`DecodingPress`). Here a press class becomes a `ScoredPolicy`: at every eviction its `score` runs
per governed layer on the cache as the stream holds it, and every (layer, KV head) keeps its
top-scored tokens (per-head keep-sets, exact re-indexing: the engine's usual guarantees).

What the press is given, per layer (the same names and shapes as in kvpress's prefill hook):
- `keys`: the kept keys, rotated at ranks 0..n-1 (what a prefill of exactly the kept tokens
  holds; RoPE scores are invariant to the stream's own rotation offset, and query-projecting
  presses then meet keys and queries in one frame); `values`: the kept values;
- `hidden_states`: the inputs to that attention layer of the last `window` fed tokens
  (kvpress's `hidden_states_buffer_size`), the newest last;
- `kwargs["position_embeddings"]`: the model's (cos, sin) at positions n - w .. n - 1, where those
  tokens sit when they are the newest kept ones (SnapKV's and TOVA's windows, which they pad to
  the top score, so they are);
- `module`: the layer's attention module, with the model's rotary embedding as `rotary_emb`
  (what kvpress's `BasePress.__call__` attaches);
- `attentions`: None (streambench's forward is SDPA: SnapKV and TOVA then project their own
  queries, as under kvpress's default SDPA), except for a press that asserts it (ObservedAttention,
  which only sums it over queries): it gets that sum as one query row (1, H, 1, n), the attention
  each kept token received from every query since it entered, from the engine's H2O statistic
  (`attention_sum`). After a compress-once prefill that is exactly the prefill's matrix summed
  (the n x n matrix is never materialised); in a stream, kvpress's normalisation by `n - rank`
  (the queries a prefill's token at that rank saw) is applied as written.
The press's `compression_ratio` is set so that `int(n * (1 - ratio))` is the number kept, as
`DecodingPress._find_target_compression_ratio` does.

Two modes. Streaming (`interval` unset): evict as the budget requires, scoring with the last
`window` hidden states. `interval=N`: kvpress's `DecodingPress(compression_interval=N,
target_size=budget - N, hidden_states_buffer_size=window)`: every N tokens the cache is
compressed back to budget - N, scored with the hidden states of the N tokens since (at most
`window`), so a query sees at most `budget` keys (the project's budget convention). Identical to
DecodingPress once its first compression has happened, which is when budget - N is a multiple
of N (DecodingPress counts steps from the prefill; streambench from the first full cache).

A press that learned something per model (QFilter, KVzap, ExpectedAttentionStats) gets kvpress's
`post_init_from_model` when a session starts (`bind`); one that scores a whole context at once
(LeverageScore, NonCausalAttn, Compactor) runs only where a task compresses once.

A press that rescores another (CriticalKVPress) takes it as `-p kvpress:CriticalKVPress.press=
SnapKVPress(window_size=16)`: any streaming press, with its own arguments.

Install with `./install.sh kvpress` (kvpress 0.5.5 declares transformers<5.3, streambench needs
5.24: it is installed without its dependency pins; see README).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, ClassVar

import numpy as np

from streambench.errors import ConfigError, PolicyContractError
from streambench.policies.base import CacheView, ScoredPolicy

KVPRESS_VERSION = "0.5.5"
INSTALL = "./install.sh kvpress (kvpress==0.5.5 without its transformers<5.3 pin; see README)"
NAN_SCORES = "the press's score() returned NaN scores"
# Presses whose score() reads no device value on the host and copies no host data up (kvpress
# 0.5.5, counted per press by tests/policies/test_kvpress_device_steps.py): the engine may keep
# their step on the device. SnapKV, TOVA, Cap and ExpectedAttention call `.max().item()` (and
# some make tensors on the host) inside their score(); ObservedAttention makes an arange on the
# host; a wrapper's depends on the press it wraps.
DEVICE_PRESSES = frozenset({"CURPress", "KeyDiffPress", "KnormPress", "LagKVPress", "RandomPress", "StreamingLLMPress"})
OURS = ("budget", "start_size", "window", "interval")  # the bridge's own fields, beside the press's
DEFAULT_RESCORED = "SnapKVPress"  # what a rescoring wrapper wraps unless told (kvpress's critical_snapkv)


def import_kvpress():
    """kvpress, imported once. Importing it wraps every attention function transformers knows
    (`kvpress.attention_patch`, for AdaKV's masked keys); the bridge masks nothing, so the
    functions are put back as they were and no other policy's forward changes."""
    import sys

    if "kvpress" in sys.modules:
        return sys.modules["kvpress"]
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    saved = dict(ALL_ATTENTION_FUNCTIONS.items())
    try:
        import kvpress
    except ImportError:
        raise ConfigError(f"kvpress is not installed: {INSTALL}") from None
    finally:
        for name, func in saved.items():
            ALL_ATTENTION_FUNCTIONS[name] = func
    return kvpress


@dataclasses.dataclass
class PressPolicy(ScoredPolicy):
    """Base of every bridged press (one generated subclass per press class, `adapt`)."""

    press_class: ClassVar[Any] = None
    wraps: ClassVar[bool] = False  # rescores another press, given as `-p <name>.press=Name(arg=value)`
    chunked: ClassVar[bool] = False  # ChunkPress: its press scores, and keeps its share of, each chunk alone
    blocked: ClassVar[bool] = False  # BlockPress: blocks of ranks scored in turn, each with the kept so far
    observes = frozenset({"attention_modules"})

    start_size: int = 0  # sinks kept whatever the press scores (kvpress protects none; n_sink presses score theirs)
    window: int = 256  # hidden states kept per layer (kvpress DecodingPress.hidden_states_buffer_size)
    interval: int | None = None  # None: streaming; N: DecodingPress, compress to budget - N every N tokens

    @property
    def observation_window(self) -> int:  # type: ignore[override]
        return self.window

    def configure(self) -> None:
        super().configure()
        self._nan_seen: Any = None  # NaN scores met in a step on the device (a device bool), or None
        self._deferring = False
        self._check_int("window", 1)
        budget = self.budget
        assert budget is not None
        if self.interval is not None:
            self._check_int("interval", 1)
            self._require(
                self.interval < budget - self.protected_start,
                f"interval {self.interval} leaves no room below budget {budget} (it compresses to budget - interval)",
            )
        self._press = self._build_press()
        scorer = self._scorer()
        window = getattr(scorer, "window_size", None)  # (SnapKV-style presses: queries of their window)
        if isinstance(window, int) and not isinstance(window, bool):
            where = (
                f"-p {self.name}.window_size=..."
                if scorer is self._press
                else f"-p {self.name}.press={type(scorer).__name__}(window_size=...)"
            )
            self._require(
                window < budget - self.protected_start,
                f"window_size {window} must be below the budget {budget}: the press scores the tokens before "
                f"its window of {window} with that window's queries, and the stream's first eviction comes "
                f"after {budget} tokens ({where})",
            )
            if self.interval is not None:
                self._require(
                    self.interval > window,
                    f"interval {self.interval} must exceed window_size {window}: the press scores with the "
                    "hidden states since its last compression",
                )
        unwrapped = scorer is self._press
        # a wrapper learns its press only now: what the engine collects follows the press chosen
        self.observes = _observations(type(scorer), None if unwrapped else type(self._press))
        self._attention_rows = attention_rows(type(scorer), unwrapped)
        self._reads_context = "hidden_states" in self.observes
        if self.chunked and self._reads_context:  # (chunks of ranks meet hidden states only in a prefill)
            self.prefill_only = True
        if self.blocked and self._reads_context and self.interval is not None:
            self._require(
                self.interval <= self._press.block_size,
                f"interval {self.interval} must not exceed block_size {self._press.block_size}: over a press "
                "reading hidden states, a stream's eviction must be one block (every block needs its tokens' "
                "hidden states, which only a compress-once prefill holds)",
            )

    def _press_args(self) -> dict[str, Any]:
        own = {f.name for f in dataclasses.fields(PressPolicy)}
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.init and f.name not in own and f.name != "press"
        }

    def _build_press(self):
        args = self._press_args()
        if "compression_ratios" in args:  # PerLayerCompressionPress
            args["compression_ratios"] = self._layer_ratios(args["compression_ratios"])
        if self.wraps:  # a press that rescores another
            args["press"] = inner_press(vars(self)["press"], self.name)
        try:
            if (
                "compression_ratios" in args
            ):  # (its warning is about kvpress's own hooks, which the bridge does not run)
                with _quiet("kvpress.presses.per_layer_compression_press"):
                    return self.press_class(**args)
            return self.press_class(**args)
        except (Exception, SystemExit) as exc:  # kvpress validates with asserts
            raise ConfigError(f"{self.name}: the press refused its arguments: {_described(exc)}") from None

    def _layer_ratios(self, ratios: Any) -> list[float]:
        """PerLayerCompressionPress's `compression_ratios`: one ratio in [0, 1) per model layer."""
        how = f"-p {self.name}.compression_ratios=[0.3,0.5,...] (one ratio in [0, 1) per model layer)"
        if ratios is None:
            raise ConfigError(f"{self.name} needs its per-layer ratios: {how}")
        if not isinstance(ratios, (list, tuple)) or not ratios:
            raise ConfigError(f"{self.name}: compression_ratios must be a list of numbers, got {ratios!r}: {how}")
        for r in ratios:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
                raise ConfigError(f"{self.name}: compression_ratios holds {r!r}, not a ratio in [0, 1): {how}")
        return [float(r) for r in ratios]

    def _scorer(self):
        """The press whose inputs decide what is collected: the wrapped one, for a wrapper."""
        return self._press.press if self.wraps else self._press

    def bind(self, model) -> None:
        """kvpress's `post_init_from_model`, as `BasePress.__call__` runs it: presses that learned
        something per model (QFilter's filters, KVzap's scorer, ExpectedAttentionStats' statistics)
        load it, from the hub or a local folder; once per model."""
        if getattr(self, "_bound", None) == id(model):  # (an id: a copied policy never copies the model)
            return
        ratios = getattr(self._press, "compression_ratios", None)
        layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if isinstance(ratios, list) and isinstance(layers, int) and len(ratios) != layers:
            raise ConfigError(
                f"{self.name}: compression_ratios has {len(ratios)} ratios for a model of {layers} layers "
                "(one per model layer, as kvpress indexes them)"
            )
        try:
            self._press.post_init_from_model(model)
        except (Exception, SystemExit) as exc:
            raise ConfigError(
                f"{self.name}: the press could not load what it needs for this model "
                f"(post_init_from_model: {_described(exc)}); it downloads it from the hub: run where the hub is "
                "reachable, or give it a local copy"
            ) from None
        self._bound = id(model)

    def kept(self, view: CacheView) -> int:
        if self.interval is None:
            return view.target
        return min(view.target, view.budget - self.interval)

    def score(self, view: CacheView):
        import torch

        n, count = view.length, self.kept(view)
        if n == 0:
            return None
        press = self._press
        # (PerLayerCompressionPress refuses one ratio: its press scores, at any, as scores are ratio-free)
        (press.press if type(press).__name__ == "PerLayerCompressionPress" else press).compression_ratio = _ratio_for(
            n, count
        )
        observed, offset = view.observed, 0
        if "held_keys" in observed:  # (as held, at rank + offset: the window's positions move with them)
            keys, offset = observed["held_keys"]
        else:
            keys = observed["keys"] if "keys" in observed else observed["key_shape"]  # (L, H, n, D)
        values = view.observed.get("values")  # (not gathered for a press whose score() never reads them)
        if values is None:
            values = keys.new_empty(*keys.shape[:-1], 0)
        modules = view.observed["attention_modules"]
        kwargs: dict[str, Any] = {}
        if self._reads_context:
            hidden = view.observed["hidden_states"]  # (the tap holds the last `window`; a compress-once prefill, all)
            w = hidden[0].shape[1] if hidden[0].dim() == 3 else 0
            if self.prefill_only and w != n:  # (the plan refuses a stream first; a library caller meets this)
                raise PolicyContractError(f"policy {self.name}: {PREFILL_ONLY}")
            if self.interval is not None:  # DecodingPress: the hidden states since the last compression
                w = min(w, self.interval)
            positions = torch.arange(offset + n - w, offset + n, device=keys.device)[None]
            kwargs = {"position_ids": positions, "cache_position": positions[0]}
            if w:  # (one rotary table for every governed layer: computed once)
                kwargs["position_embeddings"] = modules[0].rotary_emb(hidden[0][:, -w:], positions)
        rows = view.observed[self._attention_rows] if self._attention_rows else None  # (L, H_kv, n)
        # (a wrapper that only chooses differently, KeyRerotation and Block, scores with its press)
        scoring = press if callable(getattr(press, "score", None)) else press.press
        # (Block: whether the tap holds exactly the kept tokens' hidden states, as a compress-once
        # prefill or a stream not yet evicted from does)
        whole = self.blocked and self._reads_context and w == n and int(view.positions.max()) == n - 1
        # a ragged cache: each layer scored over its own span (a layer keeping fewer tokens holds
        # pads at its first ranks), as kvpress sees a layer of that many tokens
        starts = n - view.held.max(-1) if self.uneven else None
        out = []
        for layer, module in enumerate(modules):
            h = hidden[layer][:, -w:] if self._reads_context and w else keys.new_empty(1, 0, 0)
            k, v = keys[layer][None], values[layer][None]
            lo = int(starts[layer]) if starts is not None else 0
            if lo:
                k, v = k[:, :, lo:], v[:, :, lo:]
            attentions = None
            if rows is not None:  # one query row: the sum over queries, or the newest's (kvpress: KV-group-major)
                groups = module.config.num_attention_heads // k.shape[1]
                attentions = rows[layer][:, lo:].to(k.dtype).repeat_interleave(groups, 0)[None, :, None]
            try:
                if self.chunked:  # ChunkPress: its press scores each chunk of ranks on its own
                    step = self._press.chunk_length
                    inner = self._press.press
                    scores = torch.cat(
                        [
                            inner.score(
                                module, h[:, i : i + step], k[:, :, i : i + step], v[:, :, i : i + step], None, kwargs
                            )
                            for i in range(0, n, step)
                        ],
                        dim=-1,
                    )
                elif self.blocked:
                    scores = self._block_choice(module, h, whole, k, v, count, kwargs)
                else:
                    scores = scoring.score(module, h, k, v, attentions, kwargs)
            except PolicyContractError:
                raise
            except (Exception, SystemExit) as exc:
                raise PolicyContractError(
                    f"policy {self.name}: the press's score() failed: {_described(exc)}"
                ) from None
            if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (1, k.shape[1], n - lo):
                shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                raise PolicyContractError(
                    f"policy {self.name}: the press's score() returned {shape}, not (1, {k.shape[1]}, {n - lo})"
                )
            nan = torch.isnan(scores).any()
            if self._deferring:  # a step on the device: noted there, raised when the host next asks
                self._nan_seen = nan if self._nan_seen is None else self._nan_seen | nan
            elif nan:
                raise PolicyContractError(f"policy {self.name}: {NAN_SCORES}")
            if lo:
                scores = torch.nn.functional.pad(scores.float(), (lo, 0), value=float("-inf"))
            out.append(scores[0])
        return torch.stack(out)

    def lane_limits(self, view: CacheView) -> tuple[int | None, int | None]:
        """AdaKVPress and CriticalAdaKVPress: every head keeps at least its alpha_safeguard share."""
        if type(self._press).__name__ not in POOLED:
            return None, None
        from streambench.policies.allocation import safeguard

        return safeguard(self.kept(view), float(self._press.alpha_safeguard)), None

    def select(self, view: CacheView):
        """AdaKVPress, CriticalAdaKVPress, PyramidKVPress and PerLayerCompressionPress: per-lane
        counts (`uneven`), the budget the mean."""
        if not self.uneven:
            return super().select(view)
        from streambench.policies.allocation import fill, pooled_counts, protect, top_mask

        count = self.kept(view)
        L, H = view.num_layers, view.kv_heads
        held = view.held
        scores = protect(self.score(view), view, self.start_size, 0)
        if scores is None:
            return super().select(view)
        if type(self._press).__name__ in POOLED:
            counts = pooled_counts(scores, count, held, float(self._press.alpha_safeguard))
            if type(self._press).__name__ == "CriticalAdaKVPress":
                scores = self._critical(scores, counts, count, view)
        elif type(self._press).__name__ == "PerLayerCompressionPress":
            # each model layer keeps its 1 - ratio share (kvpress: `compression_ratios[layer_idx]`),
            # scaled so the mean is the budget, then water-filled to what each layer holds
            modules = view.observed["attention_modules"]
            share = np.array([1 - self._press.compression_ratios[m.layer_idx] for m in modules])
            desired = np.floor(share / max(share.mean(), 1e-9) * count).astype(np.int64)
            per_layer = fill(desired, held.min(axis=1), count * L)
            counts = np.broadcast_to(per_layer[:, None], (L, H))
        else:
            # PyramidKVPress: kvpress's own layer budgets for the stream so far as one context (in
            # compress-once, the context held; in a stream, every token fed: the schedule kvpress
            # would give it), at the ratio that keeps `count`; each layer then keeps what it can
            # of its budget (it grows one token per token), water-filled to the exact mean
            seen = max(view.length, int(view.positions.max()) + 1)
            self._press.compression_ratio = _ratio_for(seen, count)
            modules = view.observed["attention_modules"]
            desired = np.array([self._press.get_layer_budget(m, seen) for m in modules])
            per_layer = fill(desired, held.min(axis=1), count * L)
            counts = np.broadcast_to(per_layer[:, None], (L, H))
        return top_mask(scores, counts)

    def _critical(self, scores, counts: np.ndarray, count: int, view: CacheView):
        """CriticalAdaKVPress's two stages after AdaKV's pool (kvpress
        `CriticalAdaKVPress.compress`, arXiv:2502.03805): each head's safeguard tokens and the top
        `first_stage_ratio` of its pooled count by score are kept outright; its other places go
        to the highest (score + epsilon) x |W_o V|_1 (kvpress's own `CriticalKVPress.vwl1norm`
        of each token's value through the output projection). Scores as (L, H, n): kept outright
        at +inf, pads at -inf."""
        import torch

        from streambench.policies.allocation import safeguard, top_mask

        press = self._press
        values = view.observed["values"]  # (L, H, n, D) in rank order
        valid = torch.from_numpy(np.array(view.lane_valid)).to(scores.device)
        floor = np.minimum(view.held, safeguard(count, float(press.alpha_safeguard)))
        outright = torch.from_numpy(top_mask(scores, floor)).to(scores.device) | torch.isposinf(scores)
        first = (counts * float(press.first_stage_ratio)).astype(np.int64)
        boosted = scores.masked_fill(outright, float("inf"))
        outright |= torch.from_numpy(top_mask(boosted, first)).to(scores.device)
        out = []
        for layer, module in enumerate(view.observed["attention_modules"]):
            norm = self._value_norm(values[layer], module)
            out.append((scores[layer].clamp(min=-1e30, max=1e30) + float(press.epsilon)) * norm.float())
        second = torch.stack(out).masked_fill(outright, float("inf"))
        return second.masked_fill(~valid, float("-inf"))

    def _value_norm(self, values, module):
        """|W_o V|_1 per KV head and token, (H_kv, n), averaged over each head's query group: kvpress
        `CriticalKVPress.vwl1norm`, with the head size read from the values (not every config
        names `head_dim`)."""
        import torch

        weight = getattr(getattr(module, "o_proj", None), "weight", None)
        if weight is None:
            raise PolicyContractError(
                f"policy {self.name}: this model's attention has no o_proj (CriticalAdaKV weighs values by it)"
            )
        kv_heads, n, d = values.shape
        heads = weight.shape[1] // d
        wo = weight.t().reshape(heads, d, weight.shape[0])
        v = values.to(wo.dtype).repeat_interleave(heads // kv_heads, 0)  # (heads, n, D), kvpress's repeat_kv
        norm = torch.bmm(v, wo).abs().sum(dim=-1)  # (heads, n): one batched product, not a loop per head
        return norm.view(kv_heads, heads // kv_heads, n).mean(dim=1).float()

    def _block_choice(self, module, hidden, whole: bool, keys, values, count: int, kwargs):
        """BlockPress.compress for one layer, as a 0/1 score (1: kept): the first `count` ranks are
        kept, then each next block of `block_size` ranks is scored by the press together with the
        kept ones, which keep the `count` best. Hidden states are gathered per head as kvpress
        gathers them, which needs every kept token's (`whole`; in a stream after its first
        eviction the tap holds the last fed tokens instead: then the eviction must be one block,
        scored with the press's own window, as an unwrapped press is)."""
        import torch

        inner = self._press.press
        bsz, heads, n, _ = keys.shape
        block = min(self._press.block_size, n)
        kept = torch.arange(count, device=keys.device).expand(bsz, heads, -1)
        states = None
        if self._reads_context and whole:
            states = hidden.view(bsz, n, heads, -1).transpose(1, 2)
        for start in range(count, n, block):
            end = min(start + block, n)
            current = torch.arange(start, end, device=keys.device).expand(bsz, heads, -1)
            current = torch.cat([kept, current], dim=-1)
            if states is not None:
                gathered = states.gather(2, current[..., None].expand(-1, -1, -1, states.shape[-1]))
                h = gathered.transpose(1, 2).reshape(bsz, -1, hidden.shape[-1])
            elif not self._reads_context:
                h = keys.new_empty(1, 0, 0)
            elif start == count and end == n:  # (one block: every kept token, the press's own window)
                h = hidden
            else:
                raise PolicyContractError(
                    f"policy {self.name}: a block of {end - start} of {n} ranks needs every token's hidden "
                    "states, which only a compress-once prefill holds (evict at most block_size at a time)"
                )
            index = current[..., None]
            scores = inner.score(
                module,
                h,
                keys.gather(2, index.expand(-1, -1, -1, keys.shape[-1])),
                values.gather(2, index.expand(-1, -1, -1, values.shape[-1])),
                None,
                kwargs,
            )
            kept = current.gather(-1, scores.topk(count, dim=-1).indices)
        chosen = torch.zeros(bsz, heads, n, dtype=torch.float32, device=keys.device)
        return chosen.scatter_(-1, kept, 1.0)

    def keep_top(self, scores, count: int):
        """kvpress's own choice (`ScorerPress.compress`: `scores.topk(n_kept).indices`), so that
        exact ties (a repeated token's pre-RoPE key, in layer 0) fall as they fall in kvpress."""
        import numpy as np

        n = scores.shape[-1]
        if count >= n:
            return np.broadcast_to(np.arange(n), scores.shape).copy()
        return self._kept(scores, count).cpu().numpy()

    def drop_lowest(self, scores, drop: int):
        """The complement of `keep_top`'s choice, on the device: the ranks kvpress's topk leaves
        out, ties falling as there (a stable sort of the left-out mask, no boolean gather)."""
        import torch

        n = scores.shape[-1]
        if drop <= 0:
            return torch.zeros((*scores.shape[:-1], 0), dtype=torch.long, device=scores.device)
        gone = torch.ones(scores.shape, dtype=torch.uint8, device=scores.device)
        gone.scatter_(-1, self._kept(scores, n - drop), 0)
        return torch.sort(gone, dim=-1, descending=True, stable=True).indices[..., :drop]

    def _kept(self, scores, count: int):
        """The `count` ranks each head keeps, sorted, on the scores' device."""
        import torch

        n = scores.shape[-1]
        if self.chunked:  # ChunkPress.compress: each chunk keeps max(1, int(its length * (1 - ratio)))
            step, ratio = self._press.chunk_length, _ratio_for(n, count)
            parts = [
                i + torch.topk(scores[..., i : i + step], max(1, int(min(step, n - i) * (1 - ratio))), dim=-1).indices
                for i in range(0, n, step)
            ]
            chosen = torch.cat(parts, dim=-1)
            if chosen.shape[-1] > count:  # (each chunk's floor of 1 over a small count: the lowest-scored go)
                best = torch.topk(scores.gather(-1, chosen), count, dim=-1).indices
                chosen = chosen.gather(-1, best)
            return torch.sort(chosen, dim=-1).values
        return torch.sort(torch.topk(scores, count, dim=-1).indices, dim=-1).values

    def dropped(self, view: CacheView):
        """ScoredPolicy's, with the NaN check left on the device (`check_deferred` reads it)."""
        self._deferring = True
        try:
            return super().dropped(view)
        finally:
            self._deferring = False

    def check_deferred(self) -> None:
        seen, self._nan_seen = self._nan_seen, None
        if seen is not None and bool(seen):
            raise PolicyContractError(f"policy {self.name}: {NAN_SCORES} (in a step on the device)")

    def reset(self) -> None:
        self._nan_seen = None
        if hasattr(self._press, "reset"):
            self._press.reset()


def reads_context(cls: type) -> bool:
    """Whether the press's score() reads the hidden states (to project queries, or for the
    positions of its window); presses scoring keys and values alone skip collecting them."""
    return _score_reads(cls, ("hidden_states", "kwargs"))


def reads_values(cls: type) -> bool:
    """Whether the press's score() reads the values: those that do not (Knorm, KeyDiff, SnapKV,
    TOVA, ...) are spared gathering every kept value in rank order at each eviction."""
    return _score_reads(cls, ("values",))


def _score_reads(cls: type, names: tuple[str, ...]) -> bool:
    """Whether the body of the press's score() names any of `names` (True when unreadable)."""
    import ast
    import textwrap

    for klass in cls.__mro__:
        method = klass.__dict__.get("score")
        if method is None:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(method)))
        except (OSError, TypeError, SyntaxError):
            return True
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.FunctionDef) else []
        return any(
            (isinstance(node, ast.Name) and node.id in names) for statement in body for node in ast.walk(statement)
        )
    return True


def needs_attentions(cls: type) -> bool:
    """Whether the press asserts materialised attention (ObservedAttention): it is then given the
    engine's per-token attention sums (`attention_sum`) as one query row."""
    return any(
        "assert attentions is not None" in _source(klass.__dict__["score"])
        for klass in cls.__mro__
        if "score" in klass.__dict__
    )


# kvpress's own presses that score from the attention matrix when kvpress is given one (eager
# attention), and otherwise re-project queries from hidden states (SDPA): given the engine's row
# of that attention, they need no hidden states. TOVA reads the newest query's row
# (`attentions[..., -1:, :-1]`), which the engine keeps per KV head as `attention_last` (averaged
# over the group, as TOVA then averages over every head): the re-projection cost 22 ms a token at
# budget 1024 here. Only unwrapped: Block and Chunk assert no attention, CriticalKV rescales scores.
ATTENTION_ROWS = {"TOVAPress": "attention_last"}


def attention_rows(cls: type, unwrapped: bool = True) -> str | None:
    """The engine statistic a press of this class is given as `attentions` (one query row), if any."""
    if needs_attentions(cls):
        return "attention_sum"
    if unwrapped and cls.__module__.startswith("kvpress.") and cls.__name__ in ATTENTION_ROWS:
        return ATTENTION_ROWS[cls.__name__]
    return None


def _source(obj: Any) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


# How kvpress's own presses read the keys, when a gathered copy of every key in rank order, turned
# back to ranks 0..n-1, is more than they need (each eviction of a 1024-token stream: ~24 MB read
# and written per tensor). "shape": only the keys' shape (scores by rank, or attention already
# summed). "held": scores that do not change when every key turns by one common angle (norms,
# cosines to the mean key) or when keys and the window's queries move together (queries rotated
# with kwargs' position_embeddings, which are then given at the held positions). Any other press,
# a subclass included, gets keys at ranks 0..n-1 (ExpectedAttention and Cap rotate their own
# queries at positions counted from 0; LagKV reads key channels' ranges).
KEY_FRAMES = {
    "StreamingLLMPress": "shape",
    "RandomPress": "shape",
    "ObservedAttentionPress": "shape",
    "KnormPress": "held",
    "KeyDiffPress": "held",
    "SnapKVPress": "held",
    "TOVAPress": "shape",  # (given the newest query's attention row: ATTENTION_ROWS)
}
KEY_OBSERVATION = {"shape": "key_shape", "held": "held_keys", "ranks": "keys"}


def key_frame(cls: type, wrapper: type | None = None) -> str:
    """How a press of this class (rescored by `wrapper`, when one is) is given the keys."""
    if wrapper is not None or not cls.__module__.startswith("kvpress."):
        return "ranks"
    return KEY_FRAMES.get(cls.__name__, "ranks")


def _observations(cls: type, wrapper: type | None = None) -> frozenset[str]:
    """What the engine collects for a press of this class (wrapped by `wrapper`, when one is):
    the modules always, the keys in the frame the press needs; the values, the hidden-state tap (a
    hook per layer per token) and the attention statistic only when read."""
    values = reads_values(cls) or (wrapper is not None and reads_values(wrapper))
    rows = attention_rows(cls, unwrapped=wrapper is None)
    context = reads_context(cls) and not (wrapper is None and rows in ATTENTION_ROWS.values())
    return (
        PressPolicy.observes
        | {KEY_OBSERVATION[key_frame(cls, wrapper)]}
        | ({"values"} if values else set())
        | ({"hidden_states"} if context else set())
        | ({rows} if rows else set())
    )


def inner_press(spec: Any, policy: str):
    """The press a wrapper rescores, from `Name` or `Name(arg=value, ...)` (kvpress's own
    constructor syntax; `kvpress:` may prefix the name; values are Python literals)."""
    import ast

    text = str(spec).strip().removeprefix("kvpress:")
    hint = f"{policy}: press must be a streaming press, as Name or Name(arg=value), got {str(spec)!r}"
    try:
        node = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise ConfigError(hint) from None
    call = node if isinstance(node, ast.Call) else None
    name_node = call.func if call is not None else node
    if not isinstance(name_node, ast.Name) or (
        call is not None and (call.args or any(k.arg is None for k in call.keywords))
    ):
        raise ConfigError(hint)
    try:
        args = {k.arg: ast.literal_eval(k.value) for k in (call.keywords if call is not None else [])}
    except ValueError:
        raise ConfigError(f"{hint} (argument values must be literals)") from None
    kvpress = import_kvpress()
    cls = getattr(kvpress, name_node.id, None)
    if not isinstance(cls, type):
        raise ConfigError(f"{policy}: kvpress has no press {name_node.id!r} (streambench list presses)")
    status, why = press_status(cls)
    if status not in ("streaming", "hub") or _wraps(cls):
        reason = f"{status}: {why}" if why else "itself a wrapper"
        raise ConfigError(f"{policy}: {name_node.id} cannot be rescored in the stream ({reason})")
    try:
        return cls(**args)
    except (Exception, SystemExit) as exc:
        raise ConfigError(f"{policy}: {name_node.id} refused its arguments: {_described(exc)}") from None


def _wraps(cls: type) -> bool:
    try:
        takes = set(inspect.signature(cls).parameters)
    except (TypeError, ValueError):
        return False
    return bool(takes & {"press", "presses", "base_press", "prefilling_press", "decoding_press"})


@contextlib.contextmanager
def _quiet(logger: str):
    """A kvpress module's log warnings held back (ones that speak of kvpress's own pipeline)."""
    import logging

    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _ratio_for(n: int, count: int) -> float:
    """The compression ratio for which kvpress keeps exactly `count` of `n` (`int(n * (1 - r))`),
    as DecodingPress._find_target_compression_ratio finds it."""
    if count >= n:
        return 0.0
    ratio = 1 - count / n
    for _ in range(8):  # float rounding: nudge until int() lands on count
        kept = int(n * (1 - ratio))
        if kept == count:
            return ratio
        ratio += (kept - count) / n / 2 if kept > count else -(count - kept) / n / 2
    return ratio


def _described(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---- which presses run, and why the others do not -------------------------------------------------
NEEDS_HUB = ("from_pretrained", "hf_hub_download", "load_dataset", "snapshot_download")


HUB = (
    "scores in the stream once kvpress's post_init_from_model has loaded what it learned for the model "
    "(from the hub, or a local folder where the press takes one); offline: one line"
)
PREFILL_ONLY = (
    "scores a whole context at once (one query per key): runs in compress-once "
    "(-t protocol=compress-once), not in a stream"
)
# Wrappers whose counts differ between layers or heads, why (the engine keeps one count per lane today)
# Streamed through the engine's unequal counts (a keep mask per lane, the budget the mean):
ALLOCATING = {
    "AdaKVPress": "its press's scores; a layer's pool over its heads with alpha_safeguard's floor",
    "CriticalAdaKVPress": "AdaKV's pool, then its two stages: first_stage_ratio by score, the rest by score x the L1 norm of W_o V",
    "PyramidKVPress": "SnapKV's scores; each layer's count from its get_layer_budget",
    "PerLayerCompressionPress": "its press's scores; each layer keeps its 1 - ratio share, the mean scaled to the budget",
}
POOLED = ("AdaKVPress", "CriticalAdaKVPress")  # heads of a layer share its pool (AdaKV's allocation)
UNEVEN = {
    "ChunkKVPress": "keeps whole chunks chosen per layer: a layer that keeps the shorter last chunk keeps fewer",
    "DMSPress": "evicts below a score threshold: counts follow the content in every head",
    "LUKVPress": "a downloaded budget curve per layer and head: a different count per head",
}
RUNS = ("streaming", "hub", "prefill only")  # the statuses the bridge builds a policy for


def _defines(cls: type, method: str) -> bool:
    """A kvpress class below BasePress defines `method` itself."""
    return any(method in klass.__dict__ for klass in cls.__mro__ if klass.__name__ != "BasePress")


def press_status(cls: type) -> tuple[str, str]:
    """("streaming", "") for a press the bridge runs; otherwise (status, why), read from the press's
    code: its base classes, what its constructor takes, what its module calls."""
    kvpress = import_kvpress()
    from kvpress.presses.scorer_press import ScorerPress

    sources = ""
    for klass in cls.__mro__:
        if str(getattr(klass, "__module__", "")).startswith("kvpress"):
            try:
                sources += inspect.getsource(inspect.getmodule(klass))  # type: ignore[arg-type]
            except (OSError, TypeError):
                pass
    wraps = _wraps(cls)
    name = cls.__name__
    if issubclass(cls, ScorerPress) and cls.score is ScorerPress.score:
        return "base class", "scores nothing itself"
    if name in ("MergingPress", "CAMPress"):
        return "refused", "merges evicted pairs into kept ones: not token eviction"
    if name == "ThinKPress":
        return "refused", "prunes key channels, not tokens"
    hub = any(marker in sources for marker in NEEDS_HUB)
    scorer = issubclass(cls, ScorerPress) and cls.compress is ScorerPress.compress and not wraps
    if hub and scorer and _defines(cls, "post_init_from_model"):
        return "hub", HUB
    if hub:
        return "needs the hub", "downloads weights, statistics or a dataset, and compresses in its own way: not bridged"
    if name in ("ChunkPress", "BlockPress", "KeyRerotationPress"):  # (their compress(): hosted as such)
        return "streaming", ""
    if name in ALLOCATING:
        return "streaming", f"unequal counts per lane: {ALLOCATING[name]}"
    if name in UNEVEN:
        return "uneven budgets", UNEVEN[name]
    if name == "EntropyGatedChunkKVPress":
        return "wrapper", (
            "keeps one count everywhere, but chosen chunk by chunk in its own compress(), not by a score "
            "per token: not bridged yet"
        )
    if name == "ComposedPress":
        return "wrapper", (
            "chains presses, each with its own ratio: one eviction (one token, in a stream) cannot be split "
            "between its stages; not bridged"
        )
    if not issubclass(cls, ScorerPress):
        if issubclass(cls, kvpress.DecodingPress) or name == "PrefillDecodingPress":
            return "protocol", "a decoding schedule, not a scorer: `-p interval=N` reproduces DecodingPress"
        if wraps:
            return "wrapper", "wraps another press (per-layer, per-chunk or composed budgets): not bridged yet"
        return "not bridged", "compresses in its own compress(), with no per-token score to rank by"
    if cls.compress is not ScorerPress.compress:
        return "uneven budgets", "keeps a different number per layer or head (arrives with the ragged-budget issue)"
    if wraps and "press" not in inspect.signature(cls).parameters:
        return "wrapper", "rescores several presses given to it: not bridged yet"
    if "only supports prefill" in sources or "NonCausal" in sources:
        return "prefill only", PREFILL_ONLY
    return "streaming", ""


def press_classes() -> dict[str, type]:
    """Every `*Press` class kvpress exports, by name."""
    kvpress = import_kvpress()
    from kvpress.presses.base_press import BasePress

    found = {}
    for name in dir(kvpress):
        obj = getattr(kvpress, name)
        if isinstance(obj, type) and issubclass(obj, BasePress) and obj is not BasePress and name.endswith("Press"):
            found[name] = obj
    return dict(sorted(found.items()))


def first_line(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def status_table() -> str:
    """The README's press table, generated from kvpress's code (not written by hand)."""
    rows = ["| press | status | why not, or what it is |", "|---|---|---|"]
    for name, cls in press_classes().items():
        status, why = press_status(cls)
        rows.append(f"| `kvpress:{name}` | {status} | {why or first_line(cls)} |")
    return "\n".join(rows)


_ADAPTED: dict[type, type] = {}


def _parameters(obj: type) -> list[tuple[str, Any, Any]]:
    """(name, type, default) of what a press's constructor takes, but its compression ratio (set
    at every eviction): dataclass fields, or the signature of a plain class (CriticalKVPress)."""
    own_init = next(klass for klass in obj.__mro__ if "__init__" in klass.__dict__)
    if "__dataclass_fields__" in own_init.__dict__:  # (its constructor is a dataclass's)
        found = []
        for f in dataclasses.fields(obj):
            if not f.init or f.name == "compression_ratio" or f.name.startswith("_"):
                continue
            default = f.default
            if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            found.append((f.name, f.type, default))
        return found
    found = []
    for name, param in inspect.signature(obj).parameters.items():
        if name == "compression_ratio" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = dataclasses.MISSING if param.default is param.empty else param.default
        found.append((name, Any if param.annotation is param.empty else param.annotation, default))
    return found


def adapt(obj: Any) -> type | None:
    """The policy class for a kvpress press class (made once per class), None for anything that
    is not a press; a press the bridge cannot run is refused with the reason."""
    if not isinstance(obj, type):
        return None
    import_kvpress()
    from kvpress.presses.base_press import BasePress

    if not issubclass(obj, BasePress):
        return None
    if obj in _ADAPTED:
        return _ADAPTED[obj]
    status, why = press_status(obj)
    if status not in RUNS:
        raise ConfigError(f"kvpress:{obj.__name__} does not run in the stream ({status}): {why}")
    wraps = _wraps(obj)
    fields = []
    for name, kind, default in _parameters(obj):
        if name in OURS:
            raise ConfigError(f"kvpress:{obj.__name__} has a field named like the bridge's own ({name})")
        if name == "press" and wraps:  # the rescored press, by name (kvpress's evaluation: critical_snapkv)
            kind, default = str, DEFAULT_RESCORED
        elif (obj.__name__, name) == ("PerLayerCompressionPress", "compression_ratios"):
            kind, default = Any, None  # (required: `_build_press` says how to give it)
        elif default is dataclasses.MISSING:
            raise ConfigError(f"kvpress:{obj.__name__} needs {name}, which has no default: not bridged")
        # (kvpress annotates with real types; a string annotation is left to the press to check)
        fields.append((name, kind if not isinstance(kind, str) else Any, dataclasses.field(default=default)))
    cls = dataclasses.make_dataclass(
        f"{obj.__name__}Policy",
        fields,
        bases=(PressPolicy,),
        namespace={
            "press_class": obj,
            "wraps": wraps,
            "chunked": obj.__name__ == "ChunkPress",
            "blocked": obj.__name__ == "BlockPress",
            "device_select": obj.__name__ in DEVICE_PRESSES,
            "uneven": obj.__name__ in ALLOCATING,
            # kvpress's pipeline answers after KeyRerotation at the compressed length: kept keys at ranks
            "compress_reindexes": obj.__name__ == "KeyRerotationPress",
            "prefill_only": status == "prefill only",
            # (an instance narrows this to what its rescored press reads, once it knows it)
            "observes": _observations(obj) | ({"hidden_states", "attention_sum", "values"} if wraps else set()),
            "summary": f"kvpress {obj.__name__}: {first_line(obj)}",
            "__doc__": f"kvpress's {obj.__name__} in the stream (policies/kvpress_bridge.py).\n\n{inspect.getdoc(obj) or ''}",
            "__module__": __name__,
        },
    )
    _ADAPTED[obj] = cls
    return cls
