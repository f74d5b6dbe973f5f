"""The store conformance suite: what every :class:`~musubi_core.store.Store` must do.

A backend's test module runs the whole suite with two lines plus a fixture::

    from musubi_core.testing.conformance import *  # noqa: F403

    @pytest.fixture
    def store_factory(tmp_path):
        counter = itertools.count()
        return lambda: SQLiteStore(tmp_path / f"store-{next(counter)}.db")

``store_factory()`` returns a new, empty, open store on every call. The
``store`` fixture defined here builds one from it and closes it afterwards.

The tests talk to the store through the protocol only, so they hold for any
backend: node ids are 64-hex strings (as the engine makes them), artifacts are
content-addressed, writes are atomic upserts.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ..errors import MusubiError, NodeNotFoundError, StoreError
from ..store.base import ArtifactWrite, EdgeWrite, NodeRecord, NodeWrite, Store

StoreFactory = Callable[[], Store]

OP = "conformance.op"


# -- helpers ----------------------------------------------------------------------------


def hexid(seed: object) -> str:
    """A 64-hex id, as the engine makes node and artifact ids."""
    return hashlib.sha256(repr(seed).encode("utf-8")).hexdigest()


def node(
    node_id: str,
    *,
    status: str = "done",
    artifact_id: str | None = None,
    op_name: str = OP,
    op: str | None = None,
    input_hash: str | None = None,
    kind: str = "step",
    step_type: str = "deterministic",
    executed: int = 1,
    **extra: Any,
) -> NodeWrite:
    """A :class:`NodeWrite` with sensible defaults for the tests."""
    now = time.time()
    fields: dict[str, Any] = {
        "started_at": now,
        "finished_at": now if status in ("done", "failed") else None,
    }
    fields.update(extra)
    return NodeWrite(
        node_id=node_id,
        op=op or f"{op_name}#v1",
        op_name=op_name,
        kind=kind,
        step_type=step_type,
        input_hash=input_hash or hexid(("input", node_id)),
        status=status,
        artifact_id=artifact_id,
        executed=executed,
        **fields,
    )


def artifact(payload: bytes, producer: str, encoding: str = "test/1") -> ArtifactWrite:
    return ArtifactWrite(hexid((encoding, payload)), encoding, payload, producer)


def done_node(store: Store, seed: object, payload: bytes | None = None, **extra: Any) -> str:
    """Write one done node with its own artifact; return its id."""
    nid = hexid(seed)
    art = artifact(payload if payload is not None else repr(seed).encode(), nid)
    store.write([node(nid, artifact_id=art.artifact_id, **extra)], [art], [])
    return nid


def build_graph(store: Store, edges: list[tuple[str, str]], names: list[str]) -> dict[str, str]:
    """Write done nodes named ``names`` and data edges between them in one write."""
    ids = {name: hexid(("graph", name)) for name in names}
    arts = {name: artifact(name.encode(), ids[name]) for name in names}
    store.write(
        [node(ids[n], artifact_id=arts[n].artifact_id) for n in names],
        list(arts.values()),
        [EdgeWrite(ids[p], ids[c], "data", arts[p].artifact_id) for p, c in edges],
    )
    return ids


def status_of(store: Store, node_id: str) -> str | None:
    record = store.get_node(node_id)
    return None if record is None else record.status


# -- fixture ----------------------------------------------------------------------------


@pytest.fixture
def store(store_factory: StoreFactory) -> Iterator[Store]:
    """A fresh store from the backend's ``store_factory``, closed afterwards."""
    instance = store_factory()
    try:
        yield instance
    finally:
        instance.close()


# -- protocol and nodes -----------------------------------------------------------------


def test_store_satisfies_protocol(store: Store) -> None:
    assert isinstance(store, Store)
    assert isinstance(store.path, str)


def test_store_get_node_missing_is_none(store: Store) -> None:
    assert store.get_node(hexid("nothing")) is None
    assert store.get_node_and_artifact(hexid("nothing")) is None


