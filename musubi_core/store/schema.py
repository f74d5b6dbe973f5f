"""The schema, its version, the migrations from older versions, and the checks made before
any DDL runs.

Version 2 separates the record of what happened from the reusable memo: ``musubi_nodes`` stay
the memo (identity, replay policy, invalidation) and ``musubi_calls`` hold one row per execution
and per replay of anything, grouped into ``musubi_runs`` (a trace, a durable run, a ``@step``
tree), with ``musubi_flows`` linking the calls whose output fed another call.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from ..errors import SchemaError

SCHEMA_VERSION = 2
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

-- One trace: a root LangChain run, a LlamaIndex root span or workflow run, a durable run, a
-- top-level @step call tree, or a block the user named. Its counts are kept on the row (written
-- when the run ends), so listing runs never scans calls. A rowid table: run ids are random
-- (people type their prefixes), and a clustered table of these wide rows keyed by them took
-- every new run's row into a random leaf (8.4 us of the writer per top-level @step replay,
-- against 5.1 us for an append plus the narrow unique index). Files made before keep their
-- WITHOUT ROWID table: the columns and constraints are the same.
CREATE TABLE IF NOT EXISTS musubi_runs (
    run_id        TEXT NOT NULL UNIQUE,
    name          TEXT,
    kind          TEXT NOT NULL DEFAULT 'durable',
    status        TEXT NOT NULL,
    created_at    REAL NOT NULL,
    started_at    REAL,
    finished_at   REAL,
    host          TEXT,
    pid           INTEGER,
    error         TEXT,
    node_id       TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    namespace     TEXT NOT NULL DEFAULT 'default',
    root_call_id  TEXT,
    duration_s    REAL,
    calls         INTEGER NOT NULL DEFAULT 0,
    replays       INTEGER NOT NULL DEFAULT 0,
    tokens_in     INTEGER NOT NULL DEFAULT 0,
    tokens_out    INTEGER NOT NULL DEFAULT 0,
    tokens_saved  INTEGER NOT NULL DEFAULT 0,
    seconds_saved REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS musubi_runs_started ON musubi_runs (started_at);

-- The record of what happened: one row per execution and per replay of anything (a chain, a
-- span, a model call, a tool, a step). node_id is set for kinds that replay (the memo the call
-- reached); artifact_id is what it produced or was served (kept for model, retriever, tool and
-- step calls; other kinds keep only the previews). A rowid table: rows carry previews (too big
-- for WITHOUT ROWID to pay off), and every row is an append. Call ids begin with a per-process
-- token and count up, so their unique index appends too.
CREATE TABLE IF NOT EXISTS musubi_calls (
    call_id        TEXT NOT NULL UNIQUE,
    run_id         TEXT NOT NULL,
    parent_call_id TEXT,
    seq            INTEGER NOT NULL,
    kind           TEXT NOT NULL,
    op_name        TEXT NOT NULL,
    node_id        TEXT,
    artifact_id    TEXT,
    replayed       INTEGER NOT NULL DEFAULT 0,
    status         TEXT NOT NULL,
    error          TEXT,
    started_at     REAL NOT NULL,
    duration_s     REAL,
    tokens_in      INTEGER,
    tokens_out     INTEGER,
    saved_s        REAL,
    model          TEXT,
    input_preview  TEXT,
    output_preview TEXT,
    namespace      TEXT NOT NULL DEFAULT 'default'
);
-- `musubi steps RUN`: a run's calls in order; `musubi show NODE`: a node's calls.
CREATE INDEX IF NOT EXISTS musubi_calls_run ON musubi_calls (run_id, seq);
-- Keyed by the node id's first 12 hex digits (48 bits; the reader compares the whole id): a
-- random 64-character key made every call's insert cost 6 us more than this one does.
CREATE INDEX IF NOT EXISTS musubi_calls_node ON musubi_calls (substr(node_id, 1, 12));

-- Data flow between calls: the output of src (its artifact, when kept) fed dst. Node-level
-- data edges (identity, invalidation) are derived from these by the recorders.
CREATE TABLE IF NOT EXISTS musubi_flows (
    dst_call_id TEXT NOT NULL,
    src_call_id TEXT NOT NULL,
    artifact_id TEXT,
    PRIMARY KEY (dst_call_id, src_call_id)
) WITHOUT ROWID;
-- Walking downstream from a call.
CREATE INDEX IF NOT EXISTS musubi_flows_src ON musubi_flows (src_call_id);

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

-- Replay counts, beside the nodes: counting a replay upserts this narrow row (about 1 us of
-- the writer's time in a batch) instead of rewriting the node's row (5 us, and up to 90 us
-- for a long prompt: a node row carries its call's material). A node's count is its row's
-- replay_count (what was counted before this table existed) plus replays here; its last use
-- is last_at here, else its row's last_replayed_at.
-- Aliases: a digest of an adapter's raw request (LangChain's prompt and llm_string strings,
-- with the namespace and the adapter's key scheme) -> the node its canonical key reaches.
-- Written with the node; a hit in a new process probes this instead of parsing the request
-- and hashing it canonically. It is derived data, like an index: the mapping is a pure
-- function of the request, so it never goes wrong when nodes change (a missing node is a
-- miss), and a file without it (made by an older musubi) works without it.
CREATE TABLE IF NOT EXISTS musubi_replays (
    node_id TEXT PRIMARY KEY,
    replays INTEGER NOT NULL,
    last_at REAL NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS musubi_aliases (
    alias   BLOB PRIMARY KEY,
    node_id TEXT NOT NULL
) WITHOUT ROWID;
"""

