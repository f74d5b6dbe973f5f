"""A fleet of workers never pays twice: 16 processes run the same LangChain app (real
``ChatOpenAI`` against the local test server) on one store with single flight, on SQLite and
on PostgreSQL. 50 prompts, 20 distinct: exactly 20 chat requests reach the server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from langchain_openai import ChatOpenAI

from tests.support.openai_server import OpenAIServer

ROOT = Path(__file__).resolve().parents[2]
WORKERS, PROMPTS, DISTINCT = 16, 50, 20

BOTH_BACKENDS = True


def start_fleet(db: str, server: OpenAIServer, tmp_path: Path) -> tuple[list[str], list[subprocess.Popen[str]]]:
    prompts = [f"question number {i % DISTINCT}: what is {i % DISTINCT} squared?" for i in range(PROMPTS)]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\n".join(prompts))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.lc_fleet_worker", db, server.base_url,
             str(seed), str(prompts_file)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for seed in range(WORKERS)
    ]
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", line + (proc.stderr.read() if proc.stderr else "")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    return sorted(set(prompts)), procs


def fleet_reports(procs: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=400)
        assert proc.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def expected_answers(server: OpenAIServer, distinct: list[str]) -> dict[str, str]:
    """What the provider answers each prompt (asked directly, after the fleet was counted)."""
    chat = ChatOpenAI(model="gpt-4o-mini", base_url=server.base_url, api_key="test",
                      max_retries=0, temperature=0)
    return {q: str(chat.invoke([("user", q)]).content) for q in distinct}


def test_sixteen_workers_send_each_distinct_prompt_once(
    db: str, openai_server: OpenAIServer, tmp_path: Path
) -> None:
    openai_server.delay_s = 0.1  # requests overlap: workers reach the same prompt together
    distinct, procs = start_fleet(db, openai_server, tmp_path)
    reports = fleet_reports(procs)
    assert openai_server.count("chat") == DISTINCT, openai_server.counts()
    assert [r["errors"] for r in reports] == [[]] * WORKERS
    assert [r["warnings"] for r in reports] == [[]] * WORKERS
    expected = expected_answers(openai_server, distinct)
    assert all(r["answers"] == expected for r in reports)


def test_a_failed_call_releases_its_flight(db: str, chat: ChatOpenAI, openai_server: OpenAIServer) -> None:
    """Under instrument() the handler sees a provider error: the flight the cache took for
    that call is released at once (no other worker waits for an answer that will not come)."""
    import pytest

    import musubi_langchain
    from musubi_core.flight import flights_for
    from tests.support.openai_server import ChatReply

    inst = musubi_langchain.instrument(db, single_flight=True)
    openai_server.enqueue_chat(ChatReply(status=400, error="scripted failure"))
    with pytest.raises(Exception, match="scripted failure"):
        chat.invoke("fails once")
    cache = inst.cache
    assert cache is not None and cache._flying == {}
    key = cache.node_key(*next(iter(cache._inflight)))  # the (prompt, llm_string) that failed
    flights = flights_for(cache.engine.store)
    assert flights.try_claim(key.node_id)  # free: nobody holds it
    flights.release(key.node_id)
    assert "answer-" in str(chat.invoke("fails once").content)  # the retry runs and is stored
    assert openai_server.count("chat") == 2
