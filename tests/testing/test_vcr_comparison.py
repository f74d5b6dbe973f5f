"""musubi's test mode beside HTTP cassettes (vcrpy, through pytest-recording) on the same suite:
``examples/tested_app``, recorded against the same local provider, which answers tool calls
with fresh random tool-call ids as real providers do. docs/testing.md reports what this shows.

* A prompt changes. vcrpy's default matchers (method, host, path, ...) do not look at the
  body: the old answer is replayed for the new prompt and the suite passes. With the body
  matched, the request fails with a raw body diff. musubi fails the test with a
  ReplayMissError naming the field that changed.
* The planning turn of the agent changes (a prompt edit), and the provider answers it with a
  new random tool-call id. The answering turn is unchanged, but its request carries that id:
  vcrpy sees a new request and records it again (two requests); musubi's keys replace
  tool-call ids with positional aliases, so it replays the answering turn (one request).
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import vcr_all
from tests.support.tested_app import copy_app, edit_prompt, free_port, provider, run_suite

pytest.importorskip("vcr")
pytest.importorskip("pytest_recording")

MATCH_BODY = {"VCR_MATCH_BODY": "1"}
MATCH_DEFAULT = {"VCR_MATCH_BODY": "0"}
AGENT_CASSETTE = "tests/cassettes/test_agent/test_the_agent_looks_up_the_weather.yaml"


@dataclass
class Both:
    vcr_app: Path
    musubi_app: Path
    store: Path
    port: int
    vcr_requests: dict[str, int]
    musubi_requests: dict[str, int]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Both:
    """The suite recorded twice against one provider: cassettes, and a musubi store."""
    tmp_path = tmp_path_factory.mktemp("recorded")
    vcr_app = copy_app(tmp_path / "vcr")
    vcr_all.install(vcr_app)
    musubi_app = copy_app(tmp_path / "musubi")
    store = tmp_path / "llm-calls.db"
    port = free_port()
    server = provider(port).start()
    try:
        recorded = run_suite(vcr_app, port, "--record-mode=once", extra_env=MATCH_BODY)
        assert recorded.passed, recorded.output
        vcr_requests = server.counts()
        server.clear_log()
        recorded = run_suite(musubi_app, port, "--musubi-mode=record", f"--musubi-store={store}")
        assert recorded.passed, recorded.output
        musubi_requests = server.counts()
    finally:
        server.stop()
    assert (vcr_app / AGENT_CASSETTE).exists()
    return Both(vcr_app, musubi_app, store, port, vcr_requests, musubi_requests)


@pytest.fixture
def both(recorded: Both, tmp_path: Path) -> Both:
    """A copy of both recordings for one test to change."""
    vcr_app = tmp_path / "vcr" / "tested_app"
    musubi_app = tmp_path / "musubi" / "tested_app"
    shutil.copytree(recorded.vcr_app, vcr_app)
    shutil.copytree(recorded.musubi_app, musubi_app)
    store = tmp_path / "llm-calls.db"
    shutil.copyfile(recorded.store, store)
    return dataclasses.replace(recorded, vcr_app=vcr_app, musubi_app=musubi_app, store=store)


def test_recording_the_same_suite(both: Both) -> None:
    # One cassette per test: the same documents are embedded again by every test that
    # builds the index; musubi replays within the session what an earlier test recorded.
    assert both.vcr_requests == {"chat": 8, "embeddings": 4}
    assert both.musubi_requests == {"chat": 7, "embeddings": 3}


def test_when_a_prompt_changes(both: Both) -> None:
    old, new = "Use only the context below", "Use only the facts below"
    edit_prompt(both.vcr_app, old, new)
    edit_prompt(both.musubi_app, old, new)

    # vcrpy, default matchers: the stale answer is played back for the new prompt.
    stale = run_suite(both.vcr_app, both.port, "--record-mode=none", extra_env=MATCH_DEFAULT)
    assert stale.passed, stale.output

    # vcrpy, body matched: the request fails; the message is a diff of the raw JSON body.
    strict = run_suite(both.vcr_app, both.port, "--record-mode=none", extra_env=MATCH_BODY)
    assert not strict.passed
    assert "CannotOverwriteExistingCassetteException" in strict.output
    assert "FAILED tests/test_rag.py::test_answer" in strict.output
    # Its diff shows the changed JSON lines of the body, each cut at about 200 characters.
    shown = [line for line in strict.output.splitlines() if '-      "content": "You answer' in line]
    assert shown and all(line.endswith("\u2026") for line in shown), shown

    # musubi: the test fails with the field that changed, and nothing was sent.
    musubi = run_suite(both.musubi_app, both.port, "--musubi-mode=replay",
                       f"--musubi-store={both.store}", key=None)
    assert not musubi.passed
    assert "ReplayMissError" in musubi.output and "messages[0].content:" in musubi.output
    assert "Use only the context below" in musubi.output
    assert "Use only the facts below" in musubi.output
    assert "FAILED tests/test_rag.py::test_answer" in musubi.output


def test_when_the_provider_answers_with_new_random_tool_call_ids(both: Both) -> None:
    old, new = "Call the tools you need; do not", "Call the tools you need, and do not"
    edit_prompt(both.vcr_app, old, new)
    edit_prompt(both.musubi_app, old, new)
    before = (both.vcr_app / AGENT_CASSETTE).read_text(encoding="utf-8")
    ids_before = set(re.findall(r"call_[0-9a-f]{24}", before))
    assert len(ids_before) == 1

    server = provider(both.port).start()
    try:
        vcr = run_suite(both.vcr_app, both.port, "--record-mode=new_episodes",
                        extra_env=MATCH_BODY)
        vcr_sent = [r.body["messages"][0]["content"] for r in server.requests]
        server.clear_log()
        musubi = run_suite(both.musubi_app, both.port, "--musubi-mode=refresh",
                           f"--musubi-store={both.store}")
        musubi_sent = [r.body["messages"][0]["content"] for r in server.requests]
    finally:
        server.stop()
    assert vcr.passed, vcr.output
    assert musubi.passed, musubi.output

    # vcrpy: the planning turn (its prompt changed) and the answering turn (unchanged, but
    # its request holds the planner's new random tool-call id) are both recorded again.
    assert len(vcr_sent) == 2, vcr_sent
    assert vcr_sent[0].startswith("You plan") and vcr_sent[1].startswith("You write")
    after = (both.vcr_app / AGENT_CASSETTE).read_text(encoding="utf-8")
    ids_after = set(re.findall(r"call_[0-9a-f]{24}", after))
    assert len(ids_after) == 2 and ids_before < ids_after  # the old episode stays, unused

    # musubi: only the planning turn; the answering turn replays under the aliased id.
    assert len(musubi_sent) == 1, musubi_sent
    (planned,) = musubi_sent  # not indexed: test_packaging reads "name[0]" as an install line
    assert planned.startswith("You plan"), musubi_sent
    offline = run_suite(both.musubi_app, both.port, "--musubi-mode=replay",
                        f"--musubi-store={both.store}", key=None)
    assert offline.passed, offline.output
