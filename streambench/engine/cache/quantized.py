"""The quantized half of `StreamCache` (a mixin, as eviction.py and slot_stats.py): what a cache
built with `--kv-bits 8|4|2` holds per slot instead of float keys and values, how the model's
writes become that, and how attention and policies read it back (quant.py has the arithmetic).

Per slot, in each shard: the codes of the pre-RoPE key and of the value (`kq`, `vq`), the
value's per-token scales and zeros (`vs`, `vz`), the key's rotation position (`kpos`, rank +
offset: re-indexing rewrites it, eviction.py) and either the key's per-token scales and zeros
(`ks`, `kz`: the token method) or the index of its key block in the shard's block table (`kgid`:
KIVI's per-channel keys, one scale and zero per channel per block of `group` tokens, in `kgs`,
`kgz`). Every per-slot tensor moves with its token at every eviction.

Windowed caches (a residual of recent tokens in full precision, or KIVI's incomplete key block)
also hold each slot's stream position (`spos`) and a ring of the recent tokens' float keys and
values indexed by stream position (`kr`, `vr`). A held token is quantized once its stream
position falls behind the frontier (`KVQuant.frontiers`); until then attention reads it from the
ring. The frontier follows the stream, not the slots, so any eviction (of a recent token, of part
of a key block) composes: an evicted token's ring entry is never read again, and a key block is
quantized from the members each lane still holds when it completes; its scale and zero live as
long as one of them is held (kept sinks and heavy hitters keep their blocks' tables).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from streambench.engine.cache.quant import KVQuant, dequantize, pack, quantize, unpack

if TYPE_CHECKING:
    from streambench.engine.cache.layers import Shard
    from streambench.models.rope import RotaryTable

SLOT_NAMES = ("kq", "ks", "kz", "kgid", "vq", "vs", "vz", "kpos", "spos")  # per slot (eviction moves them)
SIDE_NAMES = ("kgs", "kgz", "kr", "vr")  # per layer, not per slot: block tables and recent rings


class Quantized:
    """The quantized half of `StreamCache`."""

    # provided by StreamCache
    shards: list[Shard]
    quant: KVQuant | None
    rope: RotaryTable | None
    dtype: torch.dtype
    device: torch.device
    num_layers: int
    batch: int
    kv_heads: int
    head_dim: int
    split: bool
    _where: list
    _len: list[int]
    _n: int
    _fed: int
    _base: np.ndarray
    _offsets: np.ndarray
    _pos: np.ndarray
    _slot: np.ndarray
    per_head: bool
    _wpos: tuple | None

    if TYPE_CHECKING:

        def reindexing(self) -> RotaryTable: ...

        def _resize(self, shard: Shard, capacity: int, keep: int | None = None) -> None: ...

        def lane_counts(self) -> np.ndarray: ...

    # ---- layout -------------------------------------------------------------------------------
    def _quantized_slots(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape after the slot axis, dtype) of what a quantized shard holds per slot."""
        quant, d = cast(KVQuant, self.quant), self.head_dim
        width, groups = quant.code_width(d), d // quant.group
        out: list[tuple[str, tuple[int, ...], torch.dtype]] = [("kq", (width,), torch.uint8)]
        if quant.per_channel:
            out.append(("kgid", (), torch.int32))
        else:
            out += [("ks", (groups,), self.dtype), ("kz", (groups,), self.dtype)]
        out += [("vq", (width,), torch.uint8), ("vs", (groups,), self.dtype), ("vz", (groups,), self.dtype)]
        out.append(("kpos", (), torch.int32))
        if quant.windowed:
            out.append(("spos", (), torch.int32))
        return out

    def _ring_size(self, incoming: int) -> int:
        quant = cast(KVQuant, self.quant)
        return quant.recent + quant.group + incoming

    def _ensure_side(self, shard: Shard, incoming: int = 1) -> None:
        """The shard's block tables and ring, allocated or grown (the ring to hold every token
        not yet quantized plus `incoming` new ones, re-laid out by stream position)."""
        quant = cast(KVQuant, self.quant)
        lead = (shard.stop - shard.start, self.batch, self.kv_heads)
        if quant.per_channel and shard.kgs is None:
            blocks = max(4, shard.capacity // quant.group + 4)
            shard.kgs = torch.zeros((*lead, blocks, self.head_dim), dtype=self.dtype, device=shard.device)
            shard.kgz = torch.zeros_like(shard.kgs)
        if not quant.windowed:
            return
        size = self._ring_size(incoming)
        old = shard.kr
        if old is not None and old.shape[3] >= size:
            return
        size = max(size, 2 * old.shape[3]) if old is not None else size
        new_k = torch.zeros((*lead, size, self.head_dim), dtype=self.dtype, device=shard.device)
        new_v = torch.zeros_like(new_k)
        if old is not None:
            first = quant.frontiers(self._fed)[0]
            at = torch.arange(first, self._fed, device=shard.device)
            new_k[:, :, :, at % size] = old[:, :, :, at % old.shape[3]]
            new_v[:, :, :, at % size] = cast(torch.Tensor, shard.vr)[:, :, :, at % old.shape[3]]
        shard.kr, shard.vr = new_k, new_v

    # ---- writes ------------------------------------------------------------------------------
    def _new_positions(self, count: int) -> torch.Tensor:
        """Where the forward's `count` new keys were rotated, rank + offset: (count,) for one stream,
        (B, 1, count) for several (one per forward, shared by every layer)."""
        if self._wpos is None or self._wpos[:2] != (self._n, count):
            rope = self.reindexing()
            rope.ensure(self._n + count + int(self._offsets.max()) + 1)
            if self.batch == 1:
                start = self._n + int(self._offsets[0])
                at = torch.arange(start, start + count, device=self.device)
            else:
                ranks = (self._n + self._offsets)[:, None] + np.arange(count)
                at = torch.from_numpy(ranks).to(self.device)[:, None]
            self._wpos = (self._n, count, at)
        return self._wpos[2]

    def _write_quantized(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Hold the new tokens (pre-RoPE keys): quantized at once, or in the ring until the
        frontier passes them (`_advance`). Attention reads the held ones as `_read` gives them and
        the forward's own tokens as the model computed them (as transformers' QuantizedCache
        returns them)."""
        quant = cast(KVQuant, self.quant)
        count = k.shape[-2]
        start = self._len[layer]
        end = start + count
        shard, i = self._where[layer]
        if end > shard.capacity:
            self._resize(shard, max(end, shard.capacity + shard.capacity // 4 if self.split else 2 * shard.capacity))
        at = self._new_positions(count).to(k.device)
        pre = cast("RotaryTable", self.rope).unrotate(k, at)
        cast(torch.Tensor, shard.kpos)[i, :, :, start:end] = at.to(torch.int32)
        if quant.windowed:
            self._ensure_side(shard, count)
            kr, vr = cast(torch.Tensor, shard.kr), cast(torch.Tensor, shard.vr)
            stream = torch.arange(self._fed, self._fed + count, device=shard.device)
            kr[i, :, :, stream % kr.shape[3]] = pre
            vr[i, :, :, stream % vr.shape[3]] = v
            cast(torch.Tensor, shard.spos)[i, :, :, start:end] = stream.to(torch.int32)
        else:
            for part, x in (("k", pre), ("v", v)):
                for suffix, t in zip("qsz", quantize(x, quant.bits, quant.group)):
                    getattr(shard, part + suffix)[i, :, :, start:end] = t
        self._len[layer] = end
        if start == 0:
            return k, v
        keys, values = self._read(shard, slice(i, i + 1), slice(0, start))
        return torch.cat((keys[0], k), dim=-2), torch.cat((values[0], v), dim=-2)

    def _advance(self, fed_before: int) -> None:
        """After a commit: quantize the held tokens the frontiers passed (values one by one, and
        keys one by one or, KIVI, each completed block of `group` tokens from the members each
        lane still holds)."""
        quant = cast(KVQuant, self.quant)
        old_k, old_v = quant.frontiers(fed_before)
        new_k, new_v = quant.frontiers(self._fed)
        for shard in self.shards:
            m = self._len[shard.start]
            if m == 0:
                continue
            spos = cast(torch.Tensor, shard.spos)[..., :m]
            if new_v > old_v:
                self._quantize_tokens(shard, "v", spos, old_v, new_v, m)
            if new_k > old_k:
                if quant.per_channel:
                    for block in range(old_k, new_k, quant.group):
                        self._quantize_block(shard, spos, block, m)
                else:
                    self._quantize_tokens(shard, "k", spos, old_k, new_k, m)

    def _quantize_tokens(self, shard: Shard, part: str, spos: torch.Tensor, lo: int, hi: int, m: int) -> None:
        quant = cast(KVQuant, self.quant)
        crossing = ((spos >= lo) & (spos < hi)).view(-1).nonzero()[:, 0]  # flat (lane * m + slot)
        if not len(crossing):
            return
        lane, slot = crossing // m, crossing % m
        ring = cast(torch.Tensor, getattr(shard, part + "r"))
        size = ring.shape[3]
        x = ring.view(-1, size, self.head_dim)[lane, spos.reshape(-1)[crossing].long() % size]
        cap = shard.capacity
        flat = lane * cap + slot
        for suffix, t in zip("qsz", quantize(x, quant.bits, quant.group)):
            buf = getattr(shard, part + suffix)
            buf.view(-1, buf.shape[-1])[flat] = t

    def _quantize_block(self, shard: Shard, spos: torch.Tensor, block: int, m: int) -> None:
        """KIVI's keys: the block [block, block + group) of stream positions, per lane from the
        members it holds; per channel a scale and a zero in a table entry no held key uses."""
        quant = cast(KVQuant, self.quant)
        member = (spos >= block) & (spos < block + quant.group)  # (L_s, B, H, m)
        if shard.allowed is not None:  # (a ragged lane's pad slots hold stale positions)
            member = member & shard.allowed[..., :m]
        if not bool(member.any()):
            return
        kr = cast(torch.Tensor, shard.kr)
        x = kr.gather(3, (spos.long() % kr.shape[3])[..., None].expand(-1, -1, -1, -1, self.head_dim)).float()
        inf = torch.tensor(float("inf"), device=x.device)
        low = torch.where(member[..., None], x, inf).amin(dim=3)  # (L_s, B, H, D)
        high = torch.where(member[..., None], x, -inf).amax(dim=3)
        held = member.any(dim=3)[..., None]
        low, high = torch.where(held, low, 0.0), torch.where(held, high, 0.0)
        scale = (high - low) / (2**quant.bits - 1)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        codes = torch.round((x - low[:, :, :, None]) / safe[:, :, :, None]).clamp_(0, 2**quant.bits - 1).to(torch.uint8)
        kq = cast(torch.Tensor, shard.kq)[..., :m, :]
        kq.copy_(torch.where(member[..., None], pack(codes, quant.bits), kq))
        entry = self._free_block(shard, spos, block, m)
        kgs, kgz = cast(torch.Tensor, shard.kgs), cast(torch.Tensor, shard.kgz)
        kgs[:, :, :, entry] = scale.to(self.dtype)
        kgz[:, :, :, entry] = low.to(self.dtype)
        kgid = cast(torch.Tensor, shard.kgid)[..., :m]
        kgid.masked_fill_(member, entry)

    def _free_block(self, shard: Shard, spos: torch.Tensor, block: int, m: int) -> int:
        """A block-table entry no quantized key of the shard refers to (the table grows when full)."""
        kgs = cast(torch.Tensor, shard.kgs)
        quantized = spos < block  # (keys before this block were quantized into earlier entries)
        if shard.allowed is not None:
            quantized = quantized & shard.allowed[..., :m]
        used = torch.zeros(kgs.shape[3], dtype=torch.bool, device=kgs.device)
        used[cast(torch.Tensor, shard.kgid)[..., :m][quantized].long()] = True
        free = (~used).nonzero()
        if len(free):
            return int(free[0, 0])
        size = kgs.shape[3]
        grown = torch.zeros((*kgs.shape[:3], 2 * size, kgs.shape[4]), dtype=kgs.dtype, device=kgs.device)
        for name in ("kgs", "kgz"):
            bigger = grown.clone()
            bigger[:, :, :, :size] = getattr(shard, name)
            setattr(shard, name, bigger)
        return size

    # ---- reads -------------------------------------------------------------------------------
    def _read(self, shard: Shard, layers: slice, slots, b: int | None = None, rotate: bool = True, part: str = "kv"):
        """Keys (rotated at their positions unless `rotate` is False) and values of `layers` of
        `shard` at `slots` (a slice, or per lane an index tensor (L_s, H, n) of stream `b`'s
        slots): what attention reads, (L_s, B, H, n, D), or (L_s, H, n, D) for one stream."""
        quant = cast(KVQuant, self.quant)

        def per_slot(name: str) -> torch.Tensor:
            t = cast(torch.Tensor, getattr(shard, name))[layers]
            if isinstance(slots, slice):
                return t[:, :, :, slots] if b is None else t[:, b, :, slots]
            t = t[:, b]
            idx = slots if t.dim() == 3 else slots[..., None].expand(-1, -1, -1, t.shape[-1])
            return t.gather(2, idx)

        def side(name: str) -> torch.Tensor:
            t = cast(torch.Tensor, getattr(shard, name))[layers]
            return t if b is None else t[:, b]

        keys_front, values_front = quant.frontiers(self._fed)
        spos = per_slot("spos") if quant.windowed else None
        out = []
        for which in part:
            if which == "k":
                if quant.per_channel:
                    gid = per_slot("kgid").long()
                    idx = gid[..., None].expand(*gid.shape, self.head_dim)
                    scale, zero = side("kgs").gather(-2, idx), side("kgz").gather(-2, idx)
                    x = torch.addcmul(zero, unpack(per_slot("kq"), quant.bits).to(scale.dtype), scale).to(self.dtype)
                else:
                    x = dequantize(per_slot("kq"), per_slot("ks"), per_slot("kz"), quant.bits, self.dtype)
                x = self._recent(x, spos, side("kr") if quant.windowed else None, keys_front)
                if rotate:
                    x = cast("RotaryTable", self.rope).rotate_each(x, per_slot("kpos"))
            else:
                x = dequantize(per_slot("vq"), per_slot("vs"), per_slot("vz"), quant.bits, self.dtype)
                x = self._recent(x, spos, side("vr") if quant.windowed else None, values_front)
            out.append(x)
        return out if len(out) > 1 else out[0]

    @staticmethod
    def _recent(x: torch.Tensor, spos: torch.Tensor | None, ring: torch.Tensor | None, front: int) -> torch.Tensor:
        """Tokens at stream positions >= front, read from the ring in full precision."""
        if spos is None or ring is None:
            return x
        recent = spos >= front
        if not bool(recent.any()):
            return x
        idx = (spos.long() % ring.shape[-2])[..., None].expand(*spos.shape, x.shape[-1])
        return torch.where(recent[..., None], ring.gather(-2, idx), x)

    def held_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What full-attention layer `layer` holds, as attention reads it: (keys, values) (B, H, n, D)."""
        shard, i = self._where[layer]
        if self.quant is None:
            return shard.k[i, :, :, : self._len[layer]], shard.v[i, :, :, : self._len[layer]]
        keys, values = self._read(shard, slice(i, i + 1), slice(0, self._len[layer]))
        return keys[0], values[0]

    # ---- accounting --------------------------------------------------------------------------
    def quantized_kv_bytes(self) -> int:
        """Bytes of what the lanes hold for their kept tokens, from the bookkeeping: per token its
        codes, and per-token scales and zeros or, KIVI's keys, a scale and a zero per channel per
        block some kept key belongs to; tokens in the full-precision window at the model's dtype."""
        quant = cast(KVQuant, self.quant)
        d, itemsize = self.head_dim, torch.empty(0, dtype=self.dtype).element_size()
        codes, groups = quant.code_width(d), d // quant.group
        pos = self._pos[:, : self._n]  # one row per lane, or per stream standing for all its lanes
        lanes = 1 if self.per_head else self.num_layers * self.kv_heads
        keys_front, values_front = quant.frontiers(self._fed)
        held = int((pos >= 0).sum())
        recent_v, recent_k = int((pos >= values_front).sum()), int((pos >= keys_front).sum())
        total = (recent_v + recent_k) * d * itemsize  # the full-precision window, keys and values
        total += (held - recent_v) * (codes + 2 * groups * itemsize) + (held - recent_k) * codes
        if quant.per_channel:  # a scale and a zero per channel for each distinct block per row
            blocks = np.sort(np.where((pos >= 0) & (pos < keys_front), pos // quant.group, -1), axis=1)
            live = int((blocks[:, :1] >= 0).sum() + ((np.diff(blocks, axis=1) != 0) & (blocks[:, 1:] >= 0)).sum())
            total += live * 2 * d * itemsize
        else:
            total += (held - recent_k) * 2 * groups * itemsize
        return total * lanes
