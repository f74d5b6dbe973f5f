"""``musubi export`` and ``musubi import``: a store's recordings as JSON lines, and back.

    $ musubi export > calls.jsonl                  # every recording that can replay
    $ musubi export --run 3fa9c1 > run.jsonl       # the nodes one run's calls reached
    $ musubi export --since 1d --namespace exp-2
    $ musubi --db fresh.db import calls.jsonl      # into a new (or an existing) store

See :mod:`musubi_core.cassette` for the format (one node per line, stable order, no secrets).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator

from ._cli import EXIT_OK, AddCommand, db_path, emit, open_engine, since
from .cassette import export_lines, import_lines
from .engine import Engine
from .store import is_postgres_target, open_store

__all__ = ["add_commands"]


def add_commands(add: AddCommand) -> None:
    """Register ``export`` and ``import``."""
    export = add(
        "export",
        cmd_export,
        "write the recordings that can replay as JSON lines (one node per line, stable order)",
    )
    export.add_argument("--run", metavar="RUN", help="only the nodes this run's calls reached")
    export.add_argument(
        "--since", type=since, metavar="AGE", help="only nodes recorded within, e.g. 1d, 12h"
    )
    export.add_argument("--namespace", help="only this namespace's nodes")
    export.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE instead of standard output"
    )
    imp = add(
        "import",
        cmd_import,
        "load an export into the store (created if missing); its recordings replay as they did",
    )
    imp.add_argument("file", metavar="FILE", help="a file written by `musubi export` (- for stdin)")


def cmd_export(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        run = engine.store.resolve_run(args.run) if args.run else None
        lines = export_lines(engine.store, run=run, since=args.since, namespace=args.namespace)
        if args.output:
            count = _write(args.output, lines)
            print(f"exported {count} recording(s) to {args.output}", file=sys.stderr)
        else:
            for line in lines:
                sys.stdout.write(line + "\n")
    return EXIT_OK


def _write(path: str, lines: Iterator[str]) -> int:
    """Write atomically: a reader never sees half an export."""
    partial = f"{path}.partial"
    count = 0
    with open(partial, "w", encoding="utf-8", newline="\n") as out:
        for line in lines:
            out.write(line + "\n")
            count += 1
    os.replace(partial, path)
    return count


def cmd_import(args: argparse.Namespace) -> int:
    path = db_path(args)
    if args.file == "-":
        lines = sys.stdin.read().splitlines()
    else:
        with open(args.file, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    if not is_postgres_target(path):
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
    with Engine(open_store(path)) as engine:
        report = import_lines(engine.store, lines)
    emit(
        args,
        {"store": path, "imported": report.imported, "replaced": report.replaced,
         "unchanged": report.unchanged},
        f"imported {report.imported} new recording(s) into {path} ({report.replaced} replaced, "
        f"{report.unchanged} already there)",
    )
    return EXIT_OK
