"""Shared fixtures for the core tests: a real SQLite file per test, an engine
made current for the test, an execution counter, and a helper that runs Python
code in a fresh interpreter (for cross-process behaviour)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import musubi_core.engine as engine_module
from musubi_core import Engine, use_engine
from musubi_core.store import open_store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db_path(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Path:
    """A fresh SQLite file; in a module with ``BOTH_BACKENDS = True`` also a fresh PostgreSQL
    database (its URL, a ``str``: such modules open stores with ``open_store``)."""
    if backend == "postgresql":
        return request.getfixturevalue("store_target")  # type: ignore[no-any-return]
    return tmp_path / "musubi.db"


@pytest.fixture
def engine(db_path: Path) -> Iterator[Engine]:
    """An engine on a fresh store, current for the whole test."""
    eng = Engine(open_store(str(db_path)))
    with use_engine(eng):
        yield eng
    eng.close()


@pytest.fixture
def calls() -> Counter[str]:
    """Counts executions of fake LLM calls: ``calls[name] += 1`` in the body."""
    return Counter()


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p
    )
    env.pop("MUSUBI_DB", None)
    env.update(extra)
    return env


RunPy = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_py(tmp_path: Path) -> RunPy:
    """Run ``code`` in a new interpreter (cwd=tmp_path); fail with its output
    if it exits non-zero (unless ``check=False``)."""

    def run(
        code: str,
        *args: str,
        python: str = sys.executable,
        env: dict[str, str] | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        script = tmp_path / f"script_{abs(hash(code)) % 10**8}.py"
        script.write_text(textwrap.dedent(code))
        proc = subprocess.run(
            [python, str(script), *args],
            cwd=tmp_path,
            env=env or subprocess_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"subprocess exited {proc.returncode}\n--- stdout\n{proc.stdout}\n"
                f"--- stderr\n{proc.stderr}"
            )
        return proc

    return run


def last_json(proc: subprocess.CompletedProcess[str]) -> Any:
    """The JSON document on the last line of a subprocess's stdout."""
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def make_env() -> Callable[..., dict[str, str]]:
    """Environment for a subprocess: this checkout importable, extra variables set."""
    return subprocess_env


@pytest.fixture
def parse_json() -> Callable[[subprocess.CompletedProcess[str]], Any]:
    return last_json


class Clock:
    """Stands in for the ``time`` module inside musubi_core.engine only (the
    store keeps the real clock): ``advance`` moves the engine's wall clock."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(engine_module, "time", fake)
    return fake
