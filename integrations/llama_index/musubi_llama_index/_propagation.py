"""Lineage across processes: the span handler's side of llama-index-instrumentation's
``capture_propagation_context()`` / ``restore_propagation_context()``.

``get_dispatcher().capture_propagation_context()`` asks every span handler for what another
process needs to continue the trace; musubi answers with where a call made now belongs: the
run, the call (the current span's, else the current musubi frame's), the store and the next
position in the run. The dict is plain JSON. ``restore_propagation_context(ctx)`` in the other
process (a ``ProcessPoolExecutor`` job, a workflow step run elsewhere) makes that call current
there, so LLM and embedding calls and root spans made after it are calls of the *same* run,
under that call, instead of a run of their own, until ``uninstrument()`` (a worker runs its
jobs one after another in one context: restore in each job, uninstrument at its end). The
worker records calls only: the run's row (its status and totals) stays the process's that owns
it, so its totals count its own process's calls.

In-process (llama-index-workflows captures and restores around every run's task), a restored
run is the very run object that was captured, so nothing changes there.

Example::

    ctx = get_dispatcher().capture_propagation_context()      # in the parent, inside the run
    pool.submit(job, ctx, ...)
    # in the job, in the worker process:
    instrument(db, embed_model=embed_model)
    get_dispatcher().restore_propagation_context(ctx)          # then embed, query, ...
"""

from __future__ import annotations

import contextlib
import os
import threading
from contextvars import Token
from typing import Any

from llama_index.core.instrumentation.span import active_span_id

from musubi_core.record import RunState, current_frame, joinable
from musubi_core.record.runs import Frame, enter_call, leave_call
from musubi_llama_index._calls import UNRECORDED, Tracker

__all__ = ["KEY", "capture", "forget", "restore"]

KEY = "musubi"
# Runs captured in this process, by id: restored in this process, a run is the same object.
_LIVE: dict[str, RunState] = {}
_LIVE_MAX = 1024
_lock = threading.Lock()
# What restore() entered, newest last: uninstrument() leaves them (a worker process runs one
# job after another in one context, and a job must not join the run of the one before).
_ENTERED: list[Token[Frame | None]] = []


def capture(tracker: Tracker) -> dict[str, Any]:
    """Where a call made now belongs, as plain data (empty when no run is being recorded)."""
    call = tracker.span_call(active_span_id.get())
    recorder = tracker.recorder()
    if call is not None and call is not UNRECORDED:
        state: RunState = call.trace.state
        call_id: str | None = call.call_id
    else:
        frame = joinable(current_frame(), recorder)
        if frame is None:
            return {}
        state, call_id = frame.run, frame.call_id
    with _lock:
        if len(_LIVE) >= _LIVE_MAX:
            _LIVE.pop(next(iter(_LIVE)))
        _LIVE[state.run_id] = state
    return {
        KEY: {
            "run_id": state.run_id,
            "call_id": call_id,
            "kind": state.kind,
            "name": state.name,
            "namespace": state.namespace,
            "store": str(state.recorder.store.path),
            "pid": os.getpid(),
            # The position of the handed-over work in the run (its calls number from here).
            "seq": state.next_seq(),
        }
    }


def restore(tracker: Tracker, context: Any) -> bool:
    """Make the captured call current in this context; False when ``context`` holds nothing
    of musubi's, or names another store than this process records into."""
    data = context.get(KEY) if isinstance(context, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
        return False
    recorder = tracker.recorder()
    if str(data.get("store")) != str(recorder.store.path):
        return False
    state = _LIVE.get(data["run_id"]) if data.get("pid") == os.getpid() else None
    if state is None:
        state = RunState(
            recorder,
            str(data.get("kind") or "llama_index"),
            data.get("name") if isinstance(data.get("name"), str) else None,
            run_id=data["run_id"],
            namespace=str(data.get("namespace") or "default"),
            first_seq=int(data.get("seq") or 0),
        )
    call_id = data.get("call_id")
    token = enter_call(state, call_id if isinstance(call_id, str) else None)
    with _lock:
        _ENTERED.append(token)
    return True


def forget() -> None:
    """Leave every run :func:`restore` entered in this context (``uninstrument()``)."""
    with _lock:
        tokens = _ENTERED[::-1]
        _ENTERED.clear()
    for token in tokens:
        with contextlib.suppress(ValueError, RuntimeError):  # entered in another context
            leave_call(token)
