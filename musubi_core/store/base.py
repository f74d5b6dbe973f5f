"""The storage contract: records and the :class:`Store` protocol.

Every backend (SQLite today, PostgreSQL for teams) implements :class:`Store`
and is proven by the one conformance suite in :mod:`musubi_core.testing`.
Records are plain immutable values (frozen dataclasses, and NamedTuples for
the hot NodeRecord and the write objects) so that nothing framework-specific or
executable ever comes out of a store.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

__all__ = [
    "ArtifactWrite",
    "CallRecord",
    "CallWrite",
    "ClaimOutcome",
    "EdgeRecord",
    "EdgeWrite",
    "FlowRecord",
    "FlowWrite",
    "NodeRecord",
    "NodeWrite",
    "ParentState",
    "RunRecord",
    "RunStepRecord",
    "RunStepWrite",
    "RunStore",
    "RunWrite",
    "Store",
    "UsageRow",
]

NODE_STATUSES = ("pending", "done", "failed", "stale")
EDGE_KINDS = ("data", "contains")


def as_blob(value: Any) -> bytes:
    """A stored payload as bytes: musubi writes BLOBs, but an editor (the ``sqlite3`` shell)
    may have stored TEXT, which reads back as ``str``; its UTF-8 bytes then stand for it (and
    fail the content-id check unless they are the original ones)."""
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


class NodeRecord(NamedTuple):
    """One stored lineage node (immutable).

    A ``NamedTuple`` rather than a dataclass: a replay builds one per lookup,
    and a tuple is built from the database row in one C call.
    """

    node_id: str
    op: str
    op_name: str
    kind: str
    step_type: str
    input_hash: str
    status: str
    artifact_id: str | None
    producer_node_id: str | None
    namespace: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    expires_at: float | None
    duration_s: float | None
    tokens_in: int | None
    tokens_out: int | None
    replay_count: int
    exec_count: int
    error: str | None
    owner: str | None
    label: str | None
    run_id: str | None
    stale_cause: str | None
    meta: str | None

    @property
    def tokens(self) -> int:
        return (self.tokens_in or 0) + (self.tokens_out or 0)


class NodeWrite(NamedTuple):
    """What a writer knows about a node when it records an outcome.

    A NamedTuple, like the other write objects: a writer builds thousands a second (lineage
    spans), and the store binds one as SQL parameters as it is (its field order is the column
    order of the store's upsert), so it must cost no more than a tuple.
    """

    node_id: str
    op: str
    op_name: str
    kind: str
    step_type: str
    input_hash: str
    status: str
    artifact_id: str | None = None
    namespace: str = "default"
    started_at: float | None = None
    finished_at: float | None = None
    expires_at: float | None = None
    duration_s: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    error: str | None = None
    owner: str | None = None
    label: str | None = None
    run_id: str | None = None
    meta: str | None = None
    # 1 when this write records a real execution (counts towards "misses").
    executed: int = 1


class ArtifactWrite(NamedTuple):
    artifact_id: str
    encoding: str
    payload: bytes
    producer_node_id: str


class EdgeWrite(NamedTuple):
    parent: str
    child: str
    kind: str = "data"
    # For data edges: the parent's artifact when the child consumed it, which
    # is what lets a stale child replay when the parent comes back unchanged.
    parent_artifact_id: str | None = None


class CallWrite(NamedTuple):
    """One execution or one replay of anything, as it happened (a row of ``musubi_calls``;
    the field order is the column order of the store's insert)."""

    call_id: str
    run_id: str
    parent_call_id: str | None
    seq: int
    kind: str
    op_name: str
    node_id: str | None
    artifact_id: str | None
    replayed: int  # 1: served from the store (the memo ``node_id``)
    status: str  # 'done' | 'failed'
    error: str | None
    started_at: float
    duration_s: float | None
    tokens_in: int | None
    tokens_out: int | None
    # A replay: how long the execution it stands in for took (the seconds it saved).
    saved_s: float | None
    model: str | None
    input_preview: str | None
    output_preview: str | None
    namespace: str


# A call as read back: the same fields.
CallRecord = CallWrite


class FlowWrite(NamedTuple):
    """The output of call ``src_call_id`` (artifact ``artifact_id`` when it is kept) fed call
    ``dst_call_id``."""

    dst_call_id: str
    src_call_id: str
    artifact_id: str | None = None


FlowRecord = FlowWrite


class UsageRow(NamedTuple):
    """What a group of calls used and what replay saved (:meth:`Store.call_usage`): the calls
    of one model and kind, executed (``replayed`` 0) or replayed (1), in one run or time
    bucket when asked for."""

    run_id: str | None
    bucket_start: float | None  # the start of the time bucket (epoch seconds)
    model: str | None
    kind: str
    replayed: int
    calls: int
    tokens_in: int
    tokens_out: int
    duration_s: float  # how long the calls took
    saved_s: float  # replays: how long the executions they stand in for took


class RunWrite(NamedTuple):
    """A run as its recorder knows it (upserted when it starts and when it ends)."""

    run_id: str
    kind: str
    name: str | None
    status: str  # 'running' | 'done' | 'failed' | 'interrupted'
    started_at: float
    finished_at: float | None
    duration_s: float | None
    host: str | None
    pid: int | None
    error: str | None
    namespace: str
    root_call_id: str | None
    calls: int
    replays: int
    tokens_in: int
    tokens_out: int
    tokens_saved: int
    seconds_saved: float


@dataclass(frozen=True, slots=True)
class EdgeRecord:
    parent: str
    child: str
    kind: str
    parent_artifact_id: str | None


@dataclass(frozen=True, slots=True)
class ParentState:
    """A data parent of a node, as consumed versus as it is now."""

    parent: str
    consumed_artifact_id: str | None
    status: str | None
    current_artifact_id: str | None


@dataclass(frozen=True, slots=True)
class ClaimOutcome:
    """Result of trying to become the one executor of an external effect.

    ``state`` is ``"claimed"`` (go ahead), ``"done"`` (someone finished it:
    replay ``node``), or ``"busy"`` (``node`` is pending under another owner).
    """

    state: str
    node: NodeRecord | None


@dataclass(frozen=True, slots=True)
class RunRecord:
    run_id: str
    name: str | None
    kind: str
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    host: str | None
    pid: int | None
    error: str | None
    node_id: str | None
    attempts: int
    # Filled by list_runs/get_run: how many steps the run has recorded, and
    # how many of them committed (durable runs).
    steps_done: int = 0
    steps_total: int = 0
    namespace: str = "default"
    root_call_id: str | None = None
    duration_s: float | None = None
    calls: int = 0
    replays: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_saved: int = 0
    seconds_saved: float = 0.0


@dataclass(frozen=True, slots=True)
class RunStepRecord:
    run_id: str
    name: str
    seq: int
    kind: str
    status: str
    fingerprint: str | None
    artifact_id: str | None
    node_id: str | None
    error: str | None
    started_at: float | None
    finished_at: float | None
    wake_at: float | None
    attempts: int = 0
    encoding: str | None = None
    payload: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class RunStepWrite:
    """A durable step's row as the runner writes it (pending, done or failed)."""

    run_id: str
    name: str
    seq: int
    kind: str
    status: str
    fingerprint: str | None
    node_id: str | None
    artifact_id: str | None = None
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    wake_at: float | None = None


@runtime_checkable
class Store(Protocol):
    """What the engine needs from a backend. All methods are thread-safe and
    raise :class:`musubi_core.errors.StoreError` when the backend fails.

    A store that can only be read may say so with a true ``read_only``
    attribute: the engine then replays from it and skips its writes."""

    path: str

    def get_node(self, node_id: str) -> NodeRecord | None: ...

    def get_node_and_artifact(
        self, node_id: str
    ) -> tuple[NodeRecord, str | None, bytes | None] | None:
        """The node and its artifact's (encoding, payload) in one probe."""
        ...

    def get_artifact(self, artifact_id: str) -> tuple[str, bytes] | None: ...

    def artifact_producer(self, artifact_id: str) -> str | None: ...

    def write(
        self,
        nodes: Sequence[NodeWrite] = (),
        artifacts: Sequence[ArtifactWrite] = (),
        edges: Sequence[EdgeWrite] = (),
        *,
        calls: Sequence[CallWrite] = (),
        flows: Sequence[FlowWrite] = (),
        runs: Sequence[RunWrite] = (),
        replays: Mapping[str, int] | None = None,
        aliases: Sequence[tuple[bytes, str]] = (),
    ) -> None:
        """Upsert nodes, artifacts, edges, calls, flows, runs and ``(alias, node id)`` pairs
        and add replay counts, atomically (one transaction)."""
        ...

    def claim(
        self, node: NodeWrite, *, owner_alive: Callable[[NodeRecord], bool], force: bool = False
    ) -> ClaimOutcome:
        """Atomically mark ``node`` pending under ``node.owner`` unless it is
        done (and not ``force``) or pending under another live owner."""
        ...

    def add_replays(self, counts: Mapping[str, int], now: float) -> None: ...

    def invalidate(self, node_id: str) -> int:
        """Mark the node and all its data-descendants stale; return how many
        nodes changed state."""
        ...

    def invalidate_namespace(
        self,
        namespace: str,
        *,
        kinds: Sequence[str] | None = None,
        ops: Sequence[str] | None = None,
    ) -> int:
        """Mark every done node of ``namespace`` (of ``kinds`` only, and of the operation names
        ``ops`` only, when given) stale, in one statement; no node of another namespace changes,
        and no EXTERNAL_EFFECT node (its record is what stops it from being issued twice).
        Returns how many changed."""
        ...

    def mark_fresh(self, node_id: str) -> bool:
        """Early cutoff: make a node that is stale only because of an upstream
        done again, if (checked atomically) every data parent is done with the
        artifact the node consumed. Returns whether it was revived."""
        ...

    def data_parents(self, node_id: str) -> list[ParentState]: ...

    def similar_nodes(
        self, op_name: str, input_hash: str, limit: int = 5, *, namespace: str | None = None
    ) -> list[NodeRecord]:
        """Nodes of ``op_name`` with this input hash (of ``namespace`` only, when given),
        newest first."""
        ...

    def nodes_of_op(
        self, op_name: str, limit: int = 5, *, namespace: str | None = None
    ) -> list[NodeRecord]:
        """Nodes of ``op_name`` (of ``namespace`` only, when given)."""
        ...

    def resolve(self, ref: str) -> str:
        """Full node id for a unique prefix (raises NodeNotFoundError)."""
        ...

    def edges(self, node_id: str) -> list[EdgeRecord]:
        """Edges in which the node is parent or child."""
        ...

    def lineage(
        self, node_id: str, *, upstream: bool = True, downstream: bool = True, depth: int = 50
    ) -> tuple[list[NodeRecord], list[EdgeRecord]]: ...

    def list_nodes(
        self,
        *,
        limit: int = 50,
        kind: str | None = None,
        status: str | None = None,
        op: str | None = None,
        since: float | None = None,
        run: str | None = None,
        namespace: str | None = None,
    ) -> list[NodeRecord]: ...

    def stats(self) -> dict[str, Any]: ...

    # -- the record of what happened (calls, flows, runs) --------------------------

    def list_runs(
        self,
        *,
        limit: int = 50,
        kind: str | None = None,
        since: float | None = None,
        status: str | None = None,
    ) -> list[RunRecord]:
        """Most recently started runs first."""
        ...

    def get_run(self, run_id: str) -> RunRecord | None: ...

    def resolve_run(self, ref: str) -> str: ...

    def run_calls(self, run_id: str, *, limit: int | None = None) -> list[CallRecord]: ...

    def get_call(self, call_id: str) -> CallRecord | None: ...

    def resolve_call(self, ref: str) -> str | None: ...

    def node_calls(self, node_id: str, *, limit: int = 20) -> list[CallRecord]: ...

    def call_flows(self, call_id: str) -> list[FlowRecord]: ...

    def call_lineage(
        self,
        call_id: str,
        *,
        upstream: bool = True,
        downstream: bool = False,
        depth: int = 50,
        limit: int = 2000,
    ) -> tuple[list[CallRecord], list[FlowRecord], bool]: ...

    def run_flows(self, run_id: str) -> list[FlowRecord]:
        """The flows into the calls of a run."""
        ...

    def invalidation_set(self, node_id: str) -> list[NodeRecord]:
        """Read only: the nodes :meth:`invalidate` would mark stale (the node and its data
        descendants, by the same recursive query), whatever their status now."""
        ...

    def call_usage(
        self,
        *,
        since: float | None = None,
        run_ids: Sequence[str] | None = None,
        bucket_s: float | None = None,
    ) -> list[UsageRow]:
        """Tokens, time and replays of the calls that reached a node or used tokens, grouped
        by model, kind and replayed; also by run (``run_ids``: only those runs) and by time
        bucket (``bucket_s`` seconds, from the epoch) when asked."""
        ...

    def gc(
        self,
        *,
        older_than: float | None = None,
        now: float | None = None,
        records_older_than: float | None = None,
        max_bytes: int | None = None,
        dry_run: bool = False,
        ids: bool = False,
        vacuum: bool = False,
    ) -> dict[str, Any]:
        """Remove old memo entries (``older_than`` seconds unused), old records of runs and
        calls (``records_older_than``, default ``older_than``), least recently used entries
        until the store takes at most ``max_bytes`` (where the backend can measure itself),
        and artifacts nothing refers to; never a pending node, an external effect's record or
        an unfinished durable run. ``dry_run`` removes nothing and reports what would go.
        Returns counts per table (with ``ids`` also the removed ids) and the sizes before and
        after."""
        ...

    def check(self) -> list[str]:
        """Problems found (empty when healthy)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class RunStore(Protocol):
    """What durable runs (:mod:`musubi_core.runner`) need from a backend, on
    top of :class:`Store`. One writer per run is guaranteed by the runner's
    lock, so these methods need not arbitrate between writers of one run;
    readers may call the read methods at any time, also while a run writes."""

    def begin_run(
        self,
        run_id: str,
        *,
        name: str | None,
        node_id: str,
        parent_node: str | None,
        host: str,
        pid: int,
        now: float,
    ) -> list[RunStepRecord]:
        """Mark the run running (creating it if new, counting an attempt; its
        lineage node ``node_id`` is written by :meth:`finish_run`), add a
        ``contains`` edge from ``parent_node`` when the run was started inside
        another node, and return the recorded steps with their artifacts'
        encoding and payload, in ``seq`` order."""
        ...

    def discard_steps_from(self, run_id: str, name: str) -> list[str]:
        """Forget step ``name`` and every step recorded after it (by ``seq``);
        return the names removed, or ``[]`` when ``name`` is not recorded."""
        ...

    def mark_step_started(self, step: RunStepWrite) -> None:
        """Record that a step body is starting (status ``pending``, one more
        attempt). Need not be durable: a lost marker only means a step that
        would re-run anyway is not shown as in flight."""
        ...

    def checkpoint_step(
        self,
        step: RunStepWrite,
        node: NodeWrite,
        artifact: ArtifactWrite | None,
        edges: Sequence[EdgeWrite],
        *,
        calls: Sequence[CallWrite] = (),
        flows: Sequence[FlowWrite] = (),
    ) -> None:
        """Commit a finished step durably (it survives power loss) in one
        transaction: its row, its lineage node, its artifact, its edges, and its
        call with the flows into it."""
        ...

    def record_step_failure(
        self,
        step: RunStepWrite,
        node: NodeWrite,
        edges: Sequence[EdgeWrite],
        *,
        calls: Sequence[CallWrite] = (),
    ) -> None:
        """Record that a step raised (it runs again on the next invocation)."""
        ...

    def next_call_seq(self, run_id: str) -> int:
        """The order number the next call of a (resumed) run gets."""
        ...

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        error: str | None,
        node: NodeWrite,
        artifact: ArtifactWrite | None,
        now: float,
    ) -> None: ...

    def run_steps(self, run_id: str, *, payloads: bool = False) -> list[RunStepRecord]:
        """A run's steps in ``seq`` order (with encoding and payload when asked)."""
        ...
