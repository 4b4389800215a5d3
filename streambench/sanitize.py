"""Hostile strings and where files go: slugs for file names, paths kept inside their output folder,
outputs checked writable before any work, labels checked before they reach a table.

Labels, model names and task arguments come from users, sweep specs, result files and stores.
They reach file names (run ids), HTML (reports), SQL (always as bound parameters) and one-line
messages; this module is where a string becomes safe for a file name or is refused.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import unicodedata
from pathlib import Path

from streambench.errors import ConfigError, OutputError

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")
LABEL_MAX = 200


def slug(text: str, limit: int = 60) -> str:
    """A file-name-safe form of `text`: ASCII letters, digits and `._+=-`, no leading dot or dash,
    at most `limit` characters. Never empty, never a path: '/../x' becomes 'x'."""
    ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode()
    out = _UNSAFE.sub("-", ascii_text).strip(".-_")
    out = re.sub(r"\.{2,}", ".", out)[:limit].strip(".-_")
    return out or "run"


def inside(base: str | Path, name: str) -> Path:
    """`base / name`, refusing any result that would leave `base` (the caller built `name` from a
    slug; this is the second lock)."""
    root = Path(base).resolve()
    path = (root / name).resolve()
    if path.parent != root:
        raise OutputError(f"refusing to write {name!r}: it would land outside {base}")
    return path


def check_label(label, where: str = "label") -> str | None:
    """A run's label is shown in tables, legends and reports: a string of printable characters."""
    if label is None:
        return None
    if not isinstance(label, str):
        raise ConfigError(f"{where} must be a string, got {label!r}")
    if not label.strip():
        raise ConfigError(f"{where} must not be empty")
    if len(label) > LABEL_MAX:
        raise ConfigError(f"{where} is longer than {LABEL_MAX} characters")
    if any(unicodedata.category(ch).startswith("C") for ch in label):
        raise ConfigError(f"{where} {label!r} contains control characters")
    return label


def check_writable(folder: str | Path, what: str = "output folder") -> Path:
    """Create `folder` if needed and prove a file can be written there, before any model loads:
    a read-only or full disk is one line now, not a traceback after an hour's run."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{what} {folder} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".streambench-write-check-")
        try:
            os.write(fd, b"0" * 4096)  # a full disk fails here, not only at creation
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write to {what} {folder}: {describe_os_error(exc)}") from None
    return path


def describe_os_error(exc: OSError) -> str:
    """`No space left on device`, `Read-only file system`, ... without the Python noise."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    text = exc.strerror or str(exc) or type(exc).__name__
    name = exc.filename
    return f"{text} ({name})" if name else text


def file_mode() -> int:
    """The mode an ordinary `open()` would give a new file under the current umask (mkstemp gives
    0600; results are meant to be read like the store beside them)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
