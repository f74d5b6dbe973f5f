"""Invalidation recomputes exactly the affected descendants and no others;
early cutoff stops the recomputation where outputs come back unchanged."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from musubi_core import Engine, NodeNotFoundError, Result, step


def statuses(engine: Engine) -> dict[str, int]:
    engine.flush()
    return dict(engine.store.stats()["statuses"])


class Diamond:
    """fetch -> parse -> (summarize, keywords) -> report, plus an unrelated
    branch; ``world`` is the outside data fetch reads."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.world = {"doc": "Alpha beta GAMMA", "other": "unrelated text"}
        calls, world = self.calls, self.world

        @step(name="d.fetch")
        def fetch(url: str) -> str:
            calls["fetch"] += 1
            return world[url]

        @step(name="d.parse")
        def parse(doc: Result[str]) -> list[str]:
            calls["parse"] += 1
            return doc.value.lower().split()

        @step(name="d.summarize")
        def summarize(words: Result[list[str]]) -> str:
            calls["summarize"] += 1
            return " ".join(words.value[:2])

        @step(name="d.keywords")
        def keywords(words: Result[list[str]]) -> list[str]:
            calls["keywords"] += 1
            return sorted(words.value)[:2]

        @step(name="d.report")
        def report(summary: Result[str], keys: Result[list[str]]) -> str:
            calls["report"] += 1
            return f"{summary.value} | {', '.join(keys.value)}"

        self.fetch, self.parse = fetch, parse
        self.summarize, self.keywords, self.report = summarize, keywords, report

    def run(self) -> dict[str, Result[Any]]:
        doc = self.fetch("doc")
        words = self.parse(doc)
        summary = self.summarize(words)
        keys = self.keywords(words)
        out = self.report(summary, keys)
        other = self.fetch("other")
        other_words = self.parse(other)
        return {"doc": doc, "words": words, "summary": summary, "keys": keys,
                "report": out, "other": other, "other_words": other_words}


def test_diamond_recomputes_exactly_the_descendants(engine: Engine) -> None:
    d = Diamond()
    first = d.run()
    assert d.calls == Counter(fetch=2, parse=2, summarize=1, keywords=1, report=1)
    assert statuses(engine) == {"done": 7}

    # The source changed: invalidate the fetch node.
    d.world["doc"] = "Delta epsilon ZETA"
    d.calls.clear()
    assert engine.invalidate(first["doc"].node_id) == 5
    assert statuses(engine) == {"done": 2, "stale": 5}
    stale = {n.node_id for n in engine.store.list_nodes(status="stale", limit=100)}
    assert stale == {first[k].node_id for k in ("doc", "words", "summary", "keys", "report")}

    second = d.run()
    assert d.calls == Counter(fetch=1, parse=1, summarize=1, keywords=1, report=1)
    assert second["report"].value == "delta epsilon | delta, epsilon"
    assert second["other_words"].replayed and second["other"].replayed
    assert second["doc"].node_id == first["doc"].node_id  # the same node, recomputed
    assert second["words"].node_id != first["words"].node_id  # new input -> new node

    d.calls.clear()
    d.run()
    assert d.calls == Counter()  # everything replays now


def test_invalidating_a_middle_node_leaves_ancestors_and_siblings(engine: Engine) -> None:
    d = Diamond()
    first = d.run()
    d.calls.clear()
    assert engine.invalidate(first["summary"].node_id) == 2  # summary, report
    d.run()
    # summarize re-runs with the same output: report replays (early cutoff).
    assert d.calls == Counter(summarize=1)
    assert statuses(engine) == {"done": 7}


def test_early_cutoff_same_output_keeps_descendants(engine: Engine) -> None:
    d = Diamond()
    first = d.run()
    d.calls.clear()
    assert engine.invalidate(first["doc"].node_id) == 5
    second = d.run()
    # fetch re-ran and produced the same artifact: nothing below it re-runs.
    assert d.calls == Counter(fetch=1)
    assert [second[k].replayed for k in ("words", "summary", "keys", "report")] == [True] * 4
    assert second["report"].node_id == first["report"].node_id
    assert statuses(engine) == {"done": 7}


def test_early_cutoff_changed_output_recomputes(engine: Engine) -> None:
    d = Diamond()
    first = d.run()
    d.calls.clear()
    d.world["doc"] = "Alpha beta GAMMA delta"
    engine.invalidate(first["doc"].node_id)
    assert d.fetch.explain("doc").reason.value == "stale"
    second = d.run()
    assert d.calls == Counter(fetch=1, parse=1, summarize=1, keywords=1, report=1)
    assert second["report"].value == first["report"].value  # same text, recomputed
    assert not second["report"].replayed


