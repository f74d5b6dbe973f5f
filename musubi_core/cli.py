"""The ``musubi`` command: inspect, explain and invalidate what a store holds.

Exit codes: 0 ok, 1 error, 2 usage or schema problem, 75 run locked.

    musubi [--db PATH] stats | show NODE | lineage NODE [--format text|dot|mermaid|json]
           | explain NODE | invalidate NODE | gc [--older-than 30d] | check
           | backup DEST [--force] | demo | runs | steps RUN | run module:function
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from . import __version__, _check, _render
from ._duration import age_seconds
from .engine import DEFAULT_PATH, Engine
from .errors import ConfigError, LockedError, MusubiError, SchemaError, StoreError
from .store import SQLiteStore, is_postgres_target, open_store, resolve_target

__all__ = ["build_parser", "main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 75

def parse_age(text: str) -> float:
    """``"30d"`` -> seconds; units ms, s, min, h, d, w (a bare ``m`` is refused)."""
    try:
        return age_seconds(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _default_db() -> str:
    return os.environ.get("MUSUBI_DB") or DEFAULT_PATH


def _open(args: argparse.Namespace) -> Engine:
    path = resolve_target(args.db)
    if is_postgres_target(path):
        return Engine(open_store(path))
    if args.command not in ("demo",) and not os.path.exists(path):
        raise MusubiError(
            f"no musubi store at {path}; pass --db PATH or set MUSUBI_DB "
            "(a store is created the first time a step runs)"
        )
    return Engine(SQLiteStore(path))


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def cmd_stats(args: argparse.Namespace) -> int:
    with _open(args) as engine:
        stats = engine.store.stats()
    rows = [
        (
            kind,
            k["nodes"],
            k["executions"],
            k["replays"],
            k["tokens_saved"],
            f"{k['seconds_saved']:.2f}",
        )
        for kind, k in stats["by_kind"].items()
    ]
    rows.append(
        (
            "total",
            stats["nodes"],
            stats["executions"],
            stats["replays"],
            stats["tokens_saved"],
            f"{stats['seconds_saved']:.2f}",
        )
    )
    calls = stats["executions"] + stats["replays"]
    rate = f"{100.0 * stats['replays'] / calls:.1f}%" if calls else "-"
    text = "\n".join(
        [
            f"store: {stats['path']}",
            _render.table(
                ("kind", "nodes", "executed", "replayed", "tokens saved", "seconds saved"), rows
            ),
            "",
            f"replay rate: {rate}   artifacts: {stats['artifacts']} "
            f"({stats['artifact_bytes']} bytes)   runs: {stats['runs']}   "
            f"statuses: {', '.join(f'{k}={v}' for k, v in sorted(stats['statuses'].items())) or '-'}",
        ]
    )
    _emit(args, stats, text)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    with _open(args) as engine:
        node = engine.store.get_node(engine.store.resolve(args.node))
        assert node is not None
        edges = engine.store.edges(node.node_id)
        artifact = engine.store.get_artifact(node.artifact_id) if node.artifact_id else None
        value: Any = None
        if artifact is not None:
            try:
                value = engine.codec.decode(*artifact)
            except MusubiError as err:
                value = f"<undecodable: {err}>"
    data = _render.node_dict(node)
    data["edges"] = [dataclasses.asdict(e) for e in edges]
    data["value"] = value
    lines = [f"{k:<17} {v}" for k, v in _render.node_dict(node).items() if v not in (None, "")]
    lines += ["", "edges:"] + [
        f"  {e.kind:<8} {_render.short(e.parent)} -> {_render.short(e.child)}" for e in edges
    ]
    rendered = repr(value)
    lines += ["", "value:", "  " + (rendered if len(rendered) < 2000 else rendered[:2000] + " ...")]
    _emit(args, data, "\n".join(lines))
    return EXIT_OK


def cmd_lineage(args: argparse.Namespace) -> int:
    with _open(args) as engine:
        root = engine.store.resolve(args.node)
        nodes, edges = engine.store.lineage(
            root, upstream=not args.down, downstream=not args.up, depth=args.depth
        )
    fmt = "json" if args.json else args.format
    renderers: dict[str, Callable[..., str]] = {
        "text": _render.lineage_text,
        "dot": _render.lineage_dot,
        "mermaid": _render.lineage_mermaid,
        "json": _render.lineage_json,
    }
    print(renderers[fmt](root, nodes, edges))
    return EXIT_OK


def cmd_explain(args: argparse.Namespace) -> int:
    with _open(args) as engine:
        node, decision = engine.explain_node(args.node)
    data = {
        "node_id": node.node_id,
        "op": node.op,
        "step_type": node.step_type,
        "replay": decision.replay,
        "reason": decision.reason.value,
        "detail": decision.detail,
    }
    verdict = "would REPLAY" if decision.replay else "would EXECUTE"
    text = f"{_render.short(node.node_id)} {node.op_name}: {verdict} ({decision.reason.value})"
    if decision.detail:
        text += f"\n  {decision.detail}"
    _emit(args, data, text)
    return EXIT_OK


def cmd_invalidate(args: argparse.Namespace) -> int:
    with _open(args) as engine:
        node_id = engine.store.resolve(args.node)
        changed = engine.invalidate(node_id)
    _emit(
        args,
        {"node_id": node_id, "invalidated": changed},
        f"invalidated {changed} node(s) (node {_render.short(node_id)} and its data descendants); "
        "the next run recomputes them",
    )
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    with _open(args) as engine:
        removed = engine.store.gc(older_than=args.older_than, now=time.time())
    _emit(
        args,
        removed,
        f"removed {removed['nodes']} node(s) and {removed['artifacts']} unreferenced artifact(s)",
    )
    return EXIT_OK


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
        _emit(
            args,
            {"ok": False, "damaged": True, "path": path, "problems": damage, "advice": advice},
            "\n".join([f"{path} is damaged:", *(f"problem: {p}" for p in damage),
                       f"what to do: {advice}"]),
        )
        return EXIT_ERROR
    _emit(
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
    _emit(
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
        help="store file (default: $MUSUBI_DB or .musubi/musubi.db)",
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )

    parser = argparse.ArgumentParser(
        prog="musubi",
        description="Inspect, explain and invalidate what a musubi store holds.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"musubi {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(
        name: str, handler: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        command.set_defaults(handler=handler)
        return command

    add("stats", cmd_stats, "replays, executions and what replay saved (calls, tokens, seconds)")
    add("show", cmd_show, "one node: fields, edges and stored value").add_argument(
        "node", help="node id or unique prefix"
    )
    lineage = add("lineage", cmd_lineage, "the node's upstream and downstream graph")
    lineage.add_argument("node", help="node id or unique prefix")
    lineage.add_argument("--format", choices=("text", "dot", "mermaid", "json"), default="text")
    lineage.add_argument("--depth", type=int, default=50)
    direction = lineage.add_mutually_exclusive_group()
    direction.add_argument("--up", action="store_true", help="ancestors only")
    direction.add_argument("--down", action="store_true", help="descendants only")
    add("explain", cmd_explain, "would this node replay now, and why").add_argument(
        "node", help="node id or unique prefix"
    )
    add("invalidate", cmd_invalidate, "mark a node and its data descendants stale").add_argument(
        "node", help="node id or unique prefix"
    )
    add("gc", cmd_gc, "drop old stale/unused nodes and unreferenced artifacts").add_argument(
        "--older-than",
        type=parse_age,
        default=None,
        metavar="AGE",
        help="e.g. 30d, 12h, 45min, 90s, 500ms (default: artifacts only)",
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
    _add_run_commands(sub)
    return parser


def _add_run_commands(sub: Any) -> None:
    """The durable-run commands live in their own module; they get the same
    ``--db``/``--json`` options after the command name as every other one."""
    try:
        from .cli_runs import add_run_commands
    except ImportError:
        return
    before = set(sub.choices)
    add_run_commands(sub)
    for name, command in sub.choices.items():
        if name in before:
            continue
        known = {opt for action in command._actions for opt in action.option_strings}
        if "--db" not in known:
            command.add_argument("--db", default=argparse.SUPPRESS, help="store file")
        if "--json" not in known:
            command.add_argument("--json", action="store_true", default=argparse.SUPPRESS)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.db_given = hasattr(args, "db")
    if not args.db_given:
        args.db = _default_db()
    if not hasattr(args, "json"):
        args.json = False
    handler: Callable[[argparse.Namespace], int] = args.handler
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
