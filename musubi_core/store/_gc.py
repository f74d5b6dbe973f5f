"""Collecting garbage: what ``musubi gc`` and a store's ``size_limit`` remove, for every SQL
backend.

What goes, in this order, in one write transaction (a dry run rolls it back, so it reports
exactly what a real run would remove):

1. **The memo, by age** (``older_than``): stale and failed nodes created before the cutoff, and
   done nodes nobody executed or replayed since (``COALESCE(last_replayed_at, finished_at,
   created_at)``).
2. **The record, by age** (``records_older_than``, by default the same age): runs that ended
   before the cutoff, with their calls, the flows into and out of those calls and (for durable
   runs) their steps; and calls older than the cutoff whose run row is gone.
3. **The memo, by size** (``max_bytes``, on a backend that can measure itself): the least
   recently used entries (garbage first: stale, failed and recorded-only nodes) until the store
   fits, with their outputs; a call that was served such an output keeps its row and previews
   (the record outlives the memo) but no longer its payload. When the memo is used up and the
   store still does not fit, the oldest finished runs go too, whole.
4. **Artifacts nothing refers to**: no node, durable step, call or flow.

Never removed, whatever the age or the size: a pending node (an execution in flight, or an
effect in doubt), an ``EXTERNAL_EFFECT`` record (what stops the effect from happening twice; a
failed or stale one may go by age), and an unfinished durable run (status other than ``done``)
with its steps, their nodes and their outputs: it resumes from them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import ConfigError
from ..policy import RECORDED_ONLY_KINDS

__all__ = ["GcMixin"]

T = TypeVar("T")

# Nodes a durable run that has not finished needs to resume: its steps' nodes and its own node.
# (A step row without its run row counts as unfinished: nothing says the run is over.)
_UNFINISHED_RUN_NODES = """
SELECT s.node_id FROM musubi_run_steps s LEFT JOIN musubi_runs r ON r.run_id = s.run_id
WHERE s.node_id IS NOT NULL AND (r.status IS NULL OR r.status != 'done')
UNION
SELECT r.node_id FROM musubi_runs r
WHERE r.node_id IS NOT NULL AND r.kind = 'durable' AND r.status != 'done'
"""

_AGED_NODES = f"""
((status IN ('stale', 'failed') AND created_at < ?)
 OR (status = 'done' AND COALESCE(
         (SELECT r.last_at FROM musubi_replays r WHERE r.node_id = musubi_nodes.node_id),
         last_replayed_at, finished_at, created_at) < ?
     -- An external effect's record is what stops it from being issued twice: age never
     -- makes it garbage.
     AND step_type != 'external_effect'))
AND node_id NOT IN ({_UNFINISHED_RUN_NODES})
"""

# Runs whose record may go: ended (or, still marked running, started) before the cutoff, and not
# an unfinished durable run.
_AGED_RUNS = """
COALESCE(finished_at, started_at, created_at) < ? AND NOT (kind = 'durable' AND status != 'done')
"""

_RECORDED_ONLY_SQL = ", ".join(f"'{kind}'" for kind in sorted(RECORDED_ONLY_KINDS))

# The size eviction's candidates, least valuable first: entries that can never replay (stale,
# failed, recorded-only kinds), then replayable ones, least recently used first.
_EVICTABLE = f"""
SELECT n.node_id, n.artifact_id, COALESCE(a.size, 0) FROM musubi_nodes n
LEFT JOIN musubi_artifacts a ON a.artifact_id = n.artifact_id
LEFT JOIN musubi_replays r ON r.node_id = n.node_id
WHERE n.status != 'pending' AND n.step_type != 'external_effect'
  AND n.node_id NOT IN ({_UNFINISHED_RUN_NODES})
ORDER BY CASE WHEN n.status = 'done' AND n.kind NOT IN ({_RECORDED_ONLY_SQL}) THEN 1 ELSE 0 END,
         COALESCE(r.last_at, n.last_replayed_at, n.finished_at, n.created_at), n.node_id
