"""Conformance, part three: what ``gc`` removes and keeps, and what ``stats`` counts.

Imported by :mod:`musubi_core.testing.conformance`, so a backend that runs that suite runs these
too (they use its ``store`` fixture). A backend that cannot measure its own size (PostgreSQL)
must refuse ``max_bytes`` and ``vacuum`` with a :class:`~musubi_core.errors.ConfigError`; one
that can (SQLite) must evict the least recently used entries first and never a protected one.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from ..errors import ConfigError
from ..store.base import FlowWrite, Store
from .conformance import artifact, done_node, hexid, node, status_of
from .conformance_calls import _run, call

__all__ = [
    "test_store_gc_dry_run_removes_nothing_and_lists_what_would_go",
    "test_store_gc_keeps_the_record_longer_than_the_memo",
    "test_store_gc_max_bytes_evicts_least_recently_used_first",
    "test_store_gc_removes_by_age_and_keeps_what_must_stay",
    "test_store_stats_replay_rate_counts_replayable_kinds_only",
]

HOUR = 3600.0


def _counts(store: Store) -> tuple[int, int, int, int]:
    stats = store.stats()
    calls = sum(len(store.run_calls(r.run_id)) for r in store.list_runs(limit=1000))
    return stats["nodes"], stats["artifacts"], stats["runs"], calls


def test_store_gc_removes_by_age_and_keeps_what_must_stay(store: Store) -> None:
    old_done = done_node(store, "gc-done", b"done-output")
    stale = done_node(store, "gc-stale", b"stale-output")
    store.invalidate(stale)
    pending = hexid("gc-pending")
    store.write([node(pending, status="pending")], [], [])
    effect = done_node(store, "gc-effect", b"effect-output", step_type="external_effect")
    orphan = artifact(b"nobody uses me", hexid("gone"))
    store.write((), [orphan], ())
    # Without an age only unreferenced artifacts go.
    report = store.gc(now=time.time())
    assert (report["nodes"], report["artifacts"], report["dry_run"]) == (0, 1, False)
    assert store.get_artifact(orphan.artifact_id) is None
    assert store.stats()["nodes"] == 4
    # Nothing is old enough yet.
    assert store.gc(older_than=HOUR, now=time.time())["nodes"] == 0
    # An hour later: done and stale nodes go with their outputs; a pending node and an
    # external effect's record stay, whatever their age.
    report = store.gc(older_than=60, now=time.time() + HOUR)
    assert (report["nodes"], report["artifacts"]) == (2, 2)
    assert store.get_node(old_done) is None and store.get_node(stale) is None
    assert status_of(store, pending) == "pending"
    kept = store.get_node(effect)
    assert kept is not None and kept.artifact_id is not None
    assert store.get_artifact(kept.artifact_id) is not None
    with pytest.raises(ConfigError):
        store.gc(older_than=-1)


def test_store_gc_dry_run_removes_nothing_and_lists_what_would_go(store: Store) -> None:
    old = [done_node(store, ("dry", i), f"output {i}".encode()) for i in range(3)]
    store.write(
        calls=[call("dry-c0", 0, run_id="dry-run", artifact_id=hexid("dry-art"))],
        runs=[_run("dry-run", status="done", finished_at=time.time())],
    )
    orphan = artifact(b"unreferenced", hexid("dry-orphan"))
    store.write((), [orphan], ())
    before = _counts(store)
    later = time.time() + HOUR
    dry = store.gc(older_than=60, now=later, dry_run=True, ids=True)
    assert dry["dry_run"] is True
    assert (dry["nodes"], dry["runs"], dry["calls"]) == (3, 1, 1)
    assert dry["artifacts"] == 4  # the three nodes' outputs and the orphan
    assert sorted(dry["ids"]["nodes"]) == sorted(old)
    assert dry["ids"]["runs"] == ["dry-run"] and dry["ids"]["calls"] == ["dry-c0"]
    assert orphan.artifact_id in dry["ids"]["artifacts"]
    assert _counts(store) == before  # nothing removed
    assert store.get_artifact(orphan.artifact_id) is not None
    real = store.gc(older_than=60, now=later, ids=True)
    for key in ("nodes", "artifacts", "runs", "calls", "flows", "edges"):
        assert real[key] == dry[key], key
    assert sorted(real["ids"]["nodes"]) == sorted(dry["ids"]["nodes"])
    assert _counts(store) == (0, 0, 0, 0)


def test_store_gc_keeps_the_record_longer_than_the_memo(store: Store) -> None:
    now = time.time()
    retrieved = artifact(b"documents a retriever returned", hexid("retriever-out"))
    answer = done_node(store, "llm-answer", b"the answer")
    answer_node = store.get_node(answer)
    assert answer_node is not None and answer_node.artifact_id is not None
    answer_art = answer_node.artifact_id
    store.write(
        (), [retrieved], (),
        calls=[
            call("old-r", 0, run_id="old", kind="retriever", artifact_id=retrieved.artifact_id,
                 started_at=now - 3 * HOUR),
            call("old-m", 1, run_id="old", kind="chat_model", node_id=answer,
                 artifact_id=answer_art, started_at=now - 3 * HOUR),
            call("new-m", 0, run_id="new", kind="chat_model", node_id=answer, replayed=1,
                 artifact_id=answer_art, started_at=now),
            call("durable-s", 0, run_id="unfinished", kind="run_step", started_at=now - 9 * HOUR),
        ],
        flows=[FlowWrite("old-m", "old-r", retrieved.artifact_id), FlowWrite("new-m", "old-m")],
        runs=[
            _run("old", status="done", started_at=now - 3 * HOUR, finished_at=now - 3 * HOUR),
            _run("new", status="done", started_at=now, finished_at=now),
            _run("unfinished", kind="durable", status="failed", started_at=now - 9 * HOUR,
                 finished_at=now - 9 * HOUR),
        ],
    )
    # An output only the record refers to (a retriever's) is not garbage.
    assert store.gc(now=now)["artifacts"] == 0
    assert store.get_artifact(retrieved.artifact_id) is not None
    # The memo may go sooner than the record: an entry unused for an hour goes, runs stay.
    report = store.gc(older_than=HOUR, records_older_than=24 * HOUR, now=now + 2 * HOUR)
    assert (report["nodes"], report["runs"], report["calls"]) == (1, 0, 0)
    assert store.get_node(answer) is None
    # Its output stays while calls of the record refer to it.
    assert store.get_artifact(answer_art) is not None
    assert {r.run_id for r in store.list_runs()} == {"old", "new", "unfinished"}
    # Two hours of record: the old run goes whole (its calls, the flows touching them, the
    # retriever's output only it referred to); the recent run and the unfinished durable run
    # (which resumes from its steps, however old) stay.
    report = store.gc(older_than=2 * HOUR, now=now)
    assert (report["runs"], report["calls"], report["flows"]) == (1, 2, 2)
    assert {r.run_id for r in store.list_runs()} == {"new", "unfinished"}
    assert store.get_call("old-r") is None and store.get_call("new-m") is not None
    assert store.call_flows("new-m") == []
    assert store.get_artifact(retrieved.artifact_id) is None
    assert store.get_artifact(answer_art) is not None  # "new-m" still refers to it
    assert [c.call_id for c in store.run_calls("unfinished")] == ["durable-s"]


def test_store_stats_replay_rate_counts_replayable_kinds_only(store: Store) -> None:
    now = time.time()
    llm = [done_node(store, ("rate-llm", i), kind="chat_model", tokens_in=10, tokens_out=5)
           for i in range(4)]
    store.add_replays(dict.fromkeys(llm, 1), now)  # every model call replayed once
    # Kinds that run every time: legacy chain nodes and a durable run's own node.
    for i in range(10):
        store.write([node(hexid(("rate-chain", i)), kind="chain")], [], [])
    run_node = hexid("rate-run")
    for _ in range(3):
        store.write([node(run_node, kind="run")], [], [])
    store.write(runs=[_run("rate-r", kind="langchain", status="done", calls=14, replays=4)])
    stats = store.stats()
    assert (stats["executions"], stats["replays"]) == (4, 4)
    assert stats["replay_rate"] == 0.5
    assert stats["tokens_saved"] == 60
    assert stats["nodes"] == 15
    model, chain, run = (stats["by_kind"][k] for k in ("chat_model", "chain", "run"))
    assert (model["replayable"], model["replay_rate"], model["executions"]) == (True, 0.5, 4)
    assert (chain["replayable"], chain["replay_rate"], chain["executions"]) == (False, None, 10)
    assert (run["replayable"], run["executions"]) == (False, 3)
    assert stats["runs_by_kind"]["langchain"]["calls"] == 14
    assert (stats["calls"], stats["call_replays"]) == (14, 4)


def _measurable(store: Store) -> bool:
    try:
        store.gc(max_bytes=10**15, dry_run=True)
    except ConfigError:
        return False
    return True


def test_store_gc_max_bytes_evicts_least_recently_used_first(store: Store) -> None:
    if not _measurable(store):
        # A backend that cannot measure itself says so, and what to use instead.
        with pytest.raises(ConfigError, match="older-than"):
            store.gc(max_bytes=1000)
        with pytest.raises(ConfigError, match="VACUUM"):
            store.gc(vacuum=True)
        return
    payload = 20_000
    base = time.time() - 100 * HOUR
    ids: list[str] = []
    for i in range(40):  # the oldest first: entry i was last used at base + i hours
        extra: dict[str, Any] = {"finished_at": base + i * HOUR}
        if i == 0:
            extra["step_type"] = "external_effect"
        ids.append(done_node(store, ("lru", i), bytes([i]) * payload, **extra))
    pending = hexid("lru-pending")
    store.write([node(pending, status="pending", finished_at=base)], [], [])
    # Entry 1, the second oldest by its record, was replayed just now: the most recent use.
    store.add_replays({ids[1]: 1}, time.time())
    used = store.gc(dry_run=True)["bytes_before"]
    limit = used - 15 * payload
    report = store.gc(max_bytes=limit)
    assert report["bytes_after"] <= limit < report["bytes_before"]
    assert not report["over_limit"] and report["evicted"] == report["nodes"] >= 15
    gone = [i for i, nid in enumerate(ids) if store.get_node(nid) is None]
    # The least recently used went, in order: 2, 3, ... (0 is an external effect, 1 was
    # replayed); their outputs with them.
    assert gone == list(range(2, 2 + len(gone)))
    assert report["artifacts"] == len(gone)
    assert store.get_node(ids[0]) is not None and store.get_node(ids[1]) is not None
    assert status_of(store, pending) == "pending"
    # Under the limit: nothing more goes.
    assert store.gc(max_bytes=limit)["nodes"] == 0
    with pytest.raises(ConfigError):
        store.gc(max_bytes=0)
