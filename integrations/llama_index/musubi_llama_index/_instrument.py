"""``instrument()`` / ``uninstrument()``: the one call that wires musubi into LlamaIndex.

Example::

    from musubi_llama_index import instrument, uninstrument

    instrument("musubi.db")            # Settings.llm / Settings.embed_model replay from now on
    index.as_query_engine().query("What is musubi?")
    uninstrument()                     # dispatcher, Settings and models exactly as before

Settings: models set on ``Settings`` before *or after* ``instrument()`` replay. The ``Settings``
instance's class is swapped for a subclass (same name) whose ``llm`` / ``embed_model``
properties call LlamaIndex's own getter/setter and then make the model they hold replayable,
so a model assigned later, or LlamaIndex's default resolved lazily on first use, is patched
too. ``instrument()`` itself never reads those properties (the getters resolve a default
OpenAI model and fail without a key). A model passed straight to a component
(``as_query_engine(llm=...)``) that musubi never saw is not replayed: the first call to it
warns once, naming ``instrument(llm=...)``.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.settings import Settings
from llama_index_instrumentation import get_dispatcher
from llama_index_instrumentation.span.base import BaseSpan
from llama_index_instrumentation.span_handlers.base import BaseSpanHandler

from musubi_core import Engine
from musubi_core.modes import Mode, resolve_mode
from musubi_llama_index import _lineage, _propagation, _replay, _tools
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
    # (original class, hooked subclass) of the Settings instance while its class is swapped
    settings_swap: tuple[type, type] | None = None
    # models set on / resolved by Settings after instrument() are patched (use_settings=True)
    settings_hook: bool = False
    # warns about calls to LLM / embedding instances that were never patched
    watch: UnpatchedModelWatch | None = None

    def flush(self) -> None:
        """Commit the calls, runs and nodes recorded so far (the recorder also commits at least
        every quarter second, and at exit)."""
        self.runtime.flush()


_lock = threading.RLock()
_current: Instrumentation | None = None


def _settings_model(attr: str) -> Any:
    # Settings.llm / .embed_model resolve a default (OpenAI, needing a key) when unset; the
    # private attribute tells whether the user configured one without side effects.
    return getattr(Settings, attr, None)


def _adopt(inst: Instrumentation, model: Any, *, strict: bool) -> None:
    """Patch ``model`` with ``inst``'s runtime (once). Caller holds ``_lock``.

    ``strict``: a value that is neither a BaseLLM nor a BaseEmbedding is a TypeError (an
    argument of instrument()); otherwise (a value found on Settings) it is left alone.
    """
    if model is None or any(model is p for p in inst.patched):
        return
    if isinstance(model, BaseLLM):
        if _replay.patch_llm(model, inst.runtime):
            inst.patched.append(model)
    elif isinstance(model, BaseEmbedding):
        if _replay.patch_embedding(model, inst.runtime):
            inst.patched.append(model)
    elif strict:
        raise TypeError(
            f"musubi can make BaseLLM and BaseEmbedding instances replayable, "
            f"not {type(model).__name__}"
        )


# ----------------------------------------------------------------------------- Settings hook
# Settings property -> the private field its setter fills (read after the setter has run, so
# the resolved model - resolve_llm("default"), MockLLM for None - is the one patched).
_SETTINGS_MODELS = (("llm", "_llm"), ("embed_model", "_embed_model"))
_settings_classes: dict[type, type] = {}  # original Settings class -> hooked subclass


def _adopt_from_settings(model: Any) -> None:
    """Make a model held by Settings replayable under the active instrument(). Never raises."""
    inst = _current
    if inst is None or not inst.settings_hook or model is None:
        return
    try:
        if _replay.is_patched(model):
            return
        with _lock:
            if _current is inst:
                _adopt(inst, model, strict=False)
    except Exception as exc:  # a guest never breaks Settings
        warn_once(
            "settings-hook",
            f"could not make {type(model).__name__} from Settings replayable ({exc!r}); pass "
            "it to instrument(llm=..., embed_model=...)",
        )


def _hooked_property(prop: property, private: str) -> property:
    fget, fset = prop.fget, prop.fset
    assert fget is not None and fset is not None

    def get(self: Any) -> Any:
        model = fget(self)  # LlamaIndex's getter: resolves the default; its errors propagate
        _adopt_from_settings(model)
        return model

    def set_(self: Any, value: Any) -> None:
        fset(self, value)  # LlamaIndex's setter (resolve_llm / resolve_embed_model)
        _adopt_from_settings(getattr(self, private, None))

    get.__name__ = set_.__name__ = getattr(fget, "__name__", private.lstrip("_"))
    get.__doc__ = fget.__doc__
    set_.__doc__ = fset.__doc__
    return property(get, set_, prop.fdel, prop.__doc__)


def _rebuild_settings(cls: type, state: dict[str, Any]) -> Any:
    """copy / pickle of the hooked Settings: a plain instance of the original class."""
    obj: Any = object.__new__(cls)
    obj.__dict__.update(state)
    return obj


def _settings_class(cls: type) -> type | None:
    """The hooked subclass of ``cls`` (cached), or None if ``cls`` has no model properties."""
    cached = _settings_classes.get(cls)
    if cached is not None:
        return cached
    ns: dict[str, Any] = {}
    for public, private in _SETTINGS_MODELS:
        prop = inspect.getattr_static(cls, public, None)
        if not isinstance(prop, property) or prop.fget is None or prop.fset is None:
            return None
        ns[public] = _hooked_property(prop, private)

    def __reduce_ex__(self: Any, protocol: Any) -> Any:
        return (_rebuild_settings, (cls, dict(self.__dict__)))

    ns.update(
        {
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,  # repr(Settings) unchanged
            "__doc__": cls.__doc__,
            "__musubi_original__": cls,
            "__reduce_ex__": __reduce_ex__,
        }
    )
    meta: Any = type(cls)
    sub: type = meta(cls.__name__, (cls,), ns)
    _settings_classes[cls] = sub
    return sub


def _hook_settings(inst: Instrumentation) -> None:
    """Swap the Settings instance's class for the hooked subclass (idempotent)."""
    inst.settings_hook = True
    hooked = tuple(_settings_classes.values())
    if hooked and isinstance(Settings, hooked):
        return  # already hooked (this instrumentation, or a class swapped on top of ours)
    cls = type(Settings)
    sub = _settings_class(cls)
    if sub is None:
        warn_once(
            "settings-hook",
            "this LlamaIndex's Settings has no llm / embed_model properties: models set on "
            "Settings after instrument() do not replay; pass them to "
            "instrument(llm=..., embed_model=...)",
        )
        return
    object.__setattr__(Settings, "__class__", sub)
    inst.settings_swap = (cls, sub)


