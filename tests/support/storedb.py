"""Reading and editing a store the way another tool would, on either backend: the SQLite file
through a second ``sqlite3`` connection, or a PostgreSQL database (schema ``musubi``) through
its own ``psycopg`` connection. Statements use ``?`` placeholders on both."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# A node's replay count in SQL over ``musubi_nodes``: its row's replay_count (counted before
# the counter table existed) plus its row in musubi_replays.
REPLAYS = (
    "(replay_count + COALESCE((SELECT r.replays FROM musubi_replays r "
    "WHERE r.node_id = musubi_nodes.node_id), 0))"
)


def is_postgres(db: str | Path) -> bool:
    return str(db).startswith(("postgresql://", "postgres://"))


def _select(db: str | Path, sql: str, params: Sequence[Any]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The column names and the rows ``sql`` selects."""
    if is_postgres(db):
        import psycopg

        with psycopg.connect(str(db)) as pg:
            pg.execute("SET search_path TO musubi")
            cur = pg.execute(sql.replace("?", "%s"), params)
            found = [tuple(r) for r in cur.fetchall()]
            return [c.name for c in cur.description or ()], found
    con = sqlite3.connect(db)
    try:
        cur = con.execute(sql, params)
        found = [tuple(r) for r in cur.fetchall()]
        return [c[0] for c in cur.description or ()], found
    finally:
        con.close()


def rows(db: str | Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """The rows ``sql`` selects, as tuples."""
    return _select(db, sql, params)[1]


def scalar(db: str | Path, sql: str, params: Sequence[Any] = ()) -> int:
    """The one integer ``sql`` selects (a count, a sum)."""
    return int(rows(db, sql, params)[0][0])


def dict_rows(db: str | Path, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """The rows ``sql`` selects, as dicts by column name."""
    columns, found = _select(db, sql, params)
    return [dict(zip(columns, r, strict=True)) for r in found]


def execute(db: str | Path, sql: str, params: Sequence[Any] = ()) -> int:
    """Run one statement and commit it; returns the rows it changed."""
    if is_postgres(db):
        import psycopg

        with psycopg.connect(str(db)) as pg:
            pg.execute("SET search_path TO musubi")
            return pg.execute(sql.replace("?", "%s"), params).rowcount
    con = sqlite3.connect(db)
    try:
        cur = con.execute(sql, params)
        con.commit()
        return cur.rowcount
    finally:
        con.close()


def sqlite_only(db: str | Path, why: str) -> None:
    """Skip a test of something only a SQLite file has (PostgreSQL's analogue, a server that
    goes away, is tests/postgres/test_postgres_resilience.py's)."""
    if is_postgres(db):
        import pytest

        pytest.skip(f"SQLite only: {why}")
