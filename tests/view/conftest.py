"""Fixtures for the tests of ``musubi view``: a recorded app (LangChain RAG and a LlamaIndex
query, each run twice), the page served from it by the real command, and a headless Chromium
with a guard on the network (tests/support/browser.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.support import browser as browser_support  # noqa: E402
from tests.support.openai_server import OpenAIServer  # noqa: E402
from tests.support.view_app import Recorded, record_app  # noqa: E402


@pytest.fixture(scope="session")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Recorded]:
    from langchain_core.globals import get_llm_cache, set_llm_cache

    before = get_llm_cache()
    db = str(tmp_path_factory.mktemp("app") / "app.db")
    with OpenAIServer() as server:
        app = record_app(db, server)
    set_llm_cache(before)
    yield app


def musubi(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The real command, in a new interpreter."""
    proc = subprocess.run([sys.executable, "-m", "musubi_core.cli", *args],
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


class Served:
    """``musubi view --serve --port 0`` running on a store; ``url`` is what it printed."""

    def __init__(self, db: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "musubi_core.cli", "--db", db, "view", "--serve",
             "--port", "0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"serving (http://127\.0\.0\.1:(\d+)/\S*)", line)
        if match is None:
            self.proc.kill()
            raise AssertionError(f"musubi view --serve printed {line!r}; "
                                 f"stderr: {self.proc.stderr.read() if self.proc.stderr else ''}")
        self.url = match.group(1)
        self.port = int(match.group(2))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="session")
def served(recorded: Recorded) -> Iterator[Served]:
    server = Served(recorded.db)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    why = browser_support.unavailable()
    if why is not None:
        pytest.skip(f"the browser tests need Chromium and its driver: {why}")
    with browser_support.chromium() as b:
        yield b


@pytest.fixture(scope="session")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where screenshots go: $MUSUBI_SCREENSHOTS (docs/images makes the docs' pictures), else
    a temporary folder."""
    target = os.environ.get("MUSUBI_SCREENSHOTS")
    return Path(target) if target else tmp_path_factory.mktemp("screenshots")


def wait_until(predicate: Any, timeout: float = 15.0, what: str = "the page") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except Exception as err:
            last = err
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")
