"""``MusubiCallbackHandler``: every chain, chat model, LLM, tool and retriever run becomes a node.

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
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult

from musubi_core.context import current_node, current_run
from musubi_core.engine import Engine, artifact_id_for
from musubi_core.fastpath import NOT_PLAIN, plain_tree
from musubi_core.identity import HASH_SCHEME, NodeKey
from musubi_core.policy import StepConfiguration, StepType, expiry

from . import _correlate
from ._codec import encode_generations, usage_of
from ._content import content_atom, flow_atoms, to_plain
from ._engine import (
    ArtifactRow,
    EdgeRow,
    Guard,
    NodeRow,
    WriteBehindEngine,
    canonical_json,
    make_engine,
    push,
    storable,
)
from ._keys import canonical_message_objects
from ._runs import Run, Trace, Traces, infer

_CHAIN_CONFIG = StepConfiguration()  # recorded, never replayed by the handler itself
_MODEL_CONFIG = StepConfiguration(step_type=StepType.STOCHASTIC)
_CHAIN_STEP_TYPE = _CHAIN_CONFIG.step_type.value
_MODEL_STEP_TYPE = _MODEL_CONFIG.step_type.value
# Invocation params that are bookkeeping, not sampling (mirrors _keys' volatile model fields).
_VOLATILE_PARAMS = frozenset(
    {"stream", "stream_options", "_type", "request_timeout", "max_retries"}
)
_MODEL_KINDS = frozenset({"chat_model", "llm"})
_SPAN_SCHEME = "musubi_langchain/span/1"
# The core's canonical form of plain JSON data (``musubi_core.fastpath.plain_input_hash``,
# ``_engine.canonical_json``): sorted keys, no spaces, UTF-8. A model key's input is ``{"messages": ..., "params": ...}``, so
# its canonical text is the two parts' texts in that frame, and the params part, the same for
# every call of a configured model, is computed once per distinct set of invocation params.
_CANONICAL_JSON = canonical_json
_ATOMIC_PARAMS = frozenset({str, int, bool, type(None)})
_PARAMS_TEXT: dict[tuple[Any, ...], str] = {}
_PARAMS_TEXT_MAX = 256


def _params_memo_key(params: dict[str, Any]) -> tuple[Any, ...] | None:
    """A key telling apart every set of params with a different canonical text (exact types,
    floats by repr: ``1 == 1.0 == True`` and ``0.0 == -0.0``); None unless all are atoms."""
    out: list[Any] = []
    for k, v in params.items():
        t = type(v)
        if t is float:
            out.append((k, t, repr(v)))
        elif t in _ATOMIC_PARAMS and type(k) is str:
            out.append((k, t, v))
        else:
            return None
    return tuple(out)


def _model_params(raw: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (raw or {}).items() if k not in _VOLATILE_PARAMS and v is not None}


_NODE_ID_PREFIX = f"{HASH_SCHEME}\x1f"


def _node_id(op: str, in_hash: str) -> str:
    """``identity.make_node_id(op, in_hash)`` (no upstream), without its generic steps."""
    return hashlib.sha256(f"{_NODE_ID_PREFIX}{op}\x1f{in_hash}\x1f".encode()).hexdigest()


def _name(serialized: dict[str, Any] | None, kwargs: dict[str, Any], default: str) -> str:
    name = kwargs.get("name")
    if isinstance(name, str) and name:
        return name
    if serialized:
        if isinstance(serialized.get("name"), str):
            return str(serialized["name"])
        ident = serialized.get("id")
        if isinstance(ident, list) and ident:
            return str(ident[-1])
    return default


class _SpanKey(NamedTuple):
    """What a node row needs of a chain span's key (a NodeKey without upstream, built cheaper)."""

    node_id: str
    op: str
    op_name: str
    input_hash: str


def _span_key(trace: Trace, op_name: str, inputs: Any) -> _SpanKey:
    """The key of a chain run in a trace: the root run's input hash and which of the trace's
    values (numbered in the order the trace met them, by identity) the run was given.

    A chain span is never replayed, so its key needs no canonical form of its input: it is
    stable across runs of the same root input (same chain, same ids), distinct for different
    root inputs, and, as with content keys, two runs of one operation given the same value in
    a trace are one node (a RunnableSequence inside a RunnableParallel that got the root
    sequence's input is the root's node). One hash instead of reducing every intermediate
    value (prompt values, messages) to canonical data.
    """
    material = f"{_SPAN_SCHEME}\x1f{trace.root_hash}\x1f{trace.slot(inputs)}"
    in_hash = hashlib.sha256(material.encode("utf-8")).hexdigest()
    return _SpanKey(_node_id(op_name, in_hash), op_name, op_name, in_hash)


