"""What musubi does with a call: record (the default), replay only, refresh, or nothing.

| mode | a call with a recording | a call without one |
|---|---|---|
| ``record`` | replayed (within its TTL) | executed and recorded |
| ``replay`` | replayed (TTLs do not expire it) | :class:`~musubi_core.errors.ReplayMissError`: nothing is sent, nothing runs |
| ``refresh`` | replayed (TTLs do not expire it) | executed and recorded |
| ``off`` | executed, nothing read or written | executed, nothing read or written |

``replay`` is the test mode: a suite recorded once runs offline, deterministically, and a call
the recording does not cover fails loudly, naming what changed. ``refresh`` brings a recording
up to date after a change: only the calls that changed are paid for again, everything that
still matches replays. A recording kept for tests never expires in those two modes: a
STOCHASTIC step's ``ttl_seconds`` applies in ``record`` mode only. To record everything again,
start from an empty store.

The mode comes from, in order: the ``mode=`` argument (``Engine(mode=...)``,
``MusubiCache(mode=...)``, both adapters' ``instrument(mode=...)``), the engine an adapter is
given, the ``MUSUBI_MODE`` environment variable, else ``record``.

>>> resolve_mode("replay")
<Mode.REPLAY: 'replay'>
"""

from __future__ import annotations

import enum
import os

from .errors import ConfigError

__all__ = ["MODE_ENV", "Mode", "resolve_mode"]

MODE_ENV = "MUSUBI_MODE"


class Mode(str, enum.Enum):
    """What musubi does with a call (see the module docstring)."""

    RECORD = "record"
    REPLAY = "replay"
    REFRESH = "refresh"
    OFF = "off"

    @property
    def serves_only_recordings(self) -> bool:
        """``replay``: a miss raises instead of executing."""
        return self is Mode.REPLAY

    @property
    def frozen_clock(self) -> bool:
        """``replay`` and ``refresh``: a recording's TTL does not expire it."""
        return self is Mode.REPLAY or self is Mode.REFRESH


def _parse(value: object, source: str) -> Mode:
    if isinstance(value, Mode):
        return value
    if isinstance(value, str):
        try:
            return Mode(value.strip().lower())
        except ValueError:
            pass
    choices = ", ".join(m.value for m in Mode)
    raise ConfigError(f"{source} must be one of {choices}, not {value!r}", target=str(value))


def resolve_mode(mode: Mode | str | None = None, engine_mode: Mode | None = None) -> Mode:
    """The mode an engine or adapter object works in: ``mode`` as given, else that of the
    engine it was given (``engine_mode``), else ``$MUSUBI_MODE``, else ``record``. A mode that
    contradicts the given engine's is a :class:`~musubi_core.errors.ConfigError` (the engine
    decides what its lookups serve)."""
    if mode is None:
        if engine_mode is not None:
            return engine_mode
        env = os.environ.get(MODE_ENV, "").strip()
        return _parse(env, f"${MODE_ENV}") if env else Mode.RECORD
    resolved = _parse(mode, "mode")
    if engine_mode is not None and resolved is not engine_mode:
        raise ConfigError(
            f"mode={resolved.value!r}, but the engine given is in mode {engine_mode.value!r}: "
            f"pass only one of them, or an engine made with Engine(store, mode={resolved.value!r})",
            target=resolved.value,
        )
    return resolved
