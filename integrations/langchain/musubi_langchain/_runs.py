"""Run-tree bookkeeping for the callback handler (pure data structures, no store access).

A *trace* is one root LangChain run and everything under it: one musubi run, whose calls are the
LangChain runs. The callbacks only read values and log: a run's start (with its input's preview
and atoms, see ``_content.flow_atoms``, read while the value is as the run got it; text, which
cannot change, is read later) and its end (its output's). :meth:`Trace.process` later turns the
log into rows in one pass, in the order things happened: each call's id and order, the data
upstream inferred by content when it started, its row when it ended. A run whose input holds an
atom that an earlier, finished run of the same trace produced depends on that run. Atoms the run
merely inherited from an enclosing run's input (the question every branch of a RunnableParallel
sees) are not evidence, and among matching runs an enclosing chain yields to the run inside it
that actually produced the value.

Callbacks of concurrent branches (RunnableParallel threads) only append to a trace's log (atomic);
one thread at a time processes it (the handler's lock).

Example:
    >>> import uuid
    >>> from musubi_core.record import RunState
    >>> trace = Trace(RunState(None, "demo", "rag"))
    >>> root = Run(uuid.uuid4(), None, trace, "chain", "rag")
    >>> docs = Run(uuid.uuid4(), root, trace, "retriever", "docs")
    >>> prompt = Run(uuid.uuid4(), root, trace, "chain", "prompt")
    >>> root.input_atoms = docs.input_atoms = frozenset({"what is musubi"})
    >>> prompt.input_atoms = frozenset({"musubi ties things"})
    >>> ended = (frozenset({"musubi ties things"}), 0.1, "done", None, "musubi ties things")
    >>> trace.log.extend([root, docs, (docs, *ended, None, None, 0, None, None), prompt])
    >>> batch: list[list[Any]] = [[], [], [], []]
    >>> trace.process(batch)
    >>> prompt.upstream == (docs,), [row[5] for row in batch[0]]
    (True, ['docs'])
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from operator import is_
from typing import Any
from uuid import UUID

from musubi_core.record import PREVIEW_CHARS, RunState, new_call_id, preview

from ._content import _READERS, MIN_ATOM_CHARS, _read_chat_prompt, _read_str_subclass, reader

# A trace with more finished runs than this stops indexing new outputs (a runaway agent loop
# must not make every step slower); edges inferred before that point are kept.
MAX_INDEXED_RUNS = 5_000

_NO_UPSTREAM: tuple[Run, ...] = ()
_NO_ATOMS: frozenset[Hashable] = frozenset()
_NO_NODES: dict[str, str | None] = {}
# The atoms of a text not read yet: its preview field holds the text itself (see read_text).
LATER: frozenset[Hashable] = frozenset(("<read when processed>",))


def read_text(value: Any) -> tuple[str | None, frozenset[Hashable]]:
    """The preview and flow atoms of a text (a str or a str subclass such as LangChain's
    TextAccessor), as ``_content.reader`` gives them."""
    if type(value) is str:
        text = value if len(value) <= PREVIEW_CHARS and value.isascii() else preview(value)
        return text, frozenset((value,)) if len(value) >= MIN_ATOM_CHARS else _NO_ATOMS
    return _read_str_subclass(value, [])
_now = time.time


# What the handler logs when a run ends (see Trace.process): the run, its output atoms (None:
# nothing downstream can depend on it, e.g. it failed), and the call row's remaining fields.
Ended = tuple[
    "Run",
    "frozenset[Hashable] | None",
    float,  # duration (s)
    str,  # status
    "str | None",  # error
    "str | None",  # output preview
    "int | None",  # tokens in
    "int | None",  # tokens out
    int,  # replayed (0/1)
    "float | None",  # seconds saved
    Any,  # its artifact (an ArtifactWrite) or None
]


class Trace:
    """One root run and its descendants: the musubi run its calls belong to, what happened in
    it (a log), and the output index used to infer data edges.

    Callbacks only read values (previews and atoms, while the values are as they were) and
    append to ``log``; ``process`` later turns the log into rows in one pass: the flows
    inferred when each run started, and each call's row when it ended."""

    __slots__ = (
        "index",
        "indexed",
        "keep",
        "log",
        "namespace",
        "nodes",
        "outcome",
        "own",
        "recorder",
        "root",
        "root_call_id",
        "seen",
        "state",
    )

    def __init__(self, state: Any = None, recorder: Any = None, namespace: str = "") -> None:
        # atom -> finished runs that produced it (as output); built by process()
        self.index: dict[Hashable, list[Run]] = {}
        self.indexed = 0
        self.nodes = False  # has a processed call reached a node (see Run.node_ups)?
        # Objects whose ``id()`` is an atom of this trace: kept alive until the trace ends, so
        # an id can never be reused by another object while the trace reads values.
        self.keep: list[Any] = []
        # The musubi run (a RunState) the trace records into: a run already current that it
        # joined (a chain called inside a @step), or else a run of its own (``own``), made
        # when the trace is first processed, in ``recorder`` and ``namespace``.
        self.state: Any = state
        self.own = state is None
        self.recorder = recorder
        self.namespace = namespace
        self.root: Run | None = None
        # In order: a Run when it started, an Ended tuple when it ended (callbacks append,
        # process() takes a prefix: both atomic).
        self.log: list[Run | Ended] = []
        # The root's end: (status, error, time.time() then).
        self.outcome: tuple[str, str | None, float] | None = None
        self.root_call_id: str | None = None
        # id -> (object, preview, atoms): the value one step returns is the value the next is
        # given, so it is read once (the object is held, so its id is not reused meanwhile).
        self.seen: dict[int, tuple[Any, str | None, frozenset[Hashable]]] = {}

    def observe(self, value: Any) -> tuple[str | None, frozenset[Hashable]]:
        """The preview of ``value`` and its data-flow atoms (``_content.flow_atoms``), read
        once per object of this trace (text later: see ``LATER``)."""
        if isinstance(value, str):
            # Text cannot change: it is read when the trace is processed (as the preview, with
            # LATER for its atoms; see read_text).
            return value, LATER
        if value is None:
            return None, _NO_ATOMS
        kind = type(value)
        seen = self.seen
        found = seen.get(id(value))
        if found is not None and found[0] is value:
            return found[1], found[2]
        if kind is list and value:
            # A chat model's input: the messages of a prompt value read before (LangChain
            # copies the list) are read as that value (its preview; its atoms, its output).
            found = seen.get(-id(value[0]))
            if found is not None and _same_items(found[0], value):
                return found[1], found[2]
        read = _READERS.get(kind) or reader(kind)
        text, atoms = read(value, self.keep)
        seen[id(value)] = (value, text, atoms)
        if read is _read_chat_prompt:
            messages = value.messages
            if messages:  # keyed by the negated id of its first message (ids are positive)
                seen[-id(messages[0])] = (messages, text, atoms)
        return text, atoms

    def ended(self, status: str, error: str | None) -> None:
        """The root ended: every value was read (the objects are let go; their ids are atoms
        no new run of the trace can match)."""
        self.outcome = (status, error, _now())
        self.seen.clear()
        self.keep.clear()

    def process(self, batch: list[list[Any]]) -> None:
        """Turn what the trace logged so far into rows appended to ``batch`` (calls, flows,
        edges, artifacts lists: plain tuples in the field order of CallWrite, FlowWrite and
        EdgeWrite), counting the calls in the run's totals. One thread at a time (the
        handler's lock): runs are inferred and indexed in the order they started and ended."""
        log = self.log
        n = len(log)
        if not n:
            return
        # What was logged so far (other threads may append meanwhile: after these).
        events = log[:n]
        del log[:n]
        calls, flows, edges, artifacts = batch
        state = self.state
        if state is None:
            root = self.root
            assert root is not None
            state = self.state = RunState(
                self.recorder, "langchain", root.name, namespace=self.namespace
            )
            state.started_at = root.started_at
        run_id, namespace = state.run_id, state.namespace
        index = self.index
        next_seq = state.next_seq
        taken = []
        for event in events:
            if isinstance(event, Run):
                if event.input_atoms is LATER:
                    event.input_preview, event.input_atoms = read_text(event.input_preview)
                # Started: its call id and order (in start order), and what fed it.
                event.call_id = call_id = new_call_id()
                event.seq = next_seq()
                parent = event.parent
                if parent is not None:
                    event.parent_call_id = parent.call_id
                elif self.root_call_id is None:
                    self.root_call_id = call_id
                if index:
                    event.upstream = infer(self, event)
                continue
            run, atoms, duration, status, error, text, tin, tout, replayed, saved, art = event
            if atoms is LATER:
                if type(text) is str and len(text) <= PREVIEW_CHARS and text.isascii():
                    atoms = frozenset((text,)) if len(text) >= MIN_ATOM_CHARS else _NO_ATOMS
                else:
                    text, atoms = read_text(text)
            elif text is not None and (len(text) > PREVIEW_CHARS or not text.isascii()):
                text = preview(text)  # a text given whole (a model's answer); else a preview
            call_id = run.call_id
            node_id = run.node_id
            taken.append(
                (
                    call_id,
                    run_id,
                    run.parent_call_id,
                    run.seq,
                    run.kind,
                    run.name,
                    node_id,
                    run.artifact_id,
                    replayed,
                    status,
                    error,
                    run.started_at,
                    duration,
                    tin,
                    tout,
                    saved,
                    run.model,
                    run.input_preview,
                    text,
                    namespace,
                )
            )
            ups = run.upstream
            if ups:
                flows.extend([(call_id, p.call_id, p.artifact_id) for p in ups])
            if node_id is not None:
                # A call that reached a node: the nodes upstream of it get data edges to it.
                edges.extend(
                    [
                        (up, node_id, "data", a)
                        for up, a in run.upstream_nodes().items()
                        if up != node_id
                    ]
                )
                run.node_ups = {node_id: run.artifact_id}
                self.nodes = True
            elif ups and self.nodes:  # (no node in the trace so far: none upstream either)
                run.node_ups = run.upstream_nodes()
            if art is not None:
                artifacts.append(art)
            if atoms and run.parent is not None and self.indexed < MAX_INDEXED_RUNS:
                # Its output is evidence for what starts later (not a root's: nothing inside
                # its own trace starts after it; nor past MAX_INDEXED_RUNS).
                self.indexed += 1
                for atom in atoms:
                    producers = index.get(atom)
                    if producers is None:
                        index[atom] = [run]
                    else:
                        producers.append(run)
        if taken:
            calls.extend(taken)
            state.count_rows(taken)

    def close(self) -> None:
        self.index.clear()
        self.seen.clear()
        self.keep.clear()

    def run_row(self) -> Any:
        """The row of the run the trace owns, as it ended (after ``process``: its totals)."""
        assert self.outcome is not None
        status, error, ended_at = self.outcome
        state = self.state
        if state.root_call_id is None:
            state.root_call_id = self.root_call_id
        status = "done" if status == "done" else "failed"
        return state.row(status, error, duration=ended_at - state.started_at)


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
    ) -> None:
        self.run_id = run_id
        self.parent = parent
        self.trace = trace
        self.kind = kind
        self.name = name
        self.input_atoms: frozenset[Hashable] = _NO_ATOMS
        self.upstream = _NO_UPSTREAM  # finished runs of the trace whose output fed this one
        self.started_at = _now()  # its duration is measured on the same clock
        self.call_id = ""  # its id and order in the run: given when the trace processes it
        self.seq = 0
        self.parent_call_id: str | None = None
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
    atoms = run.input_atoms
    parent = run.parent
    if parent is not None and atoms == parent.input_atoms:
        # Given what its parent was given (a sequence's first step): every atom is inherited
        # from the parent, so exactly the parent's producers fed it.
        return parent.upstream
    first: Run | None = None  # the one producer found so far (the common case: no dict)
    found: dict[Run, None] | None = None
    for atom in atoms:
        producers = index.get(atom)
        if producers is None:
            continue
        via = parent  # the nearest enclosing run whose input held the atom
        while via is not None and atom not in via.input_atoms:
            via = via.parent
        if via is not None:
            fed = via.upstream
            if not fed:
                continue
            producers = [p for p in producers if p in fed]
        for p in producers:
            if first is None:
                first = p
            elif p is not first:
                if found is None:
                    found = {first: None}
                found[p] = None
    if found is None:
        return (first,) if first is not None else _NO_UPSTREAM
    # An enclosing chain's output repeats its last child's: keep the innermost producer.
    kept = []
    for c in found:
        for o in found:
            if c is not o and c.is_ancestor_of(o):
                break
        else:
            kept.append(c)
    return tuple(kept)


def _same_items(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(map(is_, a, b))
