"""The results store: one SQLite file (stdlib sqlite3, WAL mode) holding every run of every sweep.

A run is committed the moment it finishes, keyed by its config hash, so a sweep resumed after
Ctrl-C, a crash or a reboot skips what is done and loses nothing. Failed runs are recorded with
their error and retried on the next sweep. The schema evolves through ordered migrations
(`m001_...`), recorded in a `migrations` table, as simonw/llm does.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from streambench.errors import ResultsError
from streambench.results.schema import SCHEMA, now_iso, read_result


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


def m002_claims(db: sqlite3.Connection) -> None:
    """Runs a sweep is computing now, so a second sweep on the same store does not compute them too."""
    db.execute("""
        CREATE TABLE claims (
            config_hash TEXT PRIMARY KEY,
            owner TEXT NOT NULL,  -- host:pid:random of the sweep computing it
            host TEXT, pid INTEGER,
            claimed TEXT
        )""")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [m001_runs, m002_claims]
STALE_CLAIM_S = 12 * 3600  # a claim from another machine older than this is taken over


STREAMBENCH_TABLES = {"runs", "metrics", "migrations", "claims"}


def read_folder(folder: str | Path, skip_bad: bool = False) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    """Every result JSON below `folder`, each read and validated. With any bad file this raises and
    nothing is imported, unless `skip_bad`: then the bad ones come back with their reasons."""
    good, bad = [], []
    for file in sorted(Path(folder).rglob("*.json")):
        try:
            good.append(read_result(file))
        except ResultsError as exc:
            bad.append((file, str(exc)))
    if bad and not skip_bad:
        more = f" (and {len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
        raise ResultsError(f"nothing imported: {bad[0][1]}{more}; fix or remove it, or pass --skip-bad")
    return good, bad


class Store:
    """`Store(path)` opens for writing (sweep, import): a missing file becomes a new store, a
    streambench store is migrated, anything else is refused before a single byte changes (the WAL
    switch included). `Store(path, readonly=True)` (report, export, gate) never creates, migrates
    or writes: SQLite's read-only mode, after the same schema check."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        exists = self.path.exists()
        if exists and not self.path.is_file():
            raise ResultsError(f"store {self.path} is not a file")
        if not exists and readonly:
            raise ResultsError(f"store not found: {self.path}")
        if exists:
            self._check_foreign()
        try:
            if readonly:
                # A WAL database with no -wal file has no writer: open it immutable, since even a
                # read-only connection would otherwise leave -wal and -shm files beside it.
                at_rest = self._header()[18] == 2 and not Path(f"{self.path}-wal").exists()
                mode = "immutable=1" if at_rest else "mode=ro"
                self.db = sqlite3.connect(f"{self.path.resolve().as_uri()}?{mode}", uri=True, timeout=30)
                self.db.execute("PRAGMA query_only=ON")
                self._check_schema(migrated=True)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(self.path, timeout=30)
                self._check_schema(migrated=False)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA foreign_keys=ON")
                self._migrate()
        except sqlite3.DatabaseError as exc:
            raise ResultsError(f"cannot open store {self.path}: {exc}") from None

    def _check_foreign(self) -> None:
        """Bytes only: a file that is not SQLite, or an empty one, is never opened by sqlite3."""
        size = self.path.stat().st_size
        if size == 0:
            raise ResultsError(
                f"{self.path} is an empty file, not a streambench store; left untouched "
                "(delete it, or name another --store)"
            )
        if self._header()[:16] != b"SQLite format 3\x00":
            raise ResultsError(f"{self.path} is not a streambench store (not an SQLite database); left untouched")

    def _header(self) -> bytes:
        try:
            with open(self.path, "rb") as fh:
                return fh.read(100).ljust(100, b"\0")
        except OSError as exc:
            raise ResultsError(f"cannot read store {self.path}: {exc.strerror}") from None

    def _check_schema(self, migrated: bool) -> None:
        """Refuse a database with tables streambench did not make, or without streambench's own."""
        tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")}
        if not tables:
            if migrated:
                raise ResultsError(f"{self.path} holds no streambench results (an empty database); left untouched")
            return  # a new store
        foreign = sorted(t for t in tables - STREAMBENCH_TABLES if not t.startswith("sqlite_"))
        ours = (
            "migrations" in tables
            and self.db.execute("SELECT 1 FROM migrations WHERE name = 'm001_runs'").fetchone() is not None
        )
        if foreign or not ours:
            what = (
                f"tables {', '.join(foreign[:5])}"
                if foreign
                else "a 'runs' table streambench did not make"
                if "runs" in tables
                else f"tables {', '.join(sorted(tables)[:5])}"
            )
            self.db.close()
            raise ResultsError(f"{self.path} is not a streambench store (it has {what}); left untouched")

    def _migrate(self) -> None:
        with self.db:
            self.db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied TEXT)")
            done = {row[0] for row in self.db.execute("SELECT name FROM migrations")}
            for migration in MIGRATIONS:
                if migration.__name__ not in done:
                    migration(self.db)
                    self.db.execute("INSERT INTO migrations VALUES (?, ?)", (migration.__name__, now_iso()))

    def close(self) -> None:
        if not self.readonly and getattr(self, "_owner", None):
            try:
                with self.db:
                    self.db.execute("DELETE FROM claims WHERE owner = ?", (self._owner,))
            except sqlite3.Error:
                pass  # a full disk: the claims die with this process (a later sweep sees it gone)
        if not self.readonly:
            try:  # at rest in rollback-journal mode: readers then leave no -wal/-shm files behind
                self.db.execute("PRAGMA journal_mode=DELETE")
            except sqlite3.Error:
                pass  # another connection is open: it (or the last one) will do it
        self.db.close()

    # ---- claims: one computation per run across concurrent sweeps -------------------------------
    @property
    def owner(self) -> str:
        if not getattr(self, "_owner", None):
            import os
            import secrets
            import socket

            self._owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        return self._owner

    def claim(self, digest: str, force: bool = False) -> bool:
        """Take the run for this process; False when it is finished (unless `force`: recompute) or
        another live sweep has it.
        A claim whose process is gone (same host) or that is stale (another host) is taken over."""
        import os
        import socket
        from datetime import datetime, timezone

        me, host = self.owner, socket.gethostname()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            if (
                not force
                and self.db.execute(
                    "SELECT 1 FROM runs WHERE config_hash = ? AND status = 'finished'", (digest,)
                ).fetchone()
            ):
                return False
            row = self.db.execute(
                "SELECT owner, host, pid, claimed FROM claims WHERE config_hash = ?", (digest,)
            ).fetchone()
            if row is not None and row[0] != me:
                other, other_host, pid, claimed = row
                if other_host == host:
                    try:
                        os.kill(int(pid), 0)
                        return False  # alive
                    except (ProcessLookupError, ValueError, TypeError):
                        pass
                    except PermissionError:
                        return False  # alive, another user's
                else:
                    try:
                        age = (datetime.now(timezone.utc) - datetime.fromisoformat(claimed)).total_seconds()
                    except (TypeError, ValueError):
                        age = STALE_CLAIM_S + 1
                    if age < STALE_CLAIM_S:
                        return False
            self.db.execute(
                "INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)", (digest, me, host, os.getpid(), now_iso())
            )
        return True

    def release(self, digest: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM claims WHERE config_hash = ? AND owner = ?", (digest, self.owner))

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- writing -----------------------------------------------------------------------------
    def add(self, result: dict[str, Any]) -> None:
        """Record a finished run (replacing a failed or older record of the same config)."""
        if result.get("schema") != SCHEMA:
            raise ResultsError(f"not a streambench result (schema {result.get('schema')!r})")
        with self.db:
            self._add(result)

    def _add(self, result: dict[str, Any]) -> None:
        config, digest = result["config"], result["config_hash"]
        payload = {k: v for k, v in result.items() if k != "path"}
        timing = result.get("timing") or {}
        self.db.execute("DELETE FROM runs WHERE config_hash = ?", (digest,))
        self.db.execute("DELETE FROM claims WHERE config_hash = ?", (digest,))
        self.db.execute(
            "INSERT INTO runs VALUES (?, ?, 'finished', ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
            (
                digest,
                result["run_id"],
                result.get("label"),
                config["task"]["name"],
                config["policy"]["name"],
                config["model"],
                config["policy"]["args"].get("budget"),
                str(timing.get("started", "")),
                str(timing.get("finished", "")),
                json.dumps(payload, default=str),
            ),
        )
        directions = result.get("higher_is_better", {})
        self.db.executemany(
            "INSERT INTO metrics VALUES (?, ?, ?, ?)",
            [
                (digest, name, float(value), None if name not in directions else int(directions[name]))
                for name, value in result["metrics"].items()
                if isinstance(value, (int, float))
            ],
        )

    def add_failure(self, config: dict[str, Any], digest: str, run_id: str, label: str, error: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM runs WHERE config_hash = ?", (digest,))
            self.db.execute("DELETE FROM claims WHERE config_hash = ? AND owner = ?", (digest, self.owner))
            self.db.execute(
                "INSERT INTO runs VALUES (?, ?, 'failed', ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (
                    digest,
                    run_id,
                    label,
                    config["task"]["name"],
                    config["policy"]["name"],
                    config["model"],
                    config["policy"]["args"].get("budget"),
                    now_iso(),
                    now_iso(),
                    error,
                ),
            )

    def import_dir(self, folder: str | Path, skip_bad: bool = False) -> tuple[int, list[tuple[Path, str]]]:
        """Bring in every result JSON below `folder` (see read_folder), in one transaction."""
        good, bad = read_folder(folder, skip_bad)
        self.add_all(good)
        return len(good), bad

    def add_all(self, results: list[dict[str, Any]]) -> None:
        with self.db:
            for result in results:
                self._add(result)

    # ---- reading -----------------------------------------------------------------------------
    def finished(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT config_hash FROM runs WHERE status = 'finished'")}

    def rows(self) -> list[dict[str, Any]]:
        cursor = self.db.execute(
            "SELECT config_hash, run_id, status, label, task, policy, model, budget, "
            "started, finished, error FROM runs ORDER BY started, run_id"
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def results(self) -> Iterator[dict[str, Any]]:
        from streambench.results.schema import validate_result

        query = "SELECT run_id, result FROM runs WHERE status = 'finished' ORDER BY started, run_id"
        for run_id, payload in self.db.execute(query):
            try:
                data = json.loads(payload)
            except (TypeError, ValueError, RecursionError):
                raise ResultsError(
                    f"store {self.path}: the result of run {str(run_id)[:80]!r} is corrupt (not JSON)"
                ) from None
            yield validate_result(data, f"store {self.path}, run {str(run_id)[:80]!r}")
