"""Spans -> lineage nodes: the span handler, the event handler and per-trace bookkeeping.

A LlamaIndex span (``RetrieverQueryEngine.query``, ``VectorIndexRetriever.retrieve``,
``CompactAndRefine.synthesize``, a workflow step, ...) becomes a musubi node when it exits:

* identity: op name (``id_.partition("-")[0]``) + the component's configuration (including
  the models it holds) + a deterministic view of the span's arguments and of the prompt
  templates the component holds, computed at *enter* (LlamaIndex mutates some arguments in
  place, e.g. ``QueryBundle.embedding``; and ``DefaultRefineProgram`` is called with the
  context only, the question being partially formatted into its prompt);
* ``contains`` edges from the enclosing span's node (the call tree);
* ``data`` edges by content: a span whose inputs carry texts produced earlier in the same
  trace (retrieved nodes fed to synthesis) depends on their producer; a span whose result
  carries a text produced by one of its children depends on that child (LLM -> synthesis);
  an embedding computed inside a span feeds it (query embedding -> retrieval);
* LLM and embedding calls of instrumented models are recorded by the replay layer (one
  node per call, the same node whether it executed or replayed) and attached here through
  :func:`on_leaf`, with data edges from any producer whose text appears in the prompt.

Handlers never raise into LlamaIndex (the dispatcher swallows exceptions too, but a
``TypeError`` there would silently drop a span, so everything is caught and warned once).

Example::

    handler = MusubiSpanHandler.create(runtime)
    get_dispatcher().add_span_handler(handler)
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Generator
from typing import Any

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.span import BaseSpan, active_span_id
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.prompts.base import BasePromptTemplate
from llama_index.core.tools.types import BaseTool
from pydantic import PrivateAttr

from musubi_core import StepConfiguration, StepType, current_node
from musubi_core.identity import NodeKey, input_hash, make_node_id, make_op
from musubi_llama_index._identity import (
    class_path,
    identity_view,
    model_fingerprint,
    prompt_identity,
    text_atoms,
)
from musubi_llama_index._runtime import Runtime, guarded, warn_once

__all__ = ["MusubiEventHandler", "MusubiSpanHandler", "input_text", "on_leaf"]

_SPAN_CONFIG = StepConfiguration(step_type=StepType.DETERMINISTIC)
_MAX_ATOMS = 512
_MAX_CLOSED = 4096


class _Trace:
    """Content index of one root span: text -> node that produced it."""

    __slots__ = ("exact", "lock", "recent")

    def __init__(self) -> None:
        self.exact: dict[str, str] = {}
        self.recent: deque[tuple[str, str]] = deque(maxlen=256)  # for substring matching
        self.lock = threading.Lock()

    def register(self, atoms: list[str], node_id: str) -> None:
        with self.lock:
            for a in atoms:
                if len(self.exact) >= _MAX_ATOMS and a not in self.exact:
                    continue
                self.exact[a] = node_id
                self.recent.append((a, node_id))

    def producers_exact(self, atoms: list[str]) -> set[str]:
        with self.lock:
            return {self.exact[a] for a in atoms if a in self.exact}

    def producers_within(self, text: str) -> set[str]:
        """Producers whose text appears inside ``text`` (a prompt)."""
        if not text:
            return set()
        with self.lock:
            recent = list(self.recent)
        return {node for atom, node in recent if atom in text}


class _State:
    __slots__ = (
        "children",
        "class_fp",
        "data_children",
        "inputs",
        "kind",
        "label",
        "op",
        "parent_id",
        "record",
        "run_id",
        "t0",
        "trace",
        "upstream",
    )

    def __init__(self) -> None:
        self.children: list[str] = []
        self.data_children: list[str] = []
        self.upstream: set[str] = set()
        self.class_fp: Any = None
        self.inputs: Any = None
        self.kind = "span"
        self.op = ""
        self.label = ""
        self.parent_id: str | None = None
        self.record = True
        self.run_id: str | None = None
        self.t0 = 0.0
        self.trace = _Trace()


class LineageRecorder:
    """Thread-safe span bookkeeping shared by the span handler, event handler and replay."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.lock = threading.Lock()
        self.states: dict[str, _State] = {}
        # span id -> (recorded node id | None, parent span id, trace) of exited spans, for
        # leaves that finish after their span (streams are consumed after the span exits).
        self.closed: OrderedDict[str, tuple[str | None, str | None, _Trace]] = OrderedDict()

    # -------------------------------------------------------------- enter / exit
    def enter(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any,
        parent_id: str | None,
        tags: dict[str, Any] | None,
    ) -> None:
        st = _State()
        st.op = id_.partition("-")[0]
        # Workflow steps defined in a function have "f.<locals>.Flow.step" qualnames.
        st.label = st.op.rsplit("<locals>.", 1)[-1]
        st.parent_id = parent_id
        st.t0 = time.perf_counter()
        st.kind = _kind_of(instance, tags)
        # Calls of instrumented models are nodes of the replay layer (one per call); their
        # own spans (OpenAI.chat, OpenAI.predict, MockEmbedding.get_query_embedding ...) are
        # structure only, and forward what they contain to the enclosing span.
        from musubi_llama_index._replay import is_patched

        st.record = not (instance is not None and is_patched(instance))
        if tags:
            run = tags.get("llamaindex.run_id")
            st.run_id = str(run) if run is not None else None
        with self.lock:
            parent = self.states.get(parent_id) if parent_id else None
            if parent is None and parent_id is not None and parent_id in self.closed:
                parent_trace: _Trace | None = self.closed[parent_id][2]
            else:
                parent_trace = parent.trace if parent is not None else None
        if parent_trace is not None:
            st.trace = parent_trace
        if st.record:
            args = dict(bound_args.arguments)
            st.inputs = identity_view(args)
            attrs = _held_objects(instance)
            prompts = _held_prompts(attrs)
            if prompts:
                st.inputs = {"args": st.inputs, "prompts": prompts}
            st.class_fp = _component_fingerprint(instance, attrs)
            st.upstream = st.trace.producers_exact(text_atoms(args))
        with self.lock:
            self.states[id_] = st

    def exit(self, id_: str, result: Any, err: BaseException | None = None) -> None:
        with self.lock:
            st = self.states.pop(id_, None)
        if st is None:
            return
        node_id: str | None = None
        if st.record:
            node_id = self._record_span(st, result, err)
        with self.lock:
            parent = self.states.get(st.parent_id) if st.parent_id else None
            if parent is not None:
                if node_id is not None:
                    parent.children.append(node_id)
                else:
                    parent.children.extend(st.children)
                    parent.data_children.extend(st.data_children)
            self.closed[id_] = (node_id, st.parent_id, st.trace)
            while len(self.closed) > _MAX_CLOSED:
                self.closed.popitem(last=False)
        if parent is None and st.parent_id is None:
            outer = current_node()  # a musubi @step / run step around this query
            if outer is not None:
                for child in [node_id] if node_id else st.children:
                    self._edge(outer, child, "contains")

    def _record_span(self, st: _State, result: Any, err: BaseException | None) -> str | None:
        rt = self.runtime
        key = guarded(
            lambda: span_key(f"llama_index:{st.op}", st.inputs, st.class_fp),
            None,
            topic="span key",
        )
        if key is None:
            return None
        duration = time.perf_counter() - st.t0
        if err is not None:
            guarded(
                lambda: rt.engine().record_failure(
                    key, err, _SPAN_CONFIG, kind=st.kind, duration_s=duration, label=st.label,
                    run_id=st.run_id, defer=True,
                ),
                None,
                topic="span record",
            )
            return None
        streaming = _is_stream(result)
        value = {"stream": True} if streaming else {"output": identity_view(result)}
        guarded(
            lambda: rt.engine().record(
                key, value, _SPAN_CONFIG, kind=st.kind, duration_s=duration, label=st.label,
                run_id=st.run_id, defer=True,
            ),
            None,
            topic="span record",
        )
        node = key.node_id
        for child in st.children:
            self._edge(node, child, "contains")
        for up in st.upstream:
            self._edge(up, node, "data")
        for emb in set(st.data_children):
            self._edge(emb, node, "data")
        atoms = [] if streaming else text_atoms(result)
        if atoms:
            children = set(st.children)
            for producer in st.trace.producers_exact(atoms):
                if producer in children:
                    self._edge(producer, node, "data")
            st.trace.register(atoms, node)
        return node

    def _edge(self, parent: str, child: str, kind: str) -> None:
        if parent == child:
            return
        rt = self.runtime
        guarded(lambda: rt.engine().add_edge(parent, child, kind, defer=True), None, topic="edge")

    # -------------------------------------------------------------- leaves
    def leaf(
        self, node_id: str, kind: str, text: str, out_atoms: list[str], span_id: str | None
    ) -> None:
        trace: _Trace | None = None
        container: str | None = None
        with self.lock:
            sid = span_id
            for _ in range(64):  # walk exited structure-only spans up to a recorded one
                if sid is None:
                    break
                st = self.states.get(sid)
                if st is not None:
                    st.children.append(node_id)
                    if kind == "embedding":
                        st.data_children.append(node_id)
                    trace = st.trace
                    break
                closed = self.closed.get(sid)
                if closed is None:
                    break
                trace = trace or closed[2]
                if closed[0] is not None:
                    container = closed[0]
                    break
                sid = closed[1]
        if trace is None and container is None and span_id is None:
            container = current_node()
        if container is not None:
            self._edge(container, node_id, "contains")
        if trace is not None:
            ups = (
                trace.producers_exact([text])
                if kind == "embedding"
                else trace.producers_within(text)
            )
            for up in ups:
                self._edge(up, node_id, "data")
            if out_atoms:
                trace.register(out_atoms, node_id)

    def clear(self) -> None:
        with self.lock:
            self.states.clear()
            self.closed.clear()


_RECORDER: LineageRecorder | None = None


def set_recorder(recorder: LineageRecorder | None) -> None:
    global _RECORDER
    _RECORDER = recorder


def on_leaf(
    node_id: str, kind: str, text: str, out_atoms: list[str], span_id: str | None = None
) -> None:
    """Attach an LLM/embedding node to the span it ran in (called by the replay layer)."""
    rec = _RECORDER
    if rec is None:
        return
    try:
        rec.leaf(node_id, kind, text, out_atoms, span_id)
    except Exception as exc:
        warn_once("lineage", f"lineage bookkeeping failed: {exc!r}")


def current_span_id() -> str | None:
    return active_span_id.get()


def input_text(payload: Any) -> str:
    """The text of a prompt or message list, for substring matching of producers."""
    if payload is None:
        return ""
    if isinstance(payload, str):
        return payload
    parts: list[str] = []
    try:
        for m in payload:
            for b in getattr(m, "blocks", []):
                t = getattr(b, "text", None)
                if isinstance(t, str):
                    parts.append(t)
    except TypeError:
        return ""
    return "\n".join(parts)


# ----------------------------------------------------------------------------- helpers
# op_name + repr(component fingerprint) -> op (name + digest of the fingerprint). The same
# few components run every query, and hashing their fingerprint (a type-tagged canonical
# encoding in Python) was a tenth of the span handler's cost. repr() of the JSON-plain
# fingerprint (str/int/float/bool/None in dicts and lists) is exact and type-distinguishing
# (1, 1.0 and True differ), so equal reprs mean equal canonical bytes: a hit never changes
# an identity. A differently ordered but equal dict is a miss, computed afresh.
_OPS: dict[tuple[str, str], str] = {}
_OPS_MAX = 2048


