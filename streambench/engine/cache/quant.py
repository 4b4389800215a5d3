"""Quantized KV: what a quantized cache holds per token, and the arithmetic between it and floats.

Per-token groups (the layout of transformers' `QuantizedCache` with `axis=0`, and of KIVI's
values, arXiv:2402.02750): each key and value vector is cut into groups of `group` channels, each
group stored as unsigned `bits`-bit codes with its own scale and zero (asymmetric min-max, the
arithmetic of optimum-quanto's `MaxOptimizer` and `quantize_affine`: scale = (max - min) / (2^b - 1),
code = round((x - min) / scale), x' = code * scale + min). A token's codes depend on that token
alone, so any keep-set, per head or per stream, moves whole tokens and never re-quantizes.

Keys are held *before* RoPE (KVQuant, arXiv:2401.18079, quantizes pre-RoPE keys for accuracy; here
it is also what lets a re-indexing cache move a key without quantizing it twice): attention reads
them dequantized and rotated at their rank + offset, the rotation the engine would otherwise bake
into the buffer (engine/cache/__init__.py). Re-indexing then writes one position per key instead
of re-rotating it.

Codes are packed 8 / bits to a byte along the channels; scales and zeros are in the cache's dtype
(as quanto's and HQQ's). `--kv-bits 16` is the unquantized cache (the model's dtype)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streambench.errors import ConfigError

BITS = (16, 8, 4, 2)
METHODS = ("token", "kivi")
DEFAULT_GROUP = 32  # KIVI's group size (transformers' QuantizedCache defaults to 64)
KIVI_RESIDUAL = 128  # KIVI's full-precision window (its R)


@dataclass(frozen=True)
class KVQuant:
    """How a run's cache holds its keys and values. bits 16: unquantized (the model's dtype)."""

    bits: int = 16
    method: str = "token"
    group: int = DEFAULT_GROUP
    residual: int | None = None  # recent tokens held in full precision; None: 0 (token), 128 (kivi)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ConfigError(f"KV bits must be one of {', '.join(map(str, BITS))}, got {self.bits!r}")
        if self.method not in METHODS:
            raise ConfigError(f"KV quantization method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ConfigError(f"KV group size must be a positive integer, got {self.group!r}")
        if self.residual is None:
            object.__setattr__(self, "residual", KIVI_RESIDUAL if self.method == "kivi" else 0)
        if isinstance(self.residual, bool) or not isinstance(self.residual, int) or self.residual < 0:
            raise ConfigError(f"KV residual must be an integer >= 0, got {self.residual!r}")

    @property
    def recent(self) -> int:
        """Recent tokens held in full precision (an int: __post_init__ resolved None)."""
        return int(self.residual or 0)

    @property
    def per_channel(self) -> bool:
        """KIVI's keys: each channel of a block of `group` tokens shares a scale and a zero."""
        return self.method == "kivi"

    @property
    def windowed(self) -> bool:
        """Tokens wait in full precision before they are quantized (a residual, or KIVI's
        incomplete key block): the cache holds a ring of recent tokens by stream position."""
        return self.per_channel or self.recent > 0

    def frontiers(self, fed: int) -> tuple[int, int]:
        """(keys, values): stream positions before which a held token is quantized, once `fed`
        tokens are in. Values leave the residual one by one (KIVI's values, the token method's
        keys); KIVI's keys in whole blocks of `group` tokens."""
        values = max(0, fed - self.recent)
        keys = values - values % self.group if self.per_channel else values
        return keys, values

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    @property
    def tag(self) -> str:
        """How labels and run ids name it: "int4", "kivi2" (unquantized: empty)."""
        if not self.quantized:
            return ""
        return f"{'kivi' if self.per_channel else 'int'}{self.bits}" + (
            f"-r{self.recent}" if self.recent != (KIVI_RESIDUAL if self.per_channel else 0) else ""
        )

    def record(self) -> dict:
        """What the run's config (and hash) records; an unquantized run records nothing. (The
        token method without a residual records what it always did.)"""
        out = {"bits": self.bits, "method": self.method, "group": self.group}
        return out | ({"residual": self.recent} if self.windowed else {})

    def check(self, head_dim: int) -> None:
        if not self.quantized:
            return
        if head_dim % self.group:  # (KIVI's values too: groups of channels, as its keys' of tokens)
            raise ConfigError(
                f"KV group size {self.group} does not divide the model's head size {head_dim}: "
                f"use a divisor of {head_dim} (--kv-group)"
            )
        if head_dim % (8 // self.bits):
            raise ConfigError(f"a head size of {head_dim} does not pack into bytes at {self.bits} bits")

    def code_width(self, head_dim: int) -> int:
        """Bytes of codes per vector of head_dim values."""
        return head_dim * self.bits // 8

    def vector_bytes(self, head_dim: int, itemsize: int) -> int:
        """Bytes one vector quantized per token takes: its codes, and a scale and a zero per group."""
        return self.code_width(head_dim) + 2 * (head_dim // self.group) * itemsize

    def lane_bytes(self, head_dim: int, itemsize: int) -> int:
        """Bytes of one quantized token's key and value in one lane (KIVI's keys: their codes;
        their blocks' scales and zeros are counted per block, `Quantized.quantized_kv_bytes`)."""
        keys = self.code_width(head_dim) if self.per_channel else self.vector_bytes(head_dim, itemsize)
        return keys + self.vector_bytes(head_dim, itemsize)


def parse_bits(text, where: str = "--kv-bits") -> list[int]:
    """ "16,4,2" (or a list of ints) -> [16, 4, 2]; a value outside 16/8/4/2 is one line."""
    items = text if isinstance(text, list | tuple) else [w for w in str(text).split(",") if w.strip()]
    out = []
    for item in items:
        word = item.strip() if isinstance(item, str) else item
        if isinstance(word, str) and word.isascii() and word.isdigit():
            word = int(word)
        if isinstance(word, bool) or word not in BITS:
            raise ConfigError(f"{where}: {item!r} is not one of {', '.join(map(str, BITS))}")
        if word not in out:
            out.append(word)
    if not out:
        raise ConfigError(f"{where}: no bit width given")
    return out


def quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., D) -> (codes uint8 (..., D * bits / 8), scale (..., D / group), zero (..., D / group)),
    scale and zero in x's dtype; the arithmetic in float32."""
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // group, group).float()
    low = g.amin(dim=-1, keepdim=True)
    high = g.amax(dim=-1, keepdim=True)
    scale = (high - low) / (2**bits - 1)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)  # a constant group: every code 0
    codes = torch.round((g - low) / safe).clamp_(0, 2**bits - 1).to(torch.uint8).reshape(shape)
    return pack(codes, bits), scale[..., 0].to(x.dtype), low[..., 0].to(x.dtype)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """The inverse of `quantize`: (..., D) in `dtype`."""
    q = unpack(codes, bits)
    groups = scale.shape[-1]
    g = q.reshape(*q.shape[:-1], groups, q.shape[-1] // groups).to(scale.dtype)
    return torch.addcmul(zero[..., None], g, scale[..., None]).reshape(q.shape).to(dtype)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., D) of `bits` bits -> (..., D * bits / 8): value j of a byte in bits j*b.."""
    if bits == 8:
        return codes
    per = 8 // bits
    parts = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = parts[..., 0].clone()
    for j in range(1, per):
        out |= parts[..., j] << (bits * j)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & (2**bits - 1)).reshape(*packed.shape[:-1], packed.shape[-1] * per)
