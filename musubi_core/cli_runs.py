"""``musubi runs``, ``musubi steps RUN`` and ``musubi run module:function``.

``runs`` lists every run a store recorded (LangChain and LlamaIndex traces, workflow runs,
durable runs, ``@step`` call trees and named ``trace`` blocks); ``steps`` lists one run's
calls as a tree. The read commands open the store like any SQLite reader (WAL, SQLite's own
locking on), so they are safe to run against a live run, as often as you like. ``musubi run``
executes a workflow durably; run it again after a crash and it resumes.

Exit codes: 0 ok, 1 error (a step failed, the workflow raised), 2 usage, name or schema
problem, 75 the run is locked by another process.

    $ musubi --db task.db run myflows:nightly --run-id 2024-06-01
    $ musubi --db task.db runs --kind durable --since 1d
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
from ._cli import (
    EXIT_ERROR,
    EXIT_LOCKED,
    EXIT_OK,
    EXIT_USAGE,
    AddCommand,
    db_path,
    emit,
    open_engine,
    since,
)
from .errors import (
    DivergenceError,
    InvalidStepNameError,
    LockedError,
    MusubiError,
    SchemaError,
    StepFailedError,
)
from .runner import DEFAULT_RUN_ID, run, validate_name, validate_run_id
from .store import CallRecord, RunRecord, RunStepRecord, is_postgres_target, open_store

__all__ = ["add_commands", "cmd_run", "cmd_runs", "cmd_steps"]

_HOST = socket.gethostname()
RUN_KINDS = ("langchain", "llama_index", "workflow", "durable", "step", "script")
RUN_STATUSES = ("running", "done", "failed", "interrupted")


def add_commands(add: AddCommand) -> None:
    """Register ``runs``, ``steps`` and ``run``."""
    runs = add("runs", cmd_runs, "every recorded run, newest first (safe while runs execute)")
    runs.add_argument("--kind", help=f"only runs of this kind ({', '.join(RUN_KINDS)})")
    runs.add_argument("--since", type=since, metavar="AGE", help="started within, e.g. 90s, 12h, 1d")
    runs.add_argument("--status", choices=RUN_STATUSES)
    runs.add_argument("--limit", type=int, default=50, help="at most this many runs")

    steps = add("steps", cmd_steps, "one run's calls in order, as a tree (safe while it runs)")
    steps.add_argument(
        "run_id", metavar="RUN",
        help=f"run id or unique prefix (a bare file's durable run is {DEFAULT_RUN_ID!r})",
    )

    run_cmd = add(
        "run", cmd_run,
        "run or resume a workflow durably: musubi run module:function (exit 75 if another "
        "process is executing the same run)",
    )
    run_cmd.add_argument("target", metavar="MODULE:FUNCTION", help="e.g. myflows:nightly")
    run_cmd.add_argument("--run-id", default=None, help="run id inside a shared store")
    run_cmd.add_argument(
        "--rerun-from", default=None, metavar="STEP",
        help="accept a reported change: forget STEP and every later step, then run",
    )


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
        "run_id": run.run_id, "kind": run.kind, "name": run.name, "status": _status(run),
        "recorded_status": run.status, "started_at": run.started_at,
        "finished_at": run.finished_at, "duration_s": run.duration_s, "calls": run.calls,
        "replays": run.replays, "tokens_in": run.tokens_in, "tokens_out": run.tokens_out,
        "tokens_saved": run.tokens_saved, "seconds_saved": run.seconds_saved,
        "steps_done": run.steps_done, "steps_total": run.steps_total, "attempts": run.attempts,
        "created_at": run.created_at, "host": run.host, "pid": run.pid, "error": run.error,
        "node_id": run.node_id, "root_call_id": run.root_call_id, "namespace": run.namespace,
    }


def _took(run: RunRecord) -> float | None:
    if run.duration_s is not None:
        return run.duration_s
    if run.started_at is not None and run.finished_at is not None:
        return run.finished_at - run.started_at
    return None


def _list_runs(store: Any, args: argparse.Namespace) -> list[RunRecord]:
    """Runs matching the filters. ``running`` and ``interrupted`` are judged as displayed: a
    row left ``running`` by a process that is gone is interrupted."""
    limit = max(1, int(args.limit))
    status = args.status
    if status not in ("running", "interrupted"):
        return list(store.list_runs(limit=limit, kind=args.kind, since=args.since, status=status))
    rows = [
        r for r in store.list_runs(limit=limit, kind=args.kind, since=args.since, status="running")
        if _status(r) == status
    ]
    if status == "interrupted":
        rows += store.list_runs(limit=limit, kind=args.kind, since=args.since, status=status)
        rows.sort(key=lambda r: r.started_at or r.created_at, reverse=True)
    return rows[:limit]


def cmd_runs(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        runs = _list_runs(engine.store, args)
    errors = any(r.error for r in runs)
    rows = [
        (
            r.run_id, r.kind, r.name or "-", _status(r), _render.when(r.started_at),
            _render.duration(_took(r)), r.calls, r.replays,
            _render.tokens(r.tokens_in, r.tokens_out), r.tokens_saved or "-",
            _render.duration(r.seconds_saved) if r.seconds_saved else "-",
            f"{r.steps_done}/{r.steps_total}" if r.kind == "durable" else "-",
        ) + ((_render.clip(r.error, 50) or "-",) if errors else ())
        for r in runs
    ]
    headers = ("RUN", "KIND", "NAME", "STATUS", "STARTED", "TOOK", "CALLS", "REPLAYS", "TOKENS",
               "TOKENS SAVED", "TIME SAVED", "STEPS") + (("ERROR",) if errors else ())
    text = _render.table(headers, rows) if rows else (
        "no runs match (runs are recorded when steps, traces or durable runs execute)"
    )
    emit(args, [_run_dict(r) for r in runs], text)
    return EXIT_OK


def _durable_steps(store: Any, run: RunRecord) -> list[RunStepRecord]:
    run_steps = getattr(store, "run_steps", None)
    if run.kind != "durable" or run_steps is None:
        return []
    return list(run_steps(run.run_id))


def cmd_steps(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        store: Any = engine.store
        run_rec = store.get_run(store.resolve_run(args.run_id))
        assert run_rec is not None
        calls: list[CallRecord] = store.run_calls(run_rec.run_id)
        steps = _durable_steps(store, run_rec)
    now = time.time()
    step_dicts = [
        {
            "seq": s.seq, "name": s.name, "kind": s.kind, "status": _step_status(s, now),
            "attempts": s.attempts, "started_at": s.started_at, "finished_at": s.finished_at,
            "wake_at": s.wake_at, "node_id": s.node_id, "artifact_id": s.artifact_id,
            "fingerprint": s.fingerprint, "error": s.error,
        }
        for s in steps
    ]
    data: dict[str, Any] = {"run": _run_dict(run_rec), "calls": [_render.call_dict(c) for c in calls]}
    if run_rec.kind == "durable":
        data["steps"] = step_dicts
    emit(args, data, _steps_text(run_rec, calls, steps, now))
    return EXIT_OK


def _steps_text(
    run_rec: RunRecord, calls: list[CallRecord], steps: list[RunStepRecord], now: float
) -> str:
    durable = run_rec.kind == "durable"
    head = (
        f"run {run_rec.run_id} ({run_rec.kind} {run_rec.name or '-'}): {_status(run_rec)}, "
        f"started {_render.when(run_rec.started_at)}, took {_render.duration(_took(run_rec))}, "
        f"{run_rec.calls} call(s), {run_rec.replays} replayed"
    )
    if run_rec.tokens_in or run_rec.tokens_out:
        head += f", {run_rec.tokens_in + run_rec.tokens_out} tokens"
    if run_rec.replays:
        head += (f", replay saved {run_rec.tokens_saved} tokens and "
                 f"{_render.duration(run_rec.seconds_saved)}")
    if durable:
        head += (f"; {run_rec.steps_done}/{run_rec.steps_total} steps done, "
                 f"attempt {run_rec.attempts}")
    if run_rec.error:
        head += f"\n  error: {_render.clip(run_rec.error, 300)}"
    by_name = {s.name: s for s in steps}
    seq_of = {c.call_id: c.seq for c in calls}
    rows: list[tuple[Any, ...]] = []
    for depth, c in _render.call_tree(calls):
        step = by_name.get(c.op_name) if c.kind in ("run_step", "sleep") else None
        status = _step_status(step, now) if step and c.status == "done" else c.status
        row: tuple[Any, ...] = (
            c.seq, c.call_id,
            f"#{seq_of[c.parent_call_id]}" if c.parent_call_id in seq_of else "-",
            c.kind, "  " * depth + c.op_name, _render.short(c.node_id),
            "yes" if c.replayed else "-", _render.duration(c.duration_s),
            _render.tokens(c.tokens_in, c.tokens_out), status,
        )
        if durable:
            row += (step.attempts if step else "-",)
        rows.append((*row, _render.clip(c.error, 60) or ""))
    # Durable steps without a call: in flight (its call is recorded when it ends), or
    # recorded before calls existed (a store migrated from schema 1).
    called = {c.op_name for c in calls if c.kind in ("run_step", "sleep")}
    for s in steps:
        if s.status == "pending" or s.name not in called:
            took = (s.finished_at - s.started_at) if s.started_at and s.finished_at else None
            status = "pending (in flight)" if s.status == "pending" else _step_status(s, now)
            rows.append(("-", "-", "-", "run_step" if s.kind == "step" else s.kind, s.name,
                         _render.short(s.node_id), "-", _render.duration(took), "-", status,
                         s.attempts, _render.clip(s.error, 60)))
    if not rows:
        return head + "\n(no calls recorded yet)"
    headers = ("#", "CALL", "PARENT", "KIND", "OP", "NODE", "REPLAYED", "TOOK", "TOKENS",
               "STATUS") + (("ATTEMPTS",) if durable else ()) + ("ERROR",)
    return head + "\n" + _render.table(headers, rows)


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
        _check_usage(db_path(args), run_id, args.rerun_from)
    except ValueError as err:
        print(f"musubi: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if _is_async(workflow):
            import asyncio

            from .runner import arun

            result = asyncio.run(arun(db_path(args), workflow, run_id=run_id,
                                      rerun_from=args.rerun_from))
        else:
            result = run(db_path(args), workflow, run_id=run_id, rerun_from=args.rerun_from)
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
    if is_postgres_target(db) or os.path.exists(db):
        store = open_store(db)
        try:
            known = [s.name for s in store.run_steps(run_id)]  # type: ignore[attr-defined]
        finally:
            store.close()
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
