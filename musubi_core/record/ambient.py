"""Calls made outside any run, grouped into one run per owner and session.

A LangChain cache used without a callback handler (or a text-LLM hit, for which LangChain fires
no callbacks) still records each lookup as a call; so does a key-value store used outside a
pipeline. One run per such call would flood ``musubi runs``. An :class:`AmbientRun` groups them:
the calls of one owner (a cache object) belong to one run until the owner has been idle for
``idle_s`` seconds, then the next call starts a new run; a run still current when the
interpreter exits normally ends then (a killed process leaves it running). Recording a call only appends a tuple;
the store's recorder pulls the calls (and the run's row with its totals) before every commit.

>>> import os, tempfile
>>> from musubi_core.store import SQLiteStore
>>> from musubi_core.record import recorder_for
>>> store = SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db"))
>>> ambient = AmbientRun(recorder_for(store), "langchain", "calls outside a trace")
>>> for _ in range(3):
...     ambient.record("chat_model", "fake", node_id="n" * 64, replayed=True)
>>> recorder_for(store).flush()
>>> [(r.kind, r.calls, r.replays) for r in store.list_runs()]
[('langchain', 3, 3)]
>>> store.close()
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from ..store import CallWrite, RunWrite
from .recorder import Batch
from .runs import RunState, new_call_id

if TYPE_CHECKING:
    from .recorder import Recorder

__all__ = ["AmbientRun"]


# How many calls a run holds between two checks of the recorder's bounds (see AmbientRun.add).
_CHECK_EVERY = 128


class AmbientRun:
    """The run that calls of one owner made outside any run belong to (see the module
    docstring). Thread safe: a short lock per call keeps the run a call joins and the run's end
apart."""

    def __init__(
        self,
        recorder: Recorder,
        kind: str,
        name: str,
        *,
        namespace: str = "default",
        idle_s: float = 2.0,
    ) -> None:
        self.recorder = recorder
        self.kind = kind
        self.name = name
        self.namespace = namespace
        self.idle_s = idle_s
        self._lock = threading.Lock()
        self._state: RunState | None = None
        self._last = 0.0  # when the last call was recorded (time.monotonic)
        self._pending: deque[tuple[Any, ...]] = deque()  # rows in CallWrite's field order
        self._first = 0.0  # when the oldest call in _pending was recorded (time.monotonic)
        # Nodes whose replay a call asked this run to count (see add): committed with it.
        self._replays: list[str] = []
        # The current run and the runs that ended but whose calls may not be counted yet.
        self._open: dict[str, RunState] = {}
        recorder.add_source(self._pull)
        _LIVE.add(self)

    def end(self) -> None:
        """End the current run: the next pull writes it as ``done`` (a later call starts a new
        one). Done for every run when the interpreter exits normally."""
        with self._lock:
            self._state = None

    def record(
        self,
        kind: str,
        op_name: str,
        *,
        node_id: str | None = None,
        artifact_id: str | None = None,
        replayed: bool = False,
        duration_s: float | None = None,
        tokens_in: int | None = None,
        tokens_out: int | None = None,
        saved_s: float | None = None,
        model: str | None = None,
        input_preview: str | None = None,
        output_preview: str | None = None,
    ) -> None:
        """Record one call (a tuple appended; the recorder takes it before its next commit)."""
        self.add(
            kind, op_name, node_id, artifact_id, replayed, duration_s, tokens_in, tokens_out,
            saved_s, model, input_preview, output_preview,
        )

    def add(
        self,
        kind: str,
        op_name: str,
        node_id: str | None,
        artifact_id: str | None,
        replayed: bool,
        duration_s: float | None,
        tokens_in: int | None,
        tokens_out: int | None,
        saved_s: float | None,
        model: str | None = None,
        input_preview: str | None = None,
        output_preview: str | None = None,
        count_replay: bool = False,
    ) -> None:
        """:meth:`record` with positional arguments (a cache hit's hot path). With
        ``count_replay`` the call also counts one replay of ``node_id``, committed with the
        call: a hit appends one row here instead of handing the recorder two."""
        recorder = self.recorder
        if recorder.read_only:
            recorder.skip_read_only()  # never written: nothing is held (said once)
            return
        if recorder.closed:
            recorder.refuse_closed()  # the StoreError submit() raises: nothing is held
        started = time.time()
        with self._lock:  # a pull cannot end the run between choosing it and appending
            now = time.monotonic()
            state = self._state
            if state is None or now - self._last > self.idle_s:
                state = self._state = RunState(
                    self.recorder, self.kind, self.name, namespace=self.namespace
                )
                self._open[state.run_id] = state
            self._last = now
            pending = self._pending
            if not pending:
                self._first = now
            if count_replay and node_id is not None:
                self._replays.append(node_id)
            # A plain tuple in CallWrite's field order (the store writes rows by position):
            # holding only strings, numbers and None, the garbage collector stops tracking it
            # at its first pass, and the helper process's pipe takes it as it is.
            pending.append(
                (
                    new_call_id(),
                    state.run_id,
                    None,
                    state.next_seq(),
                    kind,
                    op_name,
                    node_id,
                    artifact_id,
                    1 if replayed else 0,
                    "done",
                    None,
                    started,
                    duration_s,
                    tokens_in,
                    tokens_out,
                    saved_s,
                    model,
                    input_preview,
                    output_preview,
                    self.namespace,
                )
            )
            held = len(pending)
        # The calls held here are acknowledged rows: the recorder's bounds apply to them (and
        # a first call makes sure a writer runs). Asked every _CHECK_EVERY calls: the bound
        # is passed by at most that many rows, the lag by as many calls' time.
        if held == 1 or held % _CHECK_EVERY == 0:
            recorder.hold(held, self._first)

    def _pull(self) -> Batch | None:
        """Calls recorded since the last commit, and the rows of the runs they belong to
        (``running`` while the run is current, ``done`` once it ended)."""
        with self._lock:
            calls = list(self._pending)
            self._pending.clear()
            replays, self._replays = self._replays, []
            current = self._state
            if current is not None and time.monotonic() - self._last > self.idle_s:
                self._state = current = None  # idle: the run ends with this pull
            by_run: dict[str, list[tuple[Any, ...]]] = {}
            if len(self._open) == 1:  # the common case: every call is of the one open run
                by_run = {run_id: calls for run_id in self._open}
            else:
                for call in calls:
                    by_run.setdefault(call[1], []).append(call)  # by run_id
            runs: list[RunWrite] = []
            for run_id, state in list(self._open.items()):
                rows = by_run.get(run_id)
                if rows:
                    if state.root_call_id is None:
                        state.root_call_id = rows[0][0]  # its call_id
                    state.count_rows(rows)
                if state is not current:
                    runs.append(state.row("done"))
                    del self._open[run_id]
                elif rows:
                    runs.append(state.row("running"))
        if not calls and not runs:
            return None
        return ((), (), (), cast("list[CallWrite]", calls), (), runs, replays)


_LIVE: weakref.WeakSet[AmbientRun] = weakref.WeakSet()


@atexit.register
def _end_at_exit() -> None:
    # Registered after the recorder's exit flush (this module imports the recorder first), so
    # it runs before it: a run still current when the interpreter exits normally is written
    # as done by that flush, not left running (which `musubi runs` shows as interrupted).
    for run in list(_LIVE):
        run.end()
