"""One line and an exit status for everything that can go wrong in a command: the library's typed
errors and a full or read-only disk exit 2, anything unforeseen exits 1 naming `--debug`, Ctrl-C
130 and SIGTERM 143 (what finished is kept; the command says what)."""

from __future__ import annotations

import os
import sys

import click

from streambench.errors import StreambenchError


class UserError(click.ClickException):
    """One line on stderr, exit code 2: the user can fix it."""

    exit_code = 2


class InternalError(click.ClickException):
    """An exception nobody anticipated: still one line (exit 1); `--debug` shows the traceback."""

    exit_code = 1


def one_line(text: str, limit: int = 400) -> str:
    """Messages that reach the terminal: the first line only, control characters shown escaped."""
    first = (str(text).strip().splitlines() or [""])[0]
    first = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in first)
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    return bool((root is not None and (root.obj or {}).get("debug")) or os.environ.get("STREAMBENCH_DEBUG"))


def user_errors(fn):
    """Every exception a command lets out becomes one line: the library's typed errors (and a full
    or read-only disk) exit 2, anything unforeseen exits 1 with `--debug` named. Ctrl-C exits 130,
    SIGTERM 143; the commands' own handlers say first what they kept."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):

        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt as exc:
            interrupted("Interrupted.", exc)
        except StreambenchError as exc:
            if _debug():
                raise
            raise UserError(one_line(exc)) from None
        except SystemExit as exc:  # a plugin cannot end streambench: its exit is a plugin error
            from streambench.registry import plugin_fault

            fault = plugin_fault(exc)
            if fault is None or _debug():
                raise
            raise UserError(one_line(fault)) from None
        except OSError as exc:
            if _debug():
                raise
            from streambench.sanitize import describe_os_error

            raise UserError(one_line(describe_os_error(exc))) from None
        except MemoryError:
            raise UserError("out of memory (lower the budget, --tokens or --batch-size)") from None
        except Exception as exc:
            if _debug():
                raise
            from streambench.registry import plugin_fault

            fault = plugin_fault(exc)  # a plugin's defect: one line naming it, exit 2
            if fault is not None:
                raise UserError(one_line(fault)) from None
            if type(exc).__name__ == "OutOfMemoryError":  # torch's, on CUDA
                raise UserError(f"out of memory: {one_line(exc, 200)}") from None
            raise InternalError(
                f"unexpected {type(exc).__name__}: {one_line(exc, 300)} "
                "(rerun with streambench --debug for the traceback)"
            ) from None

    return wrapper


class OneLineGroup(click.Group):
    """Click in standalone mode prints usage errors as three lines and turns Ctrl-C into `Aborted!`
    with exit 1. Here every error is one `Error:` line (exit 2 for usage), and Ctrl-C anywhere,
    even while the command line is parsed, exits 130 (SIGTERM 143)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        from streambench.errors import Interrupted

        try:
            super().main(*args, standalone_mode=False, **kwargs)
            code = 0
        except click.exceptions.Exit as exc:
            code = exc.exit_code
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} -h')" if exc.ctx is not None else ""
            click.echo(f"Error: {one_line(exc.format_message())}{where}", err=True)
            code = exc.exit_code
        except click.ClickException as exc:
            exc.show()
            code = exc.exit_code
        except (click.Abort, KeyboardInterrupt) as exc:
            ignore_more_signals()  # a second Ctrl-C must not turn this clean exit into a traceback
            click.echo("Interrupted.", err=True)
            term = isinstance(exc, Interrupted) or isinstance(exc.__context__, Interrupted)
            code = 143 if term else 130
        except BrokenPipeError:
            code = 1
        sys.exit(code)


def one_line_warnings() -> None:
    """streambench's own warnings (e.g. undecodable bytes in a text) as `warning: ...` lines."""
    import warnings

    from streambench.errors import DataWarning

    original = warnings.showwarning
    if getattr(original, "_streambench", False):
        return

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            click.echo(f"warning: {one_line(message)}", err=True)
        else:
            original(message, category, filename, lineno, file, line)

    show._streambench = True
    warnings.showwarning = show


IN_MAIN = False  # set by main(): signal handlers are this process's to change (not a test's, not a host's)


def ignore_more_signals() -> None:
    import signal

    if not IN_MAIN:
        return
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except (ValueError, OSError):  # not the main thread
        pass


def sigterm(_signum, _frame):
    from streambench.errors import Interrupted

    raise Interrupted()


def interrupted(message: str, exc: BaseException) -> None:
    """The one way a command ends on Ctrl-C (130) or SIGTERM (143): no second signal can turn
    the clean exit into a traceback, and `message` says what was kept."""
    from streambench.errors import Interrupted

    ignore_more_signals()
    click.echo(message, err=True)
    sys.exit(143 if isinstance(exc, Interrupted) else 130)