def test_invalidate_accepts_prefixes_and_rejects_unknown(engine: Engine) -> None:
    d = Diamond()
    first = d.run()
    assert engine.invalidate(first["report"].node_id[:16]) == 1
    with pytest.raises(NodeNotFoundError):
        engine.invalidate("f" * 64 if not first["report"].node_id.startswith("f") else "0" * 64)


def test_ten_thousand_node_chain(engine: Engine) -> None:
    calls: Counter[str] = Counter()

    @step(name="chain.link")
    def link(prev: Result[int] | None, i: int) -> int:
        calls["link"] += 1
        return i

    started = time.perf_counter()
    results: list[Result[int]] = []
    prev: Result[int] | None = None
    for i in range(10_000):
        prev = link(prev, i)
        results.append(prev)
    print(f"\nbuild 10k chain: {time.perf_counter() - started:.2f}s")
    assert calls["link"] == 10_000

    started = time.perf_counter()
    changed = engine.invalidate(results[9_990].node_id)
    print(f"invalidate tail of 10 in 10k chain: {(time.perf_counter() - started) * 1e3:.1f} ms")
    assert changed == 10
    assert statuses(engine) == {"done": 9_990, "stale": 10}

    started = time.perf_counter()
    changed = engine.invalidate(results[5_000].node_id)
    print(f"invalidate 5000 of 10k chain: {(time.perf_counter() - started) * 1e3:.1f} ms")
    assert changed == 4_990  # the 10 tail nodes were already stale
    assert statuses(engine) == {"done": 5_000, "stale": 5_000}
    stale = engine.store.list_nodes(status="stale", limit=10_000)
    assert {n.node_id for n in stale} == {r.node_id for r in results[5_000:]}

    # Re-running the chain: link 5000 re-runs with the same output, and early
    # cutoff replays the links after it, except link 9990, which was itself
    # invalidated and so re-runs too.
    calls.clear()
    started = time.perf_counter()
    prev = results[4_999]
    for i in range(5_000, 10_000):
        prev = link(prev, i)
    print(f"re-run the invalidated half: {time.perf_counter() - started:.2f}s")
    assert calls["link"] == 2
    assert prev.node_id == results[-1].node_id and prev.replayed
    assert statuses(engine) == {"done": 10_000}


def build_stacked_diamonds(levels: int, calls: Counter[str], world: dict[str, int]) -> Any:
    @step(name="sd.top")
    def top() -> int:
        calls["top"] += 1
        return world["seed"]

    @step(name="sd.side")
    def side(up: Result[int], which: str) -> int:
        calls["side"] += 1
        return up.value + (1 if which == "left" else 2)

    @step(name="sd.join")
    def join(left: Result[int], right: Result[int]) -> int:
        calls["join"] += 1
        return left.value + right.value

    def run() -> list[Result[int]]:
        node = top()
        made = [node]
        for _ in range(levels):
            left, right = side(node, "left"), side(node, "right")
            node = join(left, right)
            made += [left, right, node]
        return made

    return run


def test_fifty_stacked_diamonds(engine: Engine) -> None:
    calls: Counter[str] = Counter()
    world = {"seed": 1}
    run = build_stacked_diamonds(50, calls, world)
    first = run()
    assert len({r.node_id for r in first}) == 151
    assert calls == Counter(top=1, side=100, join=50)

    started = time.perf_counter()
    changed = engine.invalidate(first[0].node_id)
    elapsed = time.perf_counter() - started
    print(f"\ninvalidate 50 stacked diamonds (2**50 paths, 151 nodes): {elapsed * 1e3:.1f} ms")
    assert changed == 151
    assert statuses(engine) == {"stale": 151}

    # Same output at the top: early cutoff through all 50 levels.
    calls.clear()
    again = run()
    assert calls == Counter(top=1)
    assert [r.node_id for r in again] == [r.node_id for r in first]
    assert statuses(engine) == {"done": 151}

    # Invalidate the middle with a changed top: exactly the lower half re-runs.
    engine.invalidate(first[0].node_id)
    world["seed"] = 2
    calls.clear()
    changed_run = run()
    assert calls == Counter(top=1, side=100, join=50)
    assert changed_run[-1].value != first[-1].value
    calls.clear()
    mid = first[75]  # a join node at level 24
    engine.invalidate(first[0].node_id)
    world["seed"] = 1
    run()  # back to the original outputs: the original nodes come back fresh
    assert calls == Counter(top=1)
    assert engine.invalidate(mid.node_id) == 1 + 3 * (50 - 25)
    calls.clear()
    run()
    assert calls == Counter(join=1)
