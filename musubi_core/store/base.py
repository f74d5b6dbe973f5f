"""The storage contract: records and the :class:`Store` protocol.

Every backend (SQLite today, PostgreSQL for teams) implements :class:`Store`
and is proven by the one conformance suite in :mod:`musubi_core.testing`.
Records are plain frozen dataclasses so that nothing framework-specific or
executable ever comes out of a store.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ArtifactWrite",
    "ClaimOutcome",
    "EdgeRecord",
    "EdgeWrite",
    "NodeRecord",
    "NodeWrite",
    "ParentState",
    "RunRecord",
    "RunStepRecord",
    "Store",
]

NODE_STATUSES = ("pending", "done", "failed", "stale")
EDGE_KINDS = ("data", "contains")


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One stored lineage node."""

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


@dataclass(frozen=True, slots=True)
class NodeWrite:
    """What a writer knows about a node when it records an outcome."""

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


@dataclass(frozen=True, slots=True)
class ArtifactWrite:
    artifact_id: str
    encoding: str
    payload: bytes
    producer_node_id: str


@dataclass(frozen=True, slots=True)
class EdgeWrite:
    parent: str
    child: str
    kind: str = "data"
    # For data edges: the parent's artifact when the child consumed it, which
    # is what lets a stale child replay when the parent comes back unchanged.
    parent_artifact_id: str | None = None


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
    encoding: str | None = None
    payload: bytes | None = field(default=None, repr=False)


@runtime_checkable
class Store(Protocol):
    """What the engine needs from a backend. All methods are thread-safe and
    raise :class:`musubi_core.errors.StoreError` when the backend fails."""

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
    ) -> None:
        """Upsert nodes, artifacts and edges atomically (one transaction)."""
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

    def mark_fresh(self, node_id: str) -> None:
        """A stale node found its inputs unchanged (early cutoff): done again."""
        ...

    def data_parents(self, node_id: str) -> list[ParentState]: ...

    def similar_nodes(self, op_name: str, input_hash: str, limit: int = 5) -> list[NodeRecord]: ...

    def nodes_of_op(self, op_name: str, limit: int = 5) -> list[NodeRecord]: ...

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
        self, *, limit: int = 50, kind: str | None = None, status: str | None = None
    ) -> list[NodeRecord]: ...

    def stats(self) -> dict[str, Any]: ...

    def gc(self, *, older_than: float | None, now: float) -> dict[str, int]: ...

    def check(self) -> list[str]:
        """Problems found (empty when healthy)."""
        ...

    def close(self) -> None: ...
