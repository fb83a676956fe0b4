"""The coordinator's durable record: rounds, participants and stage outcomes in SQLite.

Why SQLite in WAL mode: one file, crash-safe commits, readers (``fedsec status``) never block
the running server. ``synchronous = FULL`` because a round marked completed must survive a
power cut together with its checkpoint (the checkpoint is written and fsynced first, then the
row that points to it is committed; a crash in between leaves an orphan file, never a row
pointing at a missing one).

Rounds are *attempts*: ``round_number`` is the index of the global model an attempt tries to
produce, and a round aborted by a crash or by too few survivors is rerun as a new attempt with
the same ``round_number`` and a fresh secure-aggregation session id, so nothing a client sent
in the aborted attempt can be combined with anything later.

All methods are serialised by one lock: gRPC handler threads record participants while the
round loop records stages.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from fl_core.cli import UsageError

_SCHEMA_VERSION = 3
#: Version v -> v + 1, applied in order. 1 -> 2: each attempt records its aggregation backend
#: (masking before there was a choice). 2 -> 3: participants count the rounds they contributed
#: to, and the refusals clients report are kept. ALTER TABLE appends columns, so the column
#: order matches a fresh database.
_MIGRATIONS: dict[int, tuple[tuple[str, str, str], ...]] = {
    1: (("rounds", "backend", "TEXT NOT NULL DEFAULT 'masking'"),),
    2: (
        ("participants", "rounds_contributed", "INTEGER NOT NULL DEFAULT 0"),
        ("participants", "last_contributed", "INTEGER"),
    ),
}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS rounds (
    attempt       INTEGER PRIMARY KEY AUTOINCREMENT,
    round_number  INTEGER NOT NULL,
    session_id    TEXT    NOT NULL UNIQUE,
    status        TEXT    NOT NULL CHECK (status IN ('running', 'completed', 'aborted')),
    cohort        TEXT    NOT NULL,
    contributors  TEXT,
    reason        TEXT,
    checkpoint    TEXT,
    started_at    REAL    NOT NULL,
    ended_at      REAL,
    backend       TEXT    NOT NULL DEFAULT 'masking'
);
CREATE TABLE IF NOT EXISTS participants (
    client_id     INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL,
    first_seen    REAL    NOT NULL,
    last_seen     REAL    NOT NULL,
    rounds_joined INTEGER NOT NULL DEFAULT 0,
    rounds_contributed INTEGER NOT NULL DEFAULT 0,
    last_contributed   INTEGER
);
CREATE TABLE IF NOT EXISTS refusals (
    attempt       INTEGER NOT NULL REFERENCES rounds(attempt),
    client_id     INTEGER NOT NULL,
    reason        TEXT    NOT NULL,
    at            REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS stages (
    attempt       INTEGER NOT NULL REFERENCES rounds(attempt),
    stage         TEXT    NOT NULL,
    expected      INTEGER NOT NULL,
    arrived       INTEGER NOT NULL,
    deadline_hit  INTEGER NOT NULL,
    seconds       REAL    NOT NULL,
    PRIMARY KEY (attempt, stage)
);
"""


class StateDirLock:
    """An exclusive lock on a state directory, held for the server's lifetime.

    Two servers on one state directory would interleave rounds in one database and overwrite
    each other's checkpoints; the second is refused with the first one's pid. The lock is an
    ``flock`` on ``server.lock``, released by the kernel when the process dies, so a crash never
    leaves a stale lock behind.
    """

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._path = state_dir / "server.lock"
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise StoreError(
                f"{state_dir}: another fedsec server (pid {holder}) is using this state "
                "directory; stop it first, or give this server its own state_dir"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self._fd)


def check_history(state_dir: Path, store: Store) -> None:
    """Refuse to start a federation afresh over checkpoints of an earlier one: an empty or
    missing state database next to existing checkpoints would restart at round 0 and overwrite
    them."""
    checkpoints = sorted((state_dir / "checkpoints").glob("round-*.safetensors"))
    if checkpoints and store.last_completed() is None:
        raise StoreError(
            f"{state_dir / 'state.db'} records no completed round, but {state_dir / 'checkpoints'}"
            f" holds {len(checkpoints)} checkpoint(s) up to {checkpoints[-1].name}: the history "
            "of an earlier federation would be overwritten. Restore its state.db, or to start "
            "afresh deliberately move the checkpoints directory away first"
        )


class RoundStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    ABORTED = "aborted"


class StoreError(UsageError):
    """A state database that cannot be opened, or a transition the record does not allow
    (a :class:`~fl_core.cli.UsageError`: the CLIs print it as one line)."""


@dataclass(frozen=True)
class RoundRecord:
    attempt: int
    round_number: int
    session_id: bytes
    status: RoundStatus
    cohort: tuple[int, ...]
    contributors: tuple[int, ...] | None
    reason: str | None
    checkpoint: str | None
    started_at: float
    ended_at: float | None
    backend: str = "masking"


@dataclass(frozen=True)
class ParticipantRecord:
    client_id: int
    name: str
    first_seen: float
    last_seen: float
    rounds_joined: int
    rounds_contributed: int = 0
    last_contributed: int | None = None  # round number


@dataclass(frozen=True)
class StageRecord:
    stage: str
    expected: int
    arrived: int
    deadline_hit: bool
    seconds: float


def _ids(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    return tuple(int(x) for x in text.split(",")) if text else ()


def _ids_text(ids: tuple[int, ...] | list[int]) -> str:
    return ",".join(str(i) for i in ids)


class Store:
    def __init__(self, path: Path, readonly: bool = False) -> None:
        self._lock = threading.Lock()
        try:
            if readonly:
                if not path.exists():
                    raise StoreError(f"{path}: no state database (has the server run yet?)")
                self._db = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, check_same_thread=False
                )
                self._check_integrity(path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = FULL")
                self._db.execute("PRAGMA foreign_keys = ON")
                self._check_integrity(path)
                self._migrate(path)
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"{path}: cannot open the state database ({exc}); restore it from a backup "
                "(see docs/operations.md)"
            ) from None

    def _check_integrity(self, path: Path) -> None:
        verdict = self._db.execute("PRAGMA quick_check").fetchone()[0]
        if verdict != "ok":
            raise StoreError(f"{path}: the state database is damaged ({verdict})")

    def _migrate(self, path: Path) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, _SCHEMA_VERSION, *_MIGRATIONS):
            raise StoreError(
                f"{path}: schema version {version}, this server knows {_SCHEMA_VERSION}"
            )
        while version and version < _SCHEMA_VERSION:
            for table, column, kind in _MIGRATIONS[version]:
                columns = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                if columns and column not in columns:  # a missing table is created below
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            version += 1
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- transitions ---------------------------------------------------------------------

    def recover(self) -> list[RoundRecord]:
        """Mark every attempt left ``running`` by a crash as aborted; returns them."""
        with self._lock:
            rows = self._db.execute(
                "SELECT attempt FROM rounds WHERE status = 'running'"
            ).fetchall()
            self._db.execute(
                "UPDATE rounds SET status = 'aborted', ended_at = ?, "
                "reason = 'server stopped while the round was in flight' "
                "WHERE status = 'running'",
                (time.time(),),
            )
        return [self.attempt(row[0]) for row in rows]

    def begin_round(
        self,
        round_number: int,
        session_id: bytes,
        cohort: tuple[int, ...],
        backend: str = "masking",
    ) -> int:
        with self._lock:
            running = self._db.execute(
                "SELECT attempt FROM rounds WHERE status = 'running'"
            ).fetchone()
            if running is not None:
                raise StoreError(f"attempt {running[0]} is still running")
            try:
                cursor = self._db.execute(
                    "INSERT INTO rounds (round_number, session_id, status, cohort, started_at, "
                    "backend) VALUES (?, ?, 'running', ?, ?, ?)",
                    (round_number, session_id.hex(), _ids_text(cohort), time.time(), backend),
                )
            except sqlite3.IntegrityError:
                raise StoreError("session id already used by an earlier attempt") from None
            self._db.executemany(
                "UPDATE participants SET rounds_joined = rounds_joined + 1 WHERE client_id = ?",
                [(c,) for c in cohort],
            )
            attempt = cursor.lastrowid
        assert attempt is not None  # sqlite3 sets it after an INSERT
        return attempt

    def _end(self, attempt: int, status: RoundStatus, **columns: str | None) -> None:
        with self._lock:
            sets = ", ".join(f"{name} = ?" for name in columns)
            cursor = self._db.execute(
                f"UPDATE rounds SET status = ?, ended_at = ?, {sets} "
                "WHERE attempt = ? AND status = 'running'",
                (status.value, time.time(), *columns.values(), attempt),
            )
            if cursor.rowcount != 1:
                raise StoreError(f"attempt {attempt} is not running")

    def complete_round(self, attempt: int, contributors: tuple[int, ...], checkpoint: str) -> None:
        self._end(
            attempt,
            RoundStatus.COMPLETED,
            contributors=_ids_text(contributors),
            checkpoint=checkpoint,
            reason=None,
        )
        number = self.attempt(attempt).round_number
        with self._lock:
            self._db.executemany(
                "UPDATE participants SET rounds_contributed = rounds_contributed + 1, "
                "last_contributed = ? WHERE client_id = ?",
                [(number, c) for c in contributors],
            )

    def record_refusal(self, attempt: int, client_id: int, reason: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO refusals VALUES (?, ?, ?, ?)",
                (attempt, client_id, reason, time.time()),
            )

    def refusals(self, attempt: int) -> list[tuple[int, str]]:
        """(client, reason) of every refusal reported during ``attempt`` (none in a read-only
        look at a database from before refusals were kept)."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT client_id, reason FROM refusals WHERE attempt = ? ORDER BY at",
                    (attempt,),
                ).fetchall()
            except sqlite3.OperationalError:
                return []
        return [(int(c), str(r)) for c, r in rows]

    def abort_round(self, attempt: int, reason: str) -> None:
        self._end(attempt, RoundStatus.ABORTED, reason=reason)

    def record_stage(
        self,
        attempt: int,
        stage: str,
        expected: int,
        arrived: int,
        deadline_hit: bool,
        seconds: float,
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO stages VALUES (?, ?, ?, ?, ?, ?)",
                (attempt, stage, expected, arrived, int(deadline_hit), seconds),
            )

    def seen(self, client_id: int, name: str) -> None:
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO participants (client_id, name, first_seen, last_seen) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(client_id) DO UPDATE SET last_seen = ?, "
                "name = excluded.name",
                (client_id, name, now, now, now),
            )

    # --- queries -------------------------------------------------------------------------

    def _record(self, row: tuple[object, ...]) -> RoundRecord:
        (attempt, number, session, status, cohort, contributors, reason, ckpt, start, end) = row[
            :10
        ]
        # A version-1 database opened read-only (by ``fedsec status`` before the server
        # migrated it) has no backend column: every attempt there was masking.
        backend = str(row[10]) if len(row) > 10 else "masking"
        return RoundRecord(
            attempt=int(str(attempt)),
            round_number=int(str(number)),
            session_id=bytes.fromhex(str(session)),
            status=RoundStatus(str(status)),
            cohort=_ids(str(cohort)) or (),
            contributors=_ids(None if contributors is None else str(contributors)),
            reason=None if reason is None else str(reason),
            checkpoint=None if ckpt is None else str(ckpt),
            started_at=float(str(start)),
            ended_at=None if end is None else float(str(end)),
            backend=backend,
        )

    def attempt(self, attempt: int) -> RoundRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM rounds WHERE attempt = ?", (attempt,)).fetchone()
        if row is None:
            raise StoreError(f"no attempt {attempt}")
        return self._record(row)

    def rounds(self) -> list[RoundRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM rounds ORDER BY attempt").fetchall()
        return [self._record(r) for r in rows]

    def last_completed(self) -> RoundRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM rounds WHERE status = 'completed' ORDER BY attempt DESC LIMIT 1"
            ).fetchone()
        return None if row is None else self._record(row)

    def participants(self) -> list[ParticipantRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM participants ORDER BY client_id").fetchall()
        # A read-only look at an older database has fewer columns: missing counts are unknown.
        return [
            ParticipantRecord(
                int(row[0]),
                str(row[1]),
                float(row[2]),
                float(row[3]),
                int(row[4]),
                int(row[5]) if len(row) > 5 else 0,
                None if len(row) <= 6 or row[6] is None else int(row[6]),
            )
            for row in rows
        ]

    def stages(self, attempt: int) -> list[StageRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT stage, expected, arrived, deadline_hit, seconds FROM stages "
                "WHERE attempt = ? ORDER BY rowid",
                (attempt,),
            ).fetchall()
        return [StageRecord(str(s), int(e), int(a), bool(d), float(t)) for s, e, a, d, t in rows]
