"""Single flight for LlamaIndex LLM calls (``instrument(..., single_flight=True)``).

A call that missed waits while another worker of the store executes the same call, then
replays its stored response; or takes the flight and executes it, releasing the flight once
the response is recorded (:mod:`musubi_core.flight`). Streams are not flown: their response
is recorded only when the consumer has read them to the end.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from musubi_core.flight import flights_for
from musubi_core.modes import Mode
from musubi_llama_index._runtime import Runtime, warn_once

__all__ = ["afly", "fly", "land"]


def _flying(rt: Runtime, key: Any) -> bool:
    return rt.single_flight and key is not None and rt.mode in (Mode.RECORD, Mode.REFRESH)


def _failed(exc: Exception) -> tuple[Any | None, bool]:
    warn_once("flight", f"single flight failed ({type(exc).__name__}: {exc}); executing")
    return None, False


def fly(rt: Runtime, key: Any, stored: Callable[[], Any | None]) -> tuple[Any | None, bool]:
    """``(served, False)``: another worker's stored response; ``(None, True)``: this call
    holds the flight and executes (then :func:`land`); ``(None, False)``: execute."""
    if not _flying(rt, key):
        return None, False
    try:
        return flights_for(rt.engine().store).wait_or_claim(
            key.node_id, stored, timeout=rt.single_flight_timeout, category=RuntimeWarning
        )
    except Exception as exc:  # never break the host
        return _failed(exc)


async def afly(rt: Runtime, key: Any, stored: Callable[[], Any | None]) -> tuple[Any | None, bool]:
    """Async :func:`fly`: the event loop runs while it waits."""
    if not _flying(rt, key):
        return None, False
    try:
        return await flights_for(rt.engine().store).await_or_claim(
            key.node_id, stored, timeout=rt.single_flight_timeout, category=RuntimeWarning
        )
    except Exception as exc:
        return _failed(exc)


def land(rt: Runtime, key: Any, held: bool) -> None:
    """Release a flight this call held (its response recorded, or its call failed)."""
    if held:
        try:
            flights_for(rt.engine().store).release(key.node_id)
        except Exception as exc:
            _failed(exc)