def test_store_write_then_read_keeps_every_field(store: Store) -> None:
    nid = hexid("full")
    art = artifact(b"payload-bytes", nid, encoding="enc/9")
    before = time.time()
    store.write(
        [
            node(
                nid,
                artifact_id=art.artifact_id,
                kind="llm",
                step_type="stochastic",
                namespace="ns1",
                started_at=100.0,
                finished_at=101.5,
                expires_at=200.0,
                duration_s=1.5,
                tokens_in=7,
                tokens_out=11,
                label="my label",
                run_id="run-1",
                meta='{"k": 1}',
            )
        ],
        [art],
        [],
    )
    after = time.time()
    rec = store.get_node(nid)
    assert rec is not None
    assert (rec.node_id, rec.op, rec.op_name, rec.kind, rec.step_type) == (
        nid, f"{OP}#v1", OP, "llm", "stochastic",
    )
    assert rec.input_hash == hexid(("input", nid))
    assert rec.status == "done"
    assert rec.artifact_id == art.artifact_id
    assert rec.producer_node_id == nid
    assert rec.namespace == "ns1"
    assert before - 1 <= rec.created_at <= after + 1
    assert (rec.started_at, rec.finished_at, rec.expires_at, rec.duration_s) == (
        100.0, 101.5, 200.0, 1.5,
    )
    assert (rec.tokens_in, rec.tokens_out, rec.tokens) == (7, 11, 18)
    assert (rec.replay_count, rec.exec_count) == (0, 1)
    assert (rec.label, rec.run_id, rec.meta, rec.error, rec.stale_cause) == (
        "my label", "run-1", '{"k": 1}', None, None,
    )


def test_store_get_node_and_artifact_in_one_call(store: Store) -> None:
    nid = done_node(store, "with-artifact", b"\x00\xffbinary")
    found = store.get_node_and_artifact(nid)
    assert found is not None
    rec, encoding, payload = found
    assert rec.node_id == nid and rec.status == "done"
    assert encoding == "test/1"
    assert payload is not None and bytes(payload) == b"\x00\xffbinary"

    bare = hexid("no-artifact")
    store.write([node(bare, status="pending")], [], [])
    found = store.get_node_and_artifact(bare)
    assert found is not None
    assert found[0].status == "pending" and found[1:] == (None, None)

    dangling = hexid("dangling")
    store.write([node(dangling, artifact_id=hexid("never-written"))], [], [])
    found = store.get_node_and_artifact(dangling)
    assert found is not None
    assert found[0].artifact_id == hexid("never-written")
    assert found[1:] == (None, None)


def test_store_write_is_an_upsert(store: Store) -> None:
    nid = hexid("upsert")
    first = artifact(b"one", nid)
    store.write([node(nid, artifact_id=first.artifact_id, label="first", tokens_in=3)], [first], [])
    # Second write: new status and error, no artifact, no label: those are kept.
    store.write([node(nid, status="failed", error="boom", executed=1)], [], [])
    rec = store.get_node(nid)
    assert rec is not None
    assert rec.status == "failed" and rec.error == "boom"
    assert rec.artifact_id == first.artifact_id
    assert rec.label == "first" and rec.tokens_in == 3
    assert rec.exec_count == 2
    # executed=0 (e.g. an intent row) does not count as an execution.
    second = artifact(b"two", nid)
    store.write([node(nid, artifact_id=second.artifact_id, executed=0)], [second], [])
    rec = store.get_node(nid)
    assert rec is not None
    assert rec.status == "done" and rec.error is None
    assert rec.artifact_id == second.artifact_id
    assert rec.exec_count == 2
    assert store.stats()["nodes"] == 1


def test_store_write_clears_stale_cause(store: Store) -> None:
    nid = done_node(store, "restale")
    assert store.invalidate(nid) == 1
    rec = store.get_node(nid)
    assert rec is not None and rec.status == "stale" and rec.stale_cause == "invalidated"
    art = artifact(b"again", nid)
    store.write([node(nid, artifact_id=art.artifact_id)], [art], [])
    rec = store.get_node(nid)
    assert rec is not None and rec.status == "done" and rec.stale_cause is None


def test_store_write_of_new_outputs_makes_their_descendants_stale(store: Store) -> None:
    """One write that replaces some nodes' outputs (a forced re-run, an expired TTL) and not
    others: exactly the data-descendants of the replaced outputs go stale, the rewritten nodes
    themselves stay done, and a node new to the store changes nothing."""
    ids = build_graph(
        store,
        [("a", "a1"), ("a1", "a2"), ("b", "b1"), ("c", "c1")],
        ["a", "a1", "a2", "b", "b1", "c", "c1"],
    )
    new_a = artifact(b"a, again and different", ids["a"])
    same_b = artifact(b"b", ids["b"])  # the output it already has
    new_c = artifact(b"c, again and different", ids["c"])
    fresh = hexid("fresh")
    fresh_art = artifact(b"fresh", fresh)
    store.write(
        [
            node(ids["a"], artifact_id=new_a.artifact_id),
            node(ids["b"], artifact_id=same_b.artifact_id),
            node(ids["c"], artifact_id=new_c.artifact_id),
            node(fresh, artifact_id=fresh_art.artifact_id),
        ],
        [new_a, same_b, new_c, fresh_art],
        [],
    )
    assert {n: status_of(store, ids[n]) for n in ids} == {
        "a": "done",
        "a1": "stale",
        "a2": "stale",
        "b": "done",
        "b1": "done",
        "c": "done",
        "c1": "stale",
    }
    assert status_of(store, fresh) == "done"


