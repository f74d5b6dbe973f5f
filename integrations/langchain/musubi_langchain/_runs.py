"""Run-tree bookkeeping for the callback handler (pure data structures, no store access).

A *trace* is one root LangChain run and everything under it: one musubi run, whose calls are the
LangChain runs. For each live run we keep what is needed to record its call when it ends: its
parent (the call tree), its input atoms and the data upstream inferred by content: a run whose
input holds an atom (see ``_content.flow_atoms``) that an earlier, finished run of the same trace
produced depends on that run. Atoms the run merely inherited from an enclosing run's input (the
question every branch of a RunnableParallel sees) are not evidence, and among matching runs an
enclosing chain yields to the run inside it that actually produced the value.

Everything here is lock-free: the only shared structures are dicts and lists whose single
operations are atomic (``dict.get``/``pop``/``setdefault``, ``list.append``, ``next(count)``),
so concurrent branches of one trace (RunnableParallel threads) and concurrent traces are safe.

Example:
    >>> t = Traces()
    >>> import uuid
    >>> root, a, b = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    >>> r = t.start(root, None, "chain", "rag", {"what is musubi"})
    >>> ra = t.start(a, root, "retriever", "docs", {"what is musubi"})
    >>> t.finish(a, {"musubi ties things"}) is ra
    True
    >>> t.start(b, root, "chain", "prompt", {"musubi ties things"}).upstream == (ra,)
    True
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Hashable, Iterable
from typing import Any
from uuid import UUID

from musubi_core.record import PREVIEW_CHARS, preview

from ._content import _READERS, MIN_ATOM_CHARS, reader

# A trace with more finished runs than this stops indexing new outputs (a runaway agent loop
# must not make every step slower); edges inferred before that point are kept.
MAX_INDEXED_RUNS = 5_000

_NO_UPSTREAM: tuple[Run, ...] = ()
_NO_ATOMS: frozenset[Hashable] = frozenset()
_NO_NODES: dict[str, str | None] = {}
_now = time.time


class Trace:
    """One root run and its descendants: the output index used to infer data edges, and the
    musubi run its calls belong to."""

    __slots__ = ("index", "indexed", "keep", "own", "pending", "seen", "state")

    def __init__(self) -> None:
        # atom -> finished runs that produced it (as output)
        self.index: dict[Hashable, list[Run]] = {}
        self.indexed = 0
        # Objects whose ``id()`` is an atom of this trace: kept alive until the trace ends, so
        # an id can never be reused by another object while it is compared.
        self.keep: list[Any] = []
        # The musubi run (a RunState) the trace records into, and whether the trace started
        # it (True) or joined a run already current (a chain called inside a @step).
        self.state: Any = None
        self.own = False
        # What the trace recorded and the recorder has not taken yet: per call, (its row, the
        # flows into it, the node edges derived for it, its artifact or None); rows are plain
        # tuples in the field order of CallWrite, FlowWrite and EdgeWrite. A deque: the
        # recording thread appends, the recorder's thread pops (both atomic), no lock.
        self.pending: deque[tuple[Any, Any, Any, Any]] = deque()
        # id -> (object, preview, atoms): the value one step returns is the value the next is
        # given, so it is read once (the object is held, so its id is not reused meanwhile).
        self.seen: dict[int, tuple[Any, str | None, frozenset[Hashable]]] = {}

    def observe(self, value: Any) -> tuple[str | None, frozenset[Hashable]]:
        """The preview of ``value`` and its data-flow atoms (``_content.flow_atoms``), read
        once per object of this trace."""
        kind = type(value)
        if kind is str:
            text = value if len(value) <= PREVIEW_CHARS and value.isascii() else preview(value)
            return text, frozenset((value,)) if len(value) >= MIN_ATOM_CHARS else _NO_ATOMS
        if value is None:
            return None, _NO_ATOMS
        found = self.seen.get(id(value))
        if found is not None and found[0] is value:
            return found[1], found[2]
        text, atoms = (_READERS.get(kind) or reader(kind))(value, self.keep)
        self.seen[id(value)] = (value, text, atoms)
        return text, atoms

    def take(self, batch: list[list[Any]]) -> None:
        """Move what the trace recorded so far into ``batch`` (calls, flows, edges, artifacts
        lists), counting the calls in the run's totals."""
        pending = self.pending
        calls, flows, edges, artifacts = batch
        taken = []
        while True:
            try:
                row, into, derived, artifact = pending.popleft()
            except IndexError:
                break
            taken.append(row)
            if into:
                flows.extend(into)
            if derived:
                edges.extend(derived)
            if artifact is not None:
                artifacts.append(artifact)
        if taken:
            calls.extend(taken)
            self.state.count_rows(taken)

    def finish(self, status: str, error: str | None, root_call_id: str) -> None:
        """The root ended: hand everything the trace recorded to the recorder, with the run's
        row when the trace owns the run."""
        batch: list[list[Any]] = [[], [], [], []]
        self.take(batch)
        calls, flows, edges, artifacts = batch
        state = self.state
        runs: tuple[Any, ...] = ()
        if self.own:
            if state.root_call_id is None:
                state.root_call_id = root_call_id
            runs = (state.row("done" if status == "done" else "failed", error),)
        state.recorder.submit(calls=calls, flows=flows, edges=edges, artifacts=artifacts, runs=runs)

    def close(self) -> None:
        self.index.clear()
        self.seen.clear()
        self.keep.clear()


