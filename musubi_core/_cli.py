"""What the ``musubi`` command's modules share: exit codes, opening the store, printing, and
the argument types."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from ._duration import to_seconds
from .engine import DEFAULT_PATH, Engine
from .errors import MusubiError
from .store import SQLiteStore, is_postgres_target, open_store, resolve_target

__all__ = [
    "EXIT_ERROR",
    "EXIT_LOCKED",
    "EXIT_OK",
    "EXIT_USAGE",
    "AddCommand",
    "Handler",
    "default_db",
    "emit",
    "open_engine",
    "since",
]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 75

Handler = Callable[[argparse.Namespace], int]


class AddCommand(Protocol):
    """Registers a subcommand (with the common ``--db``/``--json`` options) and returns its
    parser."""

    def __call__(self, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser: ...


def default_db() -> str:
    return os.environ.get("MUSUBI_DB") or DEFAULT_PATH


def db_path(args: argparse.Namespace) -> str:
    """The store the command names: a SQLite path (``sqlite:///`` URLs resolved) or a
    PostgreSQL URL; an unknown URL scheme or a directory is a ConfigError."""
    return resolve_target(str(getattr(args, "db", None) or default_db()))


def open_engine(args: argparse.Namespace) -> Engine:
    """An engine on the store the command names; a missing SQLite file is an error (reading
    commands must not create one)."""
    path = db_path(args)
    if is_postgres_target(path):
        return Engine(open_store(path))
    if args.command not in ("demo",) and not os.path.exists(path):
        raise MusubiError(
            f"no musubi store at {path}; pass --db PATH or set MUSUBI_DB "
            "(a store is created the first time a step runs)"
        )
    return Engine(SQLiteStore(path))


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def since(text: str) -> float:
    """``--since 90s|45m|12h|1d`` -> the epoch time that long ago."""
    try:
        seconds = to_seconds(text)
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return time.time() - seconds