def test_store_write_is_atomic(store: Store) -> None:
    good = hexid("atomic-good")
    bad = hexid("atomic-bad")
    art = artifact(b"atomic", good)
    with pytest.raises(MusubiError):
        store.write(
            [node(good, artifact_id=art.artifact_id), node(bad, status="not-a-status")],
            [art],
            [EdgeWrite(good, bad)],
        )
    assert store.get_node(good) is None
    assert store.get_node(bad) is None
    assert store.get_artifact(art.artifact_id) is None
    assert store.edges(good) == []


def test_store_empty_write_is_a_no_op(store: Store) -> None:
    store.write()
    store.write([], [], [])
    assert store.stats()["nodes"] == 0


def test_store_is_thread_safe(store: Store) -> None:
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            for i in range(40):
                done_node(store, ("thread", t, i))
                assert store.get_node(hexid(("thread", t, i))) is not None
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.stats()["nodes"] == 160


# -- artifacts --------------------------------------------------------------------------


def test_store_artifacts_are_content_addressed_first_producer_kept(store: Store) -> None:
    first = hexid("producer-1")
    second = hexid("producer-2")
    shared_first = artifact(b"same output", first)
    shared_second = artifact(b"same output", second)
    assert shared_first.artifact_id == shared_second.artifact_id
    store.write([node(first, artifact_id=shared_first.artifact_id)], [shared_first], [])
    store.write([node(second, artifact_id=shared_second.artifact_id)], [shared_second], [])
    assert store.artifact_producer(shared_first.artifact_id) == first
    rec = store.get_node(second)
    assert rec is not None
    assert rec.artifact_id == shared_first.artifact_id
    assert rec.producer_node_id == first
    stats = store.stats()
    assert stats["artifacts"] == 1
    assert stats["artifact_bytes"] == len(b"same output")
    got = store.get_artifact(shared_first.artifact_id)
    assert got is not None and got[0] == "test/1" and bytes(got[1]) == b"same output"


def test_store_missing_artifact_reads(store: Store) -> None:
    assert store.get_artifact(hexid("no such artifact")) is None
    assert store.artifact_producer(hexid("no such artifact")) is None


def test_store_rewriting_an_artifact_repairs_a_damaged_payload(store: Store) -> None:
    """Content addressing means the payload of an id is fixed: writing it again
    with the right bytes repairs a damaged copy (so a recomputation heals a
    tampered store), and the first producer is still kept."""
    first = hexid("repair-1")
    good = artifact(b"the right bytes", first)
    damaged = ArtifactWrite(good.artifact_id, good.encoding, b"tampered", first)
    store.write([node(first, artifact_id=good.artifact_id)], [damaged], [])
    got = store.get_artifact(good.artifact_id)
    assert got is not None and bytes(got[1]) == b"tampered"
    second = hexid("repair-2")
    store.write(
        [node(second, artifact_id=good.artifact_id)],
        [ArtifactWrite(good.artifact_id, good.encoding, good.payload, second)],
        [],
    )
    got = store.get_artifact(good.artifact_id)
    assert got is not None and bytes(got[1]) == b"the right bytes"
    assert store.artifact_producer(good.artifact_id) == first
    assert store.stats()["artifacts"] == 1


# -- claims (EXTERNAL_EFFECT single flight) ---------------------------------------------


def _intent(node_id: str, owner: str) -> NodeWrite:
    return node(node_id, status="pending", owner=owner, executed=0, step_type="external_effect")


def test_store_claim_missing_node_is_claimed(store: Store) -> None:
    nid = hexid("claim-new")
    outcome = store.claim(_intent(nid, "me"), owner_alive=lambda n: True)
    assert outcome.state == "claimed" and outcome.node is None
    rec = store.get_node(nid)
    assert rec is not None and rec.status == "pending" and rec.owner == "me"
    assert rec.exec_count == 0


def test_store_claim_pending_under_live_owner_is_busy(store: Store) -> None:
    nid = hexid("claim-busy")
    store.claim(_intent(nid, "owner-a"), owner_alive=lambda n: True)
    seen: list[NodeRecord] = []

    def alive(n: NodeRecord) -> bool:
        seen.append(n)
        return True

    outcome = store.claim(_intent(nid, "owner-b"), owner_alive=alive)
    assert outcome.state == "busy"
    assert outcome.node is not None and outcome.node.owner == "owner-a"
    assert [n.owner for n in seen] == ["owner-a"]
    rec = store.get_node(nid)
    assert rec is not None and rec.owner == "owner-a"


