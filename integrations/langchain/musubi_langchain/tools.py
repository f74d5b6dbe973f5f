"""Tool replay, opt-in per tool: LangChain tools (in LangGraph agents too) a user declared.

Tools run every time by default: musubi records them, it does not replay them, because a tool
can read the world or change it. A tool declared **deterministic** (its result depends only on
its arguments and its code) replays its stored result for the same arguments; a tool declared
an **external effect** (it sends, writes, pays) follows the ``EXTERNAL_EFFECT`` rules: an intent
row before the call, the stored result afterwards, never issued twice, and
``EffectInDoubtError`` when a crash left it unknown whether it happened. Undeclared tools run as
they always did. Declare a tool by name (``instrument(tools={"get_weather": "deterministic"})``)
or on the tool itself (:func:`declare_tool`); the declaration on the tool wins.

The identity of a declared tool's result: the tool's name, the code of its function (edit the
function and it runs again), and its parsed arguments. ``instrument()`` installs the hook (a
patch of ``BaseTool.run``/``arun`` that does nothing for undeclared tools); ``uninstrument()``
removes it. Under the handler, a declared tool's call is a call of kind ``tool_step`` that
reaches its node: executed, or replayed with the seconds it saved.

Example:
    >>> import os, tempfile
    >>> from langchain_core.tools import tool
    >>> from musubi_langchain import instrument, uninstrument
    >>> ran = []
    >>> @tool
    ... def area(width: int, height: int) -> int:
    ...     \"\"\"The area of a rectangle.\"\"\"
    ...     ran.append(1)
    ...     return width * height
    >>> _ = instrument(os.path.join(tempfile.mkdtemp(), "m.db"), tools={"area": "deterministic"})
    >>> area.invoke({"width": 2, "height": 3}), area.invoke({"width": 2, "height": 3}), ran
    (6, 6, [1])
    >>> uninstrument()
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any
from uuid import UUID

from langchain_core.tools import BaseTool

from musubi_core.declared import Declared, arun_declared, replay_policy, run_declared
from musubi_core.engine import Engine
from musubi_core.identity import NodeKey, function_fingerprint
from musubi_core.policy import StepConfiguration, StepType

from . import _correlate
from ._engine import MusubiLangChainWarning
from ._patches import Patch

try:
    from langchain_core.utils.uuid import uuid7
except ImportError:  # pragma: no cover - older langchain-core
    from uuid import uuid4 as uuid7  # type: ignore[assignment]


def _new_run_id() -> UUID:
    """A run id as LangChain makes them (time-ordered)."""
    return uuid7()

__all__ = ["METADATA_KEY", "declare_tool", "install_tool_replay", "uninstall_tool_replay"]

# The key of ``BaseTool.metadata`` that holds a declaration made on the tool.
METADATA_KEY = "musubi_replay"
# Keyword arguments LangChain adds to ``_run`` that are not the tool's input.
_NOT_INPUT = frozenset({"run_manager", "callbacks", "config"})

Replay = str | StepType | StepConfiguration


def declare_tool(tool: BaseTool, replay: Replay = "deterministic") -> BaseTool:
    """Declare how ``tool`` replays (``"deterministic"`` or ``"external_effect"``, a
    :class:`StepType` or a :class:`StepConfiguration`); returns the tool. Takes effect under
    :func:`musubi_langchain.instrument`."""
    replay_policy(replay)  # a bad declaration fails here, not at the first call
    tool.metadata = {**(tool.metadata or {}), METADATA_KEY: replay}
    return tool


class _State:
    """What the installed hook replays with (set by ``instrument()``)."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.by_name: dict[str, StepConfiguration] = {}
        self.lock = threading.Lock()
        self.said: set[str] = set()
        self.fingerprints: dict[Any, str | None] = {}


_STATE = _State()


def _say(topic: str, message: str) -> None:
    with _STATE.lock:
        if topic in _STATE.said:
            return
        _STATE.said.add(topic)
    warnings.warn(f"musubi tool replay: {message}", MusubiLangChainWarning, stacklevel=4)


def policy_of(tool: BaseTool) -> StepConfiguration | None:
    """How ``tool`` replays (None: undeclared, it runs every time)."""
    metadata = tool.metadata
    if metadata and METADATA_KEY in metadata:
        try:
            return replay_policy(metadata[METADATA_KEY])
        except ValueError as exc:
            _say("declaration:" + tool.name, f"tool {tool.name!r}: {exc}; it runs every time")
            return None
    return _STATE.by_name.get(tool.name) if _STATE.by_name else None


class _Plan:
    """The declared tool whose ``run`` is in progress in this context."""

    __slots__ = ("config", "run_id", "tool", "used")

    def __init__(self, tool: BaseTool, run_id: UUID, config: StepConfiguration) -> None:
        self.tool, self.run_id, self.config = tool, run_id, config
        self.used = False


_PLAN: ContextVar[_Plan | None] = ContextVar("musubi_langchain_tool_plan", default=None)


def _fingerprint(tool: BaseTool) -> str | None:
    fn = getattr(tool, "func", None) or getattr(tool, "coroutine", None)
    target: Any = fn if fn is not None else type(tool)._run
    target = getattr(target, "__wrapped__", target) if getattr(target, "__musubi_patch__", False) else target
    known = _STATE.fingerprints.get(target)
    if known is None:
        try:
            known = function_fingerprint(target)
        except Exception:
            known = "nosource"
        _STATE.fingerprints[target] = known
    return known


