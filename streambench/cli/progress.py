"""Progress bars for long runs (tqdm on stderr), and quieting the libraries' own chatter."""

from __future__ import annotations

import os
import sys


def tqdm_factory(desc: str, total: int):
    """A bar drawn once the task has said its size and unit (items, rounds, tokens): one bar per
    run, not an empty token bar above the real one."""
    from tqdm import tqdm

    class _Bar:
        bar = None

        def _open(self, n, unit: str) -> None:
            self.bar = tqdm(
                total=n or None,
                desc=f"{desc:>18}",
                unit=unit,
                leave=True,
                mininterval=0.5,
                file=sys.stderr,
                dynamic_ncols=True,
            )

        def total(self, n: int, unit: str = "tok") -> None:
            if self.bar is None:
                self._open(n, unit)
            else:
                self.bar.unit = unit
                self.bar.reset(total=n)

        def __call__(self, n: int) -> None:
            if self.bar is None:
                self._open(total, "tok")
            self.bar.update(n)

        def close(self) -> None:
            if self.bar is not None:
                self.bar.close()

    return _Bar()


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as tf_logging

        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
    except ImportError:
        pass
