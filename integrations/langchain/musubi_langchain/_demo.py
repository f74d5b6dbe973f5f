"""The LangChain part of ``musubi demo``: an offline RAG-shaped chain run twice.

Example:
    >>> import io, os, tempfile
    >>> out = io.StringIO()
    >>> demo(os.path.join(tempfile.mkdtemp(), "m.db"), out)
    >>> "replayed" in out.getvalue()
    True
"""

from __future__ import annotations

import time
from typing import Any, TextIO

from langchain_core.callbacks import CallbackManagerForLLMRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough

from musubi_core.errors import StoreError

from .instrument import instrument, uninstrument


class SlowEchoChatModel(BaseChatModel):
    """An offline chat model that takes ``delay_s`` per call (so a replay is visibly faster)
    and answers deterministically from the last message."""

    delay_s: float = 0.3

    @property
    def _llm_type(self) -> str:
        return "slow-echo"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"delay_s": self.delay_s}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        time.sleep(self.delay_s)
        last = str(messages[-1].content)
        words = len(" ".join(str(m.content) for m in messages).split())
        message = AIMessage(
            content=f"(slow model) you asked: {last}",
            usage_metadata={"input_tokens": words, "output_tokens": 6, "total_tokens": words + 6},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])


class KeywordRetriever(BaseRetriever):
    """Documents sharing a word with the query."""

    docs: list[str]

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        words = set(query.lower().split())
        return [Document(page_content=d) for d in self.docs if words & set(d.lower().split())]


def build_chain(delay_s: float = 0.3) -> Runnable[str, str]:
    """retriever -> prompt -> model -> parser, all offline."""
    retriever = KeywordRetriever(
        docs=["musubi records every step as a node", "replay serves a stored node", "bananas"]
    )
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Context:\n{context}"), ("human", "{question}")]
    )

    def format_docs(docs: list[Document]) -> str:
        return "\n".join(d.page_content for d in docs)

    chain: Runnable[str, str] = (
        {"context": retriever | RunnableLambda(format_docs), "question": RunnablePassthrough()}
        | prompt
        | SlowEchoChatModel(delay_s=delay_s)
        | StrOutputParser()
    )
    return chain


def demo(db_path: str, out: TextIO) -> None:
    """Run the chain twice under ``instrument(db_path)`` and report what replayed."""
    inst = instrument(db_path)
    engine = inst.engine
    if engine is None:
        uninstrument()
        raise StoreError(f"cannot open the demo store {db_path}", path=db_path)
    try:
        chain = build_chain()
        question = "what does musubi replay"
        for attempt in (1, 2):
            start = time.perf_counter()
            answer = chain.invoke(question)
            took = time.perf_counter() - start
            out.write(f"  run {attempt}: {took:.2f}s  -> {answer}\n")
        engine.flush()
        stats = engine.store.stats()["by_kind"].get("chat_model", {})
        out.write(
            f"  chat model calls replayed: {stats.get('replays', 0)} "
            f"(saved {stats.get('seconds_saved', 0.0):.2f}s, {stats.get('tokens_saved', 0)} tokens)\n"
        )
    finally:
        uninstrument()