def _key(engine: Engine, tool: BaseTool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> NodeKey | None:
    inputs = {"args": list(args), "kwargs": {k: v for k, v in kwargs.items() if k not in _NOT_INPUT}}
    try:
        return engine.key(f"tool:{tool.name}", inputs, fingerprint={"code": _fingerprint(tool)})
    except Exception as exc:  # an argument without a stable identity: runs every time
        _say("key:" + tool.name, f"tool {tool.name!r} runs every time: {exc}")
        return None


def _report(plan: _Plan, outcome: Declared) -> None:
    if outcome.node_id is not None:
        _correlate.report(
            plan.run_id,
            _correlate.CacheReport(
                node_id=outcome.node_id,
                replayed=outcome.replayed,
                artifact_id=outcome.artifact_id,
                saved_s=outcome.saved_s,
            ),
        )


def _warner(tool: BaseTool) -> Callable[[BaseException], None]:
    def warn(exc: BaseException) -> None:
        _say(
            f"store:{tool.name}:{type(exc).__name__}",
            f"tool {tool.name!r} ran without replay ({type(exc).__name__}: {exc})",
        )

    return warn


def _take_plan(tool: Any) -> _Plan | None:
    plan = _PLAN.get()
    if plan is None or plan.tool is not tool or plan.used:
        return None
    plan.used = True
    return plan


def _make_run_impl(original: Any) -> Any:
    """``_run`` of a declared tool's class: replay or run-and-record the planned call."""

    @functools.wraps(original)
    def _run(self: BaseTool, *args: Any, **kwargs: Any) -> Any:
        plan = _take_plan(self)
        if plan is None:
            return original(self, *args, **kwargs)
        engine = _STATE.engine
        key = _key(engine, self, args, kwargs) if engine is not None else None
        outcome = run_declared(
            engine, key, lambda: original(self, *args, **kwargs), plan.config,
            warn=_warner(self), label=self.name,
        )
        _report(plan, outcome)
        return outcome.value

    return _run


def _make_arun_impl(original: Any) -> Any:
    @functools.wraps(original)
    async def _arun(self: BaseTool, *args: Any, **kwargs: Any) -> Any:
        plan = _take_plan(self)
        if plan is None:
            return await original(self, *args, **kwargs)
        engine = _STATE.engine
        key = _key(engine, self, args, kwargs) if engine is not None else None

        async def call() -> Any:
            return await original(self, *args, **kwargs)

        outcome = await arun_declared(
            engine, key, call, plan.config, warn=_warner(self), label=self.name
        )
        _report(plan, outcome)
        return outcome.value

    return _arun


_CLASS_PATCHES: dict[type, list[Patch]] = {}


def _patch_class(cls: type) -> None:
    """Hook ``_run`` (and ``_arun`` where the class defines one: BaseTool's own delegates to
    ``_run``) of a declared tool's class, once."""
    if cls in _CLASS_PATCHES:
        return
    with _STATE.lock:
        if cls in _CLASS_PATCHES:
            return
        patches = [Patch(cls, "_run", _make_run_impl)]
        if any("_arun" in c.__dict__ for c in cls.__mro__ if c is not BaseTool):
            patches.append(Patch(cls, "_arun", _make_arun_impl))
        for p in patches:
            p.install()
        _CLASS_PATCHES[cls] = patches


def _plan(tool: BaseTool, run_id: UUID | None) -> tuple[_Plan, UUID] | None:
    config = policy_of(tool)
    if config is None or _STATE.engine is None:
        return None
    _patch_class(type(tool))
    rid = run_id or _new_run_id()  # the handler's run for this call: its report's key
    return _Plan(tool, rid, config), rid


def _make_run(original: Any) -> Any:
    def run(self: BaseTool, tool_input: Any, *args: Any, run_id: UUID | None = None,
            **kwargs: Any) -> Any:
        planned = _plan(self, run_id) if _STATE.engine is not None else None
        if planned is None:
            return original(self, tool_input, *args, run_id=run_id, **kwargs)
        token = _PLAN.set(planned[0])
        try:
            return original(self, tool_input, *args, run_id=planned[1], **kwargs)
        finally:
            _PLAN.reset(token)

    return run


def _make_arun(original: Any) -> Any:
    async def arun(self: BaseTool, tool_input: Any, *args: Any, run_id: UUID | None = None,
                   **kwargs: Any) -> Any:
        planned = _plan(self, run_id) if _STATE.engine is not None else None
        if planned is None:
            return await original(self, tool_input, *args, run_id=run_id, **kwargs)
        token = _PLAN.set(planned[0])
        try:
            return await original(self, tool_input, *args, run_id=planned[1], **kwargs)
        finally:
            _PLAN.reset(token)

    return arun


_PATCHES = (Patch(BaseTool, "run", _make_run), Patch(BaseTool, "arun", _make_arun))


def install_tool_replay(
    engine: Engine | None, tools: Mapping[str, Replay] | None = None
) -> None:
    """Replay declared tools through ``engine`` (``instrument()`` calls this)."""
    by_name = {name: replay_policy(value) for name, value in (tools or {}).items()}
    _STATE.engine, _STATE.by_name = engine, by_name
    for p in _PATCHES:
        p.install()


def uninstall_tool_replay() -> None:
    """Remove the hook: every tool runs as LangChain runs it."""
    for p in _PATCHES:
        p.uninstall()
    with _STATE.lock:
        for patches in _CLASS_PATCHES.values():
            for p in patches:
                p.uninstall()
        _CLASS_PATCHES.clear()
        _STATE.said.clear()
    _STATE.engine, _STATE.by_name = None, {}
