"""``musubi runs``, ``musubi steps RUN`` and ``musubi run module:function``.

The read commands open the store like any SQLite reader (WAL, SQLite's own
locking on), so they are safe to run against a live run, as often as you
like. ``musubi run`` executes a workflow durably; run it again after a crash
and it resumes.

Exit codes: 0 ok, 1 error (a step failed, the workflow raised), 2 usage, name
or schema problem, 75 the run is locked by another process.

    $ musubi --db task.db run myflows:nightly --run-id 2024-06-01
    $ musubi --db task.db runs
    $ musubi --db task.db steps 2024-06-01 --json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import sys
import time
import traceback
from typing import Any

from . import _render
from .errors import (
    DivergenceError,
    InvalidStepNameError,
    LockedError,
    MusubiError,
    SchemaError,
    StepFailedError,
)
from .runner import DEFAULT_RUN_ID, run, validate_name, validate_run_id
from .store import RunRecord, RunStepRecord, SQLiteStore, resolve_target

__all__ = ["add_run_commands", "cmd_run", "cmd_runs", "cmd_steps"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 75
_HOST = socket.gethostname()


def add_run_commands(subparsers: Any) -> None:
    """Register ``runs``, ``steps`` and ``run`` on an argparse subparsers
    object. Handlers are stored as the ``handler`` default and take the
    parsed namespace (with ``db`` and ``json`` set by the caller)."""
    runs = subparsers.add_parser(
        "runs", help="durable runs in the store, newest first",
        description="Durable runs in the store, newest first. Safe while runs execute.",
    )
    runs.add_argument("--limit", type=int, default=50, help="at most this many runs")
    runs.set_defaults(handler=cmd_runs)

    steps = subparsers.add_parser(
        "steps", help="the steps of one durable run, in body order",
        description="The steps of one durable run, in body order. Safe while the run executes.",
    )
    steps.add_argument("run_id", metavar="RUN", help=f"run id (a bare file's run is {DEFAULT_RUN_ID!r})")
    steps.set_defaults(handler=cmd_steps)

    run_cmd = subparsers.add_parser(
        "run", help="run or resume a workflow: musubi run module:function",
        description=(
            "Run a workflow function durably, or resume it after a crash. The function "
            "takes a musubi Context. Exits 75 if another process is executing the same run."
        ),
    )
    run_cmd.add_argument("target", metavar="MODULE:FUNCTION", help="e.g. myflows:nightly")
    run_cmd.add_argument("--run-id", default=None, help="run id inside a shared store")
    run_cmd.add_argument(
        "--rerun-from", default=None, metavar="STEP",
        help="accept a reported change: forget STEP and every later step, then run",
    )
    run_cmd.set_defaults(handler=cmd_run)


def _db(args: argparse.Namespace) -> str:
    path = getattr(args, "db", None)
    if path:
        return resolve_target(str(path))
    from .engine import DEFAULT_PATH

    return resolve_target(os.environ.get("MUSUBI_DB") or DEFAULT_PATH)


def _open_existing(args: argparse.Namespace) -> SQLiteStore:
    path = _db(args)
    if not os.path.exists(path):
        raise MusubiError(f"no musubi store at {path}; pass --db PATH or set MUSUBI_DB")
    return SQLiteStore(path)


def _status(run: RunRecord) -> str:
    """``running`` is what the row says; the process may be gone (kill -9,
    power loss). Checked by pid on this host only, and without touching the
    run's lock (even a shared probe could make the writer's flock fail)."""
    if run.status != "running" or run.host != _HOST or not run.pid:
        return run.status
    try:
        os.kill(run.pid, 0)
    except ProcessLookupError:
        return "interrupted"
    except PermissionError:
        pass
    return "running"


def _step_status(step: RunStepRecord, now: float) -> str:
    if step.kind == "sleep" and step.status == "done" and step.wake_at and step.wake_at > now:
        return "sleeping"
    return step.status


def _run_dict(run: RunRecord) -> dict[str, Any]:
    return {
        "run_id": run.run_id, "name": run.name, "status": _status(run),
        "recorded_status": run.status, "steps_done": run.steps_done,
        "steps_total": run.steps_total, "attempts": run.attempts, "created_at": run.created_at,
        "started_at": run.started_at, "finished_at": run.finished_at, "host": run.host,
        "pid": run.pid, "error": run.error, "node_id": run.node_id,
    }


def cmd_runs(args: argparse.Namespace) -> int:
    with _open_existing(args) as store:
        runs = store.list_runs(limit=max(1, int(getattr(args, "limit", 50))))
    if getattr(args, "json", False):
        print(json.dumps([_run_dict(r) for r in runs], indent=2))
        return EXIT_OK
    if not runs:
        print("no durable runs in this store")
        return EXIT_OK
    rows = [
        (
            r.run_id, _status(r), f"{r.steps_done}/{r.steps_total}", r.attempts,
            _render.when(r.started_at), _render.when(r.finished_at), r.name or "-",
            (r.error or "")[:60],
        )
        for r in runs
    ]
    print(_render.table(
        ("RUN", "STATUS", "STEPS", "ATTEMPTS", "STARTED", "FINISHED", "WORKFLOW", "ERROR"), rows
    ))
    return EXIT_OK


def cmd_steps(args: argparse.Namespace) -> int:
    with _open_existing(args) as store:
        run_rec = store.get_run(args.run_id)
        if run_rec is None:
            known = [r.run_id for r in store.list_runs(limit=10)]
            raise MusubiError(
                f"no run {args.run_id!r} in {store.path}"
                + (f" (recent runs: {', '.join(known)})" if known else "")
            )
        steps = store.run_steps(args.run_id)
    now = time.time()
    if getattr(args, "json", False):
        print(json.dumps({
            "run": _run_dict(run_rec),
            "steps": [
                {
                    "seq": s.seq, "name": s.name, "kind": s.kind, "status": _step_status(s, now),
                    "attempts": s.attempts, "started_at": s.started_at,
                    "finished_at": s.finished_at, "wake_at": s.wake_at, "node_id": s.node_id,
                    "artifact_id": s.artifact_id, "fingerprint": s.fingerprint, "error": s.error,
                }
                for s in steps
            ],
        }, indent=2))
        return EXIT_OK
    print(f"run {run_rec.run_id}: {_status(run_rec)}, {run_rec.steps_done}/{run_rec.steps_total} "
          f"steps done, attempt {run_rec.attempts}")
    rows = []
    for s in steps:
        took = "-"
        if s.kind == "sleep" and s.wake_at:
            took = f"until {_render.when(s.wake_at)}"
        elif s.started_at and s.finished_at:
            took = f"{s.finished_at - s.started_at:.3f}s"
        rows.append((s.seq, s.name, s.kind, _step_status(s, now), s.attempts, took,
                     (s.node_id or "-")[:12], (s.error or "")[:60]))
    if rows:
        print(_render.table(
            ("SEQ", "STEP", "KIND", "STATUS", "ATTEMPTS", "TOOK", "NODE", "ERROR"), rows
        ))
    return EXIT_OK


def _load(target: str) -> Any:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:FUNCTION, got {target!r} (e.g. myflows:nightly)")
    # Like `python -m`: modules in the working directory are importable.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise ValueError(f"cannot import {module_name!r}: {err}") from err
        raise
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{target} is not callable")
    return obj


def cmd_run(args: argparse.Namespace) -> int:
    as_json = bool(getattr(args, "json", False))
    try:
        workflow = _load(args.target)
    except ValueError as err:
        print(f"musubi: {err}", file=sys.stderr)
        return EXIT_USAGE
    run_id = args.run_id or DEFAULT_RUN_ID
    try:
        _check_usage(_db(args), run_id, args.rerun_from)
    except ValueError as err:
        print(f"musubi: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if _is_async(workflow):
            import asyncio

            from .runner import arun

            result = asyncio.run(arun(_db(args), workflow, run_id=run_id,
                                      rerun_from=args.rerun_from))
        else:
            result = run(_db(args), workflow, run_id=run_id, rerun_from=args.rerun_from)
    except LockedError as err:
        print(f"musubi: {err}", file=sys.stderr)
        return EXIT_LOCKED
    except (SchemaError, InvalidStepNameError) as err:
        print(f"musubi: {err}", file=sys.stderr)
        return EXIT_USAGE
    except DivergenceError as err:
        print(f"musubi: {err} (CLI: --rerun-from {err.name})", file=sys.stderr)
        return EXIT_ERROR
    except StepFailedError as err:
        print(f"musubi: {err}", file=sys.stderr)
        traceback.print_exception(err.original, file=sys.stderr)
        return EXIT_ERROR
    except MusubiError as err:
        print(f"musubi: {err}", file=sys.stderr)
        return EXIT_ERROR
    except Exception:
        traceback.print_exc()
        return EXIT_ERROR
    if as_json:
        print(json.dumps({"run_id": run_id, "status": "done", "result": result}, default=repr))
    elif result is not None:
        try:
            print(json.dumps(result, indent=2, ensure_ascii=False))
        except (TypeError, ValueError):
            print(repr(result))
    return EXIT_OK


def _check_usage(db: str, run_id: str, rerun_from: str | None) -> None:
    """Reject a malformed --run-id or an unknown --rerun-from before running
    anything, so exit code 2 always means "fix the command line"."""
    validate_run_id(run_id)
    if rerun_from is None:
        return
    validate_name(rerun_from)
    known: list[str] = []
    if os.path.exists(db):
        with SQLiteStore(db) as store:
            known = [s.name for s in store.run_steps(run_id)]
    if rerun_from not in known:
        raise ValueError(
            f"--rerun-from {rerun_from!r}: run {run_id!r} has no such step "
            f"(recorded: {', '.join(known[:10]) or 'none'})"
        )


def _is_async(fn: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )
