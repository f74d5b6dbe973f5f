"""A process that replays prompts through an instrumented LangChain chain, for the durability
tests: ``python -m tests.support.replay_loop DB SECONDS|-N LOG``.

It first answers 100 distinct prompts (100 model calls, stored), then replays them in a loop,
for SECONDS seconds (or N invocations when given as -N). After every invocation it appends
``<count> <time.time()>`` to LOG (line-buffered), so a parent that kills it knows exactly which
invocations had returned and when. With -N it also writes ``rss <count> <bytes>`` lines.
"""

from __future__ import annotations

import sys
import time

from langchain_core.language_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

import musubi_langchain

PROMPTS = 100


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def main(db: str, budget: str, log_path: str) -> None:
    musubi_langchain.instrument(db)
    model = FakeListChatModel(responses=[f"answer {i}" for i in range(PROMPTS)])
    chain = ChatPromptTemplate.from_template("question {n}") | model | StrOutputParser()
    for n in range(PROMPTS):
        chain.invoke({"n": n})
    limit = int(budget[1:]) if budget.startswith("-") else None
    deadline = time.monotonic() + (float(budget) if limit is None else 1e9)
    with open(log_path, "w", buffering=1) as log:
        log.write(f"ready {time.time()}\n")
        count = 0
        while (count < limit) if limit is not None else (time.monotonic() < deadline):
            chain.invoke({"n": count % PROMPTS})
            count += 1
            if limit is None:
                log.write(f"{count} {time.time()}\n")
            elif count % 10_000 == 0:
                log.write(f"rss {count} {rss_bytes()}\n")
    musubi_langchain.uninstrument()


if __name__ == "__main__":
    main(*sys.argv[1:4])
