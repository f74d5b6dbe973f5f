"""Calls of LlamaIndex work: one per span and one per model call, grouped into runs.

A *trace* is one root span (or a model call made outside any span) and everything under it.
It records into one musubi run: its own (kind ``llama_index``, or ``workflow`` for a
llama-index-workflows run), or the run of the musubi frame it was started in (a ``@step``, a
durable step, a ``trace()`` block), under that frame's call. Every span is a call under its
parent span's call; every LLM / embedding call of an instrumented model is a call under the
span it was made in, with its node (the memo it executed or replayed).

Flows between calls are inferred by content inside a trace: a call whose input holds a text
an earlier call of the trace produced consumed that call's output (retrieved nodes fed to
synthesis; the retrieved text inside an LLM prompt); a call whose result holds a text one
of its descendants produced got it from there (the LLM answer flowing up to the query); an
embedding computed inside a call feeds it (the query embedding to retrieval). Node-level data
edges (what invalidation follows) are derived from the flows: a call that reached a node
gets edges from the nodes upstream of it through the calls that fed it.

Nothing here hashes anything or touches the store: rows are tuples handed to the store's
recorder, which commits them in the background.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from typing import Any

from llama_index.core.instrumentation.span import active_span_id

from musubi_core.record import Recorder, RunState, current_frame, joinable, new_call_id
from musubi_core.store import ArtifactWrite, CallWrite, EdgeWrite, FlowWrite, RunWrite
from musubi_llama_index._content import brief
from musubi_llama_index._runtime import Runtime, warn_once

__all__ = [
    "MODEL_CALL",
    "UNRECORDED",
    "Call",
    "Trace",
    "Tracker",
    "active",
    "begin_model_call",
    "end_model_call",
    "finish",
    "place",
    "set_active",
]

MAX_ATOMS = 512  # texts indexed per trace (a runaway agent loop must not slow every call)
MAX_CLOSED = 4096  # exited streaming spans remembered (their model's end event comes later)
BATCH_CALLS = 256  # a trace hands its rows to the recorder at least every this many calls
BATCH_SECONDS = 1.0  # ... and at least this often (the recorder then commits within 1 s)

_NO_NODES: dict[str, str | None] = {}
_now = time.perf_counter
_new_row = tuple.__new__  # a NamedTuple row without its Python-level __new__


class Trace:
    """One root span and its descendants: the run they record into, the content index, and
    the rows of its finished calls not handed to the recorder yet (they go in one batch when
    the root ends, or every :data:`BATCH_CALLS` calls / :data:`BATCH_SECONDS` of a long
    trace such as a workflow)."""

    __slots__ = (
        "artifacts",
        "calls",
        "edges",
        "ended",
        "error",
        "exact",
        "first",
        "flows",
        "last",
        "last_shown",
        "last_texts",
        "lock",
        "open",
        "own",
        "state",
        "status",
    )

    def __init__(self, state: RunState, own: bool, *, open_ended: bool = False) -> None:
        self.state = state
        self.own = own  # the trace started the run (else it joined a musubi frame's run)
        # Its top-level calls do not end it (a KV store's own run): its owner flushes it.
        self.open = open_ended
        # text -> the call that produced it last (an enclosing call re-registers what its
        # child returned, so the outermost finished producer of a text wins)
        self.exact: dict[str, Call] = {}
        self.ended = False
        self.status = "done"
        self.error: str | None = None
        self.lock = threading.Lock()
        self.calls: list[CallWrite] = []
        self.flows: list[FlowWrite] = []
        self.edges: list[EdgeWrite] = []
        self.artifacts: list[ArtifactWrite] = []
        self.first = 0.0  # when the oldest pending row was added
        # The result the last span exited with, its texts and preview: a result handed up
        # unchanged through enclosing spans is read once.
        self.last: Any = None
        self.last_texts: list[str] = []
        self.last_shown: str | None = None

    def add(
        self,
        row: CallWrite,
        flows: Sequence[FlowWrite],
        edges: Sequence[EdgeWrite],
        artifact: ArtifactWrite | None,
        now: float,
    ) -> bool:
        """Keep a finished call's rows; True when the batch is due."""
        with self.lock:
            calls = self.calls
            if not calls:
                self.first = now
            calls.append(row)
            if flows:
                self.flows.extend(flows)
            if edges:
                self.edges.extend(edges)
            if artifact is not None:
                self.artifacts.append(artifact)
            return len(calls) >= BATCH_CALLS or now - self.first >= BATCH_SECONDS

    def flush(self, run: RunWrite | None = None) -> None:
        """Hand the pending rows (and ``run``) to the recorder."""
        with self.lock:
            calls, flows, edges, artifacts = self.calls, self.flows, self.edges, self.artifacts
            self.calls, self.flows, self.edges, self.artifacts = [], [], [], []
        recorder = self.state.recorder
        if len(calls) == 1 and run is None and not edges and not artifacts:
            recorder.call(calls[0], flows)
        elif calls or run is not None:
            recorder.submit(
                calls=calls,
                flows=flows,
                edges=edges,
                artifacts=artifacts,
                runs=(run,) if run is not None else (),
            )

    def produced(self, texts: Iterable[str], call: Call) -> None:
        exact = self.exact
        if len(exact) < MAX_ATOMS:
            for text in texts:
                exact[text] = call
        else:
            for text in texts:
                if text in exact:
                    exact[text] = call

    def producers(self, texts: Iterable[str], into: dict[Call, None]) -> None:
        """Add the producers of ``texts`` (exact matches) to ``into``."""
        exact = self.exact
        for text in texts:
            producer = exact.get(text)
            if producer is not None:
                into[producer] = None

    def producers_within(self, text: str, into: dict[Call, None]) -> None:
        """Add the calls whose produced text appears inside ``text`` (a prompt)."""
        if not text:
            return
        for atom, producer in list(self.exact.items()):
            if producer not in into and atom in text:
                into[producer] = None

    def end(self, status: str, error: str | None) -> None:
        self.ended = True
        self.status, self.error = status, error
        self.exact = {}
        self.last = None


