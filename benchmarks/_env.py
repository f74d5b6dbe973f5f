"""What every case gets: the mode, scratch folders, and anchor discovery."""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
from dataclasses import dataclass, field
from typing import Any, TypeVar

from _harness import Skip

T = TypeVar("T")

HERE = pathlib.Path(__file__).resolve().parent
DATA = HERE / ".data"  # cached large stores (gitignored)


@dataclass
class Env:
    quick: bool
    tmp: pathlib.Path
    data: pathlib.Path = DATA
    skipped: list[str] = field(default_factory=list)
    _made: dict[str, int] = field(default_factory=dict)

    def path(self, name: str) -> pathlib.Path:
        """A fresh path in the scratch folder (never one an earlier case used)."""
        n = self._made.get(name, 0)
        self._made[name] = n + 1
        return self.tmp / (name if n == 0 else f"{n}-{name}")

    def pick(self, quick: T, full: T) -> T:
        return quick if self.quick else full

    def missing(self, what: str) -> None:
        msg = f"anchor not installed: {what} (pip install -r benchmarks/requirements.txt)"
        if msg not in self.skipped:
            self.skipped.append(msg)
            print(f"  ! {msg}")


def need(module: str, pip_name: str) -> Any:
    """Import ``module`` or skip the case, naming the package to install."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise Skip(f"anchor not installed: {pip_name} (pip install -r benchmarks/requirements.txt)")
    return importlib.import_module(module)


def cpu_count() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


def helper_answered(store: Any, poke: Any) -> bool:
    """Everything recorded committed, and the recorder of ``store`` commits through its helper
    process. A --quick block lasts ~0.1 s, shorter than the recorder's commit interval: its
    helper may have been started by the last flush, which never waits for one, and not have
    said it is ready yet, or not be started yet (no batch of SPAWN_ROWS rows). ``poke`` (one
    replay) is called 300 times (600 rows) between flushes until it answers, for up to 10 s."""
    import time

    from musubi_core.record import flush_recorders, recorder_for

    flush_recorders()
    rec = recorder_for(store)
    deadline = time.monotonic() + 10.0
    while rec.helper_pid is None and time.monotonic() < deadline:
        for _ in range(300):
            poke()
        flush_recorders()
        time.sleep(0.05)
    return rec.helper_pid is not None