def span_key(op_name: str, inputs: Any, component: Any) -> NodeKey:
    """``Engine.key(op_name, inputs, fingerprint={"component": component})``, with the op
    digest memoised per component fingerprint (span nodes have no upstream in their key)."""
    memo = (op_name, repr(component))
    op = _OPS.get(memo)
    if op is None:
        op = make_op(op_name, {"component": component})
        if len(_OPS) >= _OPS_MAX:
            _OPS.clear()
        _OPS[memo] = op
    in_hash = input_hash(inputs)
    return NodeKey(make_node_id(op, in_hash, ()), op, op_name, in_hash, ())


def _is_stream(result: Any) -> bool:
    if isinstance(result, (Generator, AsyncGenerator)):
        return True
    return type(result).__name__ in ("StreamingResponse", "AsyncStreamingResponse")


def _kind_of(instance: Any, tags: dict[str, Any] | None) -> str:
    if instance is None:
        return "workflow_step" if tags and "llamaindex.run_id" in tags else "span"
    if isinstance(instance, BaseLLM):
        return "llm"
    if isinstance(instance, BaseEmbedding):
        return "embedding"
    if isinstance(instance, BaseRetriever):
        return "retriever"
    if isinstance(instance, BaseQueryEngine):
        return "query"
    if isinstance(instance, BaseTool):
        return "tool"
    name = type(instance).__name__
    if "Workflow" in name or "Agent" in name or hasattr(instance, "_get_steps"):
        return "chain"
    return "span"


def _held_objects(instance: Any) -> list[tuple[str, Any]]:
    """The instance's attributes, sorted by name: ``vars()`` (plain attributes, pydantic
    fields) and pydantic private attributes (``PrivateAttr``)."""
    if instance is None:
        return []
    try:
        attrs = dict(vars(instance))
    except TypeError:
        attrs = {}
    private = getattr(instance, "__pydantic_private__", None)
    if isinstance(private, dict):
        for name, value in private.items():
            attrs.setdefault(name, value)
    return sorted(attrs.items())


