"""The service's state in one SQLite file (WAL): keys, counts, PRADA's history, watermarks.

Every change a query makes (tokens, budget, request id, PRADA's points and distances, a
watermark row, an alarm) is written in one ``BEGIN IMMEDIATE`` transaction that commits
before the answer is sent, so a restart or a killed process never loses a count: at worst
a query is counted whose answer never left. The tables are specified in serve/PROTOCOL.md
("State").
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from roadshield_base.errors import ConfigError
from serve.ratelimit import Bucket

SCHEMA_VERSION = "1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS keys (
    key_id TEXT PRIMARY KEY,
    salt BLOB, secret_hash BLOB,
    cert_sha256 TEXT,
    policy TEXT NOT NULL,
    budget INTEGER NOT NULL, used INTEGER NOT NULL DEFAULT 0,
    rate REAL NOT NULL, burst REAL NOT NULL,
    tokens REAL NOT NULL, tokens_at REAL NOT NULL,
    strikes INTEGER NOT NULL DEFAULT 0, blocked_until REAL NOT NULL DEFAULT 0,
    last_strike_at REAL NOT NULL DEFAULT 0,
    cut TEXT NOT NULL DEFAULT '',
    revoked INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS keys_cert ON keys(cert_sha256);
CREATE TABLE IF NOT EXISTS request_ids (
    key_id TEXT NOT NULL, request_id TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (key_id, request_id));
CREATE TABLE IF NOT EXISTS prada_points (
    key_id TEXT NOT NULL, seq INTEGER NOT NULL, cls INTEGER NOT NULL, image BLOB NOT NULL,
    PRIMARY KEY (key_id, seq));
CREATE TABLE IF NOT EXISTS prada_distances (
    key_id TEXT NOT NULL, seq INTEGER NOT NULL, distance REAL NOT NULL,
    PRIMARY KEY (key_id, seq));
CREATE TABLE IF NOT EXISTS prada_tests (
    key_id TEXT NOT NULL, n INTEGER NOT NULL, w REAL NOT NULL, alarm INTEGER NOT NULL,
    at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS watermark (
    key_id TEXT NOT NULL, query_sha256 TEXT NOT NULL, shape TEXT NOT NULL,
    image BLOB NOT NULL, true_label INTEGER NOT NULL, wrong_label INTEGER NOT NULL,
    at REAL NOT NULL, PRIMARY KEY (key_id, query_sha256));
"""


@dataclass(frozen=True)
class KeyRecord:
    """One identity: an API key (salted hash), a client certificate, or both.

    policy: the output policy; cut: "" or what PRADA's alarm left ("label" / "off").
    budget / used: images allowed / answered so far.
    """

    key_id: str
    salt: bytes | None
    secret_hash: bytes | None
    cert_sha256: str | None
    policy: str
    budget: int
    used: int
    bucket: Bucket
    cut: str
    revoked: bool
    created_at: float


@dataclass(frozen=True)
class Charge:
    """What an answered query writes, all in one transaction.

    points: PRADA points (class index, uint8 image bytes); distances: the new minimum
    distances; test: (n, W, alarm) when Shapiro-Wilk ran; cut: the key's new cut, or None;
    watermark: (query_sha256, shape json, uint8 image bytes, true label, wrong label).
    """

    cost: int
    bucket: Bucket
    request_id: str | None = None
    points: Sequence[tuple[int, bytes]] = ()
    first_seq: int = 0
    distances: Sequence[tuple[int, float]] = ()
    test: tuple[int, float, bool] | None = None
    cut: str | None = None
    watermark: Sequence[tuple[str, str, bytes, int, int]] = ()


_KEY_COLUMNS = ("key_id, salt, secret_hash, cert_sha256, policy, budget, used, rate, burst, "
                "tokens, tokens_at, strikes, blocked_until, last_strike_at, cut, revoked, "
                "created_at")


def _record(row: tuple) -> KeyRecord:
    (key_id, salt, secret_hash, cert, policy, budget, used, rate, burst, tokens, tokens_at,
     strikes, blocked_until, last_strike_at, cut, revoked, created_at) = row
    return KeyRecord(key_id, salt, secret_hash, cert, policy, int(budget), int(used),
                     Bucket(rate, burst, tokens, tokens_at, int(strikes), blocked_until,
                            last_strike_at), cut, bool(revoked), created_at)


