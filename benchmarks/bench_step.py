"""``@step`` replay and miss against the seed decorator library (``musubito``), with
10 vs 10,000 earlier nodes of the operation in the store."""

from __future__ import annotations

import itertools
import json
import pathlib
import sqlite3
import uuid
from collections.abc import Callable
from typing import Any

from _env import Env, helper_answered
from _harness import Comparison, Ratio, Variant

from musubi_core import Engine, SQLiteStore, step


class Counter:
    def __init__(self) -> None:
        self.calls = 0


def _musubi_step(env: Env, history: int, name: str | None = None) -> tuple[Any, Counter]:
    engine = Engine(SQLiteStore(env.path(name or f"step-{history}.db")))
    counter = Counter()

    @step(engine=engine)
    def summarise(doc_id: int, words: int = 40) -> dict[str, Any]:
        counter.calls += 1
        return {"doc": doc_id, "summary": f"document {doc_id} in {words} words"}

    for i in range(history):
        summarise(i)
    assert counter.calls == history
    return summarise, counter


def _musubito_step(env: Env, history: int) -> tuple[Any, Counter] | None:
    try:
        from musubito import MusubitoEngine, SQLiteStorage, musubito_step, use_musubito_engine
    except ImportError:
        env.missing("musubito")
        return None
    path = env.path(f"musubito-{history}.db")
    engine = MusubitoEngine(SQLiteStorage(str(path)))
    counter = Counter()

    @musubito_step()
    def summarise(doc_id: int, words: int = 40) -> dict[str, Any]:
        counter.calls += 1
        return {"doc": doc_id, "summary": f"document {doc_id} in {words} words"}

    def call(*args: Any) -> Any:
        with use_musubito_engine(engine):
            return summarise(*args)

    seed = min(history, 10)
    for i in range(seed):
        call(i)
    if history > seed:
        # musubito's own miss path scans the operation's history (quadratic to
        # fill), so the rest of the history is cloned from its real rows.
        _clone_musubito_history(path, history - seed)
    counter.calls = history
    return call, counter