def _node_row(
    run: Run,
    key: NodeKey | _SpanKey,
    namespace: str,
    step_type: str,
    status: str,
    artifact_id: str | None = None,
    *,
    finished_at: float | None = None,
    expires_at: float | None = None,
    tokens: tuple[int | None, int | None] = (None, None),
    error: str | None = None,
) -> NodeRow:
    """``run``'s node row: the fields of ``NodeWrite`` in order (see ``_engine.NodeRow``)."""
    return (
        key.node_id,
        key.op,
        key.op_name,
        run.kind,
        step_type,
        key.input_hash,
        status,
        artifact_id,
        namespace,
        None,  # started_at
        time.time() if finished_at is None else finished_at,
        expires_at,
        time.monotonic() - run.started,  # duration_s
        tokens[0],
        tokens[1],
        error,
        None,  # owner
        run.name,  # label
        current_run(),  # run_id
        None,  # meta
        1,  # executed
    )


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:4000]


class MusubiCallbackHandler(BaseCallbackHandler):
    """Records LangChain runs as musubi lineage nodes.

    * ``contains`` edges follow ``parent_run_id``; ``data`` edges are inferred by content within
      a trace (a run whose input holds an earlier run's output depends on it).
    * A chat-model run served or filled by :class:`~musubi_langchain.MusubiCache` is linked to the
      cache's node, so a hit shows as a replay (with the tokens and seconds it saved).
    * Chain runs (prompts, parsers, lambdas, sequences) are nodes without a stored value (they
      are never replayed): a root chain is keyed by its input, the chains inside it by the
      root's input and the value they were given (see ``_span_key``). Tool and retriever nodes
      keep their output; model nodes are the cache's (or, without a musubi cache, the
      handler's own record of the completion).
    * Never raises into LangChain (a failure warns once); runs inline (deterministic order, and
      the cache correlation needs the caller's context); nodes are written in batches.

    Args:
        path: SQLite file (default: ``$MUSUBI_DB`` or ``.musubi/musubi.db``).
        engine: share an engine (e.g. the cache's) instead of opening ``path``.
        namespace: as for :class:`~musubi_langchain.MusubiCache`.
    """

    run_inline = True
    raise_error = False

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        engine: Engine | None = None,
        store: Any | None = None,
        namespace: str = "default",
    ) -> None:
        super().__init__()
        self._path, self._store, self._namespace = path, store, namespace
        self._engine = engine
        self._ready: Engine | None = None  # the engine, once wired to our guard
        self._engine_lock = threading.Lock()
        self._traces = Traces()
        self._guard = Guard("MusubiCallbackHandler")

    @property
    def engine(self) -> Engine:
        engine = self._ready
        if engine is not None:
            return engine
        # Locked: the first run to end may be a RunnableParallel branch on a worker thread,
        # racing its siblings; two engines would split (and lose) the buffered writes.
        with self._engine_lock:
            engine = self._engine
            if engine is None:
                engine = self._engine = make_engine(self._path, self._store, self._namespace)
            if isinstance(engine, WriteBehindEngine) and engine.on_error is None:
                engine.on_error = self._guard.warn  # batches committed in the background
            self._ready = engine
        return engine

    def flush(self) -> None:
        """Write buffered nodes now (they are also flushed in batches and at exit)."""
        self._guard.call(self.engine.flush, None)

    # ------------------------------------------------------------------ core logic
    def _node_key(self, op_name: str, plain: Any) -> NodeKey:
        """``engine.key(op_name, plain)``; plain JSON data is hashed by the C JSON encoder
        (byte-for-byte the core's canonical form, see ``musubi_core.fastpath``)."""
        tree = plain_tree(plain)
        if tree is not NOT_PLAIN:
            try:  # plain_input_hash(tree)
                in_hash = hashlib.sha256(
                    canonical_json(tree).encode("utf-8", "surrogatepass")
                ).hexdigest()
            except ValueError:  # e.g. an int too long to print: the core says why
                return self.engine.key(op_name, plain)
            return NodeKey(_node_id(op_name, in_hash), op_name, op_name, in_hash, ())
        return self.engine.key(op_name, plain)

    def _begin(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        kind: str,
        name: str,
        inputs: Any,
    ) -> Run:
        """Register a run: its input atoms, its data upstream and (but for models) its key."""
        traces = self._traces
        parent = traces.get(parent_run_id) if parent_run_id is not None else None
        trace = parent.trace if parent is not None else Trace()
        run = Run(run_id, parent, trace, kind, name)
        atoms = run.input_atoms = flow_atoms(inputs, trace.keep)
        if kind == "tool":
            content_atom(atoms, inputs)  # a tool gets a filtered copy of the call's args
        if trace.index:
            run.upstream = infer(trace, run)
        traces.add(run)
        if kind in _MODEL_KINDS:
            return run  # keyed when it ends: by the cache's report, or by _model_key
        op_name = f"{kind}:{name}"
        key: NodeKey | _SpanKey
        if kind != "chain" or trace.root_hash is None:
            # What the run was given is its identity (reduced to plain data when it starts).
            key = self._node_key(op_name, to_plain(inputs))
            if parent is None:
                trace.root_hash = key.input_hash
        if kind == "chain" and trace.root_hash is not None:
            key = _span_key(trace, op_name, inputs)
        run.node_id, run.key = key.node_id, key
        return run

    def _write(self, run: Run, node: NodeRow | None, artifact: ArtifactRow | None) -> None:
        """Buffer ``run``'s node row (None: the cache wrote it) and its edges' rows (tuples in
        the field order of the core's write objects, see ``_engine.NodeRow``)."""
        node_id = run.node_id
        assert node_id is not None
        edges: list[EdgeRow] = []
        parent = run.parent
        if parent is None:
            outer = current_node()  # a @step / ctx.step this trace runs inside
            if outer is not None and outer != node_id:
                edges.append((outer, node_id, "contains", None))
        elif parent.node_id is not None:
            edges.append((parent.node_id, node_id, "contains", None))
        else:  # a model run's node is known when it ends: it adds the edge then
            parent.children.append(node_id)
        for child in run.children:
            edges.append((node_id, child, "contains", None))
        for up, up_artifact in run.upstream.items():
            if up != node_id:
                edges.append((up, node_id, "data", up_artifact))
        engine = self.engine
        if type(engine) is WriteBehindEngine and not engine._skips_writes():
            engine.stage(node, artifact, edges)
        else:
            push(engine, node, artifact, edges)  # (skips a read-only store's writes)

    def _artifact(self, engine: Engine, node_id: str, plain: Any) -> ArtifactRow:
        encoding, payload = engine.codec.encode(storable(engine, plain))
        return (artifact_id_for(encoding, payload), encoding, payload, node_id)

    def _end(self, run_id: UUID, output: Any) -> None:
        run = self._traces.pop(run_id)
        if run is None:
            return
        try:
            key = run.key  # a NodeKey or a _SpanKey
            if key is None:
                return  # its key could not be computed (already warned)
            engine = self.engine
            artifact = None
            if run.kind != "chain":  # tools and retrievers keep their output
                artifact = self._artifact(engine, key.node_id, to_plain(output))
                run.artifact_id = artifact[0]
            node = _node_row(run, key, engine.namespace, _CHAIN_STEP_TYPE, "done", run.artifact_id)
            self._write(run, node, artifact)
            if run.parent is not None:
                Traces.index(run, flow_atoms(output, run.trace.keep))
        finally:
            if run.parent is None:
                run.trace.close()

    def _error(self, run_id: UUID, error: BaseException) -> None:
        run = self._traces.pop(run_id)
        if run is None:
            return
        try:
            model = run.kind in _MODEL_KINDS
            if model:
                _correlate.discard(run_id)
                _correlate.take(run_id)
                # Our own key, never the cache's node: a failed call must not overwrite (or
                # poison) the completion a later retry will store there.
                key = self._model_key(run)
                run.node_id = key.node_id
            elif run.key is not None:
                key = run.key
            else:
                return
            engine = self.engine
            node = _node_row(
                run,
                key,
                engine.namespace,
                _MODEL_STEP_TYPE if model else _CHAIN_STEP_TYPE,
                "failed",
                error=_error_text(error),
            )
            # A failed run produced nothing downstream can depend on: it is not indexed.
            self._write(run, node, None)
        finally:
            if run.parent is None:
                run.trace.close()

    def _model_key(self, run: Run) -> NodeKey:
        """The handler's own key for a model run no musubi cache looked up."""
        key = self._fast_model_key(run)
        if key is not None:
            return key
        messages = run.messages
        params = _model_params(run.params)
        inputs = (
            {"messages": canonical_message_objects(messages), "params": to_plain(params)}
            if messages is not None
            else {"prompt": run.plain, "params": to_plain(params)}
        )
        return self._node_key(f"{run.kind}:{run.name}", inputs)

    def _fast_model_key(self, run: Run) -> NodeKey | None:
        """:meth:`_model_key` of a chat-model run whose messages and params are plain data,
        hashing the canonical text built from its parts (the same bytes); None otherwise."""
        messages = run.messages
        raw = run.params
        if messages is None or (raw is not None and type(raw) is not dict):
            return None
        memo = _params_memo_key(raw) if raw else ()
        params_text = _PARAMS_TEXT.get(memo) if memo is not None else None
        if params_text is None:
            tree = plain_tree(to_plain(_model_params(raw)))
            if tree is NOT_PLAIN:
                return None
            try:
                params_text = _CANONICAL_JSON(tree)
            except ValueError:
                return None
            if memo is not None:
                if len(_PARAMS_TEXT) >= _PARAMS_TEXT_MAX:
                    _PARAMS_TEXT.clear()
                _PARAMS_TEXT[memo] = params_text
        tree = plain_tree(canonical_message_objects(messages))
        if tree is NOT_PLAIN:
            return None
        try:
            text = f'{{"messages":{_CANONICAL_JSON(tree)},"params":{params_text}}}'
        except ValueError:
            return None
        in_hash = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        op_name = f"{run.kind}:{run.name}"
        return NodeKey(_node_id(op_name, in_hash), op_name, op_name, in_hash, ())

    def _model_end(self, run_id: UUID, response: LLMResult) -> None:
        run = self._traces.pop(run_id)
        if run is None:
            return
        try:
            _correlate.discard(run_id)
            report = _correlate.take(run_id)
            node: NodeRow | None = None
            artifact: ArtifactRow | None = None
            if report is not None:
                # The cache looked this call up: its lookup counted the replay (hit) or its
                # update recorded the node (miss). Only the trace edges are ours to add.
                run.node_id = report.node_id
            else:
                key = self._model_key(run)
                engine = self.engine
                generations = [g for gens in response.generations for g in gens]
                artifact = self._artifact(engine, key.node_id, encode_generations(generations))
                now = time.time()
                node = _node_row(
                    run,
                    key,
                    engine.namespace,
                    _MODEL_STEP_TYPE,
                    "done",
                    artifact[0],
                    finished_at=now,
                    expires_at=expiry(_MODEL_CONFIG, now),
                    tokens=usage_of(generations),
                )
                run.node_id, run.artifact_id = key.node_id, artifact[0]
            self._write(run, node, artifact)
            if run.parent is not None:
                Traces.index(run, flow_atoms(response, run.trace.keep))
        finally:
            if run.parent is None:
                run.trace.close()

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
        **kwargs: Any,
    ) -> None:
        """Start a chain run (prompt, parser, lambda, sequence, parallel, agent, graph node)."""
        try:
            name = kwargs.get("name")
            if not name or type(name) is not str:
                name = _name(serialized, kwargs, "chain")
            self._begin(run_id, parent_run_id, "chain", name, inputs)
        except Exception as exc:  # never raise into LangChain
            self._guard.warn(exc)

    def on_chain_end(self, outputs: dict[str, Any] | Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the chain node."""
        try:
            self._end(run_id, outputs)
        except Exception as exc:
            self._guard.warn(exc)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the chain node as failed."""
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
        **kwargs: Any,
    ) -> None:
        """Start a chat-model run (and announce it to the cache for correlation)."""
        try:
            _correlate.push(run_id)  # first: the cache lookup follows right after this callback
            msgs = messages[0] if messages else []
            run = self._begin(
                run_id, parent_run_id, "chat_model", _name(serialized, kwargs, "chat_model"), msgs
            )
            run.messages = msgs
            run.params = kwargs.get("invocation_params")
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
                run_id, parent_run_id, "llm", _name(serialized, kwargs, "llm"), prompt
            )
            run.plain = to_plain(prompt)
            run.params = kwargs.get("invocation_params")
        except Exception as exc:
            self._guard.warn(exc)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Link (or, without a musubi cache, record) the model node."""
        try:
            self._model_end(run_id, response)
        except Exception as exc:
            self._guard.warn(exc)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the model node as failed."""
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
            name = _name(serialized, kwargs, "tool")
            self._begin(run_id, parent_run_id, "tool", name, value)
        except Exception as exc:
            self._guard.warn(exc)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the tool node."""
        try:
            self._end(run_id, output)
        except Exception as exc:
            self._guard.warn(exc)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the tool node as failed."""
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
            name = _name(serialized, kwargs, "retriever")
            self._begin(run_id, parent_run_id, "retriever", name, {"query": query})
        except Exception as exc:
            self._guard.warn(exc)

    def on_retriever_end(
        self, documents: Sequence[Document], *, run_id: UUID, **kwargs: Any
    ) -> None:
        """Record the retriever node (its documents are the artifact)."""
        try:
            self._end(run_id, list(documents))
        except Exception as exc:
            self._guard.warn(exc)

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the retriever node as failed."""
        try:
            self._error(run_id, error)
        except Exception as exc:
            self._guard.warn(exc)
