# Copyright: thinair.ovirt contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The engine's database: one SQLite file in the lab directory.

Everything the engine knows lives here, so a restarted engine finds its disks,
transfers and jobs again. One connection is shared by all threads (HTTP
handlers, the transfer monitor, disk creation) and serialized by an RLock;
statements are short, long work (qemu-img, imageio) happens outside it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time

SCHEMA_VERSION = "1"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS data_centers (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    description TEXT
);
CREATE TABLE IF NOT EXISTS clusters (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    description TEXT,
    data_center_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS hosts (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    address TEXT NOT NULL,
    hw_id TEXT NOT NULL,
    cluster_id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS storage_domains (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    description TEXT,
    kind TEXT NOT NULL,
    storage_type TEXT NOT NULL,
    data_center_id TEXT NOT NULL,
    master INTEGER NOT NULL,
    path TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS disks (
    id TEXT PRIMARY KEY,
    alias TEXT NOT NULL,
    description TEXT,
    format TEXT NOT NULL,
    sparse INTEGER NOT NULL,
    provisioned_size INTEGER NOT NULL,
    initial_size INTEGER,
    content_type TEXT NOT NULL,
    backup TEXT NOT NULL,
    qcow_version TEXT,
    shareable INTEGER NOT NULL,
    wipe_after_delete INTEGER NOT NULL,
    storage_domain_id TEXT NOT NULL,
    image_id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    external_disk TEXT
);
CREATE TABLE IF NOT EXISTS image_transfers (
    id TEXT PRIMARY KEY,
    disk_id TEXT NOT NULL,
    image_id TEXT NOT NULL,
    direction TEXT NOT NULL,
    format TEXT NOT NULL,
    backend TEXT NOT NULL,
    phase TEXT NOT NULL,
    host_id TEXT,
    ticket_id TEXT,
    nbd_url TEXT,
    transfer_size INTEGER,
    sparse INTEGER NOT NULL,
    inactivity_timeout INTEGER NOT NULL,
    timeout_policy TEXT NOT NULL,
    shallow INTEGER NOT NULL,
    transferred INTEGER NOT NULL DEFAULT 0,
    active INTEGER NOT NULL DEFAULT 0,
    session_expiration REAL,
    retry_extend INTEGER NOT NULL DEFAULT 1,
    job_id TEXT,
    created REAL NOT NULL,
    last_updated REAL NOT NULL,
    ended REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    status TEXT NOT NULL,
    correlation_id TEXT,
    owner_id TEXT NOT NULL,
    start_time REAL NOT NULL,
    end_time REAL,
    last_updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY,
    name TEXT UNIQUE NOT NULL,
    description TEXT NOT NULL,
    comment TEXT NOT NULL,
    cluster_id TEXT NOT NULL,
    template_id TEXT NOT NULL,
    memory INTEGER NOT NULL,
    memory_guaranteed INTEGER NOT NULL,
    memory_max INTEGER NOT NULL,
    sockets INTEGER NOT NULL,
    cores INTEGER NOT NULL,
    threads INTEGER NOT NULL,
    os_type TEXT NOT NULL,
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    host_id TEXT,
    start_time REAL,
    stop_time REAL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS disk_attachments (
    disk_id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    interface TEXT NOT NULL,
    bootable INTEGER NOT NULL,
    active INTEGER NOT NULL,
    read_only INTEGER NOT NULL,
    pass_discard INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    number INTEGER NOT NULL,
    type TEXT NOT NULL,
    description TEXT NOT NULL,
    status TEXT NOT NULL,
    progress INTEGER,
    start_time REAL NOT NULL,
    end_time REAL
);
CREATE TABLE IF NOT EXISTS tokens (
    token TEXT PRIMARY KEY,
    username TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    state TEXT NOT NULL
);
"""

# (table, column, type) added after the first schema.
ADDED_COLUMNS = (("disks", "external_disk", "TEXT"),)


class Database:
    def __init__(self, path: str):
        self.path = path
        self.lock = threading.RLock()
        self._depth = 0
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        with self.lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(SCHEMA)
            self._add_missing_columns()
            if self.get_meta("schema") is None:
                self.set_meta("schema", SCHEMA_VERSION)

    def _add_missing_columns(self) -> None:
        # Databases of earlier labs lack columns added since.
        for table, column, kind in ADDED_COLUMNS:
            names = [row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")]
            if column not in names:
                self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        with self.lock:
            self._conn.close()

    @contextlib.contextmanager
    def transaction(self):
        """All statements inside commit together; nesting joins the outer transaction."""
        with self.lock:
            outer = self._depth == 0
            if outer:
                self._conn.execute("BEGIN IMMEDIATE")
            self._depth += 1
            try:
                yield self
            except BaseException:
                self._depth -= 1
                if outer:
                    self._conn.execute("ROLLBACK")
                raise
            self._depth -= 1
            if outer:
                self._conn.execute("COMMIT")

    def all(self, sql: str, args=()) -> list[dict]:
        with self.lock:
            return [dict(row) for row in self._conn.execute(sql, args)]

    def one(self, sql: str, args=()) -> dict | None:
        with self.lock:
            row = self._conn.execute(sql, args).fetchone()
        return None if row is None else dict(row)

    def run(self, sql: str, args=()) -> int:
        with self.lock:
            return self._conn.execute(sql, args).rowcount

    def insert(self, table: str, row: dict) -> None:
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.run(f"INSERT INTO {table} ({names}) VALUES ({marks})", tuple(row.values()))

    def update(self, table: str, entity_id: str, **fields) -> int:
        assignments = ", ".join(f"{name} = ?" for name in fields)
        return self.run(
            f"UPDATE {table} SET {assignments} WHERE id = ?", (*fields.values(), entity_id)
        )

    def delete(self, table: str, entity_id: str) -> int:
        return self.run(f"DELETE FROM {table} WHERE id = ?", (entity_id,))

    def get(self, table: str, entity_id: str) -> dict | None:
        return self.one(f"SELECT * FROM {table} WHERE id = ?", (entity_id,))

    def get_meta(self, key: str) -> str | None:
        row = self.one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else row["value"]

    def set_meta(self, key: str, value: str) -> None:
        self.run("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def record(self, kind: str, entity_id: str, state: str) -> None:
        """Remember a state change (disk status, transfer phase, job status) for the lab hooks."""
        self.run(
            "INSERT INTO history (time, kind, entity_id, state) VALUES (?, ?, ?, ?)",
            (time.time(), kind, entity_id, state),
        )

    def history(self, entity_id: str | None = None, since: int = 0) -> list[dict]:
        if entity_id is None:
            return self.all("SELECT * FROM history WHERE seq > ? ORDER BY seq", (since,))
        return self.all(
            "SELECT * FROM history WHERE entity_id = ? AND seq > ? ORDER BY seq",
            (entity_id, since),
        )
