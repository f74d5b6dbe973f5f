"""Calls a user declared replayable (a tool), run the way an adapter must run them.

Tools of agent frameworks run every time unless the user declares them: a *deterministic* tool
replays its stored result for the same input; an *external-effect* tool follows the
``EXTERNAL_EFFECT`` rules of :mod:`musubi_core.engine` (an intent row before the call, the
stored result afterwards, never issued twice, ``EffectInDoubtError`` when a crash left it
unknown). Both adapters run a declared tool through :func:`run_declared` /
:func:`arun_declared`, which add what an adapter owes its host framework:

* the tool's own exception propagates untouched (the framework handles tool errors);
* a store that cannot be read runs the tool live, and a result that cannot be stored (the codec
  refuses it, the disk is full) is returned as computed; each says so through ``warn``;
* :class:`~musubi_core.errors.EffectInDoubtError` propagates: an effect that may already have
  happened is never issued again silently.

>>> import os, tempfile
>>> from musubi_core import Engine, SQLiteStore
>>> engine = Engine(SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db")))
>>> config = replay_policy("deterministic")
>>> key = engine.key("tool:add", {"a": 1, "b": 2})
>>> runs = []
>>> add = lambda: runs.append(1) or 3
>>> [run_declared(engine, key, add, config, warn=print).replayed for _ in range(2)], runs
([False, True], [1])
>>> engine.close()
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .engine import Engine, Outcome
from .errors import EffectInDoubtError
from .identity import NodeKey
from .policy import StepConfiguration, StepType

__all__ = ["DECLARED_KIND", "Declared", "arun_declared", "replay_policy", "run_declared"]

T = TypeVar("T")

# The kind of a declared tool's nodes and calls: replayable, unlike a plain "tool" call.
DECLARED_KIND = "tool_step"

_NAMES = {
    "deterministic": StepType.DETERMINISTIC,
    "external_effect": StepType.EXTERNAL_EFFECT,
    "external-effect": StepType.EXTERNAL_EFFECT,
    "stochastic": StepType.STOCHASTIC,
}


def replay_policy(value: str | StepType | StepConfiguration) -> StepConfiguration:
    """The configuration a declaration names: ``"deterministic"``, ``"external_effect"``,
    ``"stochastic"`` (replays forever; give a :class:`StepConfiguration` for a TTL), a
    :class:`StepType` or a :class:`StepConfiguration`.

    >>> replay_policy("external_effect").step_type.value
    'external_effect'
    """
    if isinstance(value, StepConfiguration):
        return value
    if isinstance(value, StepType):
        return StepConfiguration(step_type=value)
    if isinstance(value, str) and value.lower() in _NAMES:
        return StepConfiguration(step_type=_NAMES[value.lower()])
    raise ValueError(
        f"a tool's replay declaration is 'deterministic', 'external_effect', 'stochastic', a "
        f"StepType or a StepConfiguration, not {value!r}"
    )


@dataclass(frozen=True, slots=True)
class Declared:
    """What running a declared call gave: its value, and the node it reached (None when it
    ran live, without the store)."""

    value: Any
    node_id: str | None = None
    artifact_id: str | None = None
    replayed: bool = False
    # A replay: the seconds the execution it stands in for took.
    saved_s: float | None = None


class _Tracked:
    """Whether the wrapped call started, and what it returned once it finished."""

    __slots__ = ("done", "ran", "value")

    def __init__(self) -> None:
        self.ran = False
        self.done = False
        self.value: Any = None


def _declared(out: Outcome) -> Declared:
    return Declared(
        out.value, out.node_id, out.artifact_id, out.replayed,
        out.saved_s if out.replayed else None,
    )


def _failed(exc: BaseException, tracked: _Tracked) -> bool:
    """Was ``exc`` raised by musubi around the call (True) rather than by the call itself or
    an effect in doubt (False: re-raise)?"""
    if isinstance(exc, EffectInDoubtError) or not isinstance(exc, Exception):
        return False
    return not (tracked.ran and not tracked.done)


def run_declared(
    engine: Engine | None,
    key: NodeKey | None,
    fn: Callable[[], T],
    config: StepConfiguration,
    *,
    warn: Callable[[BaseException], None],
    kind: str = DECLARED_KIND,
    label: str | None = None,
) -> Declared:
    """Replay ``key`` or run ``fn`` under ``config`` (see the module docstring). ``engine`` or
    ``key`` None (no store, an input without a stable identity) runs ``fn`` live."""
    if engine is None or key is None:
        return Declared(fn())
    tracked = _Tracked()

    def call() -> T:
        tracked.ran = True
        value = fn()
        tracked.value, tracked.done = value, True
        return value

    try:
        return _declared(engine.execute(key, call, config, kind=kind, label=label))
    except BaseException as exc:
        if not _failed(exc, tracked):
            raise
        warn(exc)
        return Declared(tracked.value if tracked.done else fn())


async def arun_declared(
    engine: Engine | None,
    key: NodeKey | None,
    fn: Callable[[], Awaitable[T]],
    config: StepConfiguration,
    *,
    warn: Callable[[BaseException], None],
    kind: str = DECLARED_KIND,
    label: str | None = None,
) -> Declared:
    """Async :func:`run_declared`."""
    if engine is None or key is None:
        return Declared(await fn())
    tracked = _Tracked()

    async def call() -> T:
        tracked.ran = True
        value = await fn()
        tracked.value, tracked.done = value, True
        return value

    try:
        return _declared(await engine.aexecute(key, call, config, kind=kind, label=label))
    except BaseException as exc:
        if not _failed(exc, tracked):
            raise
        warn(exc)
        return Declared(tracked.value if tracked.done else await fn())
