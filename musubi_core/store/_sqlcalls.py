"""Calls, flows and runs: the record of what happened, shared by every SQL backend.

Nodes are the reusable memo (see ``_sqlbase``); the rows here record each execution and each
replay (a *call*), which call's output fed which (a *flow*), and the traces they belong to (a
*run*). They are written by the recorder (:mod:`musubi_core.record`) in its batches and read by
the CLI; nothing here decides what replays.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import NodeNotFoundError
from .base import (
    CallRecord,
    CallWrite,
    FlowRecord,
    FlowWrite,
    NodeRecord,
    RunRecord,
    RunWrite,
    UsageRow,
)

__all__ = ["CALL_COLUMNS", "DATA_DESCENDANTS", "CallsMixin", "RUN_COLUMNS"]

T = TypeVar("T")

CALL_COLUMNS = (
    "call_id, run_id, parent_call_id, seq, kind, op_name, node_id, artifact_id, replayed, "
    "status, error, started_at, duration_s, tokens_in, tokens_out, saved_s, model, "
    "input_preview, output_preview, namespace"
)

# CallWrite's fields are the statement's parameters, in order. A call id is written once in
# the common case; a second write of the same id (a durable step's call committed again after
# a resumed run re-recorded it) replaces the row. Written many rows per statement (see _many).
_INSERT_CALLS = f"INSERT INTO musubi_calls ({CALL_COLUMNS}) VALUES "
_ON_CALL_CONFLICT = """
ON CONFLICT (call_id) DO UPDATE SET
    status = excluded.status,
    error = excluded.error,
    node_id = COALESCE(excluded.node_id, musubi_calls.node_id),
    artifact_id = COALESCE(excluded.artifact_id, musubi_calls.artifact_id),
    replayed = excluded.replayed,
    duration_s = excluded.duration_s,
    tokens_in = excluded.tokens_in,
    tokens_out = excluded.tokens_out,
    saved_s = excluded.saved_s,
    output_preview = excluded.output_preview
"""

_INSERT_FLOWS = "INSERT INTO musubi_flows (dst_call_id, src_call_id, artifact_id) VALUES "
_ON_FLOW_CONFLICT = " ON CONFLICT (dst_call_id, src_call_id) DO NOTHING"

# Rows per statement: each executed statement hands the GIL back and forth once, and a thread
# committing a batch while the application's thread keeps the interpreter busy waits for the
# GIL at every one of them (up to the 5 ms switch interval): thousands of one-row statements
# made a 2,000-call batch take a second under load. A batch is cut into statements of these
# sizes only (largest first), so each connection prepares at most three statements per table:
# a prepared statement of many rows is large, and one per distinct length grew the process by
# tens of MB in SQLite's statement cache. The middle size keeps a batch's tail to at most 14
# statements per table (63 one-row statements made a commit under load take over a second,
# widening what a SIGKILL can lose). 64 rows x 20 columns stays below the parameter limits of
# SQLite and PostgreSQL.
_STATEMENT_ROWS = (64, 8, 1)

# A run row is written when the run starts (status running) and again when it ends; the counts
# are the recorder's, for the calls it recorded in this run.
_INSERT_RUNS = """
INSERT INTO musubi_runs (run_id, kind, name, status, started_at, finished_at, duration_s, host,
                         pid, error, namespace, root_call_id, calls, replays, tokens_in,
                         tokens_out, tokens_saved, seconds_saved, created_at, attempts)
VALUES """
_ON_RUN_CONFLICT = """
ON CONFLICT (run_id) DO UPDATE SET
    kind = excluded.kind,
    name = COALESCE(excluded.name, musubi_runs.name),
    status = excluded.status,
    finished_at = excluded.finished_at,
    duration_s = excluded.duration_s,
    error = excluded.error,
    root_call_id = COALESCE(musubi_runs.root_call_id, excluded.root_call_id),
    calls = excluded.calls,
    replays = excluded.replays,
    tokens_in = excluded.tokens_in,
    tokens_out = excluded.tokens_out,
    tokens_saved = excluded.tokens_saved,
    seconds_saved = excluded.seconds_saved