class Call:
    """One call being recorded (a span, or a model call of the replay layer)."""

    __slots__ = (
        "artifact_id",
        "call_id",
        "feeds",
        "input_preview",
        "inst",
        "kind",
        "model",
        "node_id",
        "node_ups",
        "op",
        "parent",
        "parent_call_id",
        "replayed",
        "saved_s",
        "seq",
        "sid",
        "started_at",
        "stream",
        "t0",
        "tokens_in",
        "tokens_out",
        "trace",
        "upstream",
    )

    def __init__(
        self,
        sid: str | None,
        parent: Call | None,
        trace: Trace,
        parent_call_id: str | None,
        kind: str,
        op: str,
        inst: int = 0,
    ) -> None:
        self.sid = sid  # the span id (None for a model call)
        self.parent = parent
        self.trace = trace
        self.parent_call_id = parent_call_id
        self.kind = kind
        self.op = op
        self.inst = inst  # id() of the component the span ran on
        self.call_id = new_call_id()
        self.seq = trace.state.next_seq()
        self.started_at = time.time()
        self.t0 = _now()
        self.upstream: dict[Call, None] | None = None  # calls whose output fed this one
        self.feeds: list[Call] | None = None  # embedding calls made inside this one
        self.node_id: str | None = None
        self.artifact_id: str | None = None
        self.node_ups = _NO_NODES
        self.input_preview: str | None = None
        self.model: str | None = None
        self.tokens_in: int | None = None
        self.tokens_out: int | None = None
        self.stream = False
        # A declared tool's span that replayed its node (the seconds it saved).
        self.replayed = False
        self.saved_s: float | None = None

    def descends_from(self, other: Call) -> bool:
        cur = self.parent
        while cur is not None:
            if cur is other:
                return True
            cur = cur.parent
        return False

    def fed_by(self, producer: Call) -> None:
        if producer is self:
            return
        ups = self.upstream
        if ups is None:
            self.upstream = {producer: None}
        else:
            ups[producer] = None


