"""One LangChain call through a namespaced MusubiCache, in a process of its own, for the
namespace tests: ``python -m tests.support.namespace_child DB NAMESPACE START [clear]``.

The model answers ``RESPONSES[START]`` if it is called (so the parent tells an execution from a
replay by the answer and by ``executed``). With ``clear`` the cache is cleared first. Prints one
JSON line: ``{"answer": ..., "executed": 0 or 1}``.
"""

from __future__ import annotations

import json
import sys

from langchain_core.language_models import FakeListChatModel

from musubi_langchain import MusubiCache

RESPONSES = ["answer 0", "answer 1", "answer 2", "answer 3"]


def main(db: str, namespace: str, start: int, clear: bool) -> None:
    cache = MusubiCache(db, namespace=namespace)
    if clear:
        cache.clear()
    # Same parameters in every process: one llm_string, one prompt; only the namespace differs.
    model = FakeListChatModel(responses=RESPONSES, cache=cache)
    model.i = start
    answer = model.invoke("which answer?").content
    cache.engine.close()
    executed = (model.i - start) % len(RESPONSES)  # the model cycles through RESPONSES
    print(json.dumps({"answer": answer, "executed": executed}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:] == ["clear"])