class Run:
    """One live LangChain run: a call of the trace's musubi run."""

    __slots__ = (
        "artifact_id",
        "call_id",
        "input_atoms",
        "input_preview",
        "kind",
        "model",
        "name",
        "node_id",
        "node_ups",
        "parent",
        "parent_call_id",
        "run_id",
        "seq",
        "started_at",
        "streamed",
        "trace",
        "upstream",
    )

    def __init__(
        self,
        run_id: UUID,
        parent: Run | None,
        trace: Trace,
        kind: str,
        name: str,
        call_id: str = "",
        seq: int = 0,
    ) -> None:
        self.run_id = run_id
        self.parent = parent
        self.trace = trace
        self.kind = kind
        self.name = name
        self.input_atoms: frozenset[Hashable] = _NO_ATOMS
        self.upstream = _NO_UPSTREAM  # finished runs of the trace whose output fed this one
        self.started_at = _now()  # its duration is measured on the same clock
        self.call_id = call_id
        self.seq = seq
        self.parent_call_id: str | None = parent.call_id if parent is not None else None
        self.node_id: str | None = None  # the memo it reached (model calls via the cache)
        self.artifact_id: str | None = None
        # Nodes upstream of this call (node id -> artifact id): itself once it has a node,
        # else what flowed into it. A model call's node gets data edges from these.
        self.node_ups = _NO_NODES
        self.input_preview: str | None = None
        self.model: str | None = None
        # Text a live model stream delivered so far (v3 events): what a failed call shows.
        self.streamed: list[str] | None = None

    def is_ancestor_of(self, other: Run) -> bool:
        cur = other.parent
        while cur is not None:
            if cur is self:
                return True
            cur = cur.parent
        return False

    def upstream_nodes(self) -> dict[str, str | None]:
        """The nodes upstream of this run, through the calls that fed it."""
        ups = self.upstream
        if not ups:
            return _NO_NODES
        if len(ups) == 1:
            return ups[0].node_ups
        out: dict[str, str | None] = {}
        for p in ups:
            out.update(p.node_ups)
        return out


def _inherited_from(run: Run, atom: Hashable) -> Run | None:
    """The nearest enclosing run whose input held ``atom`` (None: the atom is new here)."""
    cur = run.parent
    while cur is not None:
        if atom in cur.input_atoms:
            return cur
        cur = cur.parent
    return None


def infer(trace: Trace, run: Run) -> tuple[Run, ...]:
    """The finished runs of the trace whose output fed ``run``.

    An atom the run inherited from an enclosing run's input fed it through that run: it counts
    only for the producers that fed the enclosing run (a model turn inside a graph node gets
    the tool result the node was given; a branch of a RunnableParallel does not get the
    question from a sibling that merely passed it through).
    """
    index = trace.index
    if not index:
        return _NO_UPSTREAM
    parent = run.parent
    if parent is not None and run.input_atoms == parent.input_atoms:
        # Given what its parent was given (a sequence's first step): every atom is inherited
        # from the parent, so exactly the parent's producers fed it.
        return parent.upstream
    found: dict[Run, None] | None = None
    for atom in run.input_atoms:
        producers = index.get(atom)
        if producers is None:
            continue
        via = _inherited_from(run, atom)
        if via is not None:
            if not via.upstream:
                continue
            producers = [p for p in producers if p in via.upstream]
            if not producers:
                continue
        if found is None:
            found = {}
        for p in producers:
            found[p] = None
    if not found:
        return _NO_UPSTREAM
    if len(found) == 1:
        return tuple(found)
    # An enclosing chain's output repeats its last child's: keep the innermost producer.
    return tuple(c for c in found if not any(c is not o and c.is_ancestor_of(o) for o in found))


class Traces:
    """Map of live runs (grouped by trace), keyed by the run id's integer (``UUID.__hash__`` is
    Python code; a run is looked up three or four times)."""

    def __init__(self) -> None:
        self.runs: dict[int, Run] = {}
        self._runs = self.runs

    def get(self, run_id: UUID) -> Run | None:
        return self._runs.get(run_id.int)

    def start(
        self,
        run_id: UUID,
        parent_run_id: UUID | None,
        kind: str,
        name: str,
        input_atoms: Iterable[Hashable] = (),
    ) -> Run:
        parent = self._runs.get(parent_run_id.int) if parent_run_id is not None else None
        run = Run(run_id, parent, parent.trace if parent is not None else Trace(), kind, name)
        run.input_atoms = frozenset(input_atoms)
        run.upstream = infer(run.trace, run)
        self._runs[run_id.int] = run
        return run

    def add(self, run: Run) -> None:
        self._runs[run.run_id.int] = run

    def pop(self, run_id: UUID) -> Run | None:
        return self._runs.pop(run_id.int, None)

    @staticmethod
    def index(run: Run, output_atoms: Iterable[Hashable]) -> None:
        """Make ``run`` (finished) a producer of ``output_atoms``."""
        trace = run.trace
        if run.parent is None or trace.indexed >= MAX_INDEXED_RUNS:
            return  # a root's output feeds nothing inside its own (now finished) trace
        trace.indexed += 1
        index = trace.index
        for atom in output_atoms:
            producers = index.get(atom)
            if producers is None:
                producers = index.setdefault(atom, [])
            producers.append(run)

    def finish(self, run_id: UUID, output_atoms: Iterable[Hashable]) -> Run | None:
        """Pop a finished run and index its output."""
        run = self._runs.pop(run_id.int, None)
        if run is None:
            return None
        self.index(run, output_atoms)
        if run.parent is None:
            run.trace.close()
        return run

    def __len__(self) -> int:
        return len(self._runs)
