"""Run-tree bookkeeping for the callback handler (pure data structures, no store access).

A *trace* is one root LangChain run and everything under it. For each run we keep what is needed
to record its node when it ends: its parent (for ``contains`` edges), its input, and the data
upstream inferred by content: a run whose input holds an atom (see ``_content.atoms``) that an
earlier, finished run of the same trace produced depends on that run. Atoms the run merely
inherited from an enclosing run's input (the question every branch of a RunnableParallel sees)
are not evidence, and among matching runs an enclosing chain yields to the run inside it that
actually produced the value.

Example:
    >>> t = Traces()
    >>> import uuid
    >>> root, a, b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    >>> _ = t.start(root, None, "chain", "rag", {"s:what is musubi"})
    >>> _ = t.start(a, root, "retriever", "docs", {"s:what is musubi"})
    >>> t.finish(a, {"s:musubi ties things"}, "node-a", "art-a") is not None
    True
    >>> t.start(b, root, "chain", "prompt", {"s:musubi ties things"}).upstream
    {'node-a': 'art-a'}
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

# A trace with more finished runs than this stops indexing new outputs (a runaway agent loop
# must not make every step slower); edges inferred before that point are kept.
MAX_INDEXED_RUNS = 5_000


@dataclass(slots=True)
class Run:
    run_id: UUID
    parent: Run | None
    kind: str
    name: str
    inherited: frozenset[str]
    input_atoms: set[str]
    started: float = field(default_factory=time.monotonic)
    upstream: dict[str, str | None] = field(default_factory=dict)  # node id -> artifact id
    node_id: str | None = None
    children: list[str] = field(default_factory=list)  # node ids of finished children
    inputs: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def is_ancestor_of(self, other: Run) -> bool:
        cur = other.parent
        while cur is not None:
            if cur is self:
                return True
            cur = cur.parent
        return False


@dataclass
class _Trace:
    root: UUID
    # atom -> finished runs that produced it (as output)
    index: dict[str, list[Run]] = field(default_factory=dict)
    finished: int = 0
    live: int = 0
    # node id + artifact id of finished runs, for data edges
    produced: dict[UUID, tuple[str, str | None]] = field(default_factory=dict)


class Traces:
    """Thread-safe map of live runs grouped by trace."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[UUID, Run] = {}
        self._trace_of: dict[UUID, _Trace] = {}

    def get(self, run_id: UUID) -> Run | None:
        with self._lock:
            return self._runs.get(run_id)

    def start(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        kind: str,
        name: str,
        input_atoms: set[str],
    ) -> Run:
        with self._lock:
            parent = self._runs.get(parent_run_id) if parent_run_id is not None else None
            trace = self._trace_of.get(parent.run_id) if parent is not None else None
            if trace is None:
                trace = _Trace(root=run_id)
            inherited = (
                parent.inherited | frozenset(parent.input_atoms) if parent is not None else frozenset()
            )
            run = Run(run_id, parent, kind, name, inherited, input_atoms)
            run.upstream = self._infer(trace, run)
            self._runs[run_id] = run
            self._trace_of[run_id] = trace
            trace.live += 1
            return run

    @staticmethod
    def _infer(trace: _Trace, run: Run) -> dict[str, str | None]:
        candidates: dict[UUID, Run] = {}
        for atom in run.input_atoms:
            if atom in run.inherited:
                continue
            for producer in trace.index.get(atom, ()):
                candidates[producer.run_id] = producer
        if not candidates:
            return {}
        found = list(candidates.values())
        # An enclosing chain's output repeats its last child's: keep the innermost producer.
        kept = [c for c in found if not any(c is not o and c.is_ancestor_of(o) for o in found)]
        out: dict[str, str | None] = {}
        for c in kept:
            produced = trace.produced.get(c.run_id)
            if produced is not None:
                out[produced[0]] = produced[1]
        return out

    def finish(
        self, run_id: UUID, output_atoms: set[str], node_id: str | None, artifact_id: str | None
    ) -> Run | None:
        """Mark a run finished; returns it (None if unknown). Drops the trace at its root's end."""
        with self._lock:
            run = self._runs.pop(run_id, None)
            trace = self._trace_of.pop(run_id, None)
            if run is None or trace is None:
                return None
            run.node_id = node_id
            if node_id is not None:
                if run.parent is not None:
                    run.parent.children.append(node_id)
                if trace.finished < MAX_INDEXED_RUNS:
                    trace.produced[run_id] = (node_id, artifact_id)
                    for atom in output_atoms:
                        trace.index.setdefault(atom, []).append(run)
                    trace.finished += 1
            trace.live -= 1
            if trace.live <= 0:
                # Root finished: release the trace's memory (index, produced, runs).
                trace.index.clear()
                trace.produced.clear()
            return run

    def __len__(self) -> int:
        with self._lock:
            return len(self._runs)
