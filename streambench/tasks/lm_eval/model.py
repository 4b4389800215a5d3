"""lm-evaluation-harness bridge: an lm-eval model `streambench` that runs any causal LM under any
streambench cache policy.

    from streambench.tasks.lm_eval.model import StreambenchLM
    lm = StreambenchLM(pretrained="smollm2-135m", policy="streamingllm", budget=256)
    lm_eval.simple_evaluate(model=lm, tasks=[...])

- `loglikelihood`: each request is its own stream: the context streams through the policy (in
  chunks of at most the policy's `max_incoming`), then the continuation is scored under the
  resulting cache. Tokenization is lm-eval's (`TemplateLM._encode_pair`, trailing spaces moved to
  the continuation), so `dense` gives the numbers of lm-eval's own `hf` model.
- `loglikelihood_rolling`: streaming perplexity of the whole document under the policy, token-exact
  (the StreamingLLM protocol), the first token predicted from the prefix token as lm-eval does:
  position-only policies take `chunk_size` tokens per forward (streambench/engine/exact_chunks.py), the others
  go token by token.
- `generate_until`: greedy generation with the policy active (streambench/engine/generation.py, the
  decode path chat and mtbench use), stopping at any `until` string, at
  the end-of-text token or after `max_gen_toks`.
- `stream=True`: every request continues ONE endless stream (StreamingLLM's "streaming ARC"): a
  multiple-choice item's context is fed once, each choice is scored from that state
  (checkpoint/rollback), and the most likely choice stays in the stream as the model's answer.

lm-eval discovers no third-party models through entry points; `@register_model` takes effect when
this module is imported (after `lm_eval.models`, or `hf` disappears from the registry).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lm_eval.api.model import TemplateLM

from streambench.engine.generation import generate
from streambench.policies.base import CachePolicy
from streambench.policies.build import PolicySpec, build_policy
from streambench.values import parse_assignments


class StreambenchLM(TemplateLM):
    def __init__(
        self,
        pretrained: str = "smollm2-135m",
        policy: str | CachePolicy = "dense",
        budget: int | None = 256,
        device: str = "auto",
        dtype: str = "auto",
        stream: bool = False,
        lm=None,
        chunk_size: int | None = None,
        **policy_args: Any,
    ):
        """`policy`: a name (or preset) built with `budget` and `policy_args`, as `lm_eval
        --model streambench --model_args policy=...` gives it; or a policy already built (the
        lm-eval task passes the run's own), of which every request's session gets a fresh copy."""
        super().__init__()
        from streambench.models import loading as models

        self.loaded = lm or models.load(pretrained, device, dtype)
        self.tokenizer = self.loaded.tokenizer
        self.built = policy if isinstance(policy, CachePolicy) else None
        if self.built is not None:
            budget, policy_args = self.built.budget, {}
        self.spec = PolicySpec(self.built.name if self.built is not None else policy, dict(policy_args))
        self.budget = budget
        self.stream = bool(stream)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            from streambench.errors import ConfigError

            raise ConfigError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self._stream_session = None
        self.tokens = 0  # tokens run through the model (tokens/s)
        self.kv_tokens_peak = self.kv_bytes_peak = 0
        if self.built is None:
            build_policy(self.spec, budget)  # validate now

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> StreambenchLM:
        args = parse_assignments([a for a in arg_string.split(",") if a.strip()], "--model_args")
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None and k in ("device",)})
        return cls(**args)

    # ---- TemplateLM plumbing ----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def _session(self):
        """A fresh stream per request, or the one endless stream in streaming mode."""
        from streambench.engine.session import StreamSession

        if self.stream and self._stream_session is not None:
            return self._stream_session
        policy = (
            copy.deepcopy(self.built)
            if self.built is not None
            else build_policy(PolicySpec(self.spec.name, dict(self.spec.args)), self.budget)
        )
        session = StreamSession(self.loaded, policy)
        if self.stream:
            self._stream_session = session
        return session

    def close(self) -> None:
        """End the endless stream (streaming mode): its session's hooks leave the model."""
        if self._stream_session is not None:
            self._stream_session.close()
            self._stream_session = None

    def _feed(self, session, tokens: list[int], exact: bool = False) -> torch.Tensor:
        self.tokens += len(tokens)
        logits = session.feed(self._ids(tokens), exact=exact)[0]
        if session.kv_tokens > self.kv_tokens_peak:
            self.kv_tokens_peak, self.kv_bytes_peak = session.kv_tokens, session.kv_bytes
        return logits

    def _ids(self, tokens: list[int]) -> torch.Tensor:
        return torch.tensor([tokens], device=next(self.loaded.model.parameters()).device)

    # ---- the three request types -----------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        if self.stream:
            return self._loglikelihood_stream(requests)
        out = []
        for _, context_enc, continuation_enc in requests:
            session = self._session()
            try:
                last = self._feed(session, context_enc)[-1]
                out.append(self._score(session, last, continuation_enc))
            finally:
                self._done(session)
        return out

    def _done(self, session) -> None:
        """A per-request session is closed (its hooks removed); the endless stream stays open."""
        if session is not self._stream_session:
            session.close()

    def _score(self, session, last: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        """Log-probability of `continuation` after the state whose last logits are `last`."""
        return self._judge(last, self._feed(session, continuation), continuation)

    def _judge(self, last: torch.Tensor, fed: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        """(log-probability, greedy) of `continuation` from the logits `fed` gave feeding it."""
        logits = torch.cat([last[None], fed[:-1]]).float()
        target = self._ids(continuation)[0]
        logprobs = torch.log_softmax(logits, dim=-1)
        return logprobs.gather(1, target[:, None]).sum().item(), bool((logits.argmax(-1) == target).all())

    def _loglikelihood_stream(self, requests) -> list[tuple[float, bool]]:
        """Consecutive requests with one context are one item: its context enters the stream once,
        its choices are scored from that state, the most likely one stays as the answer."""
        out, i = [], 0
        while i < len(requests):
            context = requests[i][1]
            j = i
            while j < len(requests) and requests[j][1] == context:
                j += 1
            choices = [r[2] for r in requests[i:j]]
            session = self._session()
            session.new_round()
            session.reserve(len(context) + max(len(c) for c in choices))
            last = self._feed(session, context)[-1]
            # every choice from the state after the context: one tree forward where the session can
            branches = session.score_branches([self._ids(choice) for choice in choices])
            self.tokens += sum(len(choice) for choice in choices)
            if session.branch_peak[0] > self.kv_tokens_peak:
                self.kv_tokens_peak, self.kv_bytes_peak = session.branch_peak
            scored = [self._judge(last, logits[0], choice) for logits, choice in zip(branches, choices)]
            best = max(range(len(choices)), key=lambda k: scored[k][0])
            self._feed(session, choices[best])
            out += scored
            i = j
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            tokens = self.tok_encode(request.args[0])
            ids = [self.prefix_token_id] + tokens
            session = self._session()
            total = 0.0
            try:
                from streambench.engine.exact_chunks import auto_chunk

                chunk = self.chunk_size or auto_chunk(session.policy.budget, session.device, session.lm.info.num_heads)
                for t in range(0, len(tokens), chunk):
                    logits = self._feed(session, ids[t : min(t + chunk, len(tokens))], exact=True).float()
                    targets = torch.tensor(ids[t + 1 : t + 1 + logits.shape[0]], device=logits.device)
                    total += torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum().item()
            finally:
                self._done(session)
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            context, kwargs = request.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(kwargs.get("max_gen_toks", 256))
            session = self._session()
            try:
                last = self._feed(session, self.tok_encode(context))[-1]
                written = generate(
                    session,
                    last=last,
                    max_new_tokens=limit,
                    stop_ids={self.eot_token_id},
                    stop_strings=until,
                    decode=self.tokenizer.decode,
                )
                if session.kv_tokens > self.kv_tokens_peak:  # the cache only grows while generating
                    self.kv_tokens_peak, self.kv_bytes_peak = session.kv_tokens, session.kv_bytes
                text = self.tokenizer.decode(written.tokens)
            finally:
                self._done(session)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def register() -> None:
    """Make `--model streambench` known to lm-eval in this process (imports lm_eval.models first)."""
    import lm_eval.models  # noqa: F401  (fills the registry; registering first would hide `hf`)
    from lm_eval.api.registry import get_model, register_model

    try:
        get_model("streambench")
    except (KeyError, ValueError):
        register_model("streambench")(StreambenchLM)
