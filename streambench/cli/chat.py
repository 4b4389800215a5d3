"""`streambench chat`: one endless conversation under a cache policy, as StreamingLLM's demo.

Each user line is a turn (`Conversation.reply`: room for the turn and the longest reply is made
once, then the reply is generated token by token through the session and printed as it is
written). After each reply, one status line: the turn, the reply's tokens and speed, the tokens
and bytes the cache holds, evictions so far. Ctrl-C while a reply is written stops that reply
(the tokens written so far stay in the stream, the turn is closed); Ctrl-C at the prompt is
ignored, as in Python's REPL; Ctrl-D or /quit leaves.
"""

from __future__ import annotations

import signal
import sys

import click

from streambench.cli.exits import UserError, user_errors
from streambench.cli.options import device_options, policy_arg_option, policy_specs

DEFAULT_BUDGET = 512
HELP = "/reset starts a new stream, /stats shows the stream so far, /quit leaves; Ctrl-C stops a reply."


class ChatLoop:
    def __init__(
        self,
        model: str,
        spec,
        budget: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        fmt: str,
        device: str,
        dtype: str,
    ):
        from streambench.engine.generation import Sampling
        from streambench.errors import ConfigError

        self.explicit_budget = budget is not None
        budget = DEFAULT_BUDGET if budget is None else budget
        if not isinstance(budget, int) or budget < 2:
            raise ConfigError(f"--budget must be an integer >= 2, got {budget!r}")
        if max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        self.sampling = Sampling(temperature, top_p, seed)  # bad values fail before the model loads
        self.spec, self.budget, self.max_new_tokens, self.fmt = spec, budget, max_new_tokens, fmt
        self.model, self.device, self.dtype = model, device, dtype
        self._stop = False

    def run(self) -> None:
        from streambench.engine.session import StreamSession
        from streambench.errors import ConfigError
        from streambench.models import loading as models
        from streambench.policies.build import build_policy
        from streambench.tasks.dialogue.chat_format import ChatFormat, Conversation

        policy = build_policy(self.spec, self.budget, explicit=self.explicit_budget)
        lm = models.load(self.model, self.device, self.dtype)
        decode = "graph" if next(lm.model.parameters()).device.type == "cuda" else "eager"
        self.session = StreamSession(lm, policy, decode=decode)
        self.tokenizer = lm.tokenizer
        self.conversation = Conversation(self.session, lm.tokenizer, ChatFormat.named(lm.tokenizer, self.fmt))
        self.replies, self.written, self.refused = 0, 0, 0
        budget = "all" if not policy.evicts else self.budget
        click.echo(f"streambench chat: {lm.info.name} under {self.spec.display} (budget {budget}). {HELP}")
        while True:
            line = self._read()
            if line is None:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                break
            if text == "/reset":
                self.conversation.reset()
                click.echo("(a new stream)")
                continue
            if text == "/stats":
                click.echo(self._stats())
                continue
            if text.startswith("/"):
                click.echo(f"unknown command {text.split()[0]!r}. {HELP}")
                continue
            self._turn(text)
        self.session.close()
        if self.refused and not self.replies:  # nothing answered: not a success
            raise ConfigError(f"every turn ({self.refused}) was refused: {self.last_refusal}")

    def _read(self) -> str | None:
        while True:
            click.echo("you> ", nl=False)
            try:
                line = _read_line()
            except KeyboardInterrupt:
                click.echo("\n(Ctrl-D or /quit leaves)")
                continue
            if line is None:
                click.echo("")  # end of input: what follows starts on its own line
                return None
            line, replaced = _valid_line(line)
            if replaced:
                click.echo(f"warning: {replaced} undecodable byte sequence(s) in this line read as U+FFFD", err=True)
            return line

    def _turn(self, text: str) -> None:
        from streambench.errors import ConfigError

        shown = {"tokens": [], "text": ""}

        def show(token: int) -> None:
            shown["tokens"].append(token)
            full = self.tokenizer.decode(shown["tokens"], skip_special_tokens=True)
            click.echo(full[len(shown["text"]) :], nl=False)
            sys.stdout.flush()
            shown["text"] = full

        self._stop = False
        previous = signal.getsignal(signal.SIGINT)
        in_main = _main_thread()
        if in_main:
            signal.signal(signal.SIGINT, self._interrupt)
        click.echo("model> ", nl=False)
        try:
            written = self.conversation.reply(
                text, self.max_new_tokens, self.sampling, on_token=show, interrupted=lambda: self._stop
            )
        except ConfigError as exc:  # a turn longer than the budget allows
            click.echo(f"\n(error: {exc})")
            self.refused += 1
            self.last_refusal = str(exc)
            return
        finally:
            if in_main:
                signal.signal(signal.SIGINT, previous)
        self.replies += 1
        self.written += len(written.tokens)
        speed = f"{written.tokens_per_s:.1f} tok/s" if written.tokens_per_s else "-"
        stopped = {"eos": "", "limit": ", stopped at --max-new-tokens", "interrupted": ", interrupted"}.get(
            written.stop, ""
        )
        click.echo(
            f"\n[turn {self.conversation.turns} | {len(written.tokens)} tokens, {speed}, first token "
            f"{1000 * written.first_token_s:.0f} ms{stopped} | {self._cache_line()}]"
        )

    def _interrupt(self, signum, frame) -> None:
        self._stop = True

    def _cache_line(self) -> str:
        s = self.session
        evictions = s.cache.evictions if s.cache is not None else 0
        held = f"{s.kv_tokens}/{s.policy.budget}" if s.policy.evicts else f"{s.kv_tokens}"
        return f"cache {held} tokens, {s.kv_bytes / 2**20:.2f} MiB, {evictions} evictions"

    def _stats(self) -> str:
        s = self.session
        extra = ", ".join(f"{k} {v}" for k, v in s.policy.stats().items())
        return (
            f"(stream: {s.fed} tokens fed in {self.conversation.turns} turns, {self.written} written in {self.replies} replies; "
            f"{self._cache_line()}" + (f"; {extra}" if extra else "") + ")"
        )


