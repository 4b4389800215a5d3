"""streambench: evaluate and benchmark KV-cache policies for streaming LLM inference.

\b
Quick start (embedded SmolLM2-135M and Hamlet, no network):
    streambench run
    streambench run --tokens 2048 --budget 256 --policy dense,window,streamingllm,sirllm
    streambench list
"""

from __future__ import annotations

import os
import sys

import click

from streambench import __version__
from streambench.cli import exits
from streambench.cli.bench import bench_command
from streambench.cli.chat import chat_command
from streambench.cli.exits import OneLineGroup, one_line_warnings
from streambench.cli.listing import list_command
from streambench.cli.results import export_command, gate_command, import_command, report_command
from streambench.cli.run import lm_eval_command, run_command, sweep_command


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@click.version_option(__version__, "--version", prog_name="streambench")
@click.option(
    "--debug", is_flag=True, help="Show the full traceback of an unexpected error (or set STREAMBENCH_DEBUG=1)."
)
@click.pass_context
def cli(ctx, debug) -> None:
    ctx.obj = {"debug": debug}
    one_line_warnings()


for command in (
    run_command,
    sweep_command,
    import_command,
    export_command,
    report_command,
    gate_command,
    lm_eval_command,
    bench_command,
    chat_command,
    list_command,
):
    cli.add_command(command)


def main() -> None:
    """Entry point: SIGTERM is handled like Ctrl-C (finished results kept), exit 143."""
    import signal

    exits.IN_MAIN = True
    try:
        signal.signal(signal.SIGTERM, exits.sigterm)
    except (ValueError, OSError):  # not the main thread
        pass
    try:
        cli.main(prog_name="streambench")
    except SystemExit as exc:
        if exc.code in (130, 143):
            # Interrupted: everything finished is fsynced and the store closed. Exit now: CPython
            # kills itself with SIGINT at shutdown (exit status -2, not 130) when the interrupt once
            # passed through C code that ran Python (an import), even though it was handled.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exc.code)
        raise


if __name__ == "__main__":
    main()