def _clone_musubito_history(path: pathlib.Path, extra: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(nodes)")]
    acols = [r[1] for r in conn.execute("PRAGMA table_info(artifacts)")]
    node = dict(zip(cols, conn.execute("SELECT * FROM nodes LIMIT 1").fetchone(), strict=True))
    art = dict(
        zip(
            acols,
            conn.execute(
                "SELECT * FROM artifacts WHERE artifact_id = ?", (node["output_artifact_id"],)
            ).fetchone(),
            strict=True,
        )
    )
    nodes, arts = [], []
    for _ in range(extra):
        nid, aid, ih = uuid.uuid4().hex * 2, uuid.uuid4().hex * 2, uuid.uuid4().hex * 2
        nodes.append(
            {
                **node,
                "node_id": nid,
                "input_hash": ih,
                "output_artifact_id": aid,
                "producer_node_id": nid,
            }
        )
        arts.append({**art, "artifact_id": aid, "payload_hash": aid})
    conn.execute("BEGIN")
    conn.executemany(
        f"INSERT INTO artifacts ({','.join(acols)}) VALUES ({','.join('?' * len(acols))})",
        [tuple(a[c] for c in acols) for a in arts],
    )
    conn.executemany(
        f"INSERT INTO nodes ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
        [tuple(n[c] for c in cols) for n in nodes],
    )
    conn.execute("COMMIT")
    conn.close()


def _hit_check(counter: Counter, label: str) -> Callable[[int], None]:
    start = counter.calls

    def check(n: int) -> None:
        assert counter.calls == start, f"{label}: a replay ran the function"

    return check


def _miss_check(counter: Counter, label: str) -> Callable[[int], None]:
    state = {"calls": counter.calls}

    def check(n: int) -> None:
        assert counter.calls == state["calls"] + n, f"{label}: a miss did not run the function"
        state["calls"] = counter.calls

    return check


def _sizes(env: Env) -> tuple[int, int]:
    return 10, env.pick(1000, 10_000)


def _label(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 else str(n)


def step_replay(env: Env) -> Comparison:
    variants = []
    calls = Counter()

    def bare(doc_id: int, words: int = 40) -> dict[str, Any]:
        calls.calls += 1
        return {"doc": doc_id, "summary": f"document {doc_id} in {words} words"}

    variants.append(Variant("bare call", lambda: bare(3), note="no caching at all"))
    ratios = []
    for n in _sizes(env):
        fn, counter = _musubi_step(env, n)
        first = fn(3)
        assert first.replayed and first.value == {"doc": 3, "summary": "document 3 in 40 words"}
        check = _hit_check(counter, "musubi")

        def check_replayed(k: int, fn: Any = fn, check: Any = check) -> None:
            check(k)
            assert fn(3).replayed

        variants.append(
            Variant(f"musubi @step, {_label(n)} earlier", lambda fn=fn: fn(3), check=check_replayed)
        )
        ratios.append(
            Ratio(
                f"musubi / musubito, {_label(n)}",
                f"musubi @step, {_label(n)} earlier",
                f"musubito, {_label(n)} earlier",
            )
        )
        mt = _musubito_step(env, n)
        if mt is not None:
            mfn, mcounter = mt
            assert json.dumps(mfn(3).value, sort_keys=True) == json.dumps(
                first.value, sort_keys=True
            )
            variants.append(
                Variant(
                    f"musubito, {_label(n)} earlier",
                    lambda mfn=mfn: mfn(3),
                    check=_hit_check(mcounter, "musubito"),
                )
            )
    have = {v.name for v in variants}
    ratios = [r for r in ratios if r.num in have and r.den in have]
    small, big = (_label(n) for n in _sizes(env))
    ratios.append(
        Ratio(
            f"musubi {big} / {small} earlier (flat = 1)",
            f"musubi @step, {big} earlier",
            f"musubi @step, {small} earlier",
        )
    )
    ratios.append(
        Ratio(f"musubi @step / bare call, {small}", f"musubi @step, {small} earlier", "bare call")
    )
    return Comparison(
        "step_replay",
        "`@step` replay (hit) vs musubito `@musubito_step`",
        variants,
        ratios,
        ops_per_block=env.pick(100, 500),
        rounds=env.pick(3, 15),
    )


def step_miss(env: Env) -> Comparison:
    variants = []
    ratios = []
    fresh = itertools.count(1_000_000)
    for n in _sizes(env):
        fn, counter = _musubi_step(env, n)
        variants.append(
            Variant(
                f"musubi @step, {_label(n)} earlier",
                lambda fn=fn: fn(next(fresh)),
                check=_miss_check(counter, "musubi"),
            )
        )
        mt = _musubito_step(env, n)
        if mt is not None:
            mfn, mcounter = mt
            variants.append(
                Variant(
                    f"musubito, {_label(n)} earlier",
                    lambda mfn=mfn: mfn(next(fresh)),
                    check=_miss_check(mcounter, "musubito"),
                    block=env.pick(2, 3 if n > 100 else 20),
                )
            )
            ratios.append(
                Ratio(
                    f"musubi / musubito, {_label(n)}",
                    f"musubi @step, {_label(n)} earlier",
                    f"musubito, {_label(n)} earlier",
                )
            )
    small, big = (_label(n) for n in _sizes(env))
    ratios.append(
        Ratio(
            f"musubi {big} / {small} earlier (flat = 1)",
            f"musubi @step, {big} earlier",
            f"musubi @step, {small} earlier",
        )
    )
    return Comparison(
        "step_miss",
        "`@step` miss (function runs, result recorded) vs musubito",
        variants,
        ratios,
        ops_per_block=env.pick(10, 50),
        rounds=env.pick(3, 9),
    )


def step_replay_sustained(env: Env) -> Comparison:
    """A long loop of replays, as an application's loop runs: blocks long enough (seconds) that
    the recorder's commits of a block's calls happen during that block, while its thread
    replays. Before each block everything recorded so far is committed (not timed), so no block
    pays for another variant's rows. The same replays with the batches committed by the
    recorder's helper process (the default under a steady load) and by its writer thread."""
    from musubi_core.record import flush_recorders, recorder_for

    variants = []
    stores = {}
    for name in ("helper process", "writer thread"):
        summarise, counter = _musubi_step(env, 10, f"step-sustained-{name.split()[0]}.db")
        store = summarise.engine.store
        recorder_for(store).helper = name == "helper process"
        stores[name] = store
        if name == "helper process":
            helper_step = summarise
        variants.append(
            Variant(
                f"musubi @step, {name}",
                lambda fn=summarise: fn(3),
                check=_hit_check(counter, "musubi"),
                setup=flush_recorders,
            )
        )
    mt = _musubito_step(env, 10)
    if mt is not None:
        mfn, mcounter = mt
        variants.append(
            Variant(
                "musubito",
                lambda: mfn(3),
                check=_hit_check(mcounter, "musubito"),
                setup=flush_recorders,
            )
        )

    def finish() -> None:
        assert helper_answered(stores["helper process"], lambda: helper_step(3)), (
            "the helper process never ran"
        )

    ratios = [
        Ratio(
            "helper process / writer thread",
            "musubi @step, helper process",
            "musubi @step, writer thread",
        )
    ]
    if mt is not None:
        ratios += [
            Ratio("helper process / musubito", "musubi @step, helper process", "musubito"),
            Ratio("writer thread / musubito", "musubi @step, writer thread", "musubito"),
        ]
    return Comparison(
        "step_replay_sustained",
        "`@step` replays in a long loop (blocks of seconds): recorder helper process vs writer thread",
        variants,
        ratios,
        ops_per_block=env.pick(2_000, 20_000),
        rounds=env.pick(2, 5),
        finish=finish,
    )


CASES = [step_replay, step_miss, step_replay_sustained]
