"""The ``musubi`` command: list, inspect, explain and invalidate what a store holds.

Exit codes: 0 ok, 1 error, 2 usage or schema problem, 75 run locked.

    musubi [--db PATH|URL] stats [--cost] [--prices FILE] | runs [--kind K] [--since 1h] [--status S]
           | steps RUN | nodes [--kind] [--op] [--status] [--since] [--run RUN]
           | show REF | lineage REF [--up|--down] [--depth N] [--format text|dot|mermaid|json]
           | explain REF | invalidate NODE | check
           | gc [--older-than 30d] [--records-older-than 90d] [--max-size 500MB] [--dry-run]
             [--vacuum]
           | backup DEST [--force] | demo | run module:function
           | view [--run RUN] [--out FILE.html] [--serve [--port N]] [--prices FILE]
           | export [--run RUN] [--since 1d] [--namespace N] [-o FILE] | import FILE

REF is a node id or a call id, or a unique prefix of one. Every read command takes ``--json``.
The commands live by concern: runs and calls in :mod:`musubi_core.cli_runs`, nodes and lineage
in :mod:`musubi_core.cli_lineage`; this module holds the store-wide ones and the parser.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from . import __version__, _check, _render, cli_export, cli_lineage, cli_runs, cli_view
from ._cli import EXIT_ERROR, EXIT_LOCKED, EXIT_OK, EXIT_USAGE, Handler, default_db, emit
from ._cli import open_engine as _open
from ._duration import age_seconds
from ._size import format_size, parse_size
from .cli_view import add_prices_argument
from .errors import ConfigError, LockedError, MusubiError, SchemaError, StoreError
from .prices import load_prices
from .store import SQLiteStore, is_postgres_target, resolve_target
from .usage import cost_lines, summarize

__all__ = ["build_parser", "main", "parse_age", "parse_max_size"]


def parse_age(text: str) -> float:
    """``"30d"`` -> seconds; units ms, s, min, h, d, w (a bare ``m`` is refused)."""
    try:
        return age_seconds(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _percent(rate: float | None) -> str:
    return "-" if rate is None else f"{100.0 * rate:.1f}%"


def parse_max_size(text: str) -> int:
    """``"500MB"`` -> bytes; units B, KB, MB, GB (decimal)."""
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def cmd_stats(args: argparse.Namespace) -> int:
    prices = load_prices(args.prices) if args.cost else None  # a bad table fails first
    with _open(args) as engine:
        stats = engine.store.stats()
        if prices is not None:
            stats["cost"] = summarize(engine.store.call_usage(), prices)
    by_run_kind: dict[str, dict[str, Any]] = stats["runs_by_kind"]
    rows = [
        (kind, k["nodes"], k["executions"], k["replays"],
         _percent(k["replay_rate"]) if k["replayable"] else "recorded only",
         k["tokens_saved"], f"{k['seconds_saved']:.2f}")
        for kind, k in stats["by_kind"].items()
    ]
    rows.append(("total", stats["nodes"], stats["executions"], stats["replays"],
                 _percent(stats["replay_rate"]), stats["tokens_saved"],
                 f"{stats['seconds_saved']:.2f}"))
    lines = [
        f"store: {stats['path']}",
        _render.table(
            ("kind", "nodes", "executed", "replayed", "replay rate", "tokens saved",
             "seconds saved"),
            rows,
        ),
        "",
        f"replay rate: {_percent(stats['replay_rate'])} of the calls that could replay "
        "(kinds recorded only, such as chains, spans, retrievers, tools and durable runs' own "
        "nodes, run every time and are not counted)",
        f"artifacts: {stats['artifacts']} ({format_size(stats['artifact_bytes'])})   "
        f"runs: {stats['runs']}   "
        f"statuses: {', '.join(f'{k}={v}' for k, v in sorted(stats['statuses'].items())) or '-'}",
    ]
    size = stats.get("size")
    if size:
        line = (f"size: {format_size(size['used_bytes'])} in use, "
                f"{format_size(size['free_bytes'])} free inside the file")
        if size["file_bytes"] is not None:
            line += f", {format_size(size['file_bytes'])} on disk (with the -wal)"
        if size["size_limit"] is not None:
            line += f"; limit {format_size(size['size_limit'])}"
        lines.append(line)
    if by_run_kind:
        lines += ["", _render.table(
            ("run kind", "runs", "calls", "replayed calls", "tokens saved", "seconds saved"),
            [(kind, k["runs"], k["calls"], k["replays"], k["tokens_saved"],
              f"{k['seconds_saved']:.2f}") for kind, k in by_run_kind.items()],
        )]
    if "cost" in stats:
        lines += ["", *cost_lines(stats["cost"], _render.table)]
    emit(args, stats, "\n".join(lines))
    return EXIT_OK


def cmd_invalidate(args: argparse.Namespace) -> int:
    with _open(args) as engine:
        node_id = engine.store.resolve(args.node)
        changed = engine.invalidate(node_id)
    emit(
        args,
        {"node_id": node_id, "invalidated": changed},
        f"invalidated {changed} node(s) (node {_render.short(node_id)} and its data descendants); "
        "the next run recomputes them",
    )
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    with _open(args) as engine:
        report = engine.store.gc(
            older_than=args.older_than,
            records_older_than=args.records_older_than,
            max_bytes=args.max_size,
            dry_run=args.dry_run,
            ids=args.dry_run and args.json,
            vacuum=args.vacuum,
            now=time.time(),
        )
        size = engine.store.stats().get("size") if not args.json else None
    verb = "would remove" if args.dry_run else "removed"
    evicted = f" ({report['evicted']} evicted to fit --max-size)" if report["evicted"] else ""
    lines = [
        f"{verb} {report['nodes']} node(s){evicted}, {report['artifacts']} artifact(s), "
        f"{report['runs']} run(s), {report['calls']} call(s) and {report['flows']} flow(s)"
        + (" (dry run: nothing was removed)" if args.dry_run else "")
    ]
    before, after = report["bytes_before"], report["bytes_after"]
    if before is not None and after is not None:
        line = f"in use: {format_size(before)} -> {format_size(after)}"
        if report["file_bytes_before"] is not None:
            line += f"; on disk: {format_size(report['file_bytes_before'])}"
            if report["file_bytes_after"] is not None:
                line += f" -> {format_size(report['file_bytes_after'])}"
        lines.append(line)
    if report.get("vacuumed"):
        lines.append("vacuumed: the file was rewritten without its free space")
    elif size and not size["incremental_vacuum"] and size["free_bytes"] and not args.dry_run:
        lines.append(
            f"{format_size(size['free_bytes'])} are free inside the file (SQLite reuses them); "
            "`musubi gc --vacuum` hands them back to the file system"
        )
    code = EXIT_OK
    if report["over_limit"]:
        kept = report.get("kept", {})
        held = ", ".join(
            f"{kept[key]} {what}"
            for key, what in (
                ("unfinished_durable_runs", "unfinished durable run(s) with their steps"),
                ("running_runs", "run(s) still running"),
                ("external_effects", "external effect record(s)"),
                ("pending_nodes", "pending node(s)"),
            )
            if kept.get(key)
        )
        lines.append(
            f"still over --max-size {format_size(args.max_size)}: nothing more can be evicted "
            f"(left: {held + ' and ' if held else ''}the tables' own pages); finish or re-run "
            "unfinished durable runs, or choose a larger size"
        )
        code = EXIT_ERROR
    emit(args, report, "\n".join(lines))
    return code


def cmd_check(args: argparse.Namespace) -> int:
    path = resolve_target(args.db)
    on_disk = not is_postgres_target(path) and os.path.isfile(path)
    # A damaged file may not even open as a store: then the file itself is examined.
    damage = _check.damage(path) if on_disk else []
    if not damage:
        try:
            with _open(args) as engine:
                problems = engine.store.check()
        except (StoreError, SchemaError):
            damage = _check.damage(path, deep=True) if on_disk else []
            if not damage:
                raise
    if damage:
        advice = _check.ADVICE.format(path=shlex.quote(path))
        emit(
            args,
            {"ok": False, "damaged": True, "path": path, "problems": damage, "advice": advice},
            "\n".join([f"{path} is damaged:", *(f"problem: {p}" for p in damage),
                       f"what to do: {advice}"]),
        )
        return EXIT_ERROR
    emit(
        args,
        {"ok": not problems, "problems": problems},
        "ok" if not problems else "\n".join(f"problem: {p}" for p in problems),
    )
    return EXIT_OK if not problems else EXIT_ERROR


def cmd_backup(args: argparse.Namespace) -> int:
    if is_postgres_target(args.db):
        raise MusubiError(
            "musubi backup copies a SQLite store; back up a PostgreSQL store with pg_dump, e.g. "
            "`pg_dump --schema=musubi --format=custom DBNAME > musubi.dump` "
            "(restore it with pg_restore)"
        )
    with _open(args) as engine:
        store = engine.store
        assert isinstance(store, SQLiteStore)
        done = store.backup(args.dest, force=args.force)
    emit(
        args,
        done,
        f"backed up {store.path} to {done['path']} ({done['nodes']} nodes, {done['bytes']} bytes)",
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    if args.db_given or os.environ.get("MUSUBI_DB"):
        path = resolve_target(args.db)
        if is_postgres_target(path):
            raise ConfigError("musubi demo writes a SQLite file: pass --db demo.db", target=path)
        return run_demo(path, sys.stdout)
    with tempfile.TemporaryDirectory(prefix="musubi-demo-") as folder:
        return run_demo(os.path.join(folder, "demo.db"), sys.stdout, kept=False)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--db",
        default=argparse.SUPPRESS,
        help="store file, sqlite:/// URL or PostgreSQL URL (default: $MUSUBI_DB or "
        ".musubi/musubi.db)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )

    parser = argparse.ArgumentParser(
        prog="musubi",
        description="List, inspect, explain and invalidate what a musubi store holds.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"musubi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        command.set_defaults(handler=handler)
        return command

    stats = add("stats", cmd_stats,
                "replays, executions and what replay saved (calls, tokens, seconds)")
    stats.add_argument("--cost", action="store_true",
                       help="also what was spent and what replay saved, in money, per model")
    add_prices_argument(stats)
    cli_runs.add_commands(add)
    cli_lineage.add_commands(add)
    cli_view.add_commands(add)
    cli_export.add_commands(add)
    add("invalidate", cmd_invalidate, "mark a node and its data descendants stale").add_argument(
        "node", help="node id or unique prefix"
    )
    gc = add(
        "gc",
        cmd_gc,
        "remove old or least recently used entries, old runs and unreferenced artifacts",
    )
    gc.add_argument(
        "--older-than",
        type=parse_age,
        default=None,
        metavar="AGE",
        help="remove entries unused for AGE and runs that ended AGE ago, e.g. 30d, 12h, "
        "45min, 90s, 500ms (default: unreferenced artifacts only)",
    )
    gc.add_argument(
        "--records-older-than",
        type=parse_age,
        default=None,
        metavar="AGE",
        help="keep the record of runs and calls for AGE instead (e.g. --older-than 7d "
        "--records-older-than 90d)",
    )
    gc.add_argument(
        "--max-size",
        type=parse_max_size,
        default=None,
        metavar="SIZE",
        help="evict the least recently used entries until the store takes at most SIZE, "
        "e.g. 500MB, 2GB (decimal: 1 MB = 1,000,000 bytes; SQLite stores)",
    )
    gc.add_argument(
        "--dry-run",
        action="store_true",
        help="remove nothing; say what would be removed (with --json, the ids)",
    )
    gc.add_argument(
        "--vacuum",
        action="store_true",
        help="then rewrite the file without its free space (SQLite VACUUM: needs free disk "
        "space the size of the store, and blocks writers while it runs)",
    )
    add("check", cmd_check, "integrity check of the store file")
    backup = add(
        "backup",
        cmd_backup,
        "copy the store to a new file, safely while other processes write to it",
    )
    backup.add_argument("dest", metavar="DEST", help="the new file (must not exist)")
    backup.add_argument("--force", action="store_true", help="replace DEST if it exists")
    add("demo", cmd_demo, "run an offline pipeline twice and watch the second run replay")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.db_given = hasattr(args, "db")
    if not args.db_given:
        args.db = default_db()
    if not hasattr(args, "json"):
        args.json = False
    handler: Handler = args.handler
    try:
        code = handler(args)
        sys.stdout.flush()  # a closed pipe fails here, inside the try
        return code
    except BrokenPipeError:
        # The reader went away (`musubi demo | head -1`): stop quietly, the way
        # https://docs.python.org/3/library/signal.html#note-on-sigpipe shows.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except LockedError as err:
        print(f"musubi: {err}", file=sys.stderr)
        return EXIT_LOCKED
    except (SchemaError, ConfigError) as err:
        print(f"musubi: {err}", file=sys.stderr)
        return EXIT_USAGE
    except MusubiError as err:
        print(f"musubi: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
