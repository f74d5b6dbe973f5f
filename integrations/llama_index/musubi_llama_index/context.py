"""Keeping span (and musubi step) context across thread pools.

asyncio tasks copy the current context, so ``asyncio.gather`` keeps lineage parents for free.
A plain ``ThreadPoolExecutor.submit`` does not: the worker runs with an empty context and its
LLM calls lose their parent span. Use :func:`wrap` or :class:`ContextThreadPoolExecutor`.

Example::

    with ContextThreadPoolExecutor(4) as pool:
        answers = list(pool.map(query_engine.query, questions))
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

__all__ = ["ContextThreadPoolExecutor", "wrap"]

P = ParamSpec("P")
R = TypeVar("R")


def wrap(fn: Callable[P, R]) -> Callable[P, R]:
    """Bind ``fn`` to a copy of the *current* context (call it in the submitting thread)."""
    ctx = contextvars.copy_context()

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return ctx.run(fn, *args, **kwargs)

    return run


class ContextThreadPoolExecutor(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` whose tasks run in a copy of the submitter's context."""

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        ctx = contextvars.copy_context()
        return super().submit(ctx.run, fn, *args, **kwargs)
