"""Durable-run storage for :class:`~musubi_core.store.sqlite.SQLiteStore` and
:class:`~musubi_core.store.postgres.PostgresStore`.

Kept apart from the lineage store so each file stays readable; both stores
inherit :class:`RunStoreMixin` (its statements run through the store's dialect
hook ``_ex``) and so implement :class:`~musubi_core.store.base.RunStore`.

Durability is chosen per write: a finished step is committed with
``synchronous=FULL`` (one fsync'd commit that carries the step row, its lineage
node, its artifact and its ``contains`` edge), while bookkeeping whose loss
only costs a re-run (the "step started" marker, failures, the run's final
status) commits with the store's normal setting and rides along with the next
fsync.

>>> import tempfile, os
>>> from musubi_core.store import SQLiteStore
>>> with SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db")) as store:
...     store.list_runs()
[]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .base import (
    ArtifactWrite,
    CallWrite,
    EdgeWrite,
    FlowWrite,
    NodeWrite,
    RunStepRecord,
    RunStepWrite,
    as_blob,
)

__all__ = ["RunStoreMixin"]

T = TypeVar("T")

_STEP_COLUMNS = (
    "s.run_id, s.name, s.seq, s.kind, s.status, s.fingerprint, s.artifact_id, s.node_id, "
    "s.error, s.started_at, s.finished_at, s.wake_at, s.attempts"
)

_BEGIN_RUN = """
INSERT INTO musubi_runs (run_id, name, kind, status, created_at, started_at, finished_at,
                         host, pid, error, node_id, attempts)
VALUES (?, ?, 'durable', 'running', ?, ?, NULL, ?, ?, NULL, ?, 1)
ON CONFLICT (run_id) DO UPDATE SET
    name = COALESCE(excluded.name, musubi_runs.name),
    status = 'running',
    started_at = excluded.started_at,
    finished_at = NULL,
    host = excluded.host,
    pid = excluded.pid,
    error = NULL,
    node_id = excluded.node_id,
    attempts = musubi_runs.attempts + 1
"""

# A retry keeps the step's seq from its first attempt only if the body still
# calls it at the same position; the body's order is the truth.
_STEP_STARTED = """
INSERT INTO musubi_run_steps (run_id, name, seq, kind, status, fingerprint, artifact_id,
                              node_id, error, started_at, finished_at, wake_at, attempts)
VALUES (?, ?, ?, ?, 'pending', ?, NULL, ?, NULL, ?, NULL, NULL, 1)
ON CONFLICT (run_id, name) DO UPDATE SET
    seq = excluded.seq,
    kind = excluded.kind,
    status = 'pending',
    fingerprint = excluded.fingerprint,
    artifact_id = NULL,
    node_id = excluded.node_id,
    error = NULL,
    started_at = excluded.started_at,
    finished_at = NULL,
    wake_at = NULL,
    attempts = musubi_run_steps.attempts + 1
"""

# Used for the final state of a step (done or failed). A step committed
# without a "started" marker (a sleep, or a marker lost with the page cache)
# still counts one attempt.
_STEP_FINISHED = """
INSERT INTO musubi_run_steps (run_id, name, seq, kind, status, fingerprint, artifact_id,
                              node_id, error, started_at, finished_at, wake_at, attempts)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)
ON CONFLICT (run_id, name) DO UPDATE SET
    seq = excluded.seq,
    kind = excluded.kind,
    status = excluded.status,
    fingerprint = excluded.fingerprint,
    artifact_id = excluded.artifact_id,
    node_id = excluded.node_id,
    error = excluded.error,
    started_at = COALESCE(excluded.started_at, musubi_run_steps.started_at),
    finished_at = excluded.finished_at,
    wake_at = excluded.wake_at
"""


_FINISH_RUN = """
UPDATE musubi_runs SET
    status = ?, error = ?, finished_at = ?,
    duration_s = ? - started_at,
    calls = (SELECT COUNT(*) FROM musubi_calls c WHERE c.run_id = musubi_runs.run_id),
    replays = (SELECT COUNT(*) FROM musubi_calls c
               WHERE c.run_id = musubi_runs.run_id AND c.replayed = 1),
    tokens_in = (SELECT COALESCE(SUM(c.tokens_in), 0) FROM musubi_calls c
                 WHERE c.run_id = musubi_runs.run_id AND c.replayed = 0),
    tokens_out = (SELECT COALESCE(SUM(c.tokens_out), 0) FROM musubi_calls c
                  WHERE c.run_id = musubi_runs.run_id AND c.replayed = 0),
    tokens_saved = (SELECT COALESCE(SUM(COALESCE(c.tokens_in, 0) + COALESCE(c.tokens_out, 0)), 0)
                    FROM musubi_calls c WHERE c.run_id = musubi_runs.run_id AND c.replayed = 1),
    seconds_saved = (SELECT COALESCE(SUM(c.saved_s), 0) FROM musubi_calls c
                     WHERE c.run_id = musubi_runs.run_id AND c.replayed = 1)
