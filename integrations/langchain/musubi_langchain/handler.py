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

import os
import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.outputs import LLMResult

from musubi_core.context import current_node
from musubi_core.engine import Engine
from musubi_core.fastpath import NOT_PLAIN, plain_input_hash, plain_tree
from musubi_core.identity import NodeKey, make_node_id
from musubi_core.policy import StepConfiguration, StepType

from . import _correlate
from ._codec import encode_generations, usage_of
from ._content import atoms, to_plain
from ._engine import Guard, WriteBehindEngine, deferring, make_engine, storable
from ._keys import canonical_message_objects
from ._runs import Run, Traces

_CHAIN_CONFIG = StepConfiguration()  # recorded, never replayed by the handler itself
_MODEL_CONFIG = StepConfiguration(step_type=StepType.STOCHASTIC)
# Invocation params that are bookkeeping, not sampling (mirrors _keys' volatile model fields).
_VOLATILE_PARAMS = frozenset({"stream", "stream_options", "_type", "request_timeout", "max_retries"})


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


class MusubiCallbackHandler(BaseCallbackHandler):
    """Records LangChain runs as musubi lineage nodes.

    * ``contains`` edges follow ``parent_run_id``; ``data`` edges are inferred by content within
      a trace (a run whose input holds an earlier run's output depends on it).
    * A chat-model run served or filled by :class:`~musubi_langchain.MusubiCache` is linked to the
      cache's node, so a hit shows as a replay (with the tokens and seconds it saved).
    * Never raises into LangChain (a failure warns once); runs inline (deterministic order, and
      the cache correlation needs the caller's context); chain nodes are written in batches.

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
        self._traces = Traces()
        self._guard = Guard("MusubiCallbackHandler")

    @property
    def engine(self) -> Engine:
        engine = self._engine
        if engine is None:
            engine = self._engine = make_engine(self._path, self._store, self._namespace)
        if isinstance(engine, WriteBehindEngine) and engine.on_error is None:
            engine.on_error = self._guard.warn  # batches committed in the background
        return engine

    def flush(self) -> None:
        """Write buffered nodes now (they are also flushed in batches and at exit)."""
        self._guard.call(self.engine.flush, None)

    # ------------------------------------------------------------------ core logic
    def _start(
        self, run_id: UUID, parent_run_id: UUID | None, kind: str, name: str, inputs: Any
    ) -> Run:
        # The input is reduced to plain data once, when the run starts: it is what the run was
        # given (identity), and the data-edge atoms of a mapping input reuse it.
        plain = to_plain(inputs)
        run = self._traces.start(run_id, parent_run_id, kind, name, atoms(inputs, plain))
        run.inputs = inputs
        run.extra["plain"] = plain
        return run

    def _node_key(self, op_name: str, plain: Any) -> NodeKey:
        """``engine.key(op_name, plain)``; plain JSON data is hashed by the C JSON encoder
        (byte-for-byte the core's canonical form, see ``musubi_core.fastpath``)."""
        tree = plain_tree(plain)
        if tree is not NOT_PLAIN:
            try:
                in_hash = plain_input_hash(tree)
            except ValueError:  # e.g. an int too long to print: the core says why
                return self.engine.key(op_name, plain)
            return NodeKey(make_node_id(op_name, in_hash), op_name, op_name, in_hash, ())
        return self.engine.key(op_name, plain)

    def _key(self, run: Run) -> NodeKey:
        plain = run.extra["plain"] if "plain" in run.extra else to_plain(run.inputs)
        return self._node_key(f"{run.kind}:{run.name}", plain)

    def _edges(self, run: Run, node_id: str) -> None:
        engine = self.engine
        for child in run.children:
            engine.add_edge(node_id, child, "contains", defer=True)
        for up, artifact in run.upstream.items():
            if up != node_id:
                engine.add_edge(up, node_id, "data", defer=True, parent_artifact_id=artifact)
        if run.parent is None:
            outer = current_node()  # a @step / ctx.step this trace runs inside
            if outer is not None and outer != node_id:
                engine.add_edge(outer, node_id, "contains", defer=True)

    def _end(self, run_id: UUID, output: Any, *, label: str | None = None) -> None:
        run = self._traces.get(run_id)
        if run is None:
            return
        node_id: str | None = None
        artifact: str | None = None
        plain = to_plain(output)
        try:
            key = self._key(run)
            rec = self.engine.record(
                key,
                storable(self.engine, plain),
                _CHAIN_CONFIG,
                kind=run.kind,
                duration_s=time.monotonic() - run.started,
                label=label or run.name,
                defer=True,
            )
            node_id, artifact = key.node_id, rec.artifact_id
            self._edges(run, node_id)
        finally:
            self._traces.finish(run_id, atoms(output, plain), node_id, artifact)

    def _error(self, run_id: UUID, error: BaseException) -> None:
        run = self._traces.get(run_id)
        if run is None:
            return
        node_id: str | None = None
        model = run.kind in ("chat_model", "llm")
        try:
            if model:
                _correlate.discard(run_id)
                _correlate.take(run_id)
            # Our own key, never the cache's node: a failed call must not overwrite (or
            # poison) the completion a later retry will store there.
            key = self._model_key(run) if model else self._key(run)
            self.engine.record_failure(
                key,
                error,
                _MODEL_CONFIG if model else _CHAIN_CONFIG,
                kind=run.kind,
                duration_s=time.monotonic() - run.started,
                label=run.name,
                defer=True,
            )
            node_id = key.node_id
            self._edges(run, node_id)
        finally:
            # A failed run produced nothing downstream can depend on.
            self._traces.finish(run_id, set(), node_id, None)

    def _model_key(self, run: Run) -> NodeKey:
        """The handler's own key for a model run no musubi cache looked up."""
        messages = run.extra.get("messages")
        params = {
            k: v
            for k, v in (run.extra.get("params") or {}).items()
            if k not in _VOLATILE_PARAMS and v is not None
        }
        inputs = (
            {"messages": canonical_message_objects(messages), "params": to_plain(params)}
            if messages is not None
            else {"prompt": run.inputs, "params": to_plain(params)}
        )
        return self._node_key(f"{run.kind}:{run.name}", inputs)

    def _model_end(self, run_id: UUID, response: LLMResult) -> None:
        run = self._traces.get(run_id)
        if run is None:
            return
        _correlate.discard(run_id)
        report = _correlate.take(run_id)
        node_id: str | None = None
        artifact: str | None = None
        try:
            generations = [g for gens in response.generations for g in gens]
            if report is not None:
                # The cache looked this call up: its lookup counted the replay (hit) or its
                # update recorded the node (miss). Only the trace edges are ours to add.
                node_id = report.node_id
            else:
                key = self._model_key(run)
                tokens_in, tokens_out = usage_of(generations)
                rec = self.engine.record(
                    key,
                    storable(self.engine, encode_generations(generations)),
                    _MODEL_CONFIG,
                    kind=run.kind,
                    duration_s=time.monotonic() - run.started,
                    tokens_in=tokens_in,
                    tokens_out=tokens_out,
                    label=run.name,
                    defer=True,
                )
                node_id, artifact = key.node_id, rec.artifact_id
            self._edges(run, node_id)
        finally:
            self._traces.finish(run_id, atoms(response), node_id, artifact)

    def _safe(self, fn: Any, *args: Any) -> None:
        try:
            engine = self._engine if self._engine is not None else self.engine
            with deferring(engine):  # a due batch is committed off this thread
                fn(*args)
        except Exception as exc:  # never raise into LangChain
            self._guard.warn(exc)

    # ------------------------------------------------------------------ chains
    def on_chain_start(
        self,
        serialized: dict[str, Any] | None,
        inputs: dict[str, Any] | Any,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Start a chain run (prompt, parser, lambda, sequence, parallel, agent, graph node)."""
        self._safe(self._start, run_id, parent_run_id, "chain", _name(serialized, kwargs, "chain"), inputs)

    def on_chain_end(self, outputs: dict[str, Any] | Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the chain node."""
        self._safe(self._end, run_id, outputs)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the chain node as failed."""
        self._safe(self._error, run_id, error)

    # ------------------------------------------------------------------ models
    def _model_start(
        self,
        kind: str,
        serialized: dict[str, Any] | None,
        inputs: Any,
        messages: Sequence[BaseMessage] | None,
        run_id: UUID,
        parent_run_id: UUID | None,
        kwargs: dict[str, Any],
    ) -> None:
        if kind == "chat_model":
            _correlate.push(run_id)  # first: the cache lookup follows right after this callback
        name = _name(serialized, kwargs, kind)
        run = self._start(run_id, parent_run_id, kind, name, inputs)
        run.extra["messages"] = messages
        run.extra["params"] = kwargs.get("invocation_params") or {}

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Start a chat-model run (and announce it to the cache for correlation)."""
        msgs = messages[0] if messages else []
        self._safe(self._model_start, "chat_model", serialized, msgs, msgs, run_id, parent_run_id, kwargs)

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Start a text-LLM run (LangChain sends none for a cache hit of a text LLM)."""
        prompt = prompts[0] if prompts else ""
        self._safe(self._model_start, "llm", serialized, prompt, None, run_id, parent_run_id, kwargs)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Link (or, without a musubi cache, record) the model node."""
        self._safe(self._model_end, run_id, response)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the model node as failed."""
        self._safe(self._error, run_id, error)

    # ------------------------------------------------------------------ tools, retrievers
    def on_tool_start(
        self,
        serialized: dict[str, Any] | None,
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Start a tool run (its structured ``inputs`` when given, else the input string)."""
        value = inputs if inputs is not None else input_str
        self._safe(self._start, run_id, parent_run_id, "tool", _name(serialized, kwargs, "tool"), value)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the tool node."""
        self._safe(self._end, run_id, output)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the tool node as failed."""
        self._safe(self._error, run_id, error)

    def on_retriever_start(
        self,
        serialized: dict[str, Any] | None,
        query: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Start a retriever run."""
        name = _name(serialized, kwargs, "retriever")
        self._safe(self._start, run_id, parent_run_id, "retriever", name, {"query": query})

    def on_retriever_end(self, documents: Sequence[Document], *, run_id: UUID, **kwargs: Any) -> None:
        """Record the retriever node (its documents are the artifact)."""
        self._safe(self._end, run_id, list(documents))

    def on_retriever_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """Record the retriever node as failed."""
        self._safe(self._error, run_id, error)
