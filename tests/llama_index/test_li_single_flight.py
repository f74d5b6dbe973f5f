"""``instrument(..., single_flight=True)`` on SQLite and on PostgreSQL: concurrent misses of
the same LLM call (threads here; processes in tests/core/test_single_flight.py) send one
request, and every caller gets its answer; without it each caller pays."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from llama_index.core.llms import ChatMessage

from musubi_llama_index import instrument
from tests.support.openai_server import OpenAIServer

BOTH_BACKENDS = True
CALLERS = 6


def _race(llm: Any, question: str) -> list[str]:
    answers: list[str] = []
    barrier = threading.Barrier(CALLERS)

    def ask() -> None:
        barrier.wait()
        answers.append(str(llm.chat([ChatMessage(role="user", content=question)]).message.content))

    threads = [threading.Thread(target=ask) for _ in range(CALLERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return answers


def test_concurrent_misses_send_one_request(
    db_path: str, llm: Any, openai_server: OpenAIServer
) -> None:
    openai_server.delay_s = 0.3  # the first request is still in flight when the others miss
    instrument(db_path, llm=llm, single_flight=True)
    answers = _race(llm, "what is a knot?")
    assert openai_server.count("chat") == 1, openai_server.counts()
    assert len(answers) == CALLERS and len(set(answers)) == 1 and "knot" in answers[0]

    async def together() -> list[Any]:
        msgs = [ChatMessage(role="user", content="and a tie?")]
        return await asyncio.gather(*(llm.achat(msgs) for _ in range(CALLERS)))

    replies = asyncio.run(together())
    assert openai_server.count("chat") == 2  # one more distinct call, sent once
    assert len({str(r.message.content) for r in replies}) == 1


def test_without_single_flight_each_caller_pays(
    db_path: str, llm: Any, openai_server: OpenAIServer
) -> None:
    openai_server.delay_s = 0.3
    instrument(db_path, llm=llm)
    _race(llm, "what is a knot?")
    assert openai_server.count("chat") > 1  # what single flight prevents
