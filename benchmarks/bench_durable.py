"""Per-step cost of a durable step: musubi vs. the ``mundane`` runner.

Both runners execute the same workflow (``steps`` trivial steps, each on a
fresh file in the same folder, so both pay the same disk). Runs are
interleaved in small shuffled blocks so drift in the machine (page cache,
CPU frequency, other load) hits both alike; the result is the ratio of the
medians, taken in this one run. DESIGN §11 budget: musubi <= 0.5x mundane.

``mundane`` is a benchmark-only dependency (``pip install mundane-sdk``); the
benchmark exits with a message when it is missing.

    .venv/bin/python benchmarks/bench_durable.py [--rounds 15] [--steps 40] [--dir PATH]

Measured per step, inside the body (opening the file and taking the lock
are excluded, they are per run): a first execution, which commits the step
durably, and a replay on a second invocation.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

try:
    import mundane
except ImportError:  # pragma: no cover - depends on the benchmark environment
    mundane = None

import musubi_core

Runner = Callable[[str, Callable[[Any], Any]], Any]


def _workflow(steps: int, out: list[float]) -> Callable[[Any], Any]:
    def body(ctx: Any) -> int:
        t0 = time.perf_counter()
        total = 0
        for i in range(steps):
            total += ctx.step(f"s{i}", lambda i=i: {"i": i, "text": "x" * 64})["i"]
        out.append((time.perf_counter() - t0) / steps)
        return total

    return body


def _measure(runner: Runner, folder: str, steps: int) -> tuple[float, float]:
    path = os.path.join(folder, f"bench-{random.getrandbits(48):x}.db")
    first: list[float] = []
    again: list[float] = []
    runner(path, _workflow(steps, first))
    runner(path, _workflow(steps, again))
    return first[0], again[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--dir", default=None, help="folder for the files (default: a temp dir)")
    args = parser.parse_args(argv)
    if mundane is None:
        print("skipped: the anchor runner is missing; install it with "
              "`.venv/bin/pip install mundane-sdk` (benchmark environment only)")
        return 0

    runners: dict[str, Runner] = {"musubi": musubi_core.run, "mundane": mundane.run}
    folder = tempfile.mkdtemp(prefix="musubi-bench-", dir=args.dir)
    results: dict[str, dict[str, list[float]]] = {
        name: {"first": [], "replay": []} for name in runners
    }
    try:
        for runner in runners.values():  # warm-up: imports, page cache
            _measure(runner, folder, 5)
        for _ in range(args.rounds):
            order = list(runners)
            random.shuffle(order)
            for name in order:
                first, replay = _measure(runners[name], folder, args.steps)
                results[name]["first"].append(first)
                results[name]["replay"].append(replay)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    print(f"{args.rounds} rounds x {args.steps} steps per runner, folder on "
          f"{os.path.dirname(folder) or '.'}")
    print(f"{'':10}{'first run (commit)':>22}{'replay':>14}")
    for name in runners:
        print(f"{name:10}{med[name]['first'] * 1e6:>19.1f} us{med[name]['replay'] * 1e6:>11.1f} us")
    ratio = med["musubi"]["first"] / med["mundane"]["first"]
    ratio_replay = med["musubi"]["replay"] / med["mundane"]["replay"]
    print(f"ratio musubi/mundane per committed step: {ratio:.2f}x (budget <= 0.5x)")
    print(f"ratio musubi/mundane per replayed step:  {ratio_replay:.2f}x")
    return 0 if ratio <= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())


# -- the suite's entry (benchmarks/run.py): the same measurement, interleaved with
#    the other cases' machinery and reported beside them.


def durable_step(env: Any) -> Any:
    from _harness import Comparison, Ratio, Skip, Variant

    if mundane is None:
        raise Skip("anchor not installed: mundane-sdk (pip install -r benchmarks/requirements.txt)")
    steps = env.pick(10, 40)
    folder = str(env.path("durable"))
    os.makedirs(folder, exist_ok=True)
    runners: dict[str, Runner] = {"musubi": musubi_core.run, "mundane": mundane.run}

    def variant(name: str, which: int) -> Variant:
        runner = runners[name]
        calls: list[int] = []

        def op() -> float:
            calls.append(1)
            return _measure(runner, folder, steps)[which]

        def check(n: int) -> None:
            # Each op ran the body twice on a fresh file; the second run must replay
            # every step: _check_replays re-runs a file and counts executions.
            assert _check_replays(runner, folder) == 0, f"{name}: a committed step ran again"

        label = "committed step" if which == 0 else "replayed step"
        return Variant(f"{name}, {label}", op, check=check, self_timed=True)

    return Comparison(
        "durable_step",
        f"Durable run: per step, timed inside the body ({steps} steps per run, fresh file)",
        [variant("musubi", 0), variant("mundane", 0), variant("musubi", 1), variant("mundane", 1)],
        [
            Ratio("musubi / mundane, committed step", "musubi, committed step", "mundane, committed step", 0.5),
            Ratio("musubi / mundane, replayed step", "musubi, replayed step", "mundane, replayed step"),
        ],
        ops_per_block=1,
        rounds=env.pick(3, 11),
        unit="step",
    )


def _check_replays(runner: Runner, folder: str) -> int:
    """Run a 3-step workflow twice on a fresh file; how many steps ran the second time."""
    path = os.path.join(folder, f"check-{random.getrandbits(48):x}.db")
    ran: list[int] = []

    def body(ctx: Any) -> None:
        for i in range(3):
            ctx.step(f"c{i}", lambda i=i: ran.append(i) or i)

    runner(path, body)
    ran.clear()
    runner(path, body)
    return len(ran)


CASES = [durable_step]
