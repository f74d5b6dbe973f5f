"""The SQLite schema, its version, and the checks made before any DDL runs."""

from __future__ import annotations

import sqlite3

from ..errors import SchemaError

SCHEMA_VERSION = 1
APP_ID = "musubi"

# Table names carry a prefix so a musubi store is recognisable at a glance
# (and a foreign database is recognised as such). A store is a file of its
# own: check_version() refuses a database that holds other tables.
DDL = """
CREATE TABLE IF NOT EXISTS musubi_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- Lineage nodes. WITHOUT ROWID: the 64-hex node id is the clustered key, so a
-- lookup is one B-tree probe instead of index probe + rowid fetch.
CREATE TABLE IF NOT EXISTS musubi_nodes (
    node_id          TEXT PRIMARY KEY,
    op               TEXT NOT NULL,
    op_name          TEXT NOT NULL,
    kind             TEXT NOT NULL,
    step_type        TEXT NOT NULL,
    input_hash       TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'done', 'failed', 'stale')),
    artifact_id      TEXT,
    namespace        TEXT NOT NULL DEFAULT 'default',
    created_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    expires_at       REAL,
    duration_s       REAL,
    tokens_in        INTEGER,
    tokens_out       INTEGER,
    replay_count     INTEGER NOT NULL DEFAULT 0,
    exec_count       INTEGER NOT NULL DEFAULT 0,
    last_replayed_at REAL,
    error            TEXT,
    owner            TEXT,
    label            TEXT,
    run_id           TEXT,
    stale_cause      TEXT,
    meta             TEXT
) WITHOUT ROWID;

-- explain(): "same operation and inputs, other code/upstream" is one probe.
CREATE INDEX IF NOT EXISTS musubi_nodes_op_input ON musubi_nodes (op_name, input_hash);
CREATE INDEX IF NOT EXISTS musubi_nodes_created ON musubi_nodes (created_at);
CREATE INDEX IF NOT EXISTS musubi_nodes_run ON musubi_nodes (run_id) WHERE run_id IS NOT NULL;

-- Content-addressed outputs. A rowid table: payloads can be large, and
-- WITHOUT ROWID suits small rows only.
CREATE TABLE IF NOT EXISTS musubi_artifacts (
    artifact_id      TEXT PRIMARY KEY,
    encoding         TEXT NOT NULL,
    payload          BLOB NOT NULL,
    size             INTEGER NOT NULL,
    producer_node_id TEXT,
    created_at       REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS musubi_edges (
    parent             TEXT NOT NULL,
    child              TEXT NOT NULL,
    kind               TEXT NOT NULL CHECK (kind IN ('data', 'contains')),
    parent_artifact_id TEXT,
    PRIMARY KEY (parent, kind, child)
) WITHOUT ROWID;
-- Walking upstream (lineage, early cutoff) needs the reverse direction.
CREATE INDEX IF NOT EXISTS musubi_edges_child ON musubi_edges (child, kind);

CREATE TABLE IF NOT EXISTS musubi_runs (
    run_id      TEXT PRIMARY KEY,
    name        TEXT,
    kind        TEXT NOT NULL DEFAULT 'workflow',
    status      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    host        TEXT,
    pid         INTEGER,
    error       TEXT,
    node_id     TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS musubi_run_steps (
    run_id      TEXT NOT NULL,
    name        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    status      TEXT NOT NULL,
    fingerprint TEXT,
    artifact_id TEXT,
    node_id     TEXT,
    error       TEXT,
    started_at  REAL,
    finished_at REAL,
    wake_at     REAL,
    -- How many times the step body was started (> 1 after a crash or failure).
    attempts    INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, name)
) WITHOUT ROWID;
-- `musubi steps RUN` and rerun_from walk a run's steps in body order.
CREATE INDEX IF NOT EXISTS musubi_run_steps_seq ON musubi_run_steps (run_id, seq);
"""

EXPECTED_TABLES = frozenset(
    {
        "musubi_meta",
        "musubi_nodes",
        "musubi_artifacts",
        "musubi_edges",
        "musubi_runs",
        "musubi_run_steps",
    }
)


def existing_tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {row[0] for row in rows}


def check_version(conn: sqlite3.Connection, path: str, tables: set[str]) -> bool:
    """Decide whether the file is ours, and current, before running any DDL.

    Returns True when the schema is complete and current (no DDL needed).
    Raises :class:`SchemaError` for a newer musubi file or a foreign database.
    """
    if "musubi_meta" not in tables:
        if tables - EXPECTED_TABLES:
            raise SchemaError(
                f"{path} is a SQLite database that musubi did not create "
                f"(it has tables {sorted(tables)[:5]}); point musubi at a new file "
                "(MUSUBI_DB or --db) instead of an application's database",
                path=path,
                expected=f"musubi schema {SCHEMA_VERSION}",
                found="foreign database",
            )
        return False
    rows = dict(conn.execute("SELECT key, value FROM musubi_meta").fetchall())
    if rows.get("app", APP_ID) != APP_ID:
        raise SchemaError(
            f"{path} belongs to {rows.get('app')!r}, not musubi", path=path, found=rows.get("app")
        )
    found = rows.get("schema_version")
    try:
        version = int(found) if found is not None else 0
    except ValueError:
        version = -1
    if version > SCHEMA_VERSION:
        raise SchemaError(
            f"{path} was written by a newer musubi (schema {found}; this version reads "
            f"{SCHEMA_VERSION}); upgrade with `pip install -U musubi-lineage`",
            path=path,
            expected=str(SCHEMA_VERSION),
            found=str(found),
        )
    if version < 0:
        raise SchemaError(
            f"{path} has an unreadable schema version {found!r}; restore it from a backup "
            "or start a new store",
            path=path,
            expected=str(SCHEMA_VERSION),
            found=str(found),
        )
    return version == SCHEMA_VERSION and tables >= EXPECTED_TABLES
