"""Stores: the :class:`Store` protocol, SQLite (default) and PostgreSQL."""

import os
import re

from ..errors import ConfigError
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
    UsageRow,
)
from .postgres import PostgresStore, _redact
from .schema import SCHEMA_VERSION
from .sqlite import SQLiteStore


def is_postgres_target(target: str) -> bool:
    """Does ``target`` (``--db`` / ``$MUSUBI_DB``) name a PostgreSQL database?"""
    return target.startswith(("postgresql://", "postgres://")) or (
        "host=" in target and "dbname=" in target
    )


_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://", re.IGNORECASE)
FORMS = (
    "a SQLite file path (.musubi/musubi.db), sqlite:///relative/path.db, "
    "sqlite:////absolute/path.db, or a PostgreSQL URL (postgresql://user@host/db) or "
    "DSN ('host=... dbname=...')"
)


def resolve_target(target: str) -> str:
    """What ``target`` (``--db`` / ``$MUSUBI_DB``) names: a PostgreSQL URL or DSN
    as given, else the SQLite path (``sqlite:///rel.db`` -> ``rel.db``,
    ``sqlite:////abs.db`` -> ``/abs.db``). An unknown URL scheme or a directory
    is a :class:`~musubi_core.errors.ConfigError`, before anything is created.

    >>> resolve_target("sqlite:////tmp/m.db"), resolve_target("sqlite:///m.db")
    ('/tmp/m.db', 'm.db')
    """
    if is_postgres_target(target):
        return target
    path = target
    scheme = _SCHEME.match(target)
    if scheme and scheme.group(1).lower() == "sqlite":
        path = target[scheme.end() :]
        if not path.startswith("/") or path == "/":
            raise ConfigError(
                f"{target!r} names no file: a SQLite URL has three slashes before a relative "
                "path (sqlite:///musubi.db) and four before an absolute one "
                "(sqlite:////var/musubi.db)",
                target=target,
            )
        path = path[1:]
    elif scheme and scheme.group(1).lower() != "file":  # file: is a SQLite URI
        shown = _redact(target)
        raise ConfigError(
            f"{shown!r}: musubi has no store for {scheme.group(1)!r} URLs; set --db or "
            f"MUSUBI_DB to {FORMS}",
            target=shown,
        )
    if os.path.isdir(path):
        raise ConfigError(
            f"{path} is a directory; a SQLite store is a file: pass a file path such as "
            f"{os.path.join(path, 'musubi.db')} with --db or MUSUBI_DB",
            target=target,
        )
    return path


def open_store(target: str) -> Store:
    """A store for a path (SQLite), a ``sqlite:///`` URL, or a PostgreSQL URL / DSN.

    >>> import tempfile, os
    >>> type(open_store(os.path.join(tempfile.mkdtemp(), "m.db"))).__name__
    'SQLiteStore'
    """
    path = resolve_target(target)
    if is_postgres_target(path):
        return PostgresStore(path)
    return SQLiteStore(path)

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
    "UsageRow",
    "is_postgres_target",
    "open_store",
    "resolve_target",
]
