import json

import pytest

from streambench.errors import ResultsError
from streambench.results import schema as results


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(results.os, "fsync", boom)  # interrupted after the temp file was written
    with pytest.raises(KeyboardInterrupt):
        results.write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "r.json"
    results.write_json_atomic(path, {"a": 1})
    results.write_json_atomic(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_read_rejects_corrupt_and_foreign_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "streambench.result/1", "run_id": ')
    with pytest.raises(ResultsError, match="corrupt results file"):
        results.read_result(bad)
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"results": {}}')
    with pytest.raises(ResultsError, match="is not a streambench result"):
        results.read_result(foreign)
    with pytest.raises(ResultsError, match="not found"):
        results.read_result(tmp_path / "missing.json")


def test_config_hash_is_canonical():
    a = {"policy": {"name": "window", "args": {"size": 8, "budget": 8}}, "seed": 0}
    b = {"seed": 0, "policy": {"args": {"budget": 8, "size": 8}, "name": "window"}}
    assert results.config_hash(a) == results.config_hash(b)
    assert results.config_hash(a) != results.config_hash({**a, "seed": 1})
