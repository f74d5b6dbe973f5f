"""Run a LangChain pipeline twice; the second run replays every model call from musubi.

    python examples/langchain_replay.py [DB_PATH]

Offline: the chat model is a local stand-in that takes 0.5 s per call, so the replay is visible.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompts import ChatPromptTemplate

import musubi_langchain


class SlowChatModel(BaseChatModel):
    """Stands in for a paid provider: slow, and deterministic in its input."""

    delay_s: float = 0.5

    @property
    def _llm_type(self) -> str:
        return "slow-example"

    def _generate(self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        time.sleep(self.delay_s)
        text = f"A short note on {messages[-1].content!s}"
        usage = {"input_tokens": 12, "output_tokens": 7, "total_tokens": 19}
        return ChatResult(generations=[ChatGeneration(message=AIMessage(text, usage_metadata=usage))])


def main(db: str) -> None:
    musubi_langchain.instrument(db)  # global cache + lineage handler; no other change needed
    chain = (
        ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{topic}")])
        | SlowChatModel()
        | StrOutputParser()
    )
    topics = ["lineage", "replay", "sqlite"]
    for attempt in ("first run", "second run"):
        start = time.perf_counter()
        answers = [chain.invoke({"topic": t}) for t in topics]
        print(f"{attempt}: {time.perf_counter() - start:.2f}s  {answers[0]!r} ...")
    musubi_langchain.uninstrument()
    print(f"the second run replayed all {len(topics)} model calls; try: musubi --db {db} stats")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(tempfile.mkdtemp()) / "musubi.db"))