WHERE run_id = ?
"""


def _step_params(step: RunStepWrite) -> tuple[Any, ...]:
    return (
        step.run_id, step.name, step.seq, step.kind, step.status, step.fingerprint,
        step.artifact_id, step.node_id, step.error, step.started_at, step.finished_at,
        step.wake_at,
    )


def _step_record(row: Sequence[Any]) -> RunStepRecord:
    payload = row[14] if len(row) > 14 else None
    return RunStepRecord(
        run_id=row[0], name=row[1], seq=row[2], kind=row[3], status=row[4],
        fingerprint=row[5], artifact_id=row[6], node_id=row[7], error=row[8],
        started_at=row[9], finished_at=row[10], wake_at=row[11], attempts=row[12],
        encoding=row[13] if len(row) > 13 else None,
        payload=None if payload is None else as_blob(payload),
    )


class RunStoreMixin:
    """The :class:`~musubi_core.store.base.RunStore` methods of the SQL stores."""

    if TYPE_CHECKING:  # provided by SQLiteStore and PostgresStore

        def _ex(self, c: Any, sql: str, params: Any = ...) -> Any: ...

        def commit_durable(
            self, fn: Callable[[Any], T], action: str = ...
        ) -> T: ...

        def transaction(self, fn: Callable[[Any], T], action: str = ...) -> T: ...

        def query(self, fn: Callable[[Any], T], action: str = ...) -> T: ...

        def _write_rows(
            self,
            c: Any,
            nodes: Sequence[NodeWrite],
            artifacts: Sequence[ArtifactWrite],
            edges: Sequence[EdgeWrite],
            now: float,
        ) -> None: ...

        def _write_records(
            self,
            c: Any,
            calls: Sequence[CallWrite],
            flows: Sequence[FlowWrite],
            runs: Sequence[Any],
            now: float,
        ) -> None: ...

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
        edges = [EdgeWrite(parent_node, node_id, "contains")] if parent_node else []

        def apply(c: Any) -> list[RunStepRecord]:
            self._ex(c, _BEGIN_RUN, (run_id, name, now, now, host, pid, node_id))
            self._write_rows(c, (), (), edges, now)
            rows = self._ex(
                c,
                f"SELECT {_STEP_COLUMNS}, a.encoding, a.payload FROM musubi_run_steps s "
                "LEFT JOIN musubi_artifacts a ON a.artifact_id = s.artifact_id "
                "WHERE s.run_id = ? ORDER BY s.seq",
                (run_id,),
            ).fetchall()
            return [_step_record(r) for r in rows]

        # Reading the steps inside the same transaction that claims the run
        # means no reader-visible state can slip between the two.
        return self.transaction(apply, "begin run")

    def discard_steps_from(self, run_id: str, name: str) -> list[str]:
        def apply(c: Any) -> list[str]:
            row = self._ex(
                c, "SELECT seq FROM musubi_run_steps WHERE run_id = ? AND name = ?", (run_id, name)
            ).fetchone()
            if row is None:
                return []
            names = [
                r[0]
                for r in self._ex(
                    c,
                    "SELECT name FROM musubi_run_steps WHERE run_id = ? AND seq >= ? ORDER BY seq",
                    (run_id, row[0]),
                ).fetchall()
            ]
            self._ex(c, "DELETE FROM musubi_run_steps WHERE run_id = ? AND seq >= ?", (run_id, row[0]))
            return names

        # Durable: after "accept the change" returns, a power cut must not
        # bring the discarded results back.
        return self.commit_durable(apply, "discard steps")

    def mark_step_started(self, step: RunStepWrite) -> None:
        params = (
            step.run_id, step.name, step.seq, step.kind, step.fingerprint, step.node_id,
            step.started_at,
        )
        self.transaction(lambda c: self._ex(c, _STEP_STARTED, params), "mark step started")

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
        now = step.finished_at or node.finished_at or 0.0
        params = _step_params(step)

        def apply(c: Any) -> None:
            self._write_rows(c, [node], [artifact] if artifact else (), edges, now)
            self._write_records(c, calls, flows, (), now)
            self._ex(c, _STEP_FINISHED, params)

        self.commit_durable(apply, f"checkpoint step {step.name!r}")

    def record_step_failure(
        self,
        step: RunStepWrite,
        node: NodeWrite,
        edges: Sequence[EdgeWrite],
        *,
        calls: Sequence[CallWrite] = (),
    ) -> None:
        now = step.finished_at or 0.0
        params = _step_params(step)

        def apply(c: Any) -> None:
            self._write_rows(c, [node], (), edges, now)
            self._write_records(c, calls, (), (), now)
            self._ex(c, _STEP_FINISHED, params)

        self.transaction(apply, f"record failure of step {step.name!r}")

    def next_call_seq(self, run_id: str) -> int:
        """Where the calls of a resumed run continue their order."""
        row = self.query(
            lambda c: self._ex(
                c, "SELECT MAX(seq) FROM musubi_calls WHERE run_id = ?", (run_id,)
            ).fetchone(),
            "next call seq",
        )
        return 0 if row is None or row[0] is None else int(row[0]) + 1

    def finish_run(
        self,
        run_id: str,
        *,
        status: str,
        error: str | None,
        node: NodeWrite,
        artifact: ArtifactWrite | None,
        now: float,
    ) -> None:
        def apply(c: Any) -> None:
            self._write_rows(c, [node], [artifact] if artifact else (), (), now)
            # The run's totals over every call it recorded, in every invocation.
            self._ex(c, _FINISH_RUN, (status, error, now, now, run_id))

        self.transaction(apply, "finish run")

    def run_steps(self, run_id: str, *, payloads: bool = False) -> list[RunStepRecord]:
        if payloads:
            sql = (
                f"SELECT {_STEP_COLUMNS}, a.encoding, a.payload FROM musubi_run_steps s "
                "LEFT JOIN musubi_artifacts a ON a.artifact_id = s.artifact_id "
                "WHERE s.run_id = ? ORDER BY s.seq"
            )
        else:
            sql = f"SELECT {_STEP_COLUMNS} FROM musubi_run_steps s WHERE s.run_id = ? ORDER BY s.seq"
        rows = self.query(lambda c: self._ex(c, sql, (run_id,)).fetchall(), "list run steps")
        return [_step_record(r) for r in rows]
