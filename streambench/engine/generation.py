"""Generation through a StreamSession, token by token: one decode path for `streambench chat`, the
mtbench task and lm-eval's `generate_until`.

Each new token is fed back through `session.feed`, so the policy evicts as it does for any stream
(before a token once the cache is full; or once per turn when the caller `reserve()`s room for
the prompt and its answer first, as mit-han-lab/streaming-llm's `evict_for_space` does before
each prompt) and one-token steps take the session's static/CUDA-graph path where it has one. A
stop token (EOS, the turn's end) is not fed: the caller closes the turn with its own suffix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from streambench.errors import ConfigError


@dataclass
class Sampling:
    """Greedy at temperature 0 (the default); else temperature and nucleus (top-p) sampling from
    a generator seeded once, so a run's samples repeat."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    _generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from streambench.values import check_seed

        if (
            not isinstance(self.temperature, (int, float))
            or isinstance(self.temperature, bool)
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        check_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def pick(self, logits: torch.Tensor) -> int:
        if self.greedy:
            return int(logits.argmax())
        if self._generator is None:
            self._generator = torch.Generator(device="cpu").manual_seed(int(self.seed))
        # In float64, after subtracting the largest logit: any temperature > 0, however tiny
        # (1e-45), gives finite log-probabilities (the top token's is 0) instead of inf / inf.
        scaled = logits.detach().cpu().double()
        probs = torch.softmax((scaled - scaled.max()) / self.temperature, dim=-1)
        if self.top_p < 1:
            ordered, order = probs.sort(descending=True)
            outside = ordered.cumsum(-1) - ordered > self.top_p  # tokens past the nucleus
            ordered[outside] = 0
            probs = torch.zeros_like(probs).scatter_(-1, order, ordered)
        return int(torch.multinomial(probs / probs.sum(), 1, generator=self._generator))


@dataclass
class Generation:
    tokens: list[int]
    stop: str  # "eos" (a stop token), "limit" (max_new_tokens), "string" (a stop string), "interrupted"
    first_token_s: float  # from the prompt's feed to the first token chosen (time to first token)
    seconds: float  # prompt and every token
    logprobs: list[float] | None = None  # each written token's log-probability (score=True)

    @property
    def tokens_per_s(self) -> float | None:
        """Generation speed after the first token (one decode step per token)."""
        steps = len(self.tokens) - 1
        rest = self.seconds - self.first_token_s
        return steps / rest if steps > 0 and rest > 0 else None


@torch.no_grad()
def generate(
    session,
    prompt: torch.Tensor | None = None,
    last: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    stop_ids=(),
    sampling: Sampling | None = None,
    stop_strings=(),
    decode: Callable | None = None,
    on_token: Callable[[int], None] | None = None,
    interrupted: Callable[[], bool] | None = None,
    score: bool = False,
) -> Generation:
    """Feed `prompt` (1, T) (or start from `last`, the logits after what was fed already) and
    generate up to `max_new_tokens`. `stop_strings` need `decode` (token ids -> text); `on_token`
    sees each token as it is chosen (chat streams it); `interrupted()` is polled between tokens;
    `score` keeps each written token's log-probability (a softmax over the vocabulary per token)."""
    if (prompt is None) == (last is None):
        raise ValueError("generate needs exactly one of prompt and last")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need decode (token ids -> text)")
    sampling = sampling or Sampling()
    stops = set(stop_ids)
    started = time.perf_counter()
    logits = session.feed(prompt)[0, -1] if prompt is not None else last
    assert logits is not None  # (exactly one of prompt and last, checked above)
    tokens: list[int] = []
    logprobs: list[float] | None = [] if score else None
    first = None
    stop = "limit"
    while len(tokens) < max_new_tokens:
        if interrupted is not None and interrupted():
            stop = "interrupted"
            break
        token = sampling.pick(logits)
        if first is None:
            first = time.perf_counter() - started
        if token in stops:
            stop = "eos"
            break
        tokens.append(token)
        if logprobs is not None:
            logprobs.append(float(torch.log_softmax(logits.float(), dim=-1)[token]))
        if on_token is not None:
            on_token(token)
        if stop_strings and decode is not None and any(s in decode(tokens) for s in stop_strings):
            stop = "string"
            break
        if len(tokens) == max_new_tokens:
            break
        logits = session.feed(torch.tensor([[token]], device=session.device))[0, -1]
    seconds = time.perf_counter() - started
    return Generation(tokens, stop, first if first is not None else seconds, seconds, logprobs)