def _unhook_settings(inst: Instrumentation) -> None:
    inst.settings_hook = False
    swap, inst.settings_swap = inst.settings_swap, None
    if swap is not None and type(Settings) is swap[1]:
        object.__setattr__(Settings, "__class__", swap[0])
    # Otherwise someone swapped Settings' class on top of ours: theirs stays, and our
    # properties do nothing while musubi is not instrumented.


# ----------------------------------------------------------------------------- unpatched models
def _wraps_model(instance: Any) -> bool:
    # StructuredLLM and similar wrappers delegate to an inner model, whose own call is checked.
    return isinstance(getattr(instance, "llm", None), BaseLLM)


class UnpatchedModelWatch(BaseSpanHandler[BaseSpan]):
    """Warns once per kind when an LLM / embedding model musubi did not patch is called.

    Only ``span_enter`` does anything (an ``isinstance`` check per span); no span is kept.
    """

    @classmethod
    def class_name(cls) -> str:
        return "MusubiUnpatchedModelWatch"

    def span_enter(
        self,
        id_: str,
        bound_args: inspect.BoundArguments,
        instance: Any | None = None,
        parent_id: str | None = None,
        tags: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if instance is None or not isinstance(instance, (BaseLLM, BaseEmbedding)):
            return
        try:
            if _current is None or _replay.is_patched(instance) or _wraps_model(instance):
                return
            llm = isinstance(instance, BaseLLM)
            kind, arg = ("LLM", "llm") if llm else ("embedding model", "embed_model")
            warn_once(
                f"unpatched:{arg}",
                f"a {type(instance).__name__} {kind} was called that musubi did not make "
                f"replayable (it was passed to a component directly, not to instrument() or "
                f"Settings), so its calls are not replayed: pass it as instrument({arg}=...)",
            )
        except Exception:  # a guest never raises into the dispatcher
            return

    def span_exit(self, *args: Any, **kwargs: Any) -> None:
        return

    def span_drop(self, *args: Any, **kwargs: Any) -> None:
        return

    def new_span(self, *args: Any, **kwargs: Any) -> BaseSpan | None:
        return None

    def prepare_to_exit_span(self, *args: Any, **kwargs: Any) -> BaseSpan | None:
        return None

    def prepare_to_drop_span(self, *args: Any, **kwargs: Any) -> BaseSpan | None:
        return None


def instrument(
    path: str | None = None,
    *,
    llm: BaseLLM | None = None,
    embed_model: BaseEmbedding | None = None,
    engine: Engine | None = None,
    namespace: str | None = None,
    ttl_seconds: float | None = None,
    lineage: bool = True,
    use_settings: bool = True,
    tools: Mapping[str, _tools.Replay] | None = None,
    mode: Mode | str | None = None,
    single_flight: bool = False,
) -> Instrumentation:
    """Make LlamaIndex LLM and embedding calls replayable and record spans as lineage.

    Args:
        path: SQLite file or PostgreSQL URL of the musubi store. ``None``: the engine in
            effect at call time
            (``use_engine(...)`` or ``$MUSUBI_DB`` / ``.musubi/musubi.db``).
        llm, embed_model: models to make replayable, in addition to ``Settings.llm`` /
            ``Settings.embed_model`` (``use_settings=True``).
            The *instances* are patched (class swapped for a replaying subclass of their own
            class), so engines built before this call replay too and ``isinstance`` holds.
        engine: an explicit :class:`musubi_core.Engine` (overrides ``path``).
        namespace: a separate cache inside the store: replays only what was recorded in the
            same namespace (default: ``engine``'s, else ``"default"``).
        ttl_seconds: LLM responses older than this are not replayed (default: forever).
        lineage: add the span and event handlers to the root dispatcher.
        use_settings: also make the models on ``Settings`` replayable: those set now, and
            those set (or resolved as LlamaIndex's default) later, until ``uninstrument()``.
        tools: ``FunctionTool`` name -> ``"deterministic"`` (replays for the same arguments)
            or ``"external_effect"`` (never issued twice); undeclared tools run every time
            (:func:`~musubi_llama_index.declare_tool` declares on the tool itself).
        mode: ``"record"`` (default: ``engine``'s, else ``$MUSUBI_MODE``, else record),
            ``"replay"`` (an LLM or embedding call with no recording raises
            :class:`~musubi_core.errors.ReplayMissError` from the model call: nothing is sent
            to the provider), ``"refresh"`` (replay what matches, record what does not) or
            ``"off"`` (nothing is installed).
        single_flight: workers (threads, processes, machines sharing the store) missing the
            same LLM call at once send it once; the others wait for its stored response
            (non-streamed calls; see :mod:`musubi_core.flight`).

    Idempotent: calling again installs nothing twice; models given later are patched with
    the runtime of the first call.

    Example::

        instrument("musubi.db", llm=my_llm, embed_model=my_embeddings)
    """
    global _current
    resolved = resolve_mode(mode, engine.mode if engine is not None else None)
    with _lock:
        if resolved is Mode.OFF:
            # musubi steps aside: LlamaIndex runs as it would without it (an active
            # instrumentation is removed, so that "off" means off).
            uninstrument()
            return Instrumentation(
                Runtime(path, engine=engine, namespace=namespace, mode=resolved), None, None, None
            )
        if _current is None:
            runtime = Runtime(
                path, engine=engine, namespace=namespace, ttl_seconds=ttl_seconds, mode=resolved,
                single_flight=single_flight,
            )
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
            _tools.install(runtime, tools)
            _current = inst
        else:
            inst = _current
            if tools:
                _tools.install(inst.runtime, {**_tools.declared_names(), **tools})
            other_path = path is not None and str(path) != inst.runtime.path
            other_namespace = namespace is not None and namespace != inst.runtime.namespace
            other_mode = mode is not None and resolved is not inst.runtime.mode
            if (
                other_path
                or other_namespace
                or other_mode
                or (engine is not None and engine is not inst.runtime.engine())
            ):
                warn_once(
                    "instrument-again",
                    "instrument() is already active; keeping its store and namespace, and its "
                    "mode (call uninstrument() first to switch)",
                )
        for model in (llm, embed_model):
            _adopt(inst, model, strict=True)
        if use_settings:
            for model in (_settings_model("_llm"), _settings_model("_embed_model")):
                _adopt(inst, model, strict=False)
            _hook_settings(inst)
        if inst.watch is None and (inst.settings_hook or inst.patched):
            # Replay is wanted (lineage-only use passes no model and use_settings=False).
            inst.watch = UnpatchedModelWatch()
            get_dispatcher().add_span_handler(inst.watch)
        return inst


def uninstrument() -> None:
    """Undo :func:`instrument`: handlers removed in place, Settings' and patched models'
    classes restored (models set on Settings meanwhile included).

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
        if inst.watch is not None:
            dispatcher.span_handlers[:] = [
                h for h in dispatcher.span_handlers if h is not inst.watch
            ]
            inst.watch = None
        _unhook_settings(inst)
        _tools.uninstall()
        _propagation.forget()
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