EXPECTED_TABLES = frozenset(
    {
        "musubi_meta",
        "musubi_nodes",
        "musubi_artifacts",
        "musubi_edges",
        "musubi_runs",
        "musubi_run_steps",
        "musubi_calls",
        "musubi_flows",
        "musubi_aliases",
        "musubi_replays",
    }
)
# Tables a file of the current version may lack (it was made before they existed): the store
# opens it, and when it may write, creates them; a read-only store works without them.
OPTIONAL_TABLES = frozenset({"musubi_aliases", "musubi_replays"})

# Statements that bring a file of version N to N + 1, run (in one transaction, before the DDL
# above, which then adds the new tables and indexes) by every store when it opens an older file.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        # The runs table gains the columns of a trace; version 1 held durable runs only.
        "ALTER TABLE musubi_runs ADD COLUMN namespace TEXT NOT NULL DEFAULT 'default'",
        "ALTER TABLE musubi_runs ADD COLUMN root_call_id TEXT",
        "ALTER TABLE musubi_runs ADD COLUMN duration_s REAL",
        "ALTER TABLE musubi_runs ADD COLUMN calls INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE musubi_runs ADD COLUMN replays INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE musubi_runs ADD COLUMN tokens_in INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE musubi_runs ADD COLUMN tokens_out INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE musubi_runs ADD COLUMN tokens_saved INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE musubi_runs ADD COLUMN seconds_saved REAL NOT NULL DEFAULT 0",
        "UPDATE musubi_runs SET kind = 'durable' WHERE kind = 'workflow'",
        "UPDATE musubi_runs SET duration_s = finished_at - started_at "
        "WHERE finished_at IS NOT NULL AND started_at IS NOT NULL",
    ],
}


def migration_statements(found: int) -> list[str]:
    """What brings a file of schema ``found`` to the current version (empty when current)."""
    statements: list[str] = []
    for version in range(max(found, 1), SCHEMA_VERSION):
        statements.extend(MIGRATIONS[version])
    return statements


def existing_tables(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {row[0] for row in rows}


def stored_version(conn: Any, tables: set[str]) -> int:
    """The schema version a (checked) store file holds; 0 for a new file."""
    if "musubi_meta" not in tables:
        return 0
    row = conn.execute("SELECT value FROM musubi_meta WHERE key = 'schema_version'").fetchone()
    try:
        return int(row[0]) if row is not None else 0
    except ValueError:
        return 0


def check_version(conn: Any, path: str, tables: set[str]) -> bool:
    """Decide whether the file is ours, and current, before running any DDL.

    Returns True when the schema is complete and current (no DDL needed); False when it needs
    creating or migrating (see :func:`stored_version` and :func:`migration_statements`).
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


def shadow_tables(missing: set[str] | frozenset[str]) -> list[str]:
    """``CREATE TEMP TABLE`` statements for the optional tables a read-only file lacks: empty
    tables of this connection that every query can name (a read-only connection may still
    create temporary tables)."""
    statements = []
    for statement in DDL.split(";\n"):
        for name in sorted(missing):
            start = statement.find(f"CREATE TABLE IF NOT EXISTS {name} (")
            if start >= 0:  # (after the statement's comment lines)
                create = statement[start:].strip()
                statements.append(create.replace("CREATE TABLE", "CREATE TEMP TABLE", 1))
    return statements


def readable_as_is(conn: Any, tables: set[str]) -> bool:
    """Can a store that may not write use this file as it is? It is of the current version
    and lacks only :data:`OPTIONAL_TABLES`."""
    missing = EXPECTED_TABLES - tables
    return stored_version(conn, tables) == SCHEMA_VERSION and missing <= OPTIONAL_TABLES
