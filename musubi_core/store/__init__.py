"""Stores: the :class:`Store` protocol, SQLite (default) and PostgreSQL."""

from .base import (
    ArtifactWrite,
    CallRecord,
    CallWrite,
    ClaimOutcome,
    EdgeRecord,
    EdgeWrite,
    FlowRecord,
    FlowWrite,
    NodeRecord,
    NodeWrite,
    ParentState,
    RunRecord,
    RunStepRecord,
    RunStepWrite,
    RunStore,
    RunWrite,
    Store,
)
from .postgres import PostgresStore
from .schema import SCHEMA_VERSION
from .sqlite import SQLiteStore


def is_postgres_target(target: str) -> bool:
    """Does ``target`` (``--db`` / ``$MUSUBI_DB``) name a PostgreSQL database?"""
    return target.startswith(("postgresql://", "postgres://")) or (
        "host=" in target and "dbname=" in target
    )


def open_store(target: str) -> Store:
    """A store for a path (SQLite) or a PostgreSQL URL / DSN.

    >>> import tempfile, os
    >>> type(open_store(os.path.join(tempfile.mkdtemp(), "m.db"))).__name__
    'SQLiteStore'
    """
    if is_postgres_target(target):
        return PostgresStore(target)
    return SQLiteStore(target)

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactWrite",
    "CallRecord",
    "CallWrite",
    "ClaimOutcome",
    "EdgeRecord",
    "EdgeWrite",
    "FlowRecord",
    "FlowWrite",
    "NodeRecord",
    "NodeWrite",
    "ParentState",
    "PostgresStore",
    "RunRecord",
    "RunStepRecord",
    "RunStepWrite",
    "RunStore",
    "RunWrite",
    "SQLiteStore",
    "Store",
    "is_postgres_target",
    "open_store",
]
