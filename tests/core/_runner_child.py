"""A durable workflow executed in a child process by the runner tests.

    python _runner_child.py DB SIDE_FILE [STEPS]

Every step appends ``start NAME PID`` / ``end NAME PID`` to SIDE_FILE, and
the after-checkpoint hook appends ``committed NAME PID``. Each line is a
single ``write(2)`` on an ``O_APPEND`` descriptor, so a SIGKILL leaves whole
lines only. Environment knobs:

* ``CHILD_STEP_DELAY``  seconds each step body takes (default 0.004)
* ``CHILD_PAUSE_AFTER`` step name: after its commit, log ``paused`` and hang,
  so the parent can kill the process between commit and return
* ``CHILD_SLEEP``       duration of the ``nap`` sleep after step 9
* ``CHILD_HOLD``        path: the first step waits until this file is deleted
* ``CHILD_RUN_ID``      run id (default: the file's run)

The final result is printed as JSON on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import musubi_core
from musubi_core import runner

DB, SIDE = sys.argv[1], sys.argv[2]
STEPS = int(sys.argv[3]) if len(sys.argv) > 3 else 20
DELAY = float(os.environ.get("CHILD_STEP_DELAY", "0.004"))
PAUSE_AFTER = os.environ.get("CHILD_PAUSE_AFTER")
NAP = os.environ.get("CHILD_SLEEP", "300ms")
HOLD = os.environ.get("CHILD_HOLD")
PID = os.getpid()


def log(line: str) -> None:
    fd = os.open(SIDE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line} {PID}\n".encode())
    finally:
        os.close(fd)


def after_checkpoint(name: str) -> None:
    log(f"committed {name}")
    if name == PAUSE_AFTER:
        log(f"paused {name}")
        time.sleep(120)


runner._after_checkpoint = after_checkpoint


def make(i: int, prev: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    def body() -> dict[str, Any]:
        name = f"s{i:04d}"
        log(f"start {name}")
        if HOLD and i == 0:
            while os.path.exists(HOLD):
                time.sleep(0.01)
        if DELAY:
            time.sleep(DELAY)
        value = {"i": i, "acc": (prev["acc"] * 31 + i) % 1_000_003, "tag": (name, i)}
        log(f"end {name}")
        return value

    return body


def workflow(ctx: musubi_core.Context) -> dict[str, Any]:
    acc: dict[str, Any] = {"acc": 7}
    for i in range(STEPS):
        acc = ctx.step(f"s{i:04d}", make(i, acc))
        if i == 9:
            log(f"sleep-begin {time.time():.3f}")
            ctx.sleep("nap", NAP)
            log(f"sleep-end {time.time():.3f}")
    return acc


result = musubi_core.run(DB, workflow, run_id=os.environ.get("CHILD_RUN_ID"))
log("done")
print(json.dumps(result, default=list))
