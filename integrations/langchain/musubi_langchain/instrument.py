"""``instrument()`` / ``uninstrument()``: musubi for every LangChain call in the process.

``instrument`` sets a :class:`MusubiCache` as the global LLM cache and registers one
:class:`MusubiCallbackHandler` through LangChain's configure hook, so existing chains, agents and
LangGraph graphs are recorded and replayed with no other change. It is idempotent (calling it
again with the same arguments changes nothing) and ``uninstrument`` restores exactly what was
there before: the previous global cache, LangChain's hook list and patched methods.

Example:
    >>> import os, tempfile
    >>> from langchain_core.language_models import FakeListChatModel
    >>> inst = instrument(os.path.join(tempfile.mkdtemp(), "m.db"))
    >>> FakeListChatModel(responses=["hi"]).invoke("hello").content
    'hi'
    >>> uninstrument()
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

from langchain_core.caches import BaseCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.globals import get_llm_cache, set_llm_cache
from langchain_core.language_models import BaseLLM
from langchain_core.tracers import context as tracer_context

from musubi_core.engine import Engine
from musubi_core.identity import resolve_namespace
from musubi_core.modes import Mode, resolve_mode

from ._engine import make_engine
from ._patches import Patch
from .cache import MusubiCache, llm_call_kwargs
from .handler import MusubiCallbackHandler
from .streaming import install_stream_replay, uninstall_stream_replay
from .tools import Replay, install_tool_replay, uninstall_tool_replay

# generate()'s own keyword parameters; everything else is a per-call provider kwarg.
_GENERATE_PARAMS = frozenset({"stop", "callbacks", "tags", "metadata", "run_name", "run_id"})


class _HandlerSlot:
    """What LangChain's configure hook reads (``.get()``): the installed handler, process-wide.

    A real ``ContextVar`` would only carry a value into contexts copied after ``set`` (a thread
    started earlier, or a fresh one, would not see it); the hook only ever calls ``get()``.
    """

    def __init__(self) -> None:
        self.handler: BaseCallbackHandler | None = None

    def get(self) -> BaseCallbackHandler | None:
        return self.handler


_SLOT = _HandlerSlot()
_HOOK = (cast("ContextVar[BaseCallbackHandler | None]", _SLOT), True, None, None)


def _make_llm_generate(original: Any) -> Any:
    def generate(self: BaseLLM, *args: Any, **kwargs: Any) -> Any:
        extra = {k: v for k, v in kwargs.items() if k not in _GENERATE_PARAMS}
        token = llm_call_kwargs.set(extra or None)
        try:
            return original(self, *args, **kwargs)
        finally:
            llm_call_kwargs.reset(token)

    return generate


def _make_llm_agenerate(original: Any) -> Any:
    async def agenerate(self: BaseLLM, *args: Any, **kwargs: Any) -> Any:
        extra = {k: v for k, v in kwargs.items() if k not in _GENERATE_PARAMS}
        token = llm_call_kwargs.set(extra or None)
        try:
            return await original(self, *args, **kwargs)
        finally:
            llm_call_kwargs.reset(token)

    return agenerate


# Per-call kwargs of text LLMs into the cache key (langchain#40403).
_LLM_PATCHES = (
    Patch(BaseLLM, "generate", _make_llm_generate),
    Patch(BaseLLM, "agenerate", _make_llm_agenerate),
)


@dataclass(frozen=True)
class Instrumentation:
    """What :func:`instrument` installed."""

    # None when the store could not be opened (the cache and handler then degrade to misses).
    engine: Engine | None
    cache: MusubiCache | None
    handler: MusubiCallbackHandler | None
    previous_cache: BaseCache | None
    args: tuple[Any, ...]


_lock = threading.RLock()
_current: Instrumentation | None = None


def instrument(
    path: str | os.PathLike[str] | None = None,
    *,
    store: Any | None = None,
    engine: Engine | None = None,
    namespace: str | None = None,
    ttl_seconds: float | None = None,
    cache: bool = True,
    handler: bool = True,
    replay_streams: bool = False,
    tools: Mapping[str, Replay] | None = None,
    mode: Mode | str | None = None,
    single_flight: bool = False,
) -> Instrumentation:
    """Install musubi globally for LangChain (see module docstring).

    Args:
        path: SQLite file (default ``$MUSUBI_DB`` or ``.musubi/musubi.db``).
        store, engine: use an existing core store/engine instead of ``path``.
        namespace, ttl_seconds: as for :class:`MusubiCache` (the cache and the handler share
            the namespace: a separate cache, and the runs and calls recorded in it).
        cache: set the global LLM cache (replay). ``handler``: record lineage.
        replay_streams: also serve ``.stream()``/``.astream()`` from the store on a hit.
        tools: tool name -> ``"deterministic"`` (replays for the same arguments) or
            ``"external_effect"`` (never issued twice); undeclared tools run every time (see
            :mod:`musubi_langchain.tools`; :func:`~musubi_langchain.declare_tool` declares on
            the tool itself).
        mode: ``"record"``, ``"replay"``, ``"refresh"`` or ``"off"`` (default: ``engine``'s,
            else ``$MUSUBI_MODE``, else record); see :class:`MusubiCache`. In replay mode
            streams are served from the store (``replay_streams`` is implied) and a call with
            no recording raises :class:`~musubi_core.errors.ReplayMissError` out of the model
            call; ``"off"`` installs nothing.
        single_flight: workers missing the same call at once make one provider request; the
            others wait for its stored answer (see :class:`MusubiCache`).
    """
    global _current
    namespace = resolve_namespace(namespace, engine.namespace if engine is not None else None)
    resolved = resolve_mode(mode, engine.mode if engine is not None else None)
    replay_streams = replay_streams or resolved is Mode.REPLAY
    args = (
        os.fspath(path) if path is not None else None,
        id(store), id(engine), namespace, ttl_seconds, cache, handler, replay_streams,
        dict(tools or {}),
        resolved,
        single_flight,
    )
    with _lock:
        if _current is not None:
            if _current.args == args:
                return _current
            uninstrument()
        if resolved is Mode.OFF:
            # musubi steps aside: nothing is installed, LangChain runs as it would without it.
            _current = Instrumentation(None, None, None, get_llm_cache(), args)
            return _current
        try:
            eng: Engine | None = engine or make_engine(path, store, namespace, resolved)
        except Exception:
            # A store that cannot be opened (a missing folder, a damaged file, a read-only
            # one SQLite cannot read safely) must not break the host: the cache and the
            # handler open it on first use, as a MusubiCache does, so every call misses and
            # LangChain answers from the provider, with one warning.
            eng = None
        new_cache = (
            MusubiCache(path, store=store, engine=eng, namespace=namespace,
                        ttl_seconds=ttl_seconds, replay_streams=replay_streams,
                        mode=resolved, single_flight=single_flight)
            if cache
            else None
        )
        new_handler = (
            MusubiCallbackHandler(path, store=store, engine=eng, namespace=namespace)
            if handler
            else None
        )
        if new_cache is not None and new_handler is not None:
            # One warning for the whole instrumentation, whichever of the two fails first.
            new_handler._guard = new_cache._guard
        previous = get_llm_cache()
        if new_cache is not None:
            set_llm_cache(new_cache)
            for p in _LLM_PATCHES:
                p.install()
        if new_handler is not None:
            _SLOT.handler = new_handler
            if _HOOK not in tracer_context._configure_hooks:
                tracer_context._configure_hooks.append(_HOOK)
        if replay_streams:
            install_stream_replay()
        install_tool_replay(eng, tools)
        _current = Instrumentation(eng, new_cache, new_handler, previous, args)
        return _current


def uninstrument() -> None:
    """Undo :func:`instrument` exactly (no-op when not instrumented)."""
    global _current
    with _lock:
        inst = _current
        if inst is None:
            return
        _current = None
        _SLOT.handler = None
        hooks = tracer_context._configure_hooks
        while _HOOK in hooks:
            hooks.remove(_HOOK)
        for p in _LLM_PATCHES:
            p.uninstall()
        uninstall_stream_replay()
        uninstall_tool_replay()
        # Restore the previous cache only if ours is still the global one: a cache the user set
        # after instrument() is theirs to keep.
        if inst.cache is not None and get_llm_cache() is inst.cache:
            set_llm_cache(inst.previous_cache)
        if inst.engine is not None:
            with contextlib.suppress(Exception):  # best effort; uninstrument must not raise
                inst.engine.flush()


def current() -> Instrumentation | None:
    """The active instrumentation, if any."""
    return _current