def _read_line() -> str | bytes | None:
    """One line of standard input, as bytes where it has them (so undecodable bytes are not
    surrogate escapes the tokenizer refuses); None at the end of input."""
    stream = getattr(sys.stdin, "buffer", None)
    line = stream.readline() if stream is not None else sys.stdin.readline()
    return line if line else None


def _valid_line(line: str | bytes) -> tuple[str, int]:
    """(text, replaced): undecodable bytes and lone surrogates become U+FFFD."""
    from streambench.tasks.texts import valid_text

    if isinstance(line, bytes):
        encoding = getattr(sys.stdin, "encoding", None) or "utf-8"
        try:
            return line.decode(encoding), 0
        except (UnicodeDecodeError, LookupError):
            text = line.decode("utf-8", errors="replace")
            return text, text.count("\ufffd") - line.decode("utf-8", errors="ignore").count("\ufffd")
    return valid_text(line)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@click.command(name="chat")
@click.option(
    "--model",
    "-m",
    "model",
    default="smollm2-135m",
    show_default=True,
    help="Embedded model name, Hugging Face hub id, local folder, or .gguf file.",
)
@click.option("--policy", default="streamingllm", show_default=True, help="A policy name or preset.")
@policy_arg_option
@click.option("--budget", "-b", type=int, default=None, help="Keys each query attends to (tokens).  [default: 512]")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Longest reply.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["template", "plain"]),
    default="template",
    show_default=True,
    help="template: the model's chat template; plain: USER/ASSISTANT (models without one).",
)
@device_options
@user_errors
def chat_command(model, policy, policy_args, budget, max_new_tokens, temperature, top_p, seed, fmt, device, dtype):
    """Talk to a model in one endless stream under a cache policy; the reply is printed as it is
    written, then a status line (cache tokens, KV MiB, evictions, tokens/s).

    \b
    Commands: /reset (a new stream), /stats (the stream so far), /quit (or Ctrl-D).
    Ctrl-C stops the reply being written, not the program.

    \b
    Examples:
        streambench chat --policy streamingllm --budget 512
        streambench chat --policy sirllm --budget 256 --temperature 0.7 --seed 1
        echo "Hello" | streambench chat --policy window
    """
    from streambench.cli.chat import ChatLoop

    specs = policy_specs([policy], policy_args)
    if not specs:
        raise UserError("no policy given")
    spec = specs[0]
    ChatLoop(model, spec, budget, max_new_tokens, temperature, top_p, seed, fmt, device, dtype).run()
