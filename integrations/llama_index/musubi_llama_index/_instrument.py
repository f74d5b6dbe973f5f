"""``instrument()`` / ``uninstrument()``: the one call that wires musubi into LlamaIndex.

Example::

    from musubi_llama_index import instrument, uninstrument

    instrument("musubi.db")            # Settings.llm / Settings.embed_model replay from now on
    index.as_query_engine().query("What is musubi?")
    uninstrument()                     # dispatcher and models exactly as before
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.settings import Settings
from llama_index_instrumentation import get_dispatcher

from musubi_core import Engine
from musubi_llama_index import _lineage, _replay
from musubi_llama_index._lineage import LineageRecorder, MusubiEventHandler, MusubiSpanHandler
from musubi_llama_index._runtime import Runtime, warn_once

__all__ = ["Instrumentation", "instrument", "is_instrumented", "uninstrument"]


@dataclass
class Instrumentation:
    """What :func:`instrument` installed (returned so callers can inspect or flush it)."""

    runtime: Runtime
    recorder: LineageRecorder | None
    span_handler: MusubiSpanHandler | None
    event_handler: MusubiEventHandler | None
    patched: list[Any] = field(default_factory=list)

    def flush(self) -> None:
        """Commit the calls, runs and nodes recorded so far (the recorder also commits at least
        every second, and at exit)."""
        self.runtime.flush()


_lock = threading.RLock()
_current: Instrumentation | None = None


def _settings_model(attr: str) -> Any:
    # Settings.llm / .embed_model resolve a default (OpenAI, needing a key) when unset; the
    # private attribute tells whether the user configured one without side effects.
    return getattr(Settings, attr, None)


def instrument(
    path: str | None = None,
    *,
    llm: BaseLLM | None = None,
    embed_model: BaseEmbedding | None = None,
    engine: Engine | None = None,
    namespace: str = "default",
    ttl_seconds: float | None = None,
    lineage: bool = True,
    use_settings: bool = True,
) -> Instrumentation:
    """Make LlamaIndex LLM and embedding calls replayable and record spans as lineage.

    Args:
        path: SQLite file of the musubi store. ``None``: the engine in effect at call time
            (``use_engine(...)`` or ``$MUSUBI_DB`` / ``.musubi/musubi.db``).
        llm, embed_model: models to make replayable, in addition to ``Settings.llm`` /
            ``Settings.embed_model`` when those are configured (``use_settings=True``).
            The *instances* are patched (class swapped for a replaying subclass of their own
            class), so engines built before this call replay too and ``isinstance`` holds.
        engine: an explicit :class:`musubi_core.Engine` (overrides ``path``).
        ttl_seconds: LLM responses older than this are not replayed (default: forever).
        lineage: add the span and event handlers to the root dispatcher.

    Idempotent: calling again installs nothing twice; models given later are patched with
    the runtime of the first call.

    Example::

        instrument("musubi.db", llm=my_llm, embed_model=my_embeddings)
    """
    global _current
    with _lock:
        if _current is None:
            runtime = Runtime(path, engine=engine, namespace=namespace, ttl_seconds=ttl_seconds)
            recorder = LineageRecorder(runtime) if lineage else None
            span_handler = MusubiSpanHandler.create(recorder) if recorder else None
            event_handler = MusubiEventHandler.create(recorder) if recorder else None
            inst = Instrumentation(runtime, recorder, span_handler, event_handler)
            dispatcher = get_dispatcher()
            if span_handler is not None and event_handler is not None:
                # add_*_handler extends the list in place; uninstrument removes in place.
                dispatcher.add_span_handler(span_handler)
                dispatcher.add_event_handler(event_handler)
                _lineage.set_recorder(recorder)
            _current = inst
        else:
            inst = _current
            other_path = path is not None and str(path) != inst.runtime.path
            if other_path or (engine is not None and engine is not inst.runtime.engine()):
                warn_once(
                    "instrument-again",
                    "instrument() is already active; keeping its store (call uninstrument() "
                    "first to switch stores)",
                )
        models: list[Any] = [llm, embed_model]
        if use_settings:
            models += [_settings_model("_llm"), _settings_model("_embed_model")]
        for model in models:
            if model is None or any(model is p for p in inst.patched):
                continue
            if isinstance(model, BaseLLM):
                if _replay.patch_llm(model, inst.runtime):
                    inst.patched.append(model)
            elif isinstance(model, BaseEmbedding):
                if _replay.patch_embedding(model, inst.runtime):
                    inst.patched.append(model)
            else:
                raise TypeError(
                    f"musubi can make BaseLLM and BaseEmbedding instances replayable, "
                    f"not {type(model).__name__}"
                )
        return inst


def uninstrument() -> None:
    """Undo :func:`instrument`: handlers removed in place, patched models' classes restored.

    Buffered writes are flushed first. A no-op when not instrumented.
    """
    global _current
    with _lock:
        inst = _current
        if inst is None:
            return
        _current = None
        dispatcher = get_dispatcher()
        if inst.span_handler is not None:
            dispatcher.span_handlers[:] = [
                h for h in dispatcher.span_handlers if h is not inst.span_handler
            ]
        if inst.event_handler is not None:
            dispatcher.event_handlers[:] = [
                h for h in dispatcher.event_handlers if h is not inst.event_handler
            ]
        _lineage.set_recorder(None)
        for obj in inst.patched:
            _replay.unpatch(obj)
        inst.patched.clear()
        if inst.recorder is not None:
            inst.recorder.clear()
        inst.runtime.close()


def is_instrumented() -> bool:
    return _current is not None


def current() -> Instrumentation | None:
    return _current
