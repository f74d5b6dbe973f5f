"""Spans -> calls: the span handler, the event handler and what they do per span.

Every LlamaIndex span (``RetrieverQueryEngine.query``, ``VectorIndexRetriever.retrieve``,
``CompactAndRefine.synthesize``, a workflow step, ...) is a *call* (see :mod:`._calls`): a
root span is a run of kind ``llama_index`` (``workflow`` for a llama-index-workflows run)
unless it starts inside a musubi frame, whose run it joins; a child span is a call under its
parent span's call. Spans have no content identity: nothing is hashed on this path, and a
span's row is a tuple handed to the recorder when it exits.

* Retriever calls keep what they returned (node ids, scores, texts) as an artifact, so the
  lineage of an answer shows exactly which documents it used; other spans keep previews.
* Spans of instrumented models (``OpenAI.predict``, ``OpenAI.chat`` run on a miss,
  ``OpenAIEmbedding.get_query_embedding``) are not calls of their own: the replay layer
  records each request as a call with its node, and those spans' contents belong to it (or
  to the enclosing span).
* Streams: a span that returns a generator exits at once; for a model that is not
  instrumented, its final text arrives with the model's end event, which completes its call.

Handlers never raise into LlamaIndex (the dispatcher swallows exceptions too, but a
``TypeError`` there would silently drop a span, so everything is caught and warned once).

Example::

    recorder = LineageRecorder(runtime)
    get_dispatcher().add_span_handler(MusubiSpanHandler.create(recorder))
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncGenerator, Generator
from typing import Any

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.base.response.schema import AsyncStreamingResponse, StreamingResponse
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent, LLMCompletionEndEvent
from llama_index.core.instrumentation.span import BaseSpan
from llama_index.core.instrumentation.span_handlers import BaseSpanHandler
from llama_index.core.tools.types import BaseTool
from pydantic import PrivateAttr
from workflows import Workflow

from musubi_core.probe import artifact_id_for
from musubi_core.store import ArtifactWrite
from musubi_llama_index import _calls, _propagation
from musubi_llama_index._calls import MODEL_CALL, UNRECORDED, Call, Tracker, finish
from musubi_llama_index._content import atoms, brief, retrieved, usage_of
from musubi_llama_index._models import model_name
from musubi_llama_index._runtime import warn_once

__all__ = ["LineageRecorder", "MusubiEventHandler", "MusubiSpanHandler"]

_RUN_TAG = "llamaindex.run_id"
_STREAMS = (Generator, AsyncGenerator, StreamingResponse, AsyncStreamingResponse)
_END_EVENTS = frozenset({LLMChatEndEvent, LLMCompletionEndEvent})


# The call kind of a span, by the class of the component it runs on (first match).
_KIND_OF: tuple[tuple[type, str], ...] = (
    (BaseLLM, "llm"),
    (BaseEmbedding, "embedding"),
    (BaseRetriever, "retriever"),
    (BaseQueryEngine, "query"),
    (BaseTool, "tool"),
    (Workflow, "workflow"),
)


def _classify(cls: type) -> tuple[str, bool]:
    """(call kind, instance of an instrumented model) for spans run on a ``cls``."""
    kind = next((k for base, k in _KIND_OF if issubclass(cls, base)), "span")
    return kind, "__musubi_original__" in cls.__dict__


_KINDS: dict[type, tuple[str, bool]] = {}
_STREAM_TYPES: dict[type, bool] = {}


def _is_stream(cls: type) -> bool:
    """Does a span returning a ``cls`` exit before its work is done (a generator, a
    streaming response)?"""
    found = _STREAM_TYPES.get(cls)
    if found is None:
        found = _STREAM_TYPES[cls] = issubclass(cls, _STREAMS)
    return found


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:4000]


def _tool_name(tool: Any) -> str:
    try:
        return str(tool.metadata.name)
    except Exception:
        return "?"


class LineageRecorder(Tracker):
    """What the span and event handlers do (shared by both; see the module docstring)."""

    # -------------------------------------------------------------- enter / exit
    def enter(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any,
        parent_id: str | None,
        tags: dict[str, Any] | None,
    ) -> None:
        states = self.states
        parent: Call | None = None
        if parent_id is not None:
            parent = states.get(parent_id)
            if parent is None:
                parent = self.closed.get(parent_id)
        cls = type(instance)
        info = _KINDS.get(cls)
        if info is None:
            info = _KINDS[cls] = _classify(cls)
        kind, patched = info
        if patched:
            # An instrumented model's own span: its request is the replay layer's call.
            target: Call | None = MODEL_CALL.get() or parent
            if target is not None:
                states[id_] = target
                return
        if parent is UNRECORDED:
            states[id_] = parent  # not recorded: nor is anything under it
            return
        op = id_.partition("-")[0]
        if instance is None and tags and _RUN_TAG in tags:
            kind = "workflow_step"
            if "<locals>." in op:  # a workflow defined in a function
                op = op.rsplit("<locals>.", 1)[1]
        if parent is None:
            try:
                trace, parent_call_id = self.open_trace(
                    "workflow" if kind == "workflow" else "llama_index", op
                )
            except Exception as exc:
                states[id_] = UNRECORDED  # its descendants skip recording too
                warn_once(f"store:{type(exc).__name__}", f"recording spans failed ({exc})")
                return
        else:
            trace, parent_call_id = parent.trace, parent.call_id
        call = Call(id_, parent, trace, parent_call_id, kind, op, id(instance))
        args = bound_args.arguments
        if args:
            call.input_preview = brief(args)
            if trace.exact:
                texts = atoms(args)
                if texts:
                    found: dict[Call, None] = {}
                    trace.producers(texts, found)
                    if kind == "llm":  # a prompt holds what it was formatted from
                        trace.producers_within("\n".join(texts), found)
                    if found:
                        call.upstream = found
        if kind == "llm":
            call.model = model_name(instance)
        elif kind == "tool":  # FunctionTool.acall(add): which tool
            call.op = f"{op}({_tool_name(instance)})"
        states[id_] = call

    def exit(self, id_: str, result: Any, err: BaseException | None = None) -> None:
        call = self.states.pop(id_, None)
        if call is None or call is UNRECORDED or call.sid != id_:
            return  # not recorded, or a model's own span (its call records it)
        if err is not None:
            finish(call, "failed", None, error=_error_text(err))
            return
        if _is_stream(type(result)):
            call.stream = True  # its text arrives with the model's end event
            self.remember(id_, call)
            finish(call, "done", f"<{type(result).__name__}>")
            return
        trace = call.trace
        parent = call.parent
        if result is trace.last:  # handed up unchanged (a Response through query/_query)
            texts, shown = trace.last_texts, trace.last_shown
        else:
            texts = atoms(result) if result is not None else []
            shown = brief(result)
            trace.last, trace.last_texts, trace.last_shown = result, texts, shown
        if texts and trace.exact:
            # What the call returns that a call inside it produced came from there.
            exact = trace.exact
            for text in texts:
                producer = exact.get(text)
                if producer is not None and producer.descends_from(call):
                    call.fed_by(producer)
        feeds = call.feeds
        if feeds:
            for producer in feeds:
                call.fed_by(producer)
        artifact = None
        if call.kind == "retriever" and (parent is None or parent.inst != call.inst):
            artifact = self._retrieved(call, result)
        finish(call, "done", shown, artifact=artifact, replayed=call.replayed, saved_s=call.saved_s)
        if parent is not None:
            if texts:
                trace.produced(texts, call)
            if call.kind == "embedding":
                pf = parent.feeds
                if pf is None:
                    parent.feeds = [call]
                else:
                    pf.append(call)

    def _retrieved(self, call: Call, result: Any) -> ArtifactWrite | None:
        """The retriever's output as an artifact (its id set on the call)."""
        plain = retrieved(result)
        if plain is None:
            return None
        engine = self.runtime.engine()
        encoding, payload = engine.codec.encode(plain)
        artifact_id = artifact_id_for(encoding, payload)
        call.artifact_id = artifact_id
        return ArtifactWrite(artifact_id, encoding, payload, "")

    # -------------------------------------------------------------- events
    def model_end(self, event: Any) -> None:
        """A model's end event: tokens of a model span that is not instrumented, and the final
        text of one that returned a stream (its call is written again, complete)."""
        call = self.span_call(event.span_id)
        if call is None or call is UNRECORDED or call.sid != event.span_id:
            return
        response = getattr(event, "response", None)
        if response is None:
            return
        call.tokens_in, call.tokens_out = usage_of(response)
        if call.stream and event.span_id not in self.states:
            texts = atoms(response)
            trace = call.trace
            if texts and not trace.ended:
                trace.produced(texts, call)
            finish(call, "done", brief(response), count=False)


