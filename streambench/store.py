"""The results store: one SQLite file (stdlib sqlite3, WAL mode) holding every run of every sweep.

A run is committed the moment it finishes, keyed by its config hash, so a sweep resumed after
Ctrl-C, a crash or a reboot skips what is done and loses nothing. Failed runs are recorded with
their error and retried on the next sweep. The schema evolves through ordered migrations
(`m001_...`), recorded in a `migrations` table, as simonw/llm does.
"""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterator

from streambench.errors import ResultsError
from streambench.results import SCHEMA, now_iso, read_result


def m001_runs(db: sqlite3.Connection) -> None:
    db.execute("""
        CREATE TABLE runs (
            config_hash TEXT PRIMARY KEY,
            run_id TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('finished', 'failed')),
            label TEXT, task TEXT, policy TEXT, model TEXT, budget INTEGER,
            started TEXT, finished TEXT,
            error TEXT,
            result TEXT  -- the full result JSON (schema streambench.result/1) for finished runs
        )""")
    db.execute("""
        CREATE TABLE metrics (
            config_hash TEXT NOT NULL REFERENCES runs(config_hash) ON DELETE CASCADE,
            name TEXT NOT NULL,
            value REAL,
            higher_is_better INTEGER,
            PRIMARY KEY (config_hash, name)
        )""")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [m001_runs]


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as fh:
                if fh.read(16) != b"SQLite format 3\x00":
                    raise ResultsError(f"{self.path} is not a streambench store (not an SQLite database); left untouched")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise ResultsError(f"cannot open store {self.path}: {exc}") from None

    def _migrate(self) -> None:
        with self.db:
            self.db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied TEXT)")
            done = {row[0] for row in self.db.execute("SELECT name FROM migrations")}
            if "m001_runs" not in done and self.db.execute(
                    "SELECT 1 FROM sqlite_master WHERE name = 'runs'").fetchone():
                raise ResultsError(f"{self.path} has a 'runs' table streambench did not make; left untouched")
            for migration in MIGRATIONS:
                if migration.__name__ not in done:
                    migration(self.db)
                    self.db.execute("INSERT INTO migrations VALUES (?, ?)", (migration.__name__, now_iso()))

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- writing -----------------------------------------------------------------------------
    def add(self, result: dict[str, Any]) -> None:
        """Record a finished run (replacing a failed or older record of the same config)."""
        if result.get("schema") != SCHEMA:
            raise ResultsError(f"not a streambench result (schema {result.get('schema')!r})")
        config, digest = result["config"], result["config_hash"]
        payload = {k: v for k, v in result.items() if k != "path"}
        with self.db:
            self.db.execute("DELETE FROM runs WHERE config_hash = ?", (digest,))
            self.db.execute(
                "INSERT INTO runs VALUES (?, ?, 'finished', ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                (digest, result["run_id"], result.get("label"), config["task"]["name"], config["policy"]["name"],
                 config["model"], config["policy"]["args"].get("budget"), result["timing"]["started"],
                 result["timing"]["finished"], json.dumps(payload, default=str)),
            )
            directions = result.get("higher_is_better", {})
            self.db.executemany(
                "INSERT INTO metrics VALUES (?, ?, ?, ?)",
                [(digest, name, float(value), None if name not in directions else int(directions[name]))
                 for name, value in result["metrics"].items() if isinstance(value, (int, float))],
            )

    def add_failure(self, config: dict[str, Any], digest: str, run_id: str, label: str, error: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM runs WHERE config_hash = ?", (digest,))
            self.db.execute(
                "INSERT INTO runs VALUES (?, ?, 'failed', ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (digest, run_id, label, config["task"]["name"], config["policy"]["name"], config["model"],
                 config["policy"]["args"].get("budget"), now_iso(), now_iso(), error),
            )

    def import_dir(self, folder: str | Path) -> int:
        """Bring in every result JSON below `folder`; returns how many were added."""
        files = sorted(Path(folder).rglob("*.json"))
        for file in files:
            self.add(read_result(file))
        return len(files)

    # ---- reading -----------------------------------------------------------------------------
    def finished(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT config_hash FROM runs WHERE status = 'finished'")}

    def rows(self) -> list[dict[str, Any]]:
        cursor = self.db.execute("SELECT config_hash, run_id, status, label, task, policy, model, budget, "
                                 "started, finished, error FROM runs ORDER BY started, run_id")
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def results(self) -> Iterator[dict[str, Any]]:
        for (payload,) in self.db.execute("SELECT result FROM runs WHERE status = 'finished' ORDER BY started, run_id"):
            yield json.loads(payload)