def test_store_claim_pending_under_dead_owner_is_taken_over(store: Store) -> None:
    nid = hexid("claim-dead")
    store.claim(_intent(nid, "owner-a"), owner_alive=lambda n: True)
    outcome = store.claim(_intent(nid, "owner-b"), owner_alive=lambda n: False)
    assert outcome.state == "claimed"
    assert outcome.node is not None and outcome.node.owner == "owner-a"
    rec = store.get_node(nid)
    assert rec is not None and rec.status == "pending" and rec.owner == "owner-b"


def test_store_claim_by_the_same_owner_is_claimed(store: Store) -> None:
    nid = hexid("claim-same")
    store.claim(_intent(nid, "owner-a"), owner_alive=lambda n: True)
    outcome = store.claim(_intent(nid, "owner-a"), owner_alive=lambda n: True)
    assert outcome.state == "claimed"


def test_store_claim_owner_alive_may_raise_and_nothing_changes(store: Store) -> None:
    nid = hexid("claim-raise")
    store.claim(_intent(nid, "owner-a"), owner_alive=lambda n: True)

    class InDoubt(Exception):
        pass

    def doubt(n: NodeRecord) -> bool:
        raise InDoubt(n.node_id)

    with pytest.raises(InDoubt):
        store.claim(_intent(nid, "owner-b"), owner_alive=doubt)
    rec = store.get_node(nid)
    assert rec is not None and rec.status == "pending" and rec.owner == "owner-a"
    # The store is still usable afterwards (no transaction left open).
    done_node(store, "after-raise")
    assert status_of(store, hexid("after-raise")) == "done"


def test_store_claim_done_node_returns_done_unless_forced(store: Store) -> None:
    nid = done_node(store, "claim-done")
    outcome = store.claim(_intent(nid, "me"), owner_alive=lambda n: True)
    assert outcome.state == "done"
    assert outcome.node is not None and outcome.node.status == "done"
    assert status_of(store, nid) == "done"
    forced = store.claim(_intent(nid, "me"), owner_alive=lambda n: True, force=True)
    assert forced.state == "claimed"
    assert status_of(store, nid) == "pending"


def test_store_claim_failed_node_is_claimed(store: Store) -> None:
    nid = hexid("claim-failed")
    store.write([node(nid, status="failed", error="x")], [], [])
    assert store.claim(_intent(nid, "me"), owner_alive=lambda n: True).state == "claimed"


def test_store_claim_is_single_flight_across_threads(store: Store) -> None:
    nid = hexid("claim-race")
    states: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def contender(i: int) -> None:
        start.wait()
        outcome = store.claim(_intent(nid, f"owner-{i}"), owner_alive=lambda n: True)
        with lock:
            states.append(outcome.state)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(states) == ["busy"] * 5 + ["claimed"]


# -- replay counters --------------------------------------------------------------------


def test_store_add_replays_accumulates(store: Store) -> None:
    a = done_node(store, "replay-a", tokens_in=10, tokens_out=5, duration_s=2.0)
    b = done_node(store, "replay-b")
    store.add_replays({a: 2, b: 1}, time.time())
    store.add_replays({a: 3, hexid("unknown"): 4}, time.time())
    store.add_replays({}, time.time())
    ra, rb = store.get_node(a), store.get_node(b)
    assert ra is not None and rb is not None
    assert (ra.replay_count, rb.replay_count) == (5, 1)
    stats = store.stats()
    assert stats["replays"] == 6
    assert stats["executions"] == 2
    assert stats["tokens_saved"] == 5 * 15
    assert stats["seconds_saved"] == pytest.approx(10.0)
    assert store.get_node(hexid("unknown")) is None


# -- invalidation -----------------------------------------------------------------------


def test_store_invalidate_single_node(store: Store) -> None:
    nid = done_node(store, "lonely")
    other = done_node(store, "bystander")
    assert store.invalidate(nid) == 1
    rec = store.get_node(nid)
    assert rec is not None and rec.status == "stale" and rec.stale_cause == "invalidated"
    assert rec.artifact_id is not None
    assert status_of(store, other) == "done"


def test_store_invalidate_unknown_node_changes_nothing(store: Store) -> None:
    nid = done_node(store, "untouched")
    assert store.invalidate(hexid("ghost")) == 0
    assert status_of(store, nid) == "done"