def _held_prompts(attrs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Prompt templates a component holds: they are part of what its spans compute from
    (``DefaultRefineProgram(prompt).__call__(context_str=...)``: the question is only in the
    partially formatted prompt), so they enter the span's inputs."""
    return {
        name: prompt_identity(value)
        for name, value in attrs
        if isinstance(value, BasePromptTemplate)
    }


def _held_models(attrs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Fingerprints of the LLMs / embedding models a component holds (configuration)."""
    out: dict[str, Any] = {}
    for name, value in attrs:
        if isinstance(value, (BaseLLM, BaseEmbedding)):
            original = type(value).__dict__.get("__musubi_original__", type(value))
            try:
                out[name] = model_fingerprint(value, original_cls=original)
            except Exception:
                out[name] = {"class": class_path(original)}
    return out


def _component_fingerprint(instance: Any, attrs: list[tuple[str, Any]] | None = None) -> Any:
    """Class + scalar configuration of the component a span runs on, and the models it
    holds (no secrets, no ids)."""
    if instance is None:
        return None
    held = _held_objects(instance) if attrs is None else attrs
    models = _held_models(held)
    if hasattr(type(instance), "model_fields"):
        try:
            fp = model_fingerprint(instance)
        except Exception:
            fp = {"class": class_path(type(instance))}
        return {**fp, "models": models} if models else fp
    scalars: dict[str, Any] = {}
    for name, value in held:
        if isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) < 200):
            if _secret_like(name):
                continue
            scalars[name] = value if not isinstance(value, float) or value == value else None
    fp = {"class": class_path(type(instance)), "params": scalars}
    return {**fp, "models": models} if models else fp


@functools.lru_cache(maxsize=4096)
def _secret_like(name: str) -> bool:
    """Attribute names kept out of a component's fingerprint (memoised: pure, and asked for
    every attribute of every component on every span)."""
    low = name.lower()
    return any(s in low for s in ("key", "secret", "token", "password", "id"))


# ----------------------------------------------------------------------------- handlers
class MusubiSpanHandler(BaseSpanHandler[BaseSpan]):
    """Turns LlamaIndex spans into musubi lineage nodes. Never raises."""

    _recorder: LineageRecorder | None = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "MusubiSpanHandler"

    @classmethod
    def create(cls, recorder: LineageRecorder) -> MusubiSpanHandler:
        handler = cls()
        handler._recorder = recorder
        return handler

    # The base class keeps open spans in a pydantic dict under a lock; musubi tracks its own
    # state, so these three are overridden directly (cheaper, and nothing can leak there).
    def span_enter(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        rec = self._recorder
        if rec is None:
            return
        try:
            rec.enter(id_, bound_args, instance, parent_id, tags)
        except Exception as exc:
            warn_once("span", f"span bookkeeping failed on enter: {exc!r}")

    def span_exit(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> None:
        rec = self._recorder
        if rec is None:
            return
        try:
            rec.exit(id_, result)
        except Exception as exc:
            warn_once("span", f"span bookkeeping failed on exit: {exc!r}")

    def span_drop(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> None:
        rec = self._recorder
        if rec is None:
            return
        try:
            rec.exit(id_, None, err if err is not None else RuntimeError("span dropped"))
        except Exception as exc:
            warn_once("span", f"span bookkeeping failed on drop: {exc!r}")

    def new_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_span_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> BaseSpan | None:
        return None

    def prepare_to_exit_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        result: Any | None = None,
        **kwargs: Any,
    ) -> BaseSpan | None:
        return None

    def prepare_to_drop_span(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        err: BaseException | None = None,
        **kwargs: Any,
    ) -> BaseSpan | None:
        return None


class MusubiEventHandler(BaseEventHandler):
    """Folds events into the lineage: the final text of streamed spans of models that are
    not instrumented for replay (instrumented ones are recorded by the replay layer)."""

    _recorder: LineageRecorder | None = PrivateAttr(default=None)
    _seen: int = PrivateAttr(default=0)

    @classmethod
    def class_name(cls) -> str:
        return "MusubiEventHandler"

    @classmethod
    def create(cls, recorder: LineageRecorder) -> MusubiEventHandler:
        handler = cls()
        handler._recorder = recorder
        return handler

    @property
    def events_seen(self) -> int:
        return self._seen

    def handle(self, event: BaseEvent, **kwargs: Any) -> Any:
        self._seen += 1
        rec = self._recorder
        if rec is None:
            return None
        try:
            name = type(event).__name__
            if name not in ("LLMChatEndEvent", "LLMCompletionEndEvent"):
                return None
            response = getattr(event, "response", None)
            if response is None or event.span_id is None:
                return None
            with rec.lock:
                closed = rec.closed.get(event.span_id)
            # Only spans that exited with a generator (their result arrives here).
            if closed is not None and closed[0] is not None:
                closed[2].register(text_atoms(response), closed[0])
        except Exception as exc:
            warn_once("event", f"event bookkeeping failed: {exc!r}")
        return None