class Store:
    """The SQLite file behind one service; safe to share between threads (one lock)."""

    def __init__(self, path: str | Path, sync: str = "normal") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                       isolation_level=None, timeout=30.0)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process; FULL also a power cut
            self._db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
            self._db.executescript(SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)",
                             (SCHEMA_VERSION,))
        except sqlite3.DatabaseError as err:
            raise ConfigError(f"cannot open the service database {self.path}: {err}",
                              "point --dir at a folder the service owns") from err
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any exception)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # keys -----------------------------------------------------------------------------

    def add_key(self, key_id: str, *, policy: str, budget: int, rate: float, burst: float,
                now: float, salt: bytes | None = None, secret_hash: bytes | None = None
                ) -> None:
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM keys WHERE key_id=?", (key_id,)).fetchone():
                raise ConfigError(f"key {key_id!r} already exists",
                                  "revoke it and add another id, or pick a new id")
            db.execute("INSERT INTO keys (key_id, salt, secret_hash, policy, budget, rate, "
                       "burst, tokens, tokens_at, created_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (key_id, salt, secret_hash, policy, budget, rate, burst, burst, now,
                        now))

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_id=?",
                                   (key_id,)).fetchone()
        return _record(row) if row else None

    def key_by_cert(self, cert_sha256: str) -> KeyRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE cert_sha256=?",
                                   (cert_sha256,)).fetchone()
        return _record(row) if row else None

    def list_keys(self) -> list[KeyRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_KEY_COLUMNS} FROM keys ORDER BY key_id")
            return [_record(r) for r in rows.fetchall()]

    def set_cert(self, key_id: str, cert_sha256: str) -> None:
        with self.transaction() as db:
            if db.execute("UPDATE keys SET cert_sha256=? WHERE key_id=?",
                          (cert_sha256, key_id)).rowcount != 1:
                raise ConfigError(f"no key {key_id!r}", "add it with `serve keys add` first")

    def revoke(self, key_id: str) -> None:
        with self.transaction() as db:
            if db.execute("UPDATE keys SET revoked=1 WHERE key_id=?", (key_id,)).rowcount != 1:
                raise ConfigError(f"no key {key_id!r}", "list keys with `serve keys list`")

    def save_bucket(self, key_id: str, bucket: Bucket) -> None:
        """Store a strike (the bucket after a refused request)."""
        with self.transaction() as db:
            _write_bucket(db, key_id, bucket)

    # queries --------------------------------------------------------------------------

    def request_id_seen(self, key_id: str, request_id: str, since: float) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM request_ids WHERE key_id=? AND "
                                   "request_id=? AND at>=?",
                                   (key_id, request_id, since)).fetchone()
        return row is not None

    def charge(self, key_id: str, charge: Charge, now: float, replay_since: float) -> str:
        """Commit an answered query; returns "" or why it may not be answered after all
        ("budget", "rate", "replay", "cut", "revoked") when a concurrent request won."""
        with self.transaction() as db:
            row = db.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_id=?",
                             (key_id,)).fetchone()
            if row is None:
                return "revoked"
            record = _record(row)
            if record.revoked:
                return "revoked"
            if record.cut == "off":
                return "cut"
            if record.used + charge.cost > record.budget:
                return "budget"
            if charge.bucket.tokens < 0:
                return "rate"
            if charge.request_id is not None:
                seen = db.execute("SELECT 1 FROM request_ids WHERE key_id=? AND "
                                  "request_id=? AND at>=?",
                                  (key_id, charge.request_id, replay_since)).fetchone()
                if seen:
                    return "replay"
                db.execute("INSERT OR REPLACE INTO request_ids VALUES (?,?,?)",
                           (key_id, charge.request_id, now))
            db.execute("UPDATE keys SET used=used+? WHERE key_id=?", (charge.cost, key_id))
            _write_bucket(db, key_id, charge.bucket)
            db.executemany("INSERT INTO prada_points VALUES (?,?,?,?)",
                           [(key_id, charge.first_seq + i, cls, image)
                            for i, (cls, image) in enumerate(charge.points)])
            db.executemany("INSERT INTO prada_distances VALUES (?,?,?)",
                           [(key_id, seq, d) for seq, d in charge.distances])
            if charge.test is not None:
                n, w, alarm = charge.test
                db.execute("INSERT INTO prada_tests VALUES (?,?,?,?,?)",
                           (key_id, n, w, int(alarm), now))
            if charge.cut is not None:
                db.execute("UPDATE keys SET cut=? WHERE key_id=?", (charge.cut, key_id))
            db.executemany("INSERT OR IGNORE INTO watermark VALUES (?,?,?,?,?,?,?)",
                           [(key_id, *row, now) for row in charge.watermark])
        return ""

    def prune_request_ids(self, before: float) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM request_ids WHERE at<?", (before,))

    # PRADA and watermark history ------------------------------------------------------

    def prada_history(self, key_id: str) -> tuple[list[tuple[int, int, bytes]], list[float]]:
        """(seq, class, uint8 image bytes) of every point and the distances, in order."""
        with self._lock:
            points = self._db.execute("SELECT seq, cls, image FROM prada_points WHERE "
                                      "key_id=? ORDER BY seq", (key_id,)).fetchall()
            dists = self._db.execute("SELECT distance FROM prada_distances WHERE key_id=? "
                                     "ORDER BY seq", (key_id,)).fetchall()
        return [(int(s), int(c), bytes(b)) for s, c, b in points], [d for (d,) in dists]

    def prada_tests(self, key_id: str) -> list[tuple[int, float, bool]]:
        with self._lock:
            rows = self._db.execute("SELECT n, w, alarm FROM prada_tests WHERE key_id=? "
                                    "ORDER BY rowid", (key_id,)).fetchall()
        return [(int(n), float(w), bool(a)) for n, w, a in rows]

    def watermark_rows(self, key_id: str | None = None
                       ) -> list[tuple[str, str, str, bytes, int, int]]:
        """(key_id, query_sha256, shape json, uint8 image, true label, wrong label) rows,
        oldest first; ``key_id`` None: every client's."""
        sql = ("SELECT key_id, query_sha256, shape, image, true_label, wrong_label FROM "
               "watermark")
        args: tuple = ()
        if key_id is not None:
            sql += " WHERE key_id=?"
            args = (key_id,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY at, rowid", args).fetchall()
        return [(k, q, s, bytes(b), int(t), int(w)) for k, q, s, b, t, w in rows]


def _write_bucket(db: sqlite3.Connection, key_id: str, b: Bucket) -> None:
    db.execute("UPDATE keys SET tokens=?, tokens_at=?, strikes=?, blocked_until=?, "
               "last_strike_at=? WHERE key_id=?",
               (b.tokens, b.tokens_at, b.strikes, b.blocked_until, b.last_strike_at, key_id))