def test_store_invalidate_chain_marks_exactly_the_descendants(store: Store) -> None:
    names = [f"n{i}" for i in range(10)]
    ids = build_graph(store, list(itertools.pairwise(names)), names)
    side = done_node(store, "side")
    assert store.invalidate(ids["n4"]) == 6
    for i, name in enumerate(names):
        expected = "stale" if i >= 4 else "done"
        assert status_of(store, ids[name]) == expected, name
    causes = {name: getattr(store.get_node(ids[name]), "stale_cause", None) for name in names}
    assert causes["n4"] == "invalidated"
    assert all(causes[f"n{i}"] == "upstream" for i in range(5, 10))
    assert status_of(store, side) == "done"


def test_store_invalidate_diamond_counts_each_node_once(store: Store) -> None:
    #     a
    #    / \
    #   b   c     x (unrelated child of c's sibling)
    #    \ /
    #     d -> e
    ids = build_graph(
        store,
        [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("d", "e"), ("y", "x")],
        ["a", "b", "c", "d", "e", "x", "y"],
    )
    assert store.invalidate(ids["b"]) == 3  # b, d, e
    assert {n: status_of(store, i) for n, i in ids.items()} == {
        "a": "done", "b": "stale", "c": "done", "d": "stale", "e": "stale",
        "x": "done", "y": "done",
    }
    # Already-stale descendants are not counted again.
    assert store.invalidate(ids["a"]) == 2  # a, c
    assert all(status_of(store, ids[n]) == "stale" for n in "abcde")
    assert status_of(store, ids["x"]) == "done"


def test_store_invalidate_follows_data_edges_only(store: Store) -> None:
    ids = build_graph(store, [("p", "q")], ["p", "q", "r"])
    store.write((), (), [EdgeWrite(ids["p"], ids["r"], "contains")])
    assert store.invalidate(ids["p"]) == 2
    assert status_of(store, ids["q"]) == "stale"
    assert status_of(store, ids["r"]) == "done"