class _Unrecorded:
    """Marks a span nothing is recorded for (the store could not be opened): its
    descendants are not recorded either."""

    __slots__ = ()


UNRECORDED: Any = _Unrecorded()


def finish(
    call: Call,
    status: str,
    output_preview: str | None,
    *,
    error: str | None = None,
    replayed: bool = False,
    saved_s: float | None = None,
    artifact: ArtifactWrite | None = None,
    count: bool = True,
) -> None:
    """Hand ``call``'s row, the flows into it, its artifact, the node-level data edges derived
    from the flows (for a call that reached a node) and, when it ends its run, the run's row
    to the recorder. ``count=False`` re-writes a recorded call (a stream's final text)."""
    trace = call.trace
    state = trace.state
    call_id = call.call_id
    now = _now()
    row = _new_row(
        CallWrite,
        (
            call_id,
            state.run_id,
            call.parent_call_id,
            call.seq,
            call.kind,
            call.op,
            call.node_id,
            call.artifact_id,
            1 if replayed else 0,
            status,
            error,
            call.started_at,
            now - call.t0,
            call.tokens_in,
            call.tokens_out,
            saved_s,
            call.model,
            call.input_preview,
            output_preview,
            state.namespace,
        ),
    )
    root = call.parent is None and count and not trace.open
    if count:
        if call.parent_call_id is None and state.root_call_id is None:
            state.root_call_id = call_id
        state.count(row)
    ups = call.upstream
    flows: Sequence[FlowWrite] = ()
    edges: Sequence[EdgeWrite] = ()
    nodes = _NO_NODES
    if ups:
        flows = [_new_row(FlowWrite, (call_id, p.call_id, p.artifact_id)) for p in ups]
        nodes = _upstream_nodes(ups)
    node_id = call.node_id
    if node_id is not None:
        if nodes:
            edges = [EdgeWrite(n, node_id, "data", a) for n, a in nodes.items() if n != node_id]
        call.node_ups = {node_id: call.artifact_id}
    else:
        call.node_ups = nodes
    due = trace.add(row, flows, edges, artifact, now)
    if root:
        trace.end(status, error)
        trace.flush(state.row(status, error) if trace.own else None)
    elif trace.ended:  # a late call (a stream consumed after its query returned)
        trace.flush(state.row(trace.status, trace.error) if trace.own else None)
    elif due:
        trace.flush()


def _upstream_nodes(ups: dict[Call, None]) -> dict[str, str | None]:
    """The nodes upstream of a call, through the calls that fed it."""
    if len(ups) == 1:
        return next(iter(ups)).node_ups
    out: dict[str, str | None] = {}
    for p in ups:
        if p.node_ups:
            out.update(p.node_ups)
    return out


# The model call running its provider right now: the provider's own spans (``OpenAI.chat``
# inside a replayable ``chat``) belong to it.
MODEL_CALL: ContextVar[Call | None] = ContextVar("musubi_li_model_call", default=None)


