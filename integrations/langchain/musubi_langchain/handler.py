"""``MusubiCallbackHandler``: every chain, chat model, LLM, tool and retriever run becomes a call.

Example:
    >>> import os, tempfile
    >>> from langchain_core.language_models import FakeListChatModel
    >>> from langchain_core.prompts import ChatPromptTemplate
    >>> db = os.path.join(tempfile.mkdtemp(), "m.db")
    >>> handler = MusubiCallbackHandler(db)
    >>> chain = ChatPromptTemplate.from_template("say {x}") | FakeListChatModel(responses=["ok"])
    >>> chain.invoke({"x": "ok"}, config={"callbacks": [handler]}).content
    'ok'
    >>> handler.flush()
    >>> [(r.kind, r.calls) for r in handler.engine.store.list_runs()]
    [('langchain', 3)]
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from uuid import UUID, uuid4

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult

from musubi_core.declared import DECLARED_KIND
from musubi_core.engine import Engine
from musubi_core.identity import resolve_namespace
from musubi_core.probe import artifact_id_for
from musubi_core.record import current_frame, joinable, preview
from musubi_core.record.recorder import Batch, Recorder
from musubi_core.store import ArtifactWrite

from . import _correlate
from ._codec import usage_of
from ._content import content_atom, to_plain
from ._engine import Guard, make_engine, storable
from ._runs import LATER, Run, Trace, read_text

_MODEL_KINDS = frozenset({"chat_model", "llm"})
# Kinds whose output is kept as an artifact (what a retriever returned, what a tool answered):
# lineage shows exactly what flowed. Chains keep previews only; model outputs are the cache's.
_KEEP_OUTPUT = frozenset({"tool", "retriever"})
_MODEL_PARAMS = ("model", "model_name", "model_id")
_GRAPH_NODE_KIND = "graph_node"
# Pieces of a live stream's text kept for a failed call's preview (a preview is short).
_MAX_STREAMED_PARTS = 256
# Ended traces of runs of their own whose rows are made in one pass (see _ended), or those that
# ended this many seconds ago (the recorder's thread also takes them before each commit).
_BATCH = 64
_BATCH_S = 0.25


# Live handlers: a forked child gets new locks (a thread of the parent may have held one).
_HANDLERS: weakref.WeakSet[MusubiCallbackHandler] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for handler in list(_HANDLERS):
        handler._rows_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _drain(done: deque[Trace]) -> Iterator[Trace]:
    """Take the traces of ``done`` (several threads may drain it: each trace goes to one)."""
    while True:
        try:
            yield done.popleft()
        except IndexError:
            return


def _name(serialized: dict[str, Any] | None, name: Any, default: str) -> str:
    if isinstance(name, str) and name:
        return name
    if serialized:
        if isinstance(serialized.get("name"), str):
            return str(serialized["name"])
        ident = serialized.get("id")
        if isinstance(ident, list) and ident:
            return str(ident[-1])
    return default


_now = time.time


def _generation_text(generations: Sequence[Any]) -> str | None:
    """A model's answer (its first generation's text), whole."""
    if not generations:
        return None
    text = getattr(generations[0], "text", None)
    if type(text) is str:
        return text
    return preview(text) if isinstance(text, str) else None


def _output_atoms(trace: Trace, generations: list[Any]) -> frozenset[Any]:
    """The flow atoms of a model's answer: those of each generation's message (what the next
    step is given, which is then read once) or text."""
    if len(generations) == 1:
        gen = generations[0]
        message = getattr(gen, "message", None)
        return (trace.observe(message) if message is not None else read_text(gen.text))[1]
    atoms: set[Any] = set()
    for gen in generations:
        message = getattr(gen, "message", None)
        atoms.update(trace.observe(message)[1] if message is not None else read_text(gen.text)[1])
    return frozenset(atoms)


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:4000]


def _model_of(params: Any) -> str | None:
    if type(params) is dict:
        for field in _MODEL_PARAMS:
            value = params.get(field)
            if type(value) is str:
                return value
    return None


class MusubiCallbackHandler(BaseCallbackHandler):
    """Records LangChain runs as musubi calls: one musubi run per root LangChain run.

    * Every chain, chat model, LLM, tool and retriever run is a *call* of the trace's run, under
      its parent run's call; a trace started inside a ``@step`` or a durable step joins that
      run, under that call.
    * ``flows`` between calls are inferred by content within a trace (a run whose input holds
      an earlier run's output depends on it). Retriever and tool calls keep their output, so
      lineage shows exactly what flowed in that run.
    * A chat-model run served or filled by :class:`~musubi_langchain.MusubiCache` reaches the
      cache's node, so a hit is a replayed call (with the tokens and seconds it saved); the
      nodes upstream of it (through the calls that fed it) get data edges to it, which is what
      invalidation follows.
    * Never raises into LangChain (a failure warns once); runs inline (deterministic order, and
      the cache correlation needs the caller's context); the store's recorder commits in the
      background.

    Args:
        path: SQLite file (default: ``$MUSUBI_DB`` or ``.musubi/musubi.db``).
        engine: share an engine (e.g. the cache's) instead of opening ``path``.
        namespace: as for :class:`~musubi_langchain.MusubiCache`.
    """

    run_inline = True
    raise_error = False
    # Plain class attributes instead of BaseCallbackHandler's properties: LangChain reads one
    # before every callback it makes (a Python call each time otherwise).
    ignore_agent = False
    ignore_chain = False
    ignore_chat_model = False
    ignore_custom_event = False
    ignore_llm = False
    ignore_retriever = False
    ignore_retry = False

    def __init__(
        self,
        path: Any = None,
        *,
        engine: Engine | None = None,
        store: Any | None = None,
        namespace: str | None = None,
    ) -> None:
        super().__init__()
        self._path, self._store = path, store
        self._namespace = resolve_namespace(namespace, engine.namespace if engine else None)
        self._engine = engine
        self._ready: Engine | None = None  # the engine, once wired to our guard
        self._engine_lock = threading.Lock()
        # Live runs by their id's integer (``UUID.__hash__`` is Python code).
        self._runs: dict[int, Run] = {}
        self._guard = Guard("MusubiCallbackHandler")
        # Traces whose root has not ended (what they logged waits in them; see _pull).
        self._open: dict[int, Trace] = {}
        # Traces of runs of their own whose root ended, waiting to become rows (see _ended):
        # handed to the recorder in batches, by the caller or by the recorder's pull.
        self._done: deque[Trace] = deque()
        self._done_since = 0.0
        # One thread at a time turns logs into rows (a trace's events in order).
        self._rows_lock = threading.Lock()
        _HANDLERS.add(self)

    @property
    def engine(self) -> Engine:
        engine = self._ready
        if engine is not None:
            return engine
        # Locked: the first run may be a RunnableParallel branch on a worker thread.
        with self._engine_lock:
            if self._ready is not None:  # another thread wired it meanwhile
                return self._ready
            engine = self._engine
            if engine is None:
                engine = self._engine = make_engine(self._path, self._store, self._namespace)
            recorder = engine.recorder
            if recorder.on_error is None:
                recorder.on_error = self._guard.warn  # batches committed in the background
            recorder.add_source(self._pull)
            self._ready = engine
            # Its thread pulls what traces log (a long first trace's calls too): start it.
            recorder.submit()
        return engine

    def flush(self) -> None:
        """Commit what was recorded so far (the recorder also commits at least every quarter second)."""
        self._guard.call(self.engine.flush, None)

    # ------------------------------------------------------------------ core logic
    def _begin(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        kind: str,
        name: str,
        inputs: Any,
    ) -> Run:
        """Register a run: its call id and place in the call tree, its input atoms and the
        calls whose output fed it."""
        runs = self._runs
        parent = runs.get(parent_run_id.int) if parent_run_id is not None else None
        if parent is not None:
            trace = parent.trace
            run = Run(run_id, parent, trace, kind, name)
        else:
            recorder = (self._ready or self.engine).recorder
            frame = current_frame()
            if frame is not None:
                frame = joinable(frame, recorder)
            # A run of its own (made when the trace is processed), or the current one.
            trace = Trace(None, recorder, self._namespace) if frame is None else Trace(frame.run)
            self._open[id(trace)] = trace
            run = trace.root = Run(run_id, None, trace, kind, name)
            if frame is not None:
                run.parent_call_id = frame.call_id
        run.input_preview, atoms = trace.observe(inputs)
        if kind == "tool":
            if atoms is LATER:
                run.input_preview, atoms = read_text(inputs)
            more: set[Any] = set(atoms)
            content_atom(more, inputs)  # a tool gets a filtered copy of the call's args
            atoms = frozenset(more)
        run.input_atoms = atoms
        trace.log.append(run)
        runs[run_id.int] = run
        return run

    def _record(
        self,
        run: Run,
        status: str,
        atoms: frozenset[Any] | None,
        *,
        error: str | None = None,
        artifact: ArtifactWrite | None = None,
        tokens: tuple[int | None, int | None] = (None, None),
        replayed: bool = False,
        saved_s: float | None = None,
        output_preview: str | None = None,
    ) -> None:
        """Log ``run``'s end: its output ``atoms`` (None: nothing can depend on it) and what
        its call row needs; the trace turns it into rows later (``Trace.process``)."""
        trace = run.trace
        trace.log.append(
            (
                run,
                atoms,
                _now() - run.started_at,
                status,
                error,
                output_preview,
                tokens[0],
                tokens[1],
                1 if replayed else 0,
                saved_s,
                artifact,
            )
        )
        if run.parent is None:
            self._ended(trace, status, error)

    def _ended(self, trace: Trace, status: str, error: str | None) -> None:
        """A root ended. A run of the trace's own is handed to the recorder with others (up to
        ``_BATCH`` traces, or what waited a quarter of a second): the rows of many traces are
        made in one pass, and the recorder also takes them before each commit. A trace that
        joined a run (a chain inside a ``@step``) is handed over now: the run's totals must
        count its calls before the run ends."""
        self._open.pop(id(trace), None)
        trace.ended(status, error)
        if not trace.own:
            self._hand_over((trace,), trace.state.recorder)
            return
        done = self._done
        recorder = self.engine.recorder
        if not done:
            self._done_since = time.monotonic()
            done.append(trace)
            # The recorder's thread takes these traces at its next commit: start it if it is
            # not running (a first trace; after a fork).
            recorder.submit()
        else:
            done.append(trace)
        if len(done) >= _BATCH or time.monotonic() - self._done_since > _BATCH_S:
            self._hand_over(_drain(done), recorder)

    def _rows(
        self, open_traces: Sequence[Trace], ended: Iterable[Trace]
    ) -> tuple[list[list[Any]], list[Any]]:
        """The rows of what ``open_traces`` logged so far and of the ``ended`` traces (with
        their runs' rows): (calls, flows, edges, artifacts), runs."""
        batch: list[list[Any]] = [[], [], [], []]
        runs = []
        with self._rows_lock:
            for trace in open_traces:
                trace.process(batch)
            for trace in ended:
                trace.process(batch)
                trace.index.clear()
                if trace.own:
                    runs.append(trace.run_row())
        return batch, runs

    def _hand_over(self, ended: Iterable[Trace], recorder: Recorder) -> None:
        (calls, flows, edges, artifacts), runs = self._rows((), ended)
        if calls or runs:
            recorder.submit(calls=calls, flows=flows, edges=edges, artifacts=artifacts, runs=runs)

    def _pull(self) -> Batch | None:
        """What running traces logged so far and the traces that ended (the recorder pulls it
        before each commit, so a long agent loop's calls reach the store while it runs)."""
        (calls, flows, edges, artifacts), runs = self._rows(
            list(self._open.values()), _drain(self._done)
        )
        return ((), artifacts, edges, calls, flows, runs, ()) if calls or runs else None

    def _artifact(self, run: Run, plain: Any) -> ArtifactWrite:
        engine = self.engine
        encoding, payload = engine.codec.encode(storable(engine, plain))
        artifact_id = artifact_id_for(encoding, payload)
        run.artifact_id = artifact_id
        return ArtifactWrite(artifact_id, encoding, payload, "")

    def _end(self, run: Run | None, output: Any) -> None:
        """Record a run that ended (``run`` popped from the live runs)."""
        if run is None:
            return
        try:
            kind = run.kind
            artifact = None
            report = _correlate.take(run.run_id) if kind == "tool" else None
            if report is not None:
                # A declared tool: its call reaches the node it executed or replayed.
                run.kind, run.node_id, run.artifact_id = (
                    DECLARED_KIND, report.node_id, report.artifact_id,
                )
            elif kind in _KEEP_OUTPUT:
                artifact = self._artifact(run, to_plain(output))
            text, atoms = run.trace.observe(output)
            self._record(
                run,
                "done",
                atoms,
                artifact=artifact,
                output_preview=text,
                replayed=report is not None and report.replayed,
                saved_s=report.saved_s if report is not None else None,
            )
        finally:
            if run.parent is None:
                self._forget(run.trace)

    def _forget(self, trace: Trace) -> None:
        """A root's end was not logged (our own error): the trace is not left open."""
        if trace.outcome is None:
            self._open.pop(id(trace), None)
            trace.close()

    def _error(self, run_id: UUID, error: BaseException) -> None:
        run = self._runs.pop(run_id.int, None)
        if run is None:
            return
        try:
            streamed = None
            if run.kind in _MODEL_KINDS:
                _correlate.discard(run_id)
                _correlate.take(run_id)
                _correlate.failed(run_id)  # a single flight held for it is released
                if run.streamed:
                    streamed = preview("".join(run.streamed))
            # A failed run produced nothing downstream can depend on: it is not indexed.
            self._record(run, "failed", None, error=_error_text(error), output_preview=streamed)
        finally:
            if run.parent is None:
                self._forget(run.trace)

    def _model_end(self, run_id: UUID, response: LLMResult) -> None:
        run = self._runs.pop(run_id.int, None)
        if run is None:
            return
        try:
            _correlate.discard(run_id)
            report = _correlate.take(run_id)
            batches = response.generations  # one batch of generations per prompt
            generations = (
                batches[0] if len(batches) == 1 else [g for gens in batches for g in gens]
            )
            text = _generation_text(generations)  # whole: the trace makes it a preview
            atoms = _output_atoms(run.trace, generations) if run.parent is not None else None
            if report is not None and report.replayed:
                # Served by the cache: a replay of its node (its lookup counted the replay).
                run.node_id, run.artifact_id = report.node_id, report.artifact_id
                self._record(
                    run,
                    "done",
                    atoms,
                    tokens=(report.tokens_in, report.tokens_out),
                    replayed=True,
                    saved_s=report.saved_s,
                    output_preview=text,
                )
            else:
                if report is not None:  # the cache recorded the completion as this node
                    run.node_id, run.artifact_id = report.node_id, report.artifact_id
                tokens = usage_of(generations)
                self._record(run, "done", atoms, tokens=tokens, output_preview=text)
        finally:
            if run.parent is None:
                self._forget(run.trace)

    def record_cached(
        self,
        parent_run_id: UUID | None,
        kind: str,
        name: str,
        inputs: Any,
        output: Any,
        *,
        node_id: str,
        artifact_id: str | None,
        saved_s: float | None,
    ) -> None:
        """Record a step LangChain skipped because a cache served it (a LangGraph node-cache
        hit) as a replayed call under ``parent_run_id``'s call (its own run when that run is
        unknown). Never raises."""
        try:
            run = self._begin(uuid4(), parent_run_id, kind, name, inputs)
            self._runs.pop(run.run_id.int, None)
            run.node_id, run.artifact_id = node_id, artifact_id
            text, atoms = run.trace.observe(output)
            self._record(run, "done", atoms, replayed=True, saved_s=saved_s, output_preview=text)
        except Exception as exc:
            self._guard.warn(exc)

    # ------------------------------------------------------------------ chains
    # Each callback does its own try/except (no wrapper call): the handler runs on every step.
    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: dict[str, Any] | Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        name: str | None = None,
        run_type: str | None = None,
        **kwargs: Any,
    ) -> None:
        """Start a chain run (prompt, parser, lambda, sequence, parallel, agent, graph node)."""
        # (What LangChain passes is named: no dict of keyword arguments to build.)
        try:
            if not name or type(name) is not str:
                name = _name(serialized, name, "chain")
            run = self._begin(run_id, parent_run_id, "chain", name, inputs)
            if _correlate.expected_nodes:
                node_id = _correlate.node_for(metadata)
                if node_id is not None:  # a LangGraph node whose cache entry missed: fills it
                    run.kind, run.node_id = _GRAPH_NODE_KIND, node_id
        except Exception as exc:  # never raise into LangChain
            self._guard.warn(exc)

    def on_chain_end(
        self,
        outputs: dict[str, Any] | Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Record the chain's call."""
        try:
            run = self._runs.pop(run_id.int, None)
            if run is None:
                return
            if run.kind == "chain":  # the common case, inline
                trace = run.trace
                text, atoms = trace.observe(outputs)
                duration = _now() - run.started_at
                # (see Trace.process: no tokens, not replayed, no seconds saved, no artifact)
                trace.log.append((run, atoms, duration, "done", None, text, None, None, 0, None, None))
                if run.parent is None:
                    self._ended(trace, "done", None)
                return
            self._end(run, outputs)
        except Exception as exc:
            self._guard.warn(exc)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the chain's call as failed."""
        try:
            self._error(run_id, error)
        except Exception as exc:
            self._guard.warn(exc)

    # ------------------------------------------------------------------ models
    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        name: str | None = None,
        invocation_params: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Start a chat-model run (and announce it to the cache for correlation)."""
        try:
            _correlate.push(run_id)  # first: the cache lookup follows right after this callback
            msgs = messages[0] if messages else []
            run = self._begin(
                run_id, parent_run_id, "chat_model", _name(serialized, name, "chat_model"), msgs
            )
            run.model = _model_of(invocation_params)
        except Exception as exc:
            self._guard.warn(exc)

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Start a text-LLM run (LangChain sends none for a cache hit of a text LLM)."""
        try:
            prompt = prompts[0] if prompts else ""
            run = self._begin(
                run_id, parent_run_id, "llm", _name(serialized, kwargs.get("name"), "llm"), prompt
            )
            run.model = _model_of(kwargs.get("invocation_params"))
        except Exception as exc:
            self._guard.warn(exc)

    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Record the model's call (a replay of the cache's node when it served it)."""
        try:
            self._model_end(run_id, response)
        except Exception as exc:
            self._guard.warn(exc)

    def on_stream_event(self, event: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """A v3 protocol event of a live model stream (``stream_events(version="v3")``, or a
        model streaming inside a graph streamed that way): its text so far is kept, so a
        stream that fails shows what it delivered. Events LangChain (or musubi) replays for
        a cache hit are not live output: the call is recorded as the replay it is."""
        try:
            if type(event) is not dict or event.get("event") != "content-block-delta":
                return
            run = self._runs.get(run_id.int)
            if run is None or run.kind != "chat_model" or _correlate.replaying(run_id):
                return
            delta = event.get("delta")
            text = delta.get("text") if type(delta) is dict else None
            if type(text) is str and text:
                streamed = run.streamed
                if streamed is None:
                    run.streamed = [text]
                elif len(streamed) < _MAX_STREAMED_PARTS:
                    streamed.append(text)
        except Exception as exc:
            self._guard.warn(exc)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the model's call as failed."""
        try:
            self._error(run_id, error)
        except Exception as exc:
            self._guard.warn(exc)

    # ------------------------------------------------------------------ tools, retrievers
    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Start a tool run (its structured ``inputs`` when given, else the input string)."""
        try:
            value = inputs if inputs is not None else input_str
            name = _name(serialized, kwargs.get("name"), "tool")
            self._begin(run_id, parent_run_id, "tool", name, value)
        except Exception as exc:
            self._guard.warn(exc)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the tool's call (its output is kept)."""
        try:
            self._end(self._runs.pop(run_id.int, None), output)
        except Exception as exc:
            self._guard.warn(exc)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the tool's call as failed."""
        try:
            self._error(run_id, error)
        except Exception as exc:
            self._guard.warn(exc)

    def on_retriever_start(
        self,
        serialized: dict[str, Any] | None,
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Start a retriever run."""
        try:
            name = _name(serialized, kwargs.get("name"), "retriever")
            self._begin(run_id, parent_run_id, "retriever", name, {"query": query})
        except Exception as exc:
            self._guard.warn(exc)

    def on_retriever_end(
        self, documents: Sequence[Document], *, run_id: UUID, **kwargs: Any
    ) -> None:
        """Record the retriever's call (its documents are kept)."""
        try:
            self._end(self._runs.pop(run_id.int, None), list(documents))
        except Exception as exc:
            self._guard.warn(exc)

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the retriever's call as failed."""
        try:
            self._error(run_id, error)
        except Exception as exc:
            self._guard.warn(exc)
