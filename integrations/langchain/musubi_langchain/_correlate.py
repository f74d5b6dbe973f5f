"""Correlates a chat-model run seen by the handler with the cache lookup LangChain makes for it.

LangChain gives ``BaseCache.lookup`` no run id. It does fire ``on_chat_model_start`` *before* the
lookup, in the same thread (sync) or the same task (async; our handler runs inline and our cache
implements ``alookup`` natively, so no executor hop loses the context). The handler pushes the run
id here; the cache claims it in ``lookup`` and reports which node the run resolved to (and whether
it replayed). ``on_llm_end`` then takes that report, so the node the handler links into the trace
is exactly the cache's node.

Example:
    >>> import uuid
    >>> rid = uuid.uuid4()
    >>> push(rid)
    >>> claim() == rid
    True
    >>> report(rid, CacheReport(node_id="n1", replayed=True)); take(rid).node_id
    'n1'
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from uuid import UUID

# FIFO of chat-model runs started in this context whose cache lookup has not happened yet.
# A tuple (immutable) so copied contexts (RunnableParallel threads) never share mutations.
_pending: ContextVar[tuple[UUID, ...]] = ContextVar("musubi_langchain_pending", default=())

_lock = threading.Lock()
_reports: dict[UUID, CacheReport] = {}
# Bound on unclaimed reports (a run whose end never reaches a handler must not leak forever).
_MAX_REPORTS = 10_000


@dataclass(frozen=True)
class CacheReport:
    """What the cache decided for one run."""

    node_id: str
    replayed: bool
    artifact_id: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    saved_s: float | None = None


# run id -> what to do if the model call fails (a single flight the cache holds for it).
_on_failure: dict[UUID, Callable[[], None]] = {}


def on_failure(run_id: UUID, fn: Callable[[], None] | None) -> None:
    """Run ``fn`` if the model run ``run_id`` fails (``None``: forget what was registered)."""
    with _lock:
        if fn is None:
            _on_failure.pop(run_id, None)
        elif len(_on_failure) < _MAX_REPORTS:
            _on_failure[run_id] = fn


def failed(run_id: UUID) -> None:
    """The model run ``run_id`` failed (the handler saw its error)."""
    with _lock:
        fn = _on_failure.pop(run_id, None)
    if fn is not None:
        fn()


def push(run_id: UUID) -> None:
    _pending.set((*_pending.get(), run_id))


# Runs that ended. A run announced in one context and looked up in a task it spawned (a v3
# async stream's producer task) stays in the announcing context's FIFO after it ends there:
# claim() skips it. Bounded: the oldest ids are forgotten first.
# By the ids' integers (``UUID.__hash__`` is Python code).
_closed: set[int] = set()
_closed_order: deque[int] = deque()


def pending() -> bool:
    """Is any run waiting for its cache lookup in this context? (cheap pre-check for claim)"""
    return bool(_pending.get())


def claim() -> UUID | None:
    """The oldest pending run in this context (LangChain looks up in start order)."""
    pending = _pending.get()
    if not pending:
        return None
    if _closed:
        while pending and pending[0].int in _closed:
            pending = pending[1:]
        if not pending:
            _pending.set(())
            return None
    _pending.set(pending[1:])
    return pending[0]


def close(run_id: UUID) -> None:
    """A model run ended: never claim it again (see ``_closed``). Lock-free: set and deque
    operations are atomic, and forgetting an old id early only costs that skip."""
    key = run_id.int
    _closed.add(key)
    _closed_order.append(key)
    if len(_closed_order) > _MAX_REPORTS:
        _closed.discard(_closed_order.popleft())


def discard(run_id: UUID) -> None:
    """Forget a pending run that never reached a cache (no cache configured, or an error)."""
    close(run_id)
    pending = _pending.get()
    if not pending:
        return
    if len(pending) == 1:  # the common case: no generator, no UUID.__ne__ per entry
        if pending[0] is run_id or pending[0] == run_id:
            _pending.set(())
        return
    if run_id in pending:
        _pending.set(tuple(r for r in pending if r != run_id))


def report(run_id: UUID, value: CacheReport) -> None:
    with _lock:
        if len(_reports) >= _MAX_REPORTS:
            _reports.pop(next(iter(_reports)))
        _reports[run_id] = value


def replaying(run_id: UUID) -> bool:
    """Did the cache serve this (still running) run? Its stream events are then a replay."""
    found = _reports.get(run_id) if _reports else None
    return found is not None and found.replayed


def take(run_id: UUID) -> CacheReport | None:
    if not _reports:  # a report for this run was made (by the cache, inline) before its end
        return None
    with _lock:
        return _reports.pop(run_id, None)


# A LangGraph task whose cache entry missed: its checkpoint namespace (unique per task) -> the
# node its execution fills. The handler links the task's run to that node when it starts.
_nodes: dict[str, str] = {}
# The same dict, for a caller's cheap "is any node expected?" (never rebound).
expected_nodes = _nodes


def expect_node(checkpoint_ns: str, node_id: str) -> None:
    with _lock:
        if len(_nodes) >= _MAX_REPORTS:
            _nodes.pop(next(iter(_nodes)))
        _nodes[checkpoint_ns] = node_id


def node_for(metadata: object) -> str | None:
    """The node the run with this metadata fills (once), if the node cache announced one."""
    if not _nodes or type(metadata) is not dict:
        return None
    checkpoint_ns = metadata.get("langgraph_checkpoint_ns")
    if not isinstance(checkpoint_ns, str):
        return None
    with _lock:
        return _nodes.pop(checkpoint_ns, None)