class Tracker:
    """Open and recently exited calls by span id, and the model-call API of the replay layer.
    Lock-free: single dict operations are atomic, and a call is only mutated by the thread
    (or task) running it, or by its children before it exits."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.states: dict[str, Call] = {}
        self.closed: dict[str, Call] = {}

    def span_call(self, span_id: str | None) -> Call | None:
        """The call of an open or recently exited span."""
        if span_id is None:
            return None
        call = self.states.get(span_id)
        if call is None:
            call = self.closed.get(span_id)
        return call

    def remember(self, span_id: str, call: Call) -> None:
        closed = self.closed
        closed[span_id] = call
        if len(closed) > MAX_CLOSED:
            for old in list(closed)[: MAX_CLOSED // 4]:
                del closed[old]

    def recorder(self) -> Recorder:
        engine = self.runtime.engine()
        recorder: Recorder = engine.recorder
        if recorder.on_error is None:
            recorder.on_error = lambda exc: warn_once(
                "recorder", f"writing calls failed ({type(exc).__name__}: {exc}); retrying"
            )
        return recorder

    def open_trace(self, run_kind: str, name: str) -> tuple[Trace, str | None]:
        """A trace for a new root: in the current musubi frame's run, else a run of its own."""
        recorder = self.recorder()
        frame = joinable(current_frame(), recorder)
        if frame is None:
            namespace = self.runtime.engine().namespace
            return Trace(RunState(recorder, run_kind, name, namespace=namespace), True), None
        return Trace(frame.run, False), frame.call_id

    def model_call(self, kind: str, op: str, text: str) -> Call | None:
        """Open the call of one LLM / embedding request made in the current span (or as a
        root of its own); ``text`` is its input (prompt or embedded text)."""
        parent = self.span_call(active_span_id.get())
        if parent is UNRECORDED:
            return None
        if parent is None:
            trace, parent_call_id = self.open_trace("llama_index", op)
        else:
            trace, parent_call_id = parent.trace, parent.call_id
        call = Call(None, parent, trace, parent_call_id, kind, op)
        if trace.exact:
            found: dict[Call, None] = {}
            if kind == "embedding":
                trace.producers((text,), found)
            else:
                trace.producers_within(text, found)
            if found:
                call.upstream = found
        return call

    def clear(self) -> None:
        self.states.clear()
        self.closed.clear()


_ACTIVE: Tracker | None = None


def begin_model_call(
    runtime: Runtime, kind: str, op: str, model: str | None, text: str
) -> Call | None:
    """The call of one request of an instrumented model: under the span it is made in (when
    lineage is recorded), else in the current musubi frame's run; None when neither."""
    tracker = _ACTIVE
    if tracker is not None:
        call = tracker.model_call(kind, op, text)
    else:
        frame = joinable(current_frame(), runtime.engine().recorder)
        if frame is None:
            return None
        call = Call(None, None, Trace(frame.run, False), frame.call_id, kind, op)
    if call is not None:
        call.model = model
        call.input_preview = brief(text)
    return call


def place(recorder: Recorder) -> tuple[Trace, Call | None, str | None] | None:
    """Where a call recorded through ``recorder`` belongs now: under the current span's call
    (lineage recorded, same store), else under the current musubi frame's call; None when
    there is neither (the caller records a run of its own)."""
    tracker = _ACTIVE
    if tracker is not None:
        parent = tracker.span_call(active_span_id.get())
        if parent is not None and parent is not UNRECORDED:
            mine = parent.trace.state.recorder
            if mine is recorder or mine.store.path == recorder.store.path:
                return parent.trace, parent, parent.call_id
    frame = joinable(current_frame(), recorder)
    if frame is None:
        return None
    return Trace(frame.run, False), None, frame.call_id


def end_model_call(
    call: Call,
    *,
    node_id: str | None,
    artifact_id: str | None,
    replayed: bool,
    tokens: tuple[int | None, int | None],
    saved_s: float | None,
    texts: list[str],
    output_preview: str | None,
    error: str | None = None,
) -> None:
    """Record a model call: executed (``node_id`` recorded) or replayed from ``node_id``."""
    call.node_id, call.artifact_id = node_id, artifact_id
    call.tokens_in, call.tokens_out = tokens
    finish(
        call,
        "done" if error is None else "failed",
        output_preview,
        error=error,
        replayed=replayed,
        saved_s=saved_s,
    )
    parent = call.parent
    if parent is None or error is not None:
        return
    if texts and not call.trace.ended:
        call.trace.produced(texts, call)
    if call.kind == "embedding":  # an embedding feeds the call it was computed in
        feeds = parent.feeds
        if feeds is None:
            parent.feeds = [call]
        else:
            feeds.append(call)


def active() -> Tracker | None:
    """The tracker of the current ``instrument()`` (None when lineage is not recorded)."""
    return _ACTIVE


def set_active(tracker: Tracker | None) -> None:
    global _ACTIVE
    _ACTIVE = tracker