class MusubiSpanHandler(BaseSpanHandler[BaseSpan]):
    """Turns LlamaIndex spans into musubi calls. Never raises."""

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
        rec = _REC
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
        rec = _REC
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
        rec = _REC
        if rec is None:
            return
        try:
            rec.exit(id_, None, err if err is not None else RuntimeError("span dropped"))
        except Exception as exc:
            warn_once("span", f"span bookkeeping failed on drop: {exc!r}")

    def capture_propagation_context(self) -> dict[str, Any]:
        """Where work handed to another process belongs (see :mod:`._propagation`)."""
        rec = _REC
        if rec is None:
            return {}
        try:
            return _propagation.capture(rec)
        except Exception as exc:
            warn_once("propagation", f"capturing the run for another process failed: {exc!r}")
            return {}

    def restore_propagation_context(self, context: dict[str, Any]) -> None:
        """Join the run another process captured: calls made after this are calls of it."""
        rec = _REC
        if rec is None:
            return
        try:
            _propagation.restore(rec, context)
        except Exception as exc:
            warn_once("propagation", f"joining the run of another process failed: {exc!r}")

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
    """Folds model end events into the calls of model spans that are not instrumented for
    replay (instrumented models' calls are recorded by the replay layer)."""

    _recorder: LineageRecorder | None = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "MusubiEventHandler"

    @classmethod
    def create(cls, recorder: LineageRecorder) -> MusubiEventHandler:
        handler = cls()
        handler._recorder = recorder
        return handler

    def handle(self, event: BaseEvent, **kwargs: Any) -> Any:
        if type(event) not in _END_EVENTS:
            return None
        rec = _REC
        if rec is None:
            return None
        try:
            rec.model_end(event)
        except Exception as exc:
            warn_once("event", f"event bookkeeping failed: {exc!r}")
        return None


# The recorder of the current instrument(): what the handlers feed (a module global, read on
# every span: a pydantic private attribute costs a __getattr__ round trip each time).
_REC: LineageRecorder | None = None


def set_recorder(recorder: LineageRecorder | None) -> None:
    """Make ``recorder`` the one the handlers feed and the replay layer places model calls
    with (None: the handlers do nothing)."""
    global _REC
    _REC = recorder
    _calls.set_active(recorder)
