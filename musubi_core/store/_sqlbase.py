"""What every SQL backend shares: the statements and the Store methods.

The statements are written once, in the SQL that SQLite and PostgreSQL both
speak, with ``?`` placeholders; a backend translates them (``_sql``) and
supplies connections and transactions (``_read``/``_write``) plus the few
things that differ (``_changes``, ``_lock_node``, ``_integrity_problems``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any, TypeVar

from ..errors import CorruptNodeError, NodeNotFoundError
from ..policy import is_replayable_kind
from ._gc import GcMixin
from ._sqlcalls import DATA_DESCENDANTS, CallsMixin, _filters
from .base import (
    ArtifactWrite,
    CallWrite,
    ClaimOutcome,
    EdgeRecord,
    EdgeWrite,
    FlowWrite,
    NodeRecord,
    NodeWrite,
    ParentState,
    RunWrite,
    as_blob,
)

__all__ = ["SQLStoreBase"]

T = TypeVar("T")

# A node row's columns (NodeRecord's fields; the producer is the artifact's) as read from
# ``musubi_nodes n``; ``musubi check`` tests each for a type musubi never writes.
NODE_EXPRS = ["node_id", "op", "op_name", "kind", "step_type", "input_hash", "status", "artifact_id", "(SELECT producer_node_id FROM musubi_artifacts a WHERE a.artifact_id = n.artifact_id)", "namespace", "created_at", "started_at", "finished_at", "expires_at", "duration_s", "tokens_in", "tokens_out", "replay_count", "exec_count", "error", "owner", "label", "run_id", "stale_cause", "meta"]
# The replays counted in musubi_replays since it exists (see schema.py); a node's count is
# its row's replay_count (counted before) plus these.
COUNTED_REPLAYS = "(SELECT r.replays FROM musubi_replays r WHERE r.node_id = n.node_id)"
# What every node read selects: NODE_EXPRS, then COUNTED_REPLAYS (see _row_to_node).
NODE_COLUMNS = ", ".join([*NODE_EXPRS, COUNTED_REPLAYS])

# The columns in NodeWrite's field order, then created_at: a write binds as ``(*node, now)``.
_UPSERT_NODE = """
INSERT INTO musubi_nodes (
    node_id, op, op_name, kind, step_type, input_hash, status, artifact_id, namespace,
    started_at, finished_at, expires_at, duration_s, tokens_in, tokens_out,
    error, owner, label, run_id, meta, exec_count, created_at
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (node_id) DO UPDATE SET
    status = excluded.status,
    artifact_id = COALESCE(excluded.artifact_id, musubi_nodes.artifact_id),
    step_type = excluded.step_type,
    -- Ids are made per namespace; a row of another namespace at this id was written by an
    -- older musubi (when namespaces did not enter ids) and belongs to its writer now.
    namespace = excluded.namespace,
    started_at = excluded.started_at,
    finished_at = excluded.finished_at,
    expires_at = excluded.expires_at,
    duration_s = COALESCE(excluded.duration_s, musubi_nodes.duration_s + 0),
    tokens_in = COALESCE(excluded.tokens_in, musubi_nodes.tokens_in + 0),
    tokens_out = COALESCE(excluded.tokens_out, musubi_nodes.tokens_out + 0),
    exec_count = musubi_nodes.exec_count + excluded.exec_count,
    -- A number column holding text (a hand edit; `musubi check` lists them) heals on the next
    -- write: "+ 0" makes SQLite's text a number (a no-op on a number, and on PostgreSQL),
    -- and any text or blob sorts above every number in SQLite, so BETWEEN tells them apart.
    replay_count = musubi_nodes.replay_count + 0,
    created_at = CASE WHEN musubi_nodes.created_at BETWEEN -1e300 AND 1e300
                      THEN musubi_nodes.created_at ELSE excluded.created_at END,
    error = excluded.error,
    owner = excluded.owner,
    label = COALESCE(excluded.label, musubi_nodes.label),
    run_id = COALESCE(excluded.run_id, musubi_nodes.run_id),
    meta = COALESCE(excluded.meta, musubi_nodes.meta),
    stale_cause = NULL
"""

_INSERT_ARTIFACT = """
INSERT INTO musubi_artifacts (artifact_id, encoding, payload, size, producer_node_id, created_at)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (artifact_id) DO UPDATE SET
    encoding = excluded.encoding,
    payload = excluded.payload,
    size = excluded.size
-- Content-addressed: an id has one right payload. Rewriting it only when it
-- differs repairs a damaged or tampered copy (a recomputation heals the store)
-- and keeps the first producer.
WHERE musubi_artifacts.payload != excluded.payload
   OR musubi_artifacts.encoding != excluded.encoding
"""

# A node's replay count in a query joining ``musubi_replays r`` (see COUNTED_REPLAYS).
_REPLAYS = "(n.replay_count + COALESCE(r.replays, 0))"

_INSERT_REPLAYS = "INSERT INTO musubi_replays (node_id, replays, last_at) VALUES "
_ON_REPLAY_CONFLICT = """
ON CONFLICT (node_id) DO UPDATE SET
    replays = musubi_replays.replays + excluded.replays,
    last_at = excluded.last_at
"""

_UPSERT_ALIAS = """
INSERT INTO musubi_aliases (alias, node_id) VALUES (?, ?)
ON CONFLICT (alias) DO UPDATE SET node_id = excluded.node_id
"""

_UPSERT_EDGE = """
INSERT INTO musubi_edges (parent, child, kind, parent_artifact_id) VALUES (?, ?, ?, ?)
ON CONFLICT (parent, kind, child) DO UPDATE SET
    parent_artifact_id = COALESCE(excluded.parent_artifact_id, musubi_edges.parent_artifact_id)
"""

# One pass over the data-descendants. UNION (not UNION ALL) makes SQLite keep
# (and PostgreSQL) a visited set, so each node is expanded once: 50 stacked diamonds stay
# linear instead of 2**50 paths.
_INVALIDATE = DATA_DESCENDANTS + """
UPDATE musubi_nodes
SET status = 'stale',
    stale_cause = CASE WHEN node_id = :root THEN 'invalidated' ELSE 'upstream' END
WHERE node_id IN (SELECT id FROM down)
  AND (status != 'stale' OR node_id = :root)
"""

# After a node's output changed: its data-descendants (not the node itself,
# which was just recomputed) go stale; early cutoff then sees the new artifact.
_STALE_DESCENDANTS = """
WITH RECURSIVE down(id) AS (
    SELECT e.child FROM musubi_edges e WHERE e.parent = :root AND e.kind = 'data'
    UNION
    SELECT e.child FROM musubi_edges e JOIN down d ON e.parent = d.id WHERE e.kind = 'data'
)
UPDATE musubi_nodes SET status = 'stale', stale_cause = 'upstream'
WHERE node_id IN (SELECT id FROM down) AND node_id != :root AND status = 'done'
"""

# Early cutoff, atomically: a node stale only because of an upstream comes
# back when every data parent is done with the very artifact it consumed.
_MARK_FRESH = """
UPDATE musubi_nodes SET status = 'done', stale_cause = NULL
WHERE node_id = ? AND status = 'stale' AND stale_cause = 'upstream'
  AND EXISTS (SELECT 1 FROM musubi_edges e WHERE e.child = musubi_nodes.node_id AND e.kind = 'data')
  AND NOT EXISTS (
      SELECT 1 FROM musubi_edges e LEFT JOIN musubi_nodes p ON p.node_id = e.parent
      WHERE e.child = ? AND e.kind = 'data'
        AND (p.status IS NULL OR p.status != 'done' OR e.parent_artifact_id IS NULL
             OR p.artifact_id IS NULL OR p.artifact_id != e.parent_artifact_id)
  )
"""


_make_node = NodeRecord._make
_NODE_WIDTH = len(NodeRecord._fields)


_OPTIONAL_TEXT = (str, type(None))
_NUMBER = (float, int)
_OPTIONAL_NUMBER = (float, int, type(None))
_OPTIONAL_INT = (int, type(None))
# What each NodeRecord column can hold as musubi writes it (and as SQLite or PostgreSQL read
# it back): anything else (text in a timestamp, a blob, a NULL in a required column) was
# written by something else, a hand edit or damage.
_COLUMN_TYPES: tuple[type | tuple[type, ...], ...] = (
    *[str] * 7,  # node_id, op, op_name, kind, step_type, input_hash, status
    *[_OPTIONAL_TEXT] * 2,  # artifact_id, producer_node_id
    str,  # namespace
    _NUMBER,  # created_at
    *[_OPTIONAL_NUMBER] * 4,  # started_at, finished_at, expires_at, duration_s
    *[_OPTIONAL_INT] * 2,  # tokens_in, tokens_out
    int,  # replay_count
    int,  # exec_count
    *[_OPTIONAL_TEXT] * 6,  # error, owner, label, run_id, stale_cause, meta
)
assert len(_COLUMN_TYPES) == len(NodeRecord._fields)


def _row_to_node(row: Sequence[Any], path: str) -> NodeRecord:
    """The node of a row whose first columns are NODE_COLUMNS (more may follow). A column
    holding what musubi never writes raises CorruptNodeError, naming the node and column."""
    values = row[:_NODE_WIDTH]
    if not all(map(isinstance, values, _COLUMN_TYPES)):
        for column, value, types in zip(NodeRecord._fields, values, _COLUMN_TYPES, strict=True):
            if not isinstance(value, types):
                raise CorruptNodeError(str(values[0]), column, value, path=path)
    node = _make_node(values)
    counted = row[_NODE_WIDTH]
    if counted:
        if not isinstance(counted, int):
            raise CorruptNodeError(str(values[0]), "replay_count", counted, path=path)
        node = node._replace(replay_count=node.replay_count + counted)
    return node


# The full lookup: a node's columns (as NODE_COLUMNS), then its artifact's encoding and payload.
_LOOKUP = (
    "SELECT n.node_id, n.op, n.op_name, n.kind, n.step_type, n.input_hash, n.status, "
    "n.artifact_id, a.producer_node_id, n.namespace, n.created_at, n.started_at, "
    "n.finished_at, n.expires_at, n.duration_s, n.tokens_in, n.tokens_out, "
    "n.replay_count, n.exec_count, n.error, n.owner, n.label, n.run_id, "
    f"n.stale_cause, n.meta, {COUNTED_REPLAYS}, a.encoding, a.payload "
    "FROM musubi_nodes n LEFT JOIN musubi_artifacts a ON a.artifact_id = n.artifact_id "
    "WHERE n.node_id = ?"
)


_by_id = itemgetter(0)  # a node's or artifact's id: its primary key


def _edge_key(edge: EdgeWrite) -> tuple[str, str, str]:
    # By position: adapters may hand edges over as plain tuples in EdgeWrite's field order.
    return (edge[0], edge[2], edge[1])


class SQLStoreBase(GcMixin, CallsMixin):
    """The :class:`~musubi_core.store.base.Store` methods over a DB-API
    connection. Subclasses provide the connection plumbing below."""

    path: str
    # Does the file have the aliases table (musubi_aliases)? Only a read-only store of a file
    # made before it existed lacks it (see schema.OPTIONAL_TABLES).
    has_aliases: bool = True

    # -- lifecycle hooks ----------------------------------------------------------

    def add_close_hook(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` when the store closes, before its connections do (the recorder of
        the store flushes what it holds there)."""
        hooks: list[Callable[[], None]] = self.__dict__.setdefault("_close_hooks", [])
        hooks.append(hook)

    def _run_close_hooks(self) -> None:
        """Run (once) the close hooks; the first error is raised after all have run."""
        hooks: list[Callable[[], None]] = self.__dict__.pop("_close_hooks", [])
        first: BaseException | None = None
        for hook in hooks:
            try:
                hook()
            except Exception as exc:
                first = first or exc
        if first is not None:
            raise first

    # -- what a backend provides --------------------------------------------------

    def _read(self, action: str, fn: Callable[[Any], T]) -> T:
        raise NotImplementedError

    def _write(self, action: str, fn: Callable[[Any], T]) -> T:
        raise NotImplementedError

    def _ex(self, c: Any, sql: str, params: Any = ()) -> Any:
        """Execute one statement; returns the cursor."""
        return c.execute(sql, params)

    def _exm(self, c: Any, sql: str, rows: Sequence[Any]) -> Any:
        return c.executemany(sql, rows)

    def _changes(self, c: Any, cursor: Any) -> int:
        """Rows changed by the statement that produced ``cursor``."""
        return int(cursor.rowcount)

    def _lock_node(self, c: Any, node_id: str) -> None:
        """Serialise claims of one node inside the current write transaction
        (a no-op where the transaction already holds the only write lock)."""

    def _integrity_problems(self, c: Any) -> list[str]:
        return []

    def _garbled_rows(self, c: Any, limit: int) -> list[Sequence[Any]]:
        """Up to ``limit`` node rows (NODE_COLUMNS) holding values of a type musubi never
        writes; always none where the database enforces the column types (PostgreSQL)."""
        return []

    def _garbled_nodes(self, c: Any, limit: int = 50) -> list[str]:
        """``musubi check``'s lines about garbled node rows: node, column, value."""
        problems = []
        for row in self._garbled_rows(c, limit + 1):
            try:
                _row_to_node(row, self.path)
            except CorruptNodeError as err:
                problems.append(
                    f"node {err.node_id} has an unreadable {err.column} ({err.value!r}); fix it, "
                    f"or delete the row (DELETE FROM musubi_nodes WHERE node_id = '{err.node_id}') "
                    "and the node is recomputed on its next call"
                )
        if len(problems) > limit:
            problems[limit:] = [f"more garbled node rows (only the first {limit} are listed)"]
        return problems

    # -- nodes ------------------------------------------------------------------

    def get_node(self, node_id: str) -> NodeRecord | None:
        row = self._read(
            "get_node",
            lambda c: self._ex(
                c, f"SELECT {NODE_COLUMNS} FROM musubi_nodes n WHERE node_id = ?", (node_id,)
            ).fetchone(),
        )
        return None if row is None else _row_to_node(row, self.path)

    def get_node_and_artifact(
        self, node_id: str
    ) -> tuple[NodeRecord, str | None, bytes | None] | None:
        row = self._read("lookup", lambda c: self._ex(c, _LOOKUP, (node_id,)).fetchone())
        if row is None:
            return None
        payload = row[27]
        return _row_to_node(row, self.path), row[26], None if payload is None else as_blob(payload)

    def get_artifact(self, artifact_id: str) -> tuple[str, bytes] | None:
        row = self._read(
            "get_artifact",
            lambda c: self._ex(
                c,
                "SELECT encoding, payload FROM musubi_artifacts WHERE artifact_id = ?",
                (artifact_id,),
            ).fetchone(),
        )
        return None if row is None else (row[0], as_blob(row[1]))

    def artifact_producer(self, artifact_id: str) -> str | None:
        row = self._read(
            "artifact_producer",
            lambda c: self._ex(
                c,
                "SELECT producer_node_id FROM musubi_artifacts WHERE artifact_id = ?",
                (artifact_id,),
            ).fetchone(),
        )
        return None if row is None else row[0]

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
        if not (nodes or artifacts or edges or calls or flows or runs or replays or aliases):
            return
        now = time.time()

        def apply(c: Any) -> None:
            self._write_rows(c, nodes, artifacts, edges, now)
            if aliases:
                self._exm(c, _UPSERT_ALIAS, sorted(aliases))
            self._write_records(c, calls, flows, runs, now)
            if replays:
                self._count_replays(c, replays, now)

        self._write("write", apply)

    def claim(
        self, node: NodeWrite, *, owner_alive: Callable[[NodeRecord], bool], force: bool = False
    ) -> ClaimOutcome:
        now = time.time()

        def apply(c: Any) -> ClaimOutcome:
            self._lock_node(c, node.node_id)
            row = self._ex(
                c, f"SELECT {NODE_COLUMNS} FROM musubi_nodes n WHERE node_id = ?", (node.node_id,)
            ).fetchone()
            current = None if row is None else _row_to_node(row, self.path)
            if current is not None and current.namespace == node.namespace:
                if current.status == "done" and not force:
                    return ClaimOutcome("done", current)
                if (
                    current.status == "pending"
                    and current.owner != node.owner
                    and owner_alive(current)
                ):
                    return ClaimOutcome("busy", current)
            self._write_rows(c, [node], (), (), now)
            return ClaimOutcome("claimed", current)

        return self._write("claim", apply)

    def add_replays(self, counts: Mapping[str, int], now: float) -> None:
        if not counts:
            return
        self._write("add_replays", lambda c: self._count_replays(c, counts, now))

    def _count_replays(self, c: Any, counts: Mapping[str, int], now: float) -> None:
        # Into the narrow counter rows, never the node's row (see schema.py: musubi_replays),
        # in statements of many rows (see _many). In key order: two writers counting
        # overlapping nodes then take their row locks in the same order (PostgreSQL would
        # otherwise deadlock them).
        self._many(
            c, _INSERT_REPLAYS, 3, _ON_REPLAY_CONFLICT,
            [(node_id, counts[node_id], now) for node_id in sorted(counts)],
        )

    def invalidate(self, node_id: str) -> int:
        def apply(c: Any) -> int:
            return self._changes(c, self._ex(c, _INVALIDATE, {"root": node_id}))

        return self._write("invalidate", apply)

    def invalidate_namespace(
        self,
        namespace: str,
        *,
        kinds: Sequence[str] | None = None,
        ops: Sequence[str] | None = None,
    ) -> int:
        # One statement, whatever the size of the store. Not an EXTERNAL_EFFECT: its record is
        # what stops it from being issued twice.
        sql = (
            "UPDATE musubi_nodes SET status = 'stale', stale_cause = 'invalidated' "
            "WHERE namespace = ? AND status = 'done' AND step_type != 'external_effect'"
        )
        params: list[str] = [namespace]
        if kinds is not None:
            if not kinds:
                return 0
            sql += f" AND kind IN ({', '.join('?' * len(kinds))})"
            params.extend(kinds)
        if ops is not None:
            if not ops:
                return 0
            sql += f" AND op_name IN ({', '.join('?' * len(ops))})"
            params.extend(ops)

        def apply(c: Any) -> int:
            return self._changes(c, self._ex(c, sql, params))

        return self._write("invalidate_namespace", apply)

    def mark_fresh(self, node_id: str) -> bool:
        # The parents are re-checked inside the write transaction: if one was
        # invalidated again since the caller looked, nothing changes.
        def apply(c: Any) -> bool:
            return self._changes(c, self._ex(c, _MARK_FRESH, (node_id, node_id))) == 1

        return self._write("mark_fresh", apply)

    def data_parents(self, node_id: str) -> list[ParentState]:
        rows = self._read(
            "data_parents",
            lambda c: self._ex(
                c,
                "SELECT e.parent, e.parent_artifact_id, n.status, n.artifact_id "
                "FROM musubi_edges e LEFT JOIN musubi_nodes n ON n.node_id = e.parent "
                "WHERE e.child = ? AND e.kind = 'data'",
                (node_id,),
            ).fetchall(),
        )
        return [ParentState(*row) for row in rows]

    def similar_nodes(
        self, op_name: str, input_hash: str, limit: int = 5, *, namespace: str | None = None
    ) -> list[NodeRecord]:
        where, params = _filters(
            ("op_name = ?", op_name), ("input_hash = ?", input_hash), ("namespace = ?", namespace)
        )
        rows = self._read(
            "similar_nodes",
            lambda c: self._ex(
                c,
                f"SELECT {NODE_COLUMNS} FROM musubi_nodes n {where} "
                "ORDER BY created_at DESC LIMIT ?",
                (*params, limit),
            ).fetchall(),
        )
        return [_row_to_node(r, self.path) for r in rows]

    def nodes_of_op(
        self, op_name: str, limit: int = 5, *, namespace: str | None = None
    ) -> list[NodeRecord]:
        where, params = _filters(("op_name = ?", op_name), ("namespace = ?", namespace))
        rows = self._read(
            "nodes_of_op",
            lambda c: self._ex(
                c,
                f"SELECT {NODE_COLUMNS} FROM musubi_nodes n {where} "
                "ORDER BY op_name, input_hash LIMIT ?",
                (*params, limit),
            ).fetchall(),
        )
        return [_row_to_node(r, self.path) for r in rows]

    def resolve(self, ref: str) -> str:
        ref = ref.strip().lower()
        if not ref or any(ch not in "0123456789abcdef" for ch in ref):
            raise NodeNotFoundError(ref)
        # A range scan on the primary key: no LIKE, so the index is used.
        upper = ref + "g"
        rows = self._read(
            "resolve",
            lambda c: self._ex(
                c,
                "SELECT node_id FROM musubi_nodes WHERE node_id >= ? AND node_id < ? LIMIT 6",
                (ref, upper),
            ).fetchall(),
        )
        if len(rows) == 1:
            return str(rows[0][0])
        if not rows:
            raise NodeNotFoundError(ref)
        exact = [r[0] for r in rows if r[0] == ref]
        if exact:
            return str(exact[0])
        raise NodeNotFoundError(ref, candidates=[r[0] for r in rows])

    def edges(self, node_id: str) -> list[EdgeRecord]:
        rows = self._read(
            "edges",
            lambda c: self._ex(
                c,
                "SELECT parent, child, kind, parent_artifact_id FROM musubi_edges WHERE parent = ? "
                "UNION ALL "
                "SELECT parent, child, kind, parent_artifact_id FROM musubi_edges WHERE child = ?",
                (node_id, node_id),
            ).fetchall(),
        )
        return [EdgeRecord(*r) for r in rows]

    def lineage(
        self, node_id: str, *, upstream: bool = True, downstream: bool = True, depth: int = 50
    ) -> tuple[list[NodeRecord], list[EdgeRecord]]:
        def walk(c: Any) -> tuple[list[NodeRecord], list[EdgeRecord]]:
            ids = {node_id}
            edges: dict[tuple[str, str, str], EdgeRecord] = {}
            for direction, enabled in (("up", upstream), ("down", downstream)):
                if not enabled:
                    continue
                frontier = {node_id}
                for _ in range(depth):
                    if not frontier:
                        break
                    marks = ",".join("?" * len(frontier))
                    column, other = (
                        ("child", "parent") if direction == "up" else ("parent", "child")
                    )
                    rows = self._ex(
                        c,
                        f"SELECT parent, child, kind, parent_artifact_id FROM musubi_edges "
                        f"WHERE {column} IN ({marks})",
                        tuple(frontier),
                    ).fetchall()
                    nxt = set()
                    for row in rows:
                        edge = EdgeRecord(*row)
                        edges[(edge.parent, edge.child, edge.kind)] = edge
                        target = edge.parent if other == "parent" else edge.child
                        if target not in ids:
                            ids.add(target)
                            nxt.add(target)
                    frontier = nxt
            nodes = []
            for nid in ids:
                row = self._ex(
                    c, f"SELECT {NODE_COLUMNS} FROM musubi_nodes n WHERE node_id = ?", (nid,)
                ).fetchone()
                if row is not None:
                    nodes.append(_row_to_node(row, self.path))
            nodes.sort(key=lambda n: (n.created_at, n.node_id))
            return nodes, list(edges.values())

        return self._read("lineage", walk)

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
    ) -> list[NodeRecord]:
        """Nodes, most recently created first; ``op`` matches the operation name or its
        prefix, ``run`` keeps the nodes a run's calls reached."""
        where, params = _filters(
            ("kind = ?", kind or None),
            ("status = ?", status or None),
            ("op_name >= ? AND op_name < ?", (op, op + "\uffff") if op else None),
            ("created_at >= ?", since),
            ("namespace = ?", namespace),
            (
                "node_id IN (SELECT node_id FROM musubi_calls WHERE run_id = ? "
                "AND node_id IS NOT NULL)",
                run,
            ),
        )
        rows = self._read(
            "list_nodes",
            lambda c: self._ex(
                c,
                f"SELECT {NODE_COLUMNS} FROM musubi_nodes n {where} "
                "ORDER BY created_at DESC LIMIT ?",
                (*params, limit),
            ).fetchall(),
        )
        return [_row_to_node(r, self.path) for r in rows]

    def stats(self) -> dict[str, Any]:
        """What the store holds and what replay saved. ``by_kind`` has one entry per node
        kind: its nodes, how often they were executed and replayed, the replay rate, and the
        tokens and seconds the replays saved. The totals (``executions``, ``replays``,
        ``replay_rate``, savings) count replayable kinds only (see
        :func:`~musubi_core.policy.is_replayable_kind`): a chain or a durable run's own node
        executes every time by design, so counting it would make every replay rate look low.
        ``runs_by_kind`` has the runs and their calls per run kind (:meth:`run_counts`);
        ``size`` what the store takes where the backend can say (SQLite)."""

        def gather(c: Any) -> dict[str, Any]:
            by_kind = self._ex(
                c,
                "SELECT kind, COUNT(*), CAST(SUM(exec_count) AS BIGINT), "
                f"CAST(SUM({_REPLAYS}) AS BIGINT), "
                f"CAST(SUM({_REPLAYS} * (COALESCE(tokens_in, 0) + COALESCE(tokens_out, 0))) "
                "AS BIGINT), "
                f"SUM({_REPLAYS} * COALESCE(duration_s, 0)) "
                "FROM musubi_nodes n LEFT JOIN musubi_replays r ON r.node_id = n.node_id "
                "GROUP BY kind ORDER BY kind",
            ).fetchall()
            statuses = dict(
                self._ex(c, "SELECT status, COUNT(*) FROM musubi_nodes GROUP BY status").fetchall()
            )
            artifacts = self._ex(
                c, "SELECT COUNT(*), CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM musubi_artifacts"
            ).fetchone()
            runs = self._ex(c, "SELECT COUNT(*) FROM musubi_runs").fetchone()[0]
            kinds: dict[str, dict[str, Any]] = {}
            for kind, nodes, executions, replays, tokens, seconds in by_kind:
                executions, replays = int(executions or 0), int(replays or 0)
                replayable = is_replayable_kind(kind)
                kinds[kind] = {
                    "nodes": int(nodes),
                    "replayable": replayable,
                    "executions": executions,
                    "replays": replays,
                    "replay_rate": _rate(replays, executions) if replayable else None,
                    "tokens_saved": int(tokens or 0),
                    "seconds_saved": round(float(seconds or 0.0), 3),
                }
            counted = [k for k in kinds.values() if k["replayable"]]
            executions = sum(k["executions"] for k in counted)
            replays = sum(k["replays"] for k in counted)
            by_run_kind = self._run_counts(c)
            return {
                "path": self.path,
                "nodes": sum(k["nodes"] for k in kinds.values()),
                "executions": executions,
                "replays": replays,
                "replay_rate": _rate(replays, executions),
                "tokens_saved": sum(k["tokens_saved"] for k in counted),
                "seconds_saved": round(sum(k["seconds_saved"] for k in counted), 3),
                "statuses": statuses,
                "artifacts": artifacts[0],
                "artifact_bytes": artifacts[1],
                "runs": runs,
                "by_kind": kinds,
                "runs_by_kind": by_run_kind,
                "calls": sum(k["calls"] for k in by_run_kind.values()),
                "call_replays": sum(k["replays"] for k in by_run_kind.values()),
                "size": self._size_info(c),
            }

        return self._read("stats", gather)

    def _size_info(self, c: Any) -> dict[str, Any] | None:
        """What the store takes (SQLite: bytes in use, free inside the file, on disk)."""
        return None

    def check(self) -> list[str]:
        def inspect(c: Any) -> list[str]:
            problems = self._integrity_problems(c)
            missing = self._ex(
                c,
                "SELECT COUNT(*) FROM musubi_nodes n WHERE n.status = 'done' AND n.artifact_id IS NOT NULL "
                "AND NOT EXISTS (SELECT 1 FROM musubi_artifacts a WHERE a.artifact_id = n.artifact_id)",
            ).fetchone()[0]
            if missing:
                problems.append(
                    f"{missing} done node(s) point at a missing artifact (they will re-run)"
                )
            problems.extend(self._garbled_nodes(c))
            pending = self._ex(
                c, "SELECT COUNT(*) FROM musubi_nodes WHERE status = 'pending'"
            ).fetchone()[0]
            if pending:
                problems.append(
                    f"{pending} node(s) pending: an execution was interrupted (effects may be in doubt)"
                )
            return problems

        return self._read("check", inspect)

    def _write_rows(
        self,
        c: Any,
        nodes: Sequence[NodeWrite],
        artifacts: Sequence[ArtifactWrite],
        edges: Sequence[EdgeWrite],
        now: float,
    ) -> None:
        # Every table in key order, tables always in this order (as in add_replays): two
        # batches sharing rows then lock them in the same order and never deadlock.
        if artifacts:
            self._exm(
                c,
                _INSERT_ARTIFACT,
                [
                    (a.artifact_id, a.encoding, a.payload, len(a.payload), a.producer_node_id, now)
                    for a in sorted(artifacts, key=_by_id)
                ],
            )
        if nodes:
            nodes = sorted(nodes, key=_by_id)
            changed = self._outputs_changed(c, nodes)
            self._exm(c, _UPSERT_NODE, [(*n, now) for n in nodes])
            for node_id in changed:
                self._ex(c, _STALE_DESCENDANTS, {"root": node_id})
        if edges:
            # EdgeWrite's fields are the statement's parameters, in order; sorted by the
            # primary key (parent, kind, child).
            self._exm(c, _UPSERT_EDGE, sorted(edges, key=_edge_key))

    def _outputs_changed(self, c: Any, nodes: Sequence[NodeWrite]) -> list[str]:
        """Nodes whose stored output this write replaces with a different one
        (a forced re-execution, an expired TTL). Their data-descendants were
        computed from the old output, so they must go stale."""
        outputs = {n.node_id: n.artifact_id for n in nodes if n.status == "done" and n.artifact_id}
        if not outputs:
            return []
        ids = list(outputs)
        changed = []
        # One query per chunk of ids, not one per node: a batch of lineage spans can hold
        # hundreds (SQLite allows 999 parameters in older builds).
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self._ex(
                c,
                f"SELECT node_id, artifact_id FROM musubi_nodes WHERE node_id IN ({marks})",
                chunk,
            ).fetchall()
            for node_id, stored in rows:
                if stored is not None and stored != outputs[node_id]:
                    changed.append(node_id)
        return changed


def _rate(replays: int, executions: int) -> float | None:
    """Replays per call that reached a stored entry (None when there was none)."""
    calls = replays + executions
    return round(replays / calls, 4) if calls else None