LIMIT ?
"""

# Runs the size eviction may take once the memo is used up: finished ones, oldest first.
_EVICTABLE_RUNS = """
SELECT run_id FROM musubi_runs
WHERE status != 'running' AND NOT (kind = 'durable' AND status != 'done')
ORDER BY COALESCE(finished_at, started_at, created_at), run_id
LIMIT ?
"""

_REFERENCED_ARTIFACTS = """
SELECT artifact_id FROM musubi_nodes WHERE artifact_id IS NOT NULL
UNION SELECT artifact_id FROM musubi_run_steps WHERE artifact_id IS NOT NULL
UNION SELECT artifact_id FROM musubi_calls WHERE artifact_id IS NOT NULL
UNION SELECT artifact_id FROM musubi_flows WHERE artifact_id IS NOT NULL
"""

# What a node row, its edges and its share of the indexes take besides its artifact (an
# estimate, used only to size the eviction's batches; the store is measured after each one).
_NODE_OVERHEAD = 400
_CHUNK = 500  # ids per IN (...) list


class _DryRun(Exception):
    """Raised inside the transaction of a dry run to roll it back, carrying the report."""

    def __init__(self, report: dict[str, Any]) -> None:
        super().__init__("dry run")
        self.report = report


def _marks(n: int) -> str:
    return ", ".join("?" * n)


class GcMixin:
    """``gc``: shared by the SQL backends; a backend that can measure itself (SQLite) supplies
    ``_used_bytes`` and ``_file_bytes`` and shrinks its file in ``_after_gc``."""

    path: str

    if TYPE_CHECKING:  # provided by SQLStoreBase

        def _write(self, action: str, fn: Callable[[Any], T]) -> T: ...

        def _read(self, action: str, fn: Callable[[Any], T]) -> T: ...

        def _ex(self, c: Any, sql: str, params: Any = ()) -> Any: ...

        def _changes(self, c: Any, cursor: Any) -> int: ...

    # -- what a backend may provide -------------------------------------------------

    def _used_bytes(self, c: Any) -> int | None:
        """The bytes the store's content takes, as the database itself counts them (inside
        the current transaction), or None when this backend cannot say."""
        return None

    def _file_bytes(self) -> int | None:
        """The bytes the store takes on disk, or None when it is not a local file."""
        return None

    def _can_vacuum(self) -> bool:
        """Can ``gc(vacuum=True)`` compact this store (see :meth:`_after_gc`)?"""
        return False

    def _after_gc(self, *, removed: bool, vacuum: bool) -> None:
        """After a gc that committed: hand freed space back to the file system (and compact
        the store when ``vacuum``)."""

    # -- gc -------------------------------------------------------------------------

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
        """Remove what is no longer worth keeping (see the module docstring for what goes and
        what never does) and return a report: counts per table (``nodes``, of which
        ``evicted`` went for ``max_bytes``; ``artifacts``, ``edges``, ``runs``, ``calls``,
        ``flows``, ``run_steps``), ``bytes_before`` / ``bytes_after`` (what the content takes,
        as the database counts it; None where it cannot), ``file_bytes_before`` /
        ``file_bytes_after`` (on disk), ``over_limit`` (``max_bytes`` could not be met: what is
        left cannot be evicted), and with ``ids`` the ids of the removed nodes, artifacts, runs
        and calls. ``dry_run`` removes nothing and reports what would go. ``records_older_than``
        (default: ``older_than``) is the age of the record of runs and calls that goes.
        ``vacuum`` compacts the file afterwards (SQLite)."""
        return self._gc(
            older_than=older_than, now=now, records_older_than=records_older_than,
            max_bytes=max_bytes, target=max_bytes, dry_run=dry_run, ids=ids, vacuum=vacuum,
        )

    def _gc(
        self,
        *,
        older_than: float | None,
        now: float | None,
        records_older_than: float | None,
        max_bytes: int | None,
        target: int | None,
        dry_run: bool,
        ids: bool,
        vacuum: bool,
    ) -> dict[str, Any]:
        for name, value in (("older_than", older_than), ("records_older_than", records_older_than)):
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ConfigError(f"{name} must be a number of seconds >= 0, not {value!r}",
                                  target=self.path)
        if max_bytes is not None:
            if max_bytes <= 0:
                raise ConfigError(f"max_bytes must be more than 0, not {max_bytes!r}",
                                  target=self.path)
            if self._read_used_bytes() is None:
                raise ConfigError(
                    f"--max-size measures a SQLite file; {self.path} cannot be measured that "
                    "way: bound it by age with --older-than (and size it with PostgreSQL's "
                    "pg_total_relation_size)",
                    target=self.path,
                )
        if vacuum and not self._can_vacuum():
            raise ConfigError(
                f"--vacuum compacts a SQLite file; on {self.path} run PostgreSQL's own VACUUM "
                "(autovacuum reclaims the space of removed rows by itself)",
                target=self.path,
            )
        when = time.time() if now is None else now
        records_age = records_older_than if records_older_than is not None else older_than
        file_before = self._file_bytes()

        def apply(c: Any) -> dict[str, Any]:
            report = _new_report(ids, dry_run, max_bytes)
            report["bytes_before"] = self._used_bytes(c)
            if older_than is not None:
                self._memo_by_age(c, when - older_than, report)
            if records_age is not None:
                self._records_by_age(c, when - records_age, report)
            if max_bytes is not None:
                self._evict(c, max_bytes, target if target is not None else max_bytes, report)
            self._unreferenced(c, report)
            report["bytes_after"] = self._used_bytes(c)
            if dry_run:
                raise _DryRun(report)
            return report

        try:
            report = self._write("gc", apply)
        except _DryRun as done:
            report = done.report
        removed = any(report[k] for k in ("nodes", "artifacts", "runs", "calls", "edges"))
        if not dry_run:
            self._after_gc(removed=removed, vacuum=vacuum)
            report["vacuumed"] = vacuum
            after = self._read_used_bytes()
            if after is not None:
                report["bytes_after"] = after
        report["file_bytes_before"] = file_before
        report["file_bytes_after"] = None if dry_run else self._file_bytes()
        return report

    def _read_used_bytes(self) -> int | None:
        return self._read("measure", self._used_bytes)

    # -- the phases ---------------------------------------------------------------

    def _delete(
        self, c: Any, table: str, key: str | None, where: str, params: Sequence[Any],
        report: dict[str, Any], field: str, *, count: bool = True,
    ) -> int:
        """DELETE FROM ``table`` WHERE ``where``; add the count (and, when asked, the ids in
        ``key``, read first in the same transaction) to the report."""
        if key is not None and "ids" in report:
            rows = self._ex(c, f"SELECT {key} FROM {table} WHERE {where}", params).fetchall()
            report["ids"].setdefault(field, []).extend(r[0] for r in rows)
        n = self._changes(c, self._ex(c, f"DELETE FROM {table} WHERE {where}", params))
        if count:
            report[field] += n
        return n

    def _memo_by_age(self, c: Any, cutoff: float, report: dict[str, Any]) -> None:
        self._delete(c, "musubi_nodes", "node_id", _AGED_NODES, (cutoff, cutoff), report, "nodes")

    def _records_by_age(self, c: Any, cutoff: float, report: dict[str, Any]) -> None:
        runs = f"SELECT run_id FROM musubi_runs WHERE {_AGED_RUNS}"
        # Calls of those runs, and calls older than the cutoff whose run row is gone.
        doomed = (
            f"run_id IN ({runs}) OR (started_at < ? "
            "AND run_id NOT IN (SELECT run_id FROM musubi_runs))"
        )
        calls = f"SELECT call_id FROM musubi_calls WHERE {doomed}"
        self._delete(
            c, "musubi_flows", None,
            f"dst_call_id IN ({calls}) OR src_call_id IN ({calls})",
            (cutoff, cutoff, cutoff, cutoff), report, "flows",
        )
        self._delete(c, "musubi_calls", "call_id", doomed, (cutoff, cutoff), report, "calls")
        self._delete(
            c, "musubi_run_steps", None, f"run_id IN ({runs})", (cutoff,), report, "run_steps"
        )
        self._delete(c, "musubi_runs", "run_id", _AGED_RUNS, (cutoff,), report, "runs")

    def _unreferenced(self, c: Any, report: dict[str, Any]) -> None:
        if report["nodes"]:
            # An edge goes with the last of its two nodes: one whose other end is still
            # stored keeps telling where that node's input came from.
            self._delete(
                c, "musubi_edges", None,
                "parent NOT IN (SELECT node_id FROM musubi_nodes) "
                "AND child NOT IN (SELECT node_id FROM musubi_nodes)",
                (), report, "edges",
            )
            # Aliases and replay counts of nodes that are gone (an alias would only lead a
            # probe to a miss; a node made again starts counting afresh).
            for table in ("musubi_aliases", "musubi_replays"):
                self._delete(
                    c, table, None, "node_id NOT IN (SELECT node_id FROM musubi_nodes)",
                    (), report, "nodes", count=False,
                )
        self._delete(
            c, "musubi_artifacts", "artifact_id", f"artifact_id NOT IN ({_REFERENCED_ARTIFACTS})",
            (), report, "artifacts",
        )

    def _evict(self, c: Any, limit: int, target: int, report: dict[str, Any]) -> None:
        """Remove memo entries, least recently used first, then (when the memo is used up)
        the oldest finished runs, until the store takes at most ``target`` bytes; started
        only when it takes more than ``limit``."""
        used = self._used_bytes(c)
        assert used is not None
        if used <= limit:
            return
        nodes = self._ex(c, "SELECT COUNT(*) FROM musubi_nodes").fetchone()[0] or 1
        per_node = max(used / nodes, 1.0)
        batch = max(64, min(20_000, math.ceil((used - target) / per_node * 1.25)))
        while used > target:
            rows = self._ex(c, _EVICTABLE, (batch,)).fetchall()
            if not rows:
                break
            chosen: list[str] = []
            artifacts: set[str] = set()
            estimate, want = 0, used - target
            for node_id, artifact_id, size in rows:
                chosen.append(node_id)
                if artifact_id is not None:
                    artifacts.add(artifact_id)
                estimate += int(size) + _NODE_OVERHEAD
                if estimate >= want:
                    break
            self._evict_nodes(c, chosen, sorted(artifacts), report)
            now_used = self._used_bytes(c)
            assert now_used is not None
            if now_used >= used:
                # Small rows free whole pages only once their neighbours go too: take more.
                batch = min(batch * 2, 100_000)
            used = now_used
        if used > target:
            self._evict_runs(c, target, report)
            used = self._used_bytes(c) or 0
        report["over_limit"] = used > limit
        if report["over_limit"]:
            report["kept"] = self._kept_counts(c)

    def _kept_counts(self, c: Any) -> dict[str, int]:
        """What the size eviction may not remove, by reason (for the report of a store it
        could not bring under its limit)."""
        def one(sql: str) -> int:
            return int(self._ex(c, sql).fetchone()[0] or 0)

        return {
            "unfinished_durable_runs": one(
                "SELECT COUNT(*) FROM musubi_runs WHERE kind = 'durable' AND status != 'done'"
            ),
            "running_runs": one(
                "SELECT COUNT(*) FROM musubi_runs WHERE kind != 'durable' AND status = 'running'"
            ),
            "external_effects": one(
                "SELECT COUNT(*) FROM musubi_nodes WHERE step_type = 'external_effect'"
            ),
            "pending_nodes": one("SELECT COUNT(*) FROM musubi_nodes WHERE status = 'pending'"),
            "nodes": one("SELECT COUNT(*) FROM musubi_nodes"),
            "calls": one("SELECT COUNT(*) FROM musubi_calls"),
        }

    def _evict_nodes(
        self, c: Any, node_ids: list[str], artifact_ids: list[str], report: dict[str, Any]
    ) -> None:
        for i in range(0, len(node_ids), _CHUNK):
            chunk = node_ids[i : i + _CHUNK]
            n = self._changes(
                c, self._ex(c, f"DELETE FROM musubi_nodes WHERE node_id IN ({_marks(len(chunk))})",
                            chunk)
            )
            report["nodes"] += n
            report["evicted"] += n
        if "ids" in report:
            report["ids"].setdefault("nodes", []).extend(node_ids)
        # Their outputs go unless another node or a durable step still needs them: a call
        # keeps its row (its previews, timings and tokens) without the payload.
        for i in range(0, len(artifact_ids), _CHUNK):
            chunk = artifact_ids[i : i + _CHUNK]
            self._delete(
                c, "musubi_artifacts", "artifact_id",
                f"artifact_id IN ({_marks(len(chunk))}) AND artifact_id NOT IN "
                "(SELECT artifact_id FROM musubi_nodes WHERE artifact_id IS NOT NULL "
                " UNION SELECT artifact_id FROM musubi_run_steps WHERE artifact_id IS NOT NULL)",
                chunk, report, "artifacts",
            )

    def _evict_runs(self, c: Any, target: int, report: dict[str, Any]) -> None:
        """The memo is used up and the store is still too big: the oldest finished runs go,
        whole (calls, flows, steps), with the outputs only they referred to."""
        batch = 16
        used = self._used_bytes(c) or 0
        while used > target:
            run_ids = [r[0] for r in self._ex(c, _EVICTABLE_RUNS, (batch,)).fetchall()]
            if not run_ids:
                return
            for i in range(0, len(run_ids), _CHUNK):
                chunk = run_ids[i : i + _CHUNK]
                marks = _marks(len(chunk))
                calls = f"SELECT call_id FROM musubi_calls WHERE run_id IN ({marks})"
                self._delete(
                    c, "musubi_flows", None,
                    f"dst_call_id IN ({calls}) OR src_call_id IN ({calls})",
                    (*chunk, *chunk), report, "flows",
                )
                for table, key, field in (
                    ("musubi_calls", "call_id", "calls"),
                    ("musubi_run_steps", None, "run_steps"),
                    ("musubi_runs", "run_id", "runs"),
                ):
                    self._delete(c, table, key, f"run_id IN ({marks})", chunk, report, field)
            self._delete(
                c, "musubi_artifacts", "artifact_id",
                f"artifact_id NOT IN ({_REFERENCED_ARTIFACTS})", (), report, "artifacts",
            )
            used = self._used_bytes(c) or 0
            batch = min(batch * 2, 10_000)


def _new_report(ids: bool, dry_run: bool, max_bytes: int | None) -> dict[str, Any]:
    report: dict[str, Any] = {
        "dry_run": dry_run,
        "nodes": 0,
        "evicted": 0,
        "artifacts": 0,
        "edges": 0,
        "runs": 0,
        "calls": 0,
        "flows": 0,
        "run_steps": 0,
        "max_bytes": max_bytes,
        "over_limit": False,
        "bytes_before": None,
        "bytes_after": None,
    }
    if ids:
        report["ids"] = {"nodes": [], "artifacts": [], "runs": [], "calls": []}
    return report
