"""lm-evaluation-harness bridge: an lm-eval model `streambench` that runs any causal LM under any
streambench cache policy.

    from streambench.lmeval import StreambenchLM
    lm = StreambenchLM(pretrained="smollm2-135m", policy="streamingllm", budget=256)
    lm_eval.simple_evaluate(model=lm, tasks=[...])

- `loglikelihood`: each request is its own stream: the context streams through the policy (in
  chunks of at most the policy's `max_incoming`), then the continuation is scored under the
  resulting cache. Tokenization is lm-eval's (`TemplateLM._encode_pair`, trailing spaces moved to
  the continuation), so `dense` gives the numbers of lm-eval's own `hf` model.
- `loglikelihood_rolling`: streaming perplexity of the whole document, token by token under the
  policy, the first token predicted from the prefix token as lm-eval does.
- `generate_until`: greedy generation with the policy active, stopping at any `until` string, at
  the end-of-text token or after `max_gen_toks`.

lm-eval discovers no third-party models through entry points; `@register_model` takes effect when
this module is imported (after `lm_eval.models`, or `hf` disappears from the registry).
"""
from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.model import TemplateLM

from streambench.config import PolicySpec, build_policy, parse_assignments


class StreambenchLM(TemplateLM):
    def __init__(self, pretrained: str = "smollm2-135m", policy: str = "dense", budget: int | None = 256,
                 device: str = "auto", dtype: str = "auto", lm=None, **policy_args: Any):
        super().__init__()
        from streambench import models

        self.model_info = lm or models.load(pretrained, device, dtype)
        self.tokenizer = self.model_info.tokenizer
        self.spec = PolicySpec(policy, dict(policy_args))
        self.budget = budget
        build_policy(self.spec, budget)  # validate now

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "StreambenchLM":
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
        from streambench.session import StreamSession

        return StreamSession(self.model_info, build_policy(PolicySpec(self.spec.name, dict(self.spec.args)), self.budget))

    def _ids(self, tokens: list[int]) -> torch.Tensor:
        return torch.tensor([tokens], device=next(self.model_info.model.parameters()).device)

    # ---- the three request types -----------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = []
        for _, context_enc, continuation_enc in requests:
            session = self._session()
            last = session.feed(self._ids(context_enc))[0, -1:]
            cont = self._ids(continuation_enc)
            logits = torch.cat([last, session.feed(cont)[0, :-1]]).float()
            logprobs = torch.log_softmax(logits, dim=-1)
            target = cont[0]
            out.append((logprobs.gather(1, target[:, None]).sum().item(), bool((logits.argmax(-1) == target).all())))
            self.cache_hook.add_partial("loglikelihood", None, out[-1])
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for request in requests:
            tokens = self.tok_encode(request.args[0])
            ids = self._ids([self.prefix_token_id] + tokens)
            session = self._session()
            total = 0.0
            for t in range(len(tokens)):
                logits = session.feed(ids[:, t : t + 1])[0, -1].float()
                total += torch.log_softmax(logits, dim=-1)[ids[0, t + 1]].item()
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
            last = session.feed(self._ids(self.tok_encode(context)))[0, -1]
            generated: list[int] = []
            text = ""
            for _ in range(limit):
                token = int(last.argmax())
                if token == self.eot_token_id:
                    break
                generated.append(token)
                text = self.tokenizer.decode(generated)
                if any(stop in text for stop in until):
                    break
                last = session.feed(self._ids([token]))[0, -1]
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
