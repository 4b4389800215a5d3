"""StreamCache: a transformers `Cache` whose kept tokens can be evicted and re-indexed exactly.

Layout: one preallocated buffer per tensor for all layers, shape (L, B, H, capacity, D) (one per
device when a device map spreads the layers), so the engine's own work (eviction, re-rotation) is
a handful of batched ops per step, not L of them. A cache whose lanes keep unequal counts splits
into one buffer per layer, each at its own length (eviction.py). B streams are fed in lockstep; each keeps its own
tokens, bookkeeping and rotation offset. transformers lets each layer own its tensors
(`cache_utils.DynamicLayer`); here layers are views into the shared buffers, which is why the
cache is split along its own seams rather than transformers':

    stream_cache.py   StreamCache: state, writes from the model, commit, views, accounting
    layers.py         the transformers adapter (a view per layer) and the per-device shards
    eviction.py       keep-sets applied: swap-remove, re-rotation, per-head lanes, retrieval splices
    slot_stats.py     per-slot statistics a policy asked for (attention sums, key norms)
    sliding.py        hybrid models' sliding-window layers (the model's own window)
    quant.py          quantized KV's arithmetic and settings (--kv-bits: per-token groups, KIVI)
    quantized.py      what a quantized cache holds per slot, its writes and reads

The valid tokens occupy physical slots [0, n) in *any* order: attention over a cache is
permutation-invariant, so eviction fills holes with tokens moved from the tail ("swap-remove"):
O(evicted) copies, never a shift of the whole cache. New tokens are always appended at the end,
so the ordinary causal mask is right for multi-token chunks too.

Positions follow mit-han-lab/streaming-llm: a kept token's position is its rank among the kept
tokens (time order), the query's is the number of kept tokens. RoPE depends only on position
differences, so the cache stores every key rotated at `rank + offset` for one `offset` per stream:
after an eviction, the largest group of tokens whose rank shifted by the same amount keeps its
rotation (the offset absorbs the shift) and only the others are re-rotated, from their pre-RoPE
keys. For StreamingLLM that is the 4 sink tokens per step. When the offset grows past the
capacity, all keys are re-rotated once at offset 0 (amortised O(1)), so positions stay as small
as a fresh forward's and never lose float precision.

Host-side bookkeeping (numpy, per rank in time order), shared by every part: `_slot` (physical
slot), `_pos` (original stream position), `_score` (per-token score), rows per stream (or per
lane, eviction.py), valid up to `_n`; `_offsets` per stream. The engine is exact: the next-token
logits equal a fresh forward over the kept tokens at positions 0..n-1
(tests/engine/test_exactness.py).
"""

from streambench.engine.cache.stream_cache import StreamCache

__all__ = ["StreamCache"]