def test_store_invalidate_survives_cycles(store: Store) -> None:
    ids = build_graph(store, [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")], list("abcd"))
    assert store.invalidate(ids["b"]) == 4
    assert all(status_of(store, i) == "stale" for i in ids.values())


def test_store_invalidate_stacked_diamonds_is_linear(store: Store) -> None:
    """50 stacked diamonds have 2**50 paths; a visited-set walk touches 151 nodes."""
    names = ["top"]
    edges: list[tuple[str, str]] = []
    for level in range(50):
        left, right, bottom = f"l{level}", f"r{level}", f"b{level}"
        top = names[-1] if level == 0 else f"b{level - 1}"
        edges += [(top, left), (top, right), (left, bottom), (right, bottom)]
        names += [left, right, bottom]
    ids = build_graph(store, edges, names)
    started = time.perf_counter()
    changed = store.invalidate(ids["top"])
    elapsed = time.perf_counter() - started
    print(f"invalidate 50 stacked diamonds ({len(names)} nodes): {elapsed * 1000:.1f} ms")
    assert changed == 151
    assert store.stats()["statuses"] == {"stale": 151}


def test_store_mark_fresh(store: Store) -> None:
    """Early cutoff: a node stale only because of an upstream is revived when
    (checked atomically) every data parent is done with the consumed artifact."""
    ids = build_graph(store, [("a", "b"), ("b", "c")], ["a", "b", "c"])
    failed = hexid("fresh-failed")
    store.write([node(failed, status="failed", error="x")], [], [])
    assert store.invalidate(ids["a"]) == 3
    # The parent is still stale: nothing is revived.
    assert store.mark_fresh(ids["b"]) is False
    assert status_of(store, ids["b"]) == "stale"
    # The parent was itself invalidated (not by an upstream): never revived here.
    assert store.mark_fresh(ids["a"]) is False
    # The parent re-ran with the same output: the child comes back.
    same = artifact(b"a", ids["a"])
    store.write([node(ids["a"], artifact_id=same.artifact_id)], [same], [])
    assert store.mark_fresh(ids["b"]) is True
    rec = store.get_node(ids["b"])
    assert rec is not None and rec.status == "done" and rec.stale_cause is None
    assert store.mark_fresh(ids["b"]) is False  # already done
    # c's parent b is back with the artifact c consumed.
    assert store.mark_fresh(ids["c"]) is True
    # A parent that came back with a different output does not revive.
    store.invalidate(ids["b"])
    other = artifact(b"b changed", ids["b"])
    store.write([node(ids["b"], artifact_id=other.artifact_id)], [other], [])
    assert store.mark_fresh(ids["c"]) is False
    assert status_of(store, ids["c"]) == "stale"
    assert store.mark_fresh(failed) is False
    assert status_of(store, failed) == "failed"
    assert store.mark_fresh(hexid("ghost")) is False
    assert store.get_node(hexid("ghost")) is None


# -- graph reads ------------------------------------------------------------------------


def test_store_data_parents_report_consumed_and_current_artifacts(store: Store) -> None:
    ids = build_graph(store, [("a", "c"), ("b", "c")], ["a", "b", "c"])
    ghost = hexid("ghost-parent")
    store.write(
        (),
        (),
        [
            EdgeWrite(ghost, ids["c"], "data", hexid("ghost-art")),
            EdgeWrite(hexid("container"), ids["c"], "contains"),
        ],
    )
    # b is recomputed with a different output.
    new_b = artifact(b"b changed", ids["b"])
    store.write([node(ids["b"], artifact_id=new_b.artifact_id)], [new_b], [])
    parents = {p.parent: p for p in store.data_parents(ids["c"])}
    assert set(parents) == {ids["a"], ids["b"], ghost}
    a, b, g = parents[ids["a"]], parents[ids["b"]], parents[ghost]
    assert a.status == "done" and a.consumed_artifact_id == a.current_artifact_id
    assert a.consumed_artifact_id == hexid(("test/1", b"a"))
    assert b.status == "done" and b.current_artifact_id == new_b.artifact_id
    assert b.consumed_artifact_id == hexid(("test/1", b"b"))
    assert g.status is None and g.current_artifact_id is None
    assert g.consumed_artifact_id == hexid("ghost-art")
    assert store.data_parents(ids["a"]) == []


def test_store_similar_nodes_and_nodes_of_op(store: Store) -> None:
    shared_input = hexid("shared-input")
    old = done_node(store, "sim-old", op="op.sim#old", op_name="op.sim", input_hash=shared_input)
    time.sleep(0.01)
    new = done_node(store, "sim-new", op="op.sim#new", op_name="op.sim", input_hash=shared_input)
    done_node(store, "sim-other-input", op="op.sim#new", op_name="op.sim")
    done_node(store, "sim-other-op", op="op.other#x", op_name="op.other", input_hash=shared_input)
    similar = store.similar_nodes("op.sim", shared_input)
    assert [n.node_id for n in similar] == [new, old]
    assert [n.node_id for n in store.similar_nodes("op.sim", shared_input, limit=1)] == [new]
    assert store.similar_nodes("op.none", shared_input) == []
    of_op = store.nodes_of_op("op.sim", limit=10)
    assert len(of_op) == 3 and {n.op_name for n in of_op} == {"op.sim"}
    assert len(store.nodes_of_op("op.sim", limit=1)) == 1
    assert store.nodes_of_op("op.none") == []


def test_store_similar_nodes_and_nodes_of_op_keep_to_a_namespace(store: Store) -> None:
    shared_input = hexid("ns-shared-input")
    same: dict[str, Any] = {"op": "op.ns#v1", "op_name": "op.ns", "input_hash": shared_input}
    alpha = done_node(store, "ns-alpha", namespace="alpha", **same)
    beta = done_node(store, "ns-beta", namespace="beta", **same)
    assert {n.node_id for n in store.similar_nodes("op.ns", shared_input)} == {alpha, beta}
    assert [n.node_id for n in store.similar_nodes("op.ns", shared_input, namespace="beta")] == [
        beta
    ]
    assert store.similar_nodes("op.ns", shared_input, namespace="gamma") == []
    assert [n.node_id for n in store.nodes_of_op("op.ns", 10, namespace="alpha")] == [alpha]
    assert len(store.nodes_of_op("op.ns", limit=10)) == 2


def test_store_invalidate_namespace_changes_exactly_that_namespace(store: Store) -> None:
    ids = {
        (ns, kind): done_node(store, ("ns-clear", ns, kind), namespace=ns, kind=kind)
        for ns in ("alpha", "beta", "default")
        for kind in ("llm", "chat_model", "step")
    }
    effect = done_node(
        store, "ns-clear-effect", namespace="alpha", step_type="external_effect"
    )
    failed = hexid("ns-clear-failed")
    store.write([node(failed, status="failed", error="x", namespace="alpha", kind="llm")])
    # A data child in another namespace is not the cleared namespace's entry.
    child = done_node(store, "ns-clear-child", namespace="beta")
    store.write(edges=[EdgeWrite(ids["alpha", "llm"], child, "data")])

    assert store.invalidate_namespace("alpha", kinds=("llm", "chat_model")) == 2
    for (ns, kind), nid in ids.items():
        expected = "stale" if ns == "alpha" and kind != "step" else "done"
        assert status_of(store, nid) == expected, (ns, kind)
    rec = store.get_node(ids["alpha", "llm"])
    assert rec is not None and rec.stale_cause == "invalidated"
    assert status_of(store, child) == "done"
    assert status_of(store, failed) == "failed"
    # Every kind of the namespace; never an external effect (its record stops a repeat).
    assert store.invalidate_namespace("alpha") == 1
    assert status_of(store, ids["alpha", "step"]) == "stale"
    assert status_of(store, effect) == "done"
    assert store.invalidate_namespace("alpha") == 0
    assert store.invalidate_namespace("beta", kinds=()) == 0
    assert status_of(store, ids["beta", "llm"]) == "done"
    assert store.invalidate_namespace("nobody") == 0


def test_store_invalidate_namespace_of_some_operations(store: Store) -> None:
    ids = {
        (ns, op): done_node(
            store, ("ns-clear-op", ns, op), namespace=ns, kind="graph_node", op_name=op
        )
        for ns in ("alpha", "beta")
        for op in ("lg:a", "lg:b", "lg:c")
    }
    assert store.invalidate_namespace("alpha", kinds=("graph_node",), ops=("lg:a", "lg:c")) == 2
    for (ns, op), nid in ids.items():
        expected = "stale" if ns == "alpha" and op != "lg:b" else "done"
        assert status_of(store, nid) == expected, (ns, op)
    assert store.invalidate_namespace("alpha", ops=()) == 0
    assert store.invalidate_namespace("beta", ops=("lg:b",)) == 1
    assert status_of(store, ids["beta", "lg:b"]) == "stale"


def test_store_write_gives_a_node_to_the_namespace_that_writes_it(store: Store) -> None:
    # A row an older musubi wrote in another namespace at what is now this namespace's id:
    # the writer's namespace takes it over, and a claim treats it as absent.
    nid = done_node(store, "ns-takeover", namespace="alpha")
    art = artifact(b"mine", nid)
    store.write([node(nid, artifact_id=art.artifact_id)], [art])
    rec = store.get_node(nid)
    assert rec is not None and rec.namespace == "default" and rec.artifact_id == art.artifact_id
    effect = done_node(store, "ns-takeover-effect", namespace="alpha")
    claimed = store.claim(_intent(effect, "me"), owner_alive=lambda n: True)
    assert claimed.state == "claimed"
    rec = store.get_node(effect)
    assert rec is not None and rec.status == "pending" and rec.namespace == "default"


def test_store_resolve_prefixes(store: Store) -> None:
    ids = [done_node(store, ("resolve", i)) for i in range(40)]
    target = ids[0]
    assert store.resolve(target) == target
    # The shortest prefix unique among the 40 ids resolves to the full id.
    length = next(
        n for n in range(1, 65) if sum(1 for i in ids if i.startswith(target[:n])) == 1
    )
    assert store.resolve(target[:length]) == target
    assert store.resolve(target[: length + 4]) == target
    # A one-character prefix shared by several ids is ambiguous and says so.
    shared = next(c for c in "0123456789abcdef" if sum(1 for i in ids if i.startswith(c)) >= 2)
    with pytest.raises(NodeNotFoundError) as ambiguous:
        store.resolve(shared)
    assert ambiguous.value.candidates
    assert all(c.startswith(shared) for c in ambiguous.value.candidates)
    assert "ambiguous" in str(ambiguous.value)
    free = next(
        c + d
        for c in "0123456789abcdef"
        for d in "0123456789abcdef"
        if not any(i.startswith(c + d) for i in ids)
    )
    with pytest.raises(NodeNotFoundError):
        store.resolve(free)
    with pytest.raises(NodeNotFoundError):
        store.resolve("not-hex!")
    with pytest.raises(NodeNotFoundError):
        store.resolve("")


def test_store_edges_lists_both_directions_and_upserts(store: Store) -> None:
    ids = build_graph(store, [("a", "b"), ("b", "c")], ["a", "b", "c"])
    store.write((), (), [EdgeWrite(ids["a"], ids["b"], "contains")])
    edges = store.edges(ids["b"])
    assert {(e.parent, e.child, e.kind) for e in edges} == {
        (ids["a"], ids["b"], "data"),
        (ids["a"], ids["b"], "contains"),
        (ids["b"], ids["c"], "data"),
    }
    consumed = {(e.parent, e.kind): e.parent_artifact_id for e in edges}
    assert consumed[(ids["a"], "data")] == hexid(("test/1", b"a"))
    assert consumed[(ids["a"], "contains")] is None
    # Writing the same edge again without an artifact keeps the recorded one.
    store.write((), (), [EdgeWrite(ids["a"], ids["b"], "data", None)])
    again = [e for e in store.edges(ids["b"]) if e.kind == "data" and e.parent == ids["a"]]
    assert len(again) == 1 and again[0].parent_artifact_id == hexid(("test/1", b"a"))
    assert store.edges(hexid("ghost")) == []


def test_store_lineage_walks_up_and_down(store: Store) -> None:
    ids = build_graph(
        store, [("a", "b"), ("b", "c"), ("c", "d"), ("x", "c")], ["a", "b", "c", "d", "x", "z"]
    )
    store.write((), (), [EdgeWrite(ids["z"], ids["c"], "contains")])
    nodes, edges = store.lineage(ids["c"])
    assert {n.node_id for n in nodes} == {ids[k] for k in "abcdxz"}
    assert len(edges) == 5
    up, _ = store.lineage(ids["c"], downstream=False)
    assert {n.node_id for n in up} == {ids[k] for k in "abcxz"}
    down, down_edges = store.lineage(ids["c"], upstream=False)
    assert {n.node_id for n in down} == {ids["c"], ids["d"]}
    assert [(e.parent, e.child) for e in down_edges] == [(ids["c"], ids["d"])]
    near, _ = store.lineage(ids["d"], downstream=False, depth=1)
    assert {n.node_id for n in near} == {ids["c"], ids["d"]}
    alone, no_edges = store.lineage(ids["z"], upstream=False, downstream=False)
    assert [n.node_id for n in alone] == [ids["z"]] and no_edges == []


def test_store_list_nodes_filters_and_orders_newest_first(store: Store) -> None:
    made = []
    for i in range(6):
        made.append(done_node(store, ("list", i), kind="llm" if i % 2 else "step"))
        time.sleep(0.002)
    failed = hexid("list-failed")
    store.write([node(failed, status="failed", kind="tool")], [], [])
    everything = store.list_nodes(limit=100)
    assert len(everything) == 7
    stamps = [n.created_at for n in everything]
    assert stamps == sorted(stamps, reverse=True)
    assert everything[0].node_id == failed
    assert len(store.list_nodes(limit=3)) == 3
    assert {n.node_id for n in store.list_nodes(kind="llm")} == {made[1], made[3], made[5]}
    assert [n.node_id for n in store.list_nodes(status="failed")] == [failed]
    assert store.list_nodes(kind="llm", status="failed") == []


def test_store_stats(store: Store) -> None:
    empty = store.stats()
    assert (empty["nodes"], empty["executions"], empty["replays"], empty["artifacts"]) == (0, 0, 0, 0)
    a = done_node(store, "stats-a", b"12345", kind="llm", tokens_in=100, tokens_out=20)
    done_node(store, "stats-b", b"123", kind="step")
    store.write([node(hexid("stats-c"), status="failed", kind="step")], [], [])
    store.add_replays({a: 3}, time.time())
    stats = store.stats()
    assert stats["nodes"] == 3
    assert stats["executions"] == 3
    assert stats["replays"] == 3
    assert stats["tokens_saved"] == 360
    assert stats["statuses"] == {"done": 2, "failed": 1}
    assert (stats["artifacts"], stats["artifact_bytes"]) == (2, 8)
    assert stats["by_kind"]["llm"]["nodes"] == 1
    assert stats["by_kind"]["llm"]["replays"] == 3
    assert stats["by_kind"]["step"]["nodes"] == 2


def test_store_check(store: Store) -> None:
    done_node(store, "healthy")
    assert store.check() == []
    store.write([node(hexid("check-dangling"), artifact_id=hexid("missing-art"))], [], [])
    problems = store.check()
    assert len(problems) == 1 and "missing artifact" in problems[0]
    store.write([node(hexid("check-pending"), status="pending")], [], [])
    problems = store.check()
    assert len(problems) == 2 and any("pending" in p for p in problems)


def test_store_close_then_use_raises_store_error(store_factory: StoreFactory) -> None:
    instance = store_factory()
    done_node(instance, "before-close")
    instance.close()
    instance.close()  # idempotent
    with pytest.raises(StoreError):
        instance.get_node(hexid("before-close"))
    with pytest.raises(StoreError):
        done_node(instance, "after-close")


def test_store_factory_gives_independent_stores(store_factory: StoreFactory) -> None:
    first, second = store_factory(), store_factory()
    try:
        nid = done_node(first, "only-in-first")
        assert first.get_node(nid) is not None
        assert second.get_node(nid) is None
    finally:
        first.close()
        second.close()


# The record of what happened (calls, flows, runs) and the recorder: part two of the suite.
from .conformance_calls import *  # noqa: E402, F403

# What gc removes and keeps, and what stats counts: part three.
from .conformance_gc import *  # noqa: E402, F403

__all__ = [
    "store",
    *sorted(
        name for name in list(globals()) if name.startswith(("test_store_", "test_calls_"))
    ),
]
