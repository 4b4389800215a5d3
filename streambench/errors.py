"""Typed errors a user can cause. The CLI turns each into one line on stderr and exit code 2."""


class StreambenchError(Exception):
    """Base class: anything the user can fix (bad input, missing model or data, impossible sizes)."""


class UnknownNameError(StreambenchError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConfigError(StreambenchError, ValueError):
    """A policy, task or run configuration that cannot work (e.g. budget not above start_size)."""


class ModelLoadError(StreambenchError):
    """A model that cannot be found offline or cannot be loaded."""


class UnsupportedModelError(StreambenchError):
    """A model whose attention or position encoding the engine cannot re-index exactly."""


class DataError(StreambenchError):
    """A text or dataset that is missing, unreadable or too short."""


class ResultsError(StreambenchError):
    """A results file that is missing, corrupt or of an unknown schema."""


class MissingDependencyError(StreambenchError):
    """An optional extra (e.g. Ray) that the requested feature needs is not installed."""


class OutputError(StreambenchError):
    """An output that cannot be written (read-only or full disk, a path outside the output folder)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (finished results kept, the run in progress discarded); exit 143."""


class DataWarning(UserWarning):
    """Input that is used but not as given (e.g. undecodable bytes replaced); the CLI prints one line."""


class PolicyContractError(StreambenchError):
    """A policy's `select` returned something the engine cannot keep (unsorted, out of range, too many)."""
