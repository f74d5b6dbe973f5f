"""One call being made: where it belongs (run, parent call), and its row when it ends.

:class:`CallScope` is what ``@step`` (and any other caller of the engine that executes or
replays one thing) wraps around the work: inside a current run it becomes a call of that run
under the current call; otherwise it starts a run of its own (kind ``run_kind``), whose row is
written with the call when it ends. While the work runs, the call is current, so whatever it
calls is recorded under it.

>>> import os, tempfile
>>> from musubi_core.store import SQLiteStore
>>> from musubi_core.record import recorder_for
>>> store = SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db"))
>>> scope = CallScope(recorder_for(store), "step", "demo.add", run_kind="step")
>>> with scope:
...     _ = scope.done(output=3)
>>> recorder_for(store).flush()
>>> [(c.kind, c.op_name, c.output_preview) for c in store.run_calls(scope.run.run_id)]
[('step', 'demo.add', '3')]
>>> store.close()
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextvars import Token
from typing import TYPE_CHECKING, Any

from ..store import CallWrite, FlowWrite
from .runs import _FRAME, Frame, RunState, joinable, new_call_id

if TYPE_CHECKING:
    from .recorder import Recorder

__all__ = ["CallScope"]


class CallScope:
    """Context manager for one call (see the module docstring). Call :meth:`done` (or
    :meth:`failed`) inside the block; leaving the block by an exception records a failure."""

    __slots__ = (
        "_token",
        "call_id",
        "flows_from",
        "inputs",
        "kind",
        "op_name",
        "own_run",
        "parent_call_id",
        "recorded",
        "run",
        "run_kind",
        "seq",
        "started_at",
        "t0",
    )

    def __init__(
        self,
        recorder: Recorder,
        kind: str,
        op_name: str,
        *,
        run_kind: str,
        run_name: str | None = None,
        namespace: str = "default",
        inputs: Any = None,
        flows_from: Sequence[tuple[str, str | None]] = (),
    ) -> None:
        frame = joinable(_FRAME.get(), recorder)
        if frame is None:
            self.run = RunState(recorder, run_kind, run_name or op_name, namespace=namespace)
            self.own_run = True
            self.parent_call_id: str | None = None
        else:
            self.run = frame.run
            self.own_run = False
            self.parent_call_id = frame.call_id
        self.kind = kind
        self.op_name = op_name
        self.inputs = inputs
        # (call id, artifact id) of the calls whose outputs this call consumes.
        self.flows_from = flows_from
        self.call_id = new_call_id()
        self.seq = self.run.next_seq()
        self.recorded: CallWrite | None = None
        self._token: Token[Frame | None] | None = None
        self.started_at = 0.0
        self.t0 = 0.0

    def __enter__(self) -> CallScope:
        self._token = _FRAME.set(Frame(self.run, self.call_id))
        self.started_at = time.time()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if self._token is not None:
            _FRAME.reset(self._token)
            self._token = None
        if self.recorded is None and exc is not None:
            self._record("failed", exc)
        row = self.recorded
        if row is None:
            return
        flows = self._flows()
        run = self.run
        if not self.own_run:
            run.recorder.call(row, flows)
            return
        # A run of its own: the call and the run's row go to the recorder together.
        status = "done" if exc is None else ("failed" if isinstance(exc, Exception) else "interrupted")
        error = None if exc is None else f"{type(exc).__name__}: {exc}"[:4000]
        run.recorder.submit(calls=(row,), flows=flows, runs=(run.row(status, error),))

    def done(
        self,
        *,
        node_id: str | None = None,
        artifact_id: str | None = None,
        replayed: bool = False,
        output: Any = None,
        tokens_in: int | None = None,
        tokens_out: int | None = None,
        saved_s: float | None = None,
        model: str | None = None,
    ) -> CallWrite:
        """Record the call as finished (executed, or replayed from ``node_id``)."""
        return self._record(
            "done",
            None,
            node_id=node_id,
            artifact_id=artifact_id,
            replayed=replayed,
            output=output,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            saved_s=saved_s,
            model=model,
        )

    def failed(self, error: BaseException | str, *, node_id: str | None = None) -> CallWrite:
        """Record the call as failed (the block may still end normally)."""
        return self._record("failed", error, node_id=node_id)

    def _flows(self) -> list[FlowWrite]:
        return [FlowWrite(self.call_id, src, art) for src, art in self.flows_from if src]

    def _record(self, status: str, error: BaseException | str | None, **fields: Any) -> CallWrite:
        """Build the call's row and count it in the run (it is handed to the recorder when the
        block ends, with the run's row when the call has a run of its own)."""
        row = self.run.record(
            self.call_id,
            self.parent_call_id,
            self.kind,
            self.op_name,
            seq=self.seq,
            status=status,
            error=error,
            started_at=self.started_at,
            duration_s=time.perf_counter() - self.t0,
            inputs=self.inputs,
            submit=False,
            **fields,
        )
        self.recorded = row
        return row
