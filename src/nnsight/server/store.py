"""Embedded SQLite storage for API keys (hashed) and jobs, behind small interfaces.

``KeyStore`` and ``JobStore`` are what the app uses; another backend (Postgres, Redis)
only needs the same methods.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path

KEY_PREFIX = "nns_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class _Db:
    def __init__(self, path: Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.conn = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA busy_timeout=30000")
        # WAL with NORMAL sync stays consistent after a crash and costs no fsync per job update.
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(
            """
            CREATE TABLE IF NOT EXISTS keys (
                id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
                created REAL NOT NULL, revoked REAL
            );
            CREATE TABLE IF NOT EXISTS jobs (
                id TEXT PRIMARY KEY, key_id TEXT NOT NULL, model TEXT NOT NULL, status TEXT NOT NULL,
                created REAL NOT NULL, updated REAL NOT NULL, error TEXT, stdout TEXT NOT NULL DEFAULT '',
                result_path TEXT
            );
            CREATE INDEX IF NOT EXISTS jobs_key ON jobs(key_id);
            """
        )

    def execute(self, sql, args=()):
        with self.lock:
            return self.conn.execute(sql, args).fetchall()


class KeyStore:
    def __init__(self, db_path):
        self.db = _Db(db_path)

    def create(self, name: str) -> tuple[str, str]:
        """A new key: ``(key_id, key)``. Only the hash is stored; the key is shown once."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = secrets.token_hex(4)
        self.db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, NULL)", (key_id, name, hash_key(key), time.time()))
        return key_id, key

    def revoke(self, key_id: str) -> bool:
        rows = self.db.execute("SELECT id FROM keys WHERE id = ? AND revoked IS NULL", (key_id,))
        if not rows:
            return False
        self.db.execute("UPDATE keys SET revoked = ? WHERE id = ?", (time.time(), key_id))
        return True

    def list(self) -> list[dict]:
        rows = self.db.execute("SELECT id, name, created, revoked FROM keys ORDER BY created")
        return [{"id": r[0], "name": r[1], "created": r[2], "revoked": r[3]} for r in rows]

    def authenticate(self, key: str | None) -> str | None:
        """The key id for a valid, unrevoked key; else None."""
        if not key or not isinstance(key, str) or len(key) > 200:
            return None
        digest = hash_key(key)
        rows = self.db.execute("SELECT id, hash FROM keys WHERE hash = ? AND revoked IS NULL", (digest,))
        if rows and hmac.compare_digest(rows[0][1], digest):
            return rows[0][0]
        return None


class JobStore:
    def __init__(self, db_path):
        self.db = _Db(db_path)

    def create(self, job_id, key_id, model):
        now = time.time()
        self.db.execute("INSERT INTO jobs (id, key_id, model, status, created, updated) VALUES (?, ?, ?, 'received', ?, ?)",
                        (job_id, key_id, model, now, now))

    def update(self, job_id, status=None, error=None, result_path=None, stdout_append=None):
        sets, args = ["updated = ?"], [time.time()]
        if status is not None:
            sets.append("status = ?")
            args.append(status)
        if error is not None:
            sets.append("error = ?")
            args.append(json.dumps(error))
        if result_path is not None:
            sets.append("result_path = ?")
            args.append(str(result_path))
        if stdout_append:
            sets.append("stdout = stdout || ?")
            args.append(stdout_append)
        args.append(job_id)
        self.db.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", args)

    def get(self, job_id) -> dict | None:
        rows = self.db.execute(
            "SELECT id, key_id, model, status, created, updated, error, stdout, result_path FROM jobs WHERE id = ?", (job_id,)
        )
        if not rows:
            return None
        r = rows[0]
        return {"id": r[0], "key_id": r[1], "model": r[2], "status": r[3], "created": r[4], "updated": r[5],
                "error": json.loads(r[6]) if r[6] else None, "stdout": r[7], "result_path": r[8]}

    def delete(self, job_ids):
        """Forget finished jobs (their retention time is over)."""
        ids = list(job_ids)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            self.db.execute(f"DELETE FROM jobs WHERE id IN ({','.join('?' * len(chunk))})", chunk)

    def finished_jobs(self) -> list:
        """``(id, updated)`` of every finished job, oldest first (retention after a restart)."""
        return [(r[0], r[1]) for r in self.db.execute(
            "SELECT id, updated FROM jobs WHERE status IN ('completed', 'error', 'cancelled') ORDER BY updated")]

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM jobs")[0][0]

    def fail_unfinished(self):
        """Jobs a previous server process left queued or running can never finish."""
        self.db.execute(
            "UPDATE jobs SET status = 'error', error = ?, updated = ? WHERE status IN ('received', 'queued', 'running')",
            (json.dumps({"type": "RemoteError", "message": "the server restarted before the job finished", "traceback": []}), time.time()),
        )
