"""Tool replay, opt-in per tool, for LlamaIndex ``FunctionTool``s (agents included).

Tools run every time by default: musubi records each as a call, it does not replay them. A
tool declared **deterministic** replays its stored result for the same arguments; one declared
an **external effect** follows the ``EXTERNAL_EFFECT`` rules (an intent row first, never issued
twice, ``EffectInDoubtError`` after a crash left it unknown). Declare by name
(``instrument(tools={"add": "deterministic"})``) or on the tool (:func:`declare_tool`); the
declaration on the tool wins. Undeclared tools run exactly as before.

What replays is the tool function's return value (``raw_output``): ``FunctionTool`` builds its
``ToolOutput`` from it as usual, callbacks included. Identity: the tool's name, the code of its
function, and its arguments (a ``Context`` argument excluded). The hook wraps a declared
tool's function where ``FunctionTool.call``/``acall`` call it, inside the tool's span, so the
span's call becomes a ``tool_step`` call of the node (replayed, with the seconds it saved).

Example::

    instrument("musubi.db", llm=llm, tools={"add": "deterministic"})
    agent = FunctionAgent(tools=[FunctionTool.from_defaults(add), ...], llm=llm)
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any

from llama_index.core.instrumentation.span import active_span_id
from llama_index.core.tools import FunctionTool

from musubi_core.declared import (
    DECLARED_KIND,
    Declared,
    arun_declared,
    replay_policy,
    run_declared,
)
from musubi_core.identity import NodeKey, function_fingerprint
from musubi_core.policy import StepConfiguration, StepType
from musubi_llama_index import _calls
from musubi_llama_index._runtime import Runtime, warn_once

__all__ = ["ATTRIBUTE", "declare_tool", "install", "uninstall"]

ATTRIBUTE = "__musubi_replay__"
Replay = str | StepType | StepConfiguration


def declare_tool(tool: FunctionTool, replay: Replay = "deterministic") -> FunctionTool:
    """Declare how ``tool`` replays (``"deterministic"`` or ``"external_effect"``, a
    :class:`StepType` or a :class:`StepConfiguration`); returns the tool. Takes effect under
    :func:`musubi_llama_index.instrument`."""
    replay_policy(replay)
    setattr(tool, ATTRIBUTE, replay)
    return tool


class _State:
    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        self.by_name: dict[str, StepConfiguration] = {}
        self.lock = threading.Lock()
        # tool -> its original (_fn, _async_fn), for uninstall
        self.wrapped: dict[int, tuple[FunctionTool, Any, Any]] = {}
        # a tool's function -> the fingerprint of its code (read once)
        self.fingerprints: dict[Any, str] = {}


_STATE = _State()


def _name(tool: FunctionTool) -> str:
    try:
        return str(tool.metadata.get_name())
    except Exception:
        return getattr(getattr(tool, "metadata", None), "name", None) or "tool"


def policy_of(tool: FunctionTool) -> StepConfiguration | None:
    """How ``tool`` replays (None: undeclared)."""
    declared = getattr(tool, ATTRIBUTE, None)
    if declared is not None:
        try:
            return replay_policy(declared)
        except ValueError as exc:
            warn_once("tool-declaration", f"tool {_name(tool)!r}: {exc}; it runs every time")
            return None
    return _STATE.by_name.get(_name(tool)) if _STATE.by_name else None


def _key(tool: FunctionTool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> NodeKey | None:
    runtime = _STATE.runtime
    if runtime is None:
        return None
    ctx = getattr(tool, "ctx_param_name", None)
    inputs = {"args": list(args), "kwargs": {k: v for k, v in kwargs.items() if k != ctx}}
    name = _name(tool)
    try:
        fn = tool.real_fn
        fingerprint = _STATE.fingerprints.get(fn)
        if fingerprint is None:
            fingerprint = _STATE.fingerprints[fn] = function_fingerprint(fn)
        return runtime.engine().key(f"tool:{name}", inputs, fingerprint={"code": fingerprint})
    except Exception as exc:  # an argument without a stable identity, a broken store
        warn_once(f"tool-key:{name}", f"tool {name!r} runs every time: {exc}")
        return None


def _warn(tool: FunctionTool) -> Callable[[BaseException], None]:
    def warn(exc: BaseException) -> None:
        warn_once(
            f"tool-store:{_name(tool)}:{type(exc).__name__}",
            f"tool {_name(tool)!r} ran without replay ({type(exc).__name__}: {exc})",
        )

    return warn


def _mark_span(outcome: Declared) -> None:
    """The tool span's call reaches the node (executed or replayed)."""
    if outcome.node_id is None:
        return
    tracker = _calls.active()
    call = tracker.span_call(active_span_id.get()) if tracker is not None else None
    if call is None or call is _calls.UNRECORDED or call.kind != "tool":
        return
    call.kind, call.node_id, call.artifact_id = DECLARED_KIND, outcome.node_id, outcome.artifact_id
    call.replayed, call.saved_s = outcome.replayed, outcome.saved_s


