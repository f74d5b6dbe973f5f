"""The pytest plugin on a small ``@step`` suite, each pytest a real subprocess: inert without a
mode, one store per session or per test, a ``.jsonl`` store read and written back (pruned on
request), ini options, the ``musubi`` fixture, the summary and the JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

APP = '''
import os
from musubi_core import step

@step
def shout(text: str) -> str:
    with open(os.environ["RAN"], "a") as ran:
        ran.write(text + "\\n")
    return text.upper()
'''

TESTS = '''
from app import shout

def test_one():
    assert shout("one").value == "ONE"

def test_two():
    assert shout("two").value == "TWO"

def test_fixture(musubi):
    shout("one")
    if musubi.mode.value == "off":
        assert musubi.calls() == []
        return
    counts = musubi.counts()
    assert counts.replayed + counts.executed == 1
    assert musubi.store.endswith(".db") and musubi.calls()[0].op_name == "app.shout"
    if musubi.mode.value == "replay":
        assert counts.replayed == 1
'''

TWO, DEUX = 'shout("two").value == "TWO"', 'shout("deux").value == "DEUX"'


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    root = tmp_path / "suite"
    (root / "tests").mkdir(parents=True)
    (root / "app.py").write_text(APP)
    (root / "tests" / "test_suite.py").write_text(TESTS)
    (root / "pyproject.toml").write_text('[tool.pytest.ini_options]\npythonpath = ["."]\n')
    return root


def pytest_in(root: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run pytest in ``root``; also the step bodies that ran (``$RAN``)."""
    ran = root / "ran.txt"
    ran.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSUBI_")}
    env.update(RAN=str(ran), MUSUBI_DB=str(root / "default.db"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", *args],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )
    return proc, ran.read_text().split() if ran.exists() else []


def _report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_without_a_mode_the_plugin_does_nothing(suite: Path) -> None:
    proc, ran = pytest_in(suite)
    assert proc.returncode == 0, proc.stdout
    assert "2 passed, 1 skipped" in proc.stdout and "musubi" not in proc.stdout.split("PASSED")[0]
    assert "musubi is not installed for this session" in proc.stdout
    assert ran == ["one", "two"]
    assert (suite / "default.db").exists()  # @step used $MUSUBI_DB, as without the plugin


def test_record_then_replay_a_session_store(suite: Path) -> None:
    store = suite / "recordings" / "calls.db"
    proc, ran = pytest_in(suite, "--musubi-mode=record", f"--musubi-store={store}",
                          "--musubi-report=record.json")
    assert proc.returncode == 0, proc.stdout
    assert ran == ["one", "two"]  # test_fixture replayed test_one's call
    assert f"record mode, {store}: 1 call(s) replayed, 2 executed, 0 replay miss(es)" \
        in proc.stdout
    assert not (suite / "default.db").exists()

    proc, ran = pytest_in(suite, "--musubi-mode=replay", f"--musubi-store={store}",
                          "--musubi-report=replay.json")
    assert proc.returncode == 0, proc.stdout
    assert ran == []
    report = _report(suite / "replay.json")
    assert report["replayed"] == 3 and report["executed"] == 0 and report["misses"] == 0
    assert report["by_kind"] == {"step": {"replayed": 3, "executed": 0, "failed": 0,
                                          "unrecorded": 0}}

    (suite / "tests" / "test_suite.py").write_text(TESTS.replace(TWO, DEUX))
    proc, ran = pytest_in(suite, "--musubi-mode=replay", f"--musubi-store={store}")
    assert proc.returncode == 1 and ran == []
    assert "1 failed, 2 passed" in proc.stdout
    assert 'miss in tests/test_suite.py::test_two: step app.shout: text: "two" -> "deux"' \
        in proc.stdout
    assert "record what changed with --musubi-mode=refresh" in proc.stdout


def test_each_test_its_own_store(suite: Path) -> None:
    folder = suite / "per-test"
    proc, ran = pytest_in(suite, "--musubi-mode=record", f"--musubi-store={folder}",
                          "--musubi-per-test")
    assert proc.returncode == 0, proc.stdout
    assert ran == ["one", "two", "one"]  # no store is shared: test_fixture records its own
    assert sorted(p.name for p in folder.glob("*.db")) == [
        "tests_test_suite.py_test_fixture.db",
        "tests_test_suite.py_test_one.db",
        "tests_test_suite.py_test_two.db",
    ]
    proc, ran = pytest_in(suite, "--musubi-mode=replay", f"--musubi-store={folder}",
                          "--musubi-per-test")
    assert proc.returncode == 0, proc.stdout
    assert ran == []


def test_a_jsonl_store_is_read_and_written_back(suite: Path) -> None:
    calls = suite / "calls.jsonl"
    proc, _ = pytest_in(suite, "--musubi-mode=record", f"--musubi-store={calls}")
    assert proc.returncode == 0, proc.stdout
    recorded = calls.read_text().splitlines()
    assert len(recorded) == 2 and all(json.loads(x)["op_name"] == "app.shout" for x in recorded)

    proc, ran = pytest_in(suite, "--musubi-mode=replay", f"--musubi-store={calls}")
    assert proc.returncode == 0 and ran == []
    assert calls.read_text().splitlines() == recorded

    # A renamed input: refresh records it and keeps the old line (nothing is pruned) ...
    (suite / "tests" / "test_suite.py").write_text(TESTS.replace(TWO, DEUX))
    proc, ran = pytest_in(suite, "--musubi-mode=refresh", f"--musubi-store={calls}")
    assert proc.returncode == 0 and ran == ["deux"]
    assert len(calls.read_text().splitlines()) == 3
    # ... and --musubi-prune keeps only what the session reached.
    proc, ran = pytest_in(suite, "--musubi-mode=refresh", f"--musubi-store={calls}",
                          "--musubi-prune")
    assert proc.returncode == 0 and ran == []
    kept = calls.read_text().splitlines()
    assert len(kept) == 2 and not any('"two"' in line for line in kept)


def test_ini_options_and_off(suite: Path) -> None:
    store = suite / "ini.db"
    (suite / "pyproject.toml").write_text(textwrap.dedent(f'''
        [tool.pytest.ini_options]
        pythonpath = ["."]
        musubi_mode = "record"
        musubi_store = "{store}"
    '''))
    proc, ran = pytest_in(suite)
    assert proc.returncode == 0 and store.exists() and ran == ["one", "two"]
    proc, ran = pytest_in(suite, "--musubi-mode=off")
    assert proc.returncode == 0, proc.stdout
    assert ran == ["one", "two", "one"]  # off: every step runs, nothing replays


def test_per_test_stores_cannot_be_one_jsonl_file(suite: Path) -> None:
    proc, _ = pytest_in(suite, "--musubi-mode=record", "--musubi-store=x.jsonl",
                        "--musubi-per-test")
    assert proc.returncode == 4
    assert "musubi: --musubi-per-test keeps one SQLite file per test" in proc.stderr


def test_a_model_musubi_does_not_see_is_reported(suite: Path) -> None:
    (suite / "tests" / "test_uncached.py").write_text(textwrap.dedent('''
        from langchain_core.language_models import FakeListChatModel

        def test_uncached():
            model = FakeListChatModel(responses=["live"], cache=False)
            assert model.invoke("hi").content == "live"
    '''))
    report = suite / "report.json"
    proc, _ = pytest_in(suite, "--musubi-mode=replay", f"--musubi-store={suite / 'x.db'}",
                        "tests/test_uncached.py", f"--musubi-report={report}")
    assert proc.returncode == 0, proc.stdout
    assert "warning: 1 model call(s) went past musubi (chat_model 1)" in proc.stdout
    assert _report(report)["unrecorded"] == 1