"""

RUN_COLUMNS = (
    "r.run_id, r.name, r.kind, r.status, r.created_at, r.started_at, r.finished_at, r.host, "
    "r.pid, r.error, r.node_id, r.attempts, "
    "(SELECT COUNT(*) FROM musubi_run_steps s WHERE s.run_id = r.run_id AND s.status = 'done'), "
    "(SELECT COUNT(*) FROM musubi_run_steps s WHERE s.run_id = r.run_id), "
    "r.namespace, r.root_call_id, r.duration_s, r.calls, r.replays, r.tokens_in, r.tokens_out, "
    "r.tokens_saved, r.seconds_saved"
)

# A node and its data-descendants: what ``invalidate`` marks stale, and what its read-only
# preview (``invalidation_set``) lists; one query for both. UNION (not UNION ALL) makes SQLite
# (and PostgreSQL) keep a visited set, so each node is expanded once: 50 stacked diamonds stay
# linear instead of 2**50 paths.
DATA_DESCENDANTS = """
WITH RECURSIVE down(id) AS (
    SELECT :root
    UNION
    SELECT e.child FROM musubi_edges e JOIN down d ON e.parent = d.id WHERE e.kind = 'data'
)
"""

# The calls that count for usage and savings: those that reached a node (what can replay) or
# used tokens.
_USAGE_CALLS = "(node_id IS NOT NULL OR tokens_in IS NOT NULL OR tokens_out IS NOT NULL)"

_HEX = frozenset("0123456789abcdef")
_first = itemgetter(0)
_chain = itertools.chain.from_iterable


class CallsMixin:
    """Store methods for calls, flows and runs over the SQL base's plumbing."""

    path: str

    # The largest integer not above a positive number, in this backend's SQL (SQLite's CAST
    # truncates; PostgreSQL's rounds, so its store says FLOOR).
    _FLOOR = "CAST({} AS INTEGER)"

    if TYPE_CHECKING:  # provided by SQLStoreBase

        def _read(self, action: str, fn: Callable[[Any], T]) -> T:
            raise NotImplementedError

        def _ex(self, c: Any, sql: str, params: Any = ()) -> Any:
            raise NotImplementedError

        def _exm(self, c: Any, sql: str, rows: Sequence[Any]) -> Any:
            raise NotImplementedError

    # -- writing (inside the caller's transaction) ----------------------------------

    def _write_records(
        self,
        c: Any,
        calls: Sequence[CallWrite],
        flows: Sequence[FlowWrite],
        runs: Sequence[RunWrite],
        now: float,
    ) -> None:
        if runs:
            if len(set(map(_first, runs))) != len(runs):
                runs = list({r[0]: r for r in runs}.values())
            self._many(
                c, _INSERT_RUNS, len(RunWrite._fields) + 2, _ON_RUN_CONFLICT,
                [(*r, now, 1) for r in runs],
            )
        if calls:
            # (rows may be CallWrite objects or plain tuples in its field order)
            if len(set(map(_first, calls))) != len(calls):
                # One statement may not upsert a row twice (PostgreSQL refuses): the last wins.
                calls = list({r[0]: r for r in calls}.values())
            self._many(c, _INSERT_CALLS, len(CallWrite._fields), _ON_CALL_CONFLICT, calls)
        if flows:
            self._many(c, _INSERT_FLOWS, 3, _ON_FLOW_CONFLICT, flows)

    def _many(
        self, c: Any, head: str, width: int, tail: str, rows: Sequence[Sequence[Any]]
    ) -> None:
        """``head`` + value tuples + ``tail``: statements of the sizes in ``_STATEMENT_ROWS``."""
        group = "(" + ", ".join("?" * width) + ")"
        i, n = 0, len(rows)
        for size in _STATEMENT_ROWS:
            if n - i < size:
                continue
            sql = head + ", ".join([group] * size) + tail
            while n - i >= size:
                self._ex(c, sql, list(_chain(rows[i : i + size])))
                i += size

    # -- runs ---------------------------------------------------------------------

    def get_run(self, run_id: str) -> RunRecord | None:
        row = self._read(
            "get run",
            lambda c: self._ex(
                c, f"SELECT {RUN_COLUMNS} FROM musubi_runs r WHERE r.run_id = ?", (run_id,)
            ).fetchone(),
        )
        return None if row is None else RunRecord(*row)

    def resolve_run(self, ref: str) -> str:
        """The run id ``ref`` names: itself, or the one run whose id starts with it."""
        if self.get_run(ref) is not None:
            return ref
        rows = self._read(
            "resolve run",
            lambda c: self._ex(
                c,
                "SELECT run_id FROM musubi_runs WHERE run_id >= ? AND run_id < ? LIMIT 6",
                (ref, ref + "\uffff"),
            ).fetchall(),
        )
        if len(rows) == 1:
            return str(rows[0][0])
        raise NodeNotFoundError(
            ref,
            candidates=[r[0] for r in rows],
            what="run",
            listing="musubi runs",
        )

    def list_runs(
        self,
        *,
        limit: int = 50,
        kind: str | None = None,
        since: float | None = None,
        status: str | None = None,
    ) -> list[RunRecord]:
        """Most recently started runs first."""
        clauses, params = _filters(
            ("r.kind = ?", kind), ("r.started_at >= ?", since), ("r.status = ?", status)
        )
        rows = self._read(
            "list runs",
            lambda c: self._ex(
                c,
                f"SELECT {RUN_COLUMNS} FROM musubi_runs r {clauses} "
                "ORDER BY COALESCE(r.started_at, r.created_at) DESC LIMIT ?",
                (*params, limit),
            ).fetchall(),
        )
        return [RunRecord(*r) for r in rows]

    # -- calls --------------------------------------------------------------------

    def run_calls(self, run_id: str, *, limit: int | None = None) -> list[CallRecord]:
        """A run's calls in the order they started."""
        sql = f"SELECT {CALL_COLUMNS} FROM musubi_calls WHERE run_id = ? ORDER BY seq"
        params: tuple[Any, ...] = (run_id,)
        if limit is not None:
            sql += " LIMIT ?"
            params = (run_id, limit)
        rows = self._read("run calls", lambda c: self._ex(c, sql, params).fetchall())
        return [CallRecord._make(r) for r in rows]

    def get_call(self, call_id: str) -> CallRecord | None:
        row = self._read(
            "get call",
            lambda c: self._ex(
                c, f"SELECT {CALL_COLUMNS} FROM musubi_calls WHERE call_id = ?", (call_id,)
            ).fetchone(),
        )
        return None if row is None else CallRecord._make(row)

    def resolve_call(self, ref: str) -> str | None:
        """The call id ``ref`` names (a unique prefix), None when no call matches; raises
        :class:`NodeNotFoundError` when several do."""
        ref = ref.strip().lower()
        if not ref or not set(ref) <= _HEX:
            return None
        rows = self._read(
            "resolve call",
            lambda c: self._ex(
                c,
                "SELECT call_id FROM musubi_calls WHERE call_id >= ? AND call_id < ? LIMIT 6",
                (ref, ref + "g"),
            ).fetchall(),
        )
        exact = [r[0] for r in rows if r[0] == ref]
        if exact or len(rows) == 1:
            return str((exact or [rows[0][0]])[0])
        if not rows:
            return None
        raise NodeNotFoundError(ref, candidates=[r[0] for r in rows], what="call")

    def node_calls(self, node_id: str, *, limit: int = 20) -> list[CallRecord]:
        """The calls that reached a node (executions and replays), most recent first."""
        # By the indexed 12-digit prefix alone (a planner given `AND node_id = ?` as well may
        # scan the table instead); ids sharing a prefix are vanishingly rare and filtered here.
        rows = self._read(
            "node calls",
            lambda c: self._ex(
                c,
                f"SELECT {CALL_COLUMNS} FROM musubi_calls WHERE substr(node_id, 1, 12) = ? "
                "ORDER BY started_at DESC LIMIT ?",
                (node_id[:12], limit + 64),
            ).fetchall(),
        )
        return [CallRecord._make(r) for r in rows if r[6] == node_id][:limit]

    def call_flows(self, call_id: str) -> list[FlowRecord]:
        """Flows into and out of a call."""
        rows = self._read(
            "call flows",
            lambda c: self._ex(
                c,
                "SELECT dst_call_id, src_call_id, artifact_id FROM musubi_flows "
                "WHERE dst_call_id = ? UNION ALL "
                "SELECT dst_call_id, src_call_id, artifact_id FROM musubi_flows "
                "WHERE src_call_id = ?",
                (call_id, call_id),
            ).fetchall(),
        )
        return [FlowRecord._make(r) for r in rows]

    def call_lineage(
        self, call_id: str, *, upstream: bool = True, downstream: bool = False,
        depth: int = 50, limit: int = 2000,
    ) -> tuple[list[CallRecord], list[FlowRecord], bool]:
        """The calls whose output flowed into ``call_id`` (and/or out of it), the flows between
        them, and whether ``depth`` or ``limit`` cut the walk short. Calls come in the order
        they started (a topological order: a call's inputs existed before it started)."""

        def walk(c: Any) -> tuple[list[CallRecord], list[FlowRecord], bool]:
            seen = {call_id}
            flows: dict[tuple[str, str], FlowRecord] = {}
            cut = False
            for direction, enabled in (("up", upstream), ("down", downstream)):
                if not enabled:
                    continue
                frontier = [call_id]
                column = "dst_call_id" if direction == "up" else "src_call_id"
                for level in range(depth + 1):
                    if not frontier:
                        break
                    if level == depth or len(seen) >= limit:
                        # Cut only when a call beyond the frontier exists (not at a source).
                        cut = cut or self._flows_beyond(c, column, frontier, seen)
                        break
                    found: list[str] = []
                    for i in range(0, len(frontier), 500):
                        chunk = frontier[i : i + 500]
                        marks = ", ".join("?" * len(chunk))
                        rows = self._ex(
                            c,
                            "SELECT dst_call_id, src_call_id, artifact_id FROM musubi_flows "
                            f"WHERE {column} IN ({marks})",
                            chunk,
                        ).fetchall()
                        for row in rows:
                            flow = FlowRecord._make(row)
                            flows[(flow.dst_call_id, flow.src_call_id)] = flow
                            other = flow.src_call_id if direction == "up" else flow.dst_call_id
                            if other not in seen:
                                seen.add(other)
                                found.append(other)
                    frontier = found
            ids = list(seen)
            calls: list[CallRecord] = []
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                marks = ", ".join("?" * len(chunk))
                calls.extend(
                    CallRecord._make(r)
                    for r in self._ex(
                        c,
                        f"SELECT {CALL_COLUMNS} FROM musubi_calls WHERE call_id IN ({marks})",
                        chunk,
                    ).fetchall()
                )
            calls.sort(key=lambda r: (r.started_at, r.run_id, r.seq))
            return calls, list(flows.values()), cut

        return self._read("call lineage", walk)

    def _flows_beyond(self, c: Any, column: str, frontier: list[str], seen: set[str]) -> bool:
        """Does a flow lead from ``frontier`` (along ``column``) to a call not in ``seen``?"""
        other = "src_call_id" if column == "dst_call_id" else "dst_call_id"
        for i in range(0, len(frontier), 500):
            chunk = frontier[i : i + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self._ex(
                c, f"SELECT {other} FROM musubi_flows WHERE {column} IN ({marks})", chunk
            ).fetchall()
            if any(row[0] not in seen for row in rows):
                return True
        return False

    def run_flows(self, run_id: str) -> list[FlowRecord]:
        """The flows into the calls of a run (by the run's index, then the flows' key)."""
        rows = self._read(
            "run flows",
            lambda c: self._ex(
                c,
                "SELECT f.dst_call_id, f.src_call_id, f.artifact_id FROM musubi_calls c "
                "JOIN musubi_flows f ON f.dst_call_id = c.call_id WHERE c.run_id = ? "
                "ORDER BY c.seq",
                (run_id,),
            ).fetchall(),
        )
        return [FlowRecord._make(r) for r in rows]

    def invalidation_set(self, node_id: str) -> list[NodeRecord]:
        """Read only: the nodes ``invalidate(node_id)`` would mark stale, by the same query."""
        from ._sqlbase import NODE_COLUMNS, _row_to_node  # (it imports this module)

        rows = self._read(
            "invalidation set",
            lambda c: self._ex(
                c,
                DATA_DESCENDANTS + f"SELECT {NODE_COLUMNS} FROM musubi_nodes n "
                "WHERE n.node_id IN (SELECT id FROM down)",
                {"root": node_id},
            ).fetchall(),
        )
        return [_row_to_node(r, self.path) for r in rows]

    def call_usage(
        self,
        *,
        since: float | None = None,
        run_ids: Sequence[str] | None = None,
        bucket_s: float | None = None,
    ) -> list[UsageRow]:
        """Per model, kind and replayed (and run, and time bucket, when asked): the calls that
        reached a node or used tokens, their tokens, time and the time replay saved."""
        width = None if bucket_s is None else float(bucket_s)
        # The width is a float written into the statement (not bound), so that the SELECT's
        # bucket and the GROUP BY's are one expression to PostgreSQL.
        bucket = "NULL" if width is None else self._FLOOR.format(f"started_at / {width!r}")
        keys = ["model", "kind", "replayed"]
        if width is not None:
            keys.insert(0, bucket)
        if run_ids is not None:
            keys.insert(0, "run_id")
        select = (
            f"SELECT {'run_id' if run_ids is not None else 'NULL'}, {bucket}, model, kind, "
            "replayed, COUNT(*), CAST(COALESCE(SUM(tokens_in), 0) AS BIGINT), "
            "CAST(COALESCE(SUM(tokens_out), 0) AS BIGINT), COALESCE(SUM(duration_s), 0), "
            f"COALESCE(SUM(saved_s), 0) FROM musubi_calls WHERE {_USAGE_CALLS}"
        )
        chunks: list[list[str]] = [[]]
        if run_ids is not None:
            ids = list(dict.fromkeys(run_ids))
            chunks = [ids[i : i + 500] for i in range(0, len(ids), 500)]

        def statement(chunk: list[str]) -> tuple[str, list[Any]]:
            sql, args = select, list[Any]()
            if since is not None:
                sql += " AND started_at >= ?"
                args.append(since)
            if run_ids is not None:
                sql += f" AND run_id IN ({', '.join('?' * len(chunk))})"
                args.extend(chunk)
            return sql + " GROUP BY " + ", ".join(keys), args

        def gather(c: Any) -> list[UsageRow]:
            out: list[UsageRow] = []
            for chunk in chunks:
                for row in self._ex(c, *statement(chunk)).fetchall():
                    out.append(UsageRow(
                        row[0], None if row[1] is None else float(row[1]) * (width or 0.0),
                        row[2], row[3], int(row[4]), int(row[5]), int(row[6]), int(row[7]),
                        float(row[8]), float(row[9]),
                    ))
            return out

        return self._read("call usage", gather) if chunks else []

    def run_counts(self) -> dict[str, dict[str, Any]]:
        """Per run kind: how many runs, their calls and replayed calls, and what replay saved
        (from the counts kept on each run row: no scan of the calls)."""
        return self._read("run counts", self._run_counts)

    def _run_counts(self, c: Any) -> dict[str, dict[str, Any]]:
        rows = self._ex(
            c,
            "SELECT kind, COUNT(*), CAST(SUM(calls) AS BIGINT), CAST(SUM(replays) AS BIGINT), "
            "CAST(SUM(tokens_saved) AS BIGINT), SUM(seconds_saved) "
            "FROM musubi_runs GROUP BY kind ORDER BY kind",
        ).fetchall()
        return {
            row[0]: {
                "runs": int(row[1]),
                "calls": int(row[2] or 0),
                "replays": int(row[3] or 0),
                "tokens_saved": int(row[4] or 0),
                "seconds_saved": round(float(row[5] or 0.0), 3),
            }
            for row in rows
        }


def _filters(*pairs: tuple[str, Any]) -> tuple[str, list[Any]]:
    """A WHERE clause of the pairs whose value is not None (a tuple value binds several
    placeholders)."""
    clauses: list[str] = []
    params: list[Any] = []
    for sql, value in pairs:
        if value is None:
            continue
        clauses.append(f"({sql})")
        params.extend(value if isinstance(value, tuple) else (value,))
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), params
