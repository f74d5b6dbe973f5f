"""Crash tests: a 20-step durable workflow in a child process, SIGKILLed at
random moments, inside steps, between a step's commit and its return, and
during a durable sleep; re-invoked until it finishes.

After every kill the file must pass ``PRAGMA integrity_check``. At the end:
the result equals an uninterrupted run, and no step whose commit was
observed (in the database after a kill, or by the after-commit hook) ever
started again.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _runner_support import committed, integrity, kill, lines, spawn, wait_for

STEPS = 20
KILLS: dict[str, int] = {}

Killer = Callable[[int, "object"], bool]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("reference")
    proc = spawn(folder / "ref.db", folder / "side.txt", CHILD_SLEEP="1ms")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.strip()


def _episode(folder: Path, plan: Callable[[int], dict[str, object] | None], reference: str,
             max_invocations: int = 60) -> int:
    """Invoke the child until it finishes; ``plan(attempt)`` says how to kill
    this invocation (None: let it finish). Returns the number of kills."""
    db, side = folder / "task.db", folder / "side.txt"
    observed: list[tuple[int, set[str]]] = []  # (side-file length, steps done) per kill
    kills = 0
    for attempt in range(max_invocations):
        how = plan(attempt)
        env = {k: str(v) for k, v in (how or {}).get("env", {}).items()}  # type: ignore[union-attr]
        proc = spawn(db, side, STEPS, **env)
        if how is None:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            result = out.strip()
            break
        wait = how["wait"]
        assert callable(wait)
        reached = wait(proc, side)
        if not kill(proc):
            # The child finished before the kill landed: that is the final run.
            assert proc.returncode == 0
            result = None
            break
        assert reached, "the kill point was never reached"
        kills += 1
        assert integrity(db) == "ok", f"integrity_check failed after kill {kills}"
        observed.append((len(lines(side)), committed(db)))
    else:
        pytest.fail("workflow did not finish")

    events = lines(side)
    if result is None:  # finished on its own while we were about to kill it
        proc = spawn(db, side, STEPS)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        result = out.strip()
        events = lines(side)
    assert result == reference

    # No step observed committed after a kill ever started again.
    for offset, done in observed:
        again = [e for e in events[offset:] if e[0] == "start" and e[1] in done]
        assert not again, f"committed steps re-ran: {again}"
    # Nor after the after-commit hook logged it (same process or later ones).
    for index, event in enumerate(events):
        if event[0] == "committed" and event[1].startswith("s"):
            rerun = [e for e in events[index:] if e[0] == "start" and e[1] == event[1]]
            assert not rerun, f"{event[1]} started after its commit was observed"
    # Every step ran to completion at least once and is committed.
    names = {f"s{i:04d}" for i in range(STEPS)}
    assert {e[1] for e in events if e[0] == "end"} == names
    assert committed(db) == names | {"nap"}
    assert integrity(db) == "ok"
    return kills


def _after_start(rng: random.Random, min_delay: float, max_delay: float):  # type: ignore[no-untyped-def]
    def wait(proc, side):  # type: ignore[no-untyped-def]
        ok = wait_for(side, proc.pid, "start", proc=proc)
        time.sleep(rng.uniform(min_delay, max_delay))
        return ok

    return wait


def test_sigkill_at_random_moments(tmp_path: Path, reference: str) -> None:
    """Kills land anywhere after the first step began: inside step bodies,
    inside the commit, between steps."""
    rng = random.Random(20240601)
    total = 0
    episode = 0
    while total < 26:
        assert episode < 8, "kills kept missing the workflow"
        folder = tmp_path / f"ep{episode}"
        folder.mkdir()
        episode += 1
        budget = 12

        def plan(attempt: int, budget: int = budget) -> dict[str, object] | None:
            if attempt >= budget:
                return None
            return {"env": {"CHILD_STEP_DELAY": "0.004", "CHILD_SLEEP": "60ms"},
                    "wait": _after_start(rng, 0.0, 0.03)}

        total += _episode(folder, plan, reference)
    KILLS["random"] = total
    assert total >= 26


def test_sigkill_inside_a_step(tmp_path: Path, reference: str) -> None:
    """Deterministically inside a body: the step logged ``start`` and sleeps."""
    rng = random.Random(7)

    def plan(attempt: int) -> dict[str, object] | None:
        if attempt >= 6:
            return None
        return {"env": {"CHILD_STEP_DELAY": "0.05", "CHILD_SLEEP": "1ms"},
                "wait": _after_start(rng, 0.0, 0.02)}

    kills = _episode(tmp_path, plan, reference)
    KILLS["inside"] = kills
    assert kills == 6


def test_sigkill_between_commit_and_return(tmp_path: Path, reference: str) -> None:
    """The child pauses right after a step's checkpoint committed, before the
    value reaches the body; killed there, the step must not run again."""
    targets = [f"s{i:04d}" for i in (0, 1, 3, 5, 8, 9, 10, 12, 15, 17, 18, 19)]

    def plan(attempt: int) -> dict[str, object] | None:
        if attempt >= len(targets):
            return None
        name = targets[attempt]

        def wait(proc, side):  # type: ignore[no-untyped-def]
            return wait_for(side, proc.pid, "paused", name, proc=proc)

        return {"env": {"CHILD_PAUSE_AFTER": name, "CHILD_STEP_DELAY": "0",
                        "CHILD_SLEEP": "1ms"}, "wait": wait}

    kills = _episode(tmp_path, plan, reference)
    KILLS["after-commit"] = kills
    assert kills == len(targets)
    starts = [e[1] for e in lines(tmp_path / "side.txt") if e[0] == "start"]
    # Each paused step committed in the invocation that was killed; none ran twice.
    for name in targets:
        assert starts.count(name) == 1, (name, starts.count(name))


def test_sigkill_during_sleep(tmp_path: Path, reference: str) -> None:
    rng = random.Random(99)
    nap = 5.0

    def plan(attempt: int) -> dict[str, object] | None:
        if attempt >= 10:
            return None

        def wait(proc, side):  # type: ignore[no-untyped-def]
            ok = wait_for(side, proc.pid, "sleep-begin", proc=proc)
            time.sleep(rng.uniform(0.0, 0.08))
            return ok

        # A long nap, so every kill lands inside it; the wake time was stored
        # by the first invocation, later ones sleep what is left.
        return {"env": {"CHILD_SLEEP": f"{nap}s", "CHILD_STEP_DELAY": "0"}, "wait": wait}

    kills = _episode(tmp_path, plan, reference)
    KILLS["sleep"] = kills
    assert kills == 10
    events = lines(tmp_path / "side.txt")
    begins = [float(e[1]) for e in events if e[0] == "sleep-begin"]
    ends = [float(e[1]) for e in events if e[0] == "sleep-end"]
    assert len(begins) == 11 and len(ends) == 1
    # Eleven invocations reached the nap, yet it lasted one nap in total: the
    # survivor slept only the remainder, and did not wake early.
    assert nap - 0.05 <= ends[0] - begins[0] < nap + 0.5
    assert ends[0] - begins[-1] < nap - 1.0


def test_kill_count_across_the_suite() -> None:
    if len(KILLS) < 4:
        pytest.skip("run the whole module to count kills")
    assert sum(KILLS.values()) >= 50, KILLS
