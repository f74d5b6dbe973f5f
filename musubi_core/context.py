"""Which lineage node is running right now (for ``contains`` edges).

A ``@step`` or a durable ``ctx.step`` sets the current node while its body
runs, so anything recorded inside it (a nested step, an LLM call seen by an
adapter) is attached under it. ``ContextVar`` keeps this correct across
threads and ``asyncio`` tasks; for a thread pool, submit
``contextvars.copy_context().run`` so workers inherit it.

>>> current_node() is None
True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["current_node", "current_run", "running_node", "running_run"]

_NODE: ContextVar[str | None] = ContextVar("musubi_current_node", default=None)
_RUN: ContextVar[str | None] = ContextVar("musubi_current_run", default=None)


def current_node() -> str | None:
    """The node id of the innermost running step, if any."""
    return _NODE.get()


def current_run() -> str | None:
    """The id of the durable run being executed, if any."""
    return _RUN.get()


@contextlib.contextmanager
def running_node(node_id: str) -> Iterator[None]:
    token = _NODE.set(node_id)
    try:
        yield
    finally:
        _NODE.reset(token)


@contextlib.contextmanager
def running_run(run_id: str) -> Iterator[None]:
    token = _RUN.set(run_id)
    try:
        yield
    finally:
        _RUN.reset(token)