def _engine() -> Any:
    runtime = _STATE.runtime
    return runtime.engine() if runtime is not None else None


def _wrap(tool: FunctionTool) -> None:
    """Wrap the declared tool's functions where ``call``/``acall`` call them (once)."""
    with _STATE.lock:
        if id(tool) in _STATE.wrapped:
            return
        fn, async_fn = tool._fn, tool._async_fn

        @functools.wraps(fn)
        def sync_fn(*args: Any, **kwargs: Any) -> Any:
            config = policy_of(tool)
            if config is None or _STATE.runtime is None:
                return fn(*args, **kwargs)
            outcome = run_declared(
                _engine(), _key(tool, args, kwargs), lambda: fn(*args, **kwargs), config,
                warn=_warn(tool), label=_name(tool),
            )
            _mark_span(outcome)
            return outcome.value

        @functools.wraps(async_fn)
        async def async_wrapped(*args: Any, **kwargs: Any) -> Any:
            config = policy_of(tool)
            if config is None or _STATE.runtime is None:
                return await async_fn(*args, **kwargs)

            async def call() -> Any:
                return await async_fn(*args, **kwargs)

            outcome = await arun_declared(
                _engine(), _key(tool, args, kwargs), call, config,
                warn=_warn(tool), label=_name(tool),
            )
            _mark_span(outcome)
            return outcome.value

        tool._fn, tool._async_fn = sync_fn, async_wrapped
        _STATE.wrapped[id(tool)] = (tool, fn, async_fn)


def _make(original: Any) -> Any:
    # The original is bound before it is called: its span decorator then sees the tool as the
    # span's instance (called as a plain function, it would see none).
    if _is_async(original):

        async def acall(self: FunctionTool, *args: Any, **kwargs: Any) -> Any:
            if policy_of(self) is not None:
                _wrap(self)
            return await original.__get__(self, type(self))(*args, **kwargs)

        return acall

    def call(self: FunctionTool, *args: Any, **kwargs: Any) -> Any:
        if policy_of(self) is not None:
            _wrap(self)
        return original.__get__(self, type(self))(*args, **kwargs)

    return call


def _is_async(fn: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(inspect.unwrap(fn))


_ORIGINALS: dict[str, Any] = {}


def declared_names() -> dict[str, StepConfiguration]:
    """The declarations by name in effect."""
    return dict(_STATE.by_name)


def install(runtime: Runtime, tools: Mapping[str, Replay] | None) -> None:
    """Replay declared ``FunctionTool``s through ``runtime`` (``instrument()`` calls this)."""
    _STATE.runtime = runtime
    _STATE.by_name = {name: replay_policy(value) for name, value in (tools or {}).items()}
    for name in ("call", "acall"):
        if name not in _ORIGINALS:
            original = FunctionTool.__dict__[name]
            _ORIGINALS[name] = original
            wrapper = _make(original)
            # The original is already span-decorated: the dispatcher must not wrap ours again.
            wrapper.__dispatcher_span_decorated__ = True
            setattr(FunctionTool, name, wrapper)


def uninstall() -> None:
    """Every tool runs as LlamaIndex runs it; wrapped tools get their functions back."""
    for name, original in list(_ORIGINALS.items()):
        setattr(FunctionTool, name, original)
        del _ORIGINALS[name]
    with _STATE.lock:
        for tool, fn, async_fn in _STATE.wrapped.values():
            tool._fn, tool._async_fn = fn, async_fn
        _STATE.wrapped.clear()
    _STATE.runtime, _STATE.by_name = None, {}
