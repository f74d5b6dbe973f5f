"""The LlamaIndex part of ``musubi demo``: an offline query pipeline run twice."""

from __future__ import annotations

import time
from typing import TextIO

from musubi_llama_index._instrument import instrument, uninstrument
from musubi_llama_index.offline import SlowMockEmbedding, SlowMockLLM

DOCS = [
    "Musubi is the Japanese word for a knot that ties things together.",
    "musubi keeps every expensive step as a node of a lineage graph in one SQLite file.",
    "Reaching the same node again replays its stored output instead of paying for it.",
    "Invalidating a node marks everything downstream stale, so only that part recomputes.",
]
QUESTION = "What does musubi do with expensive steps?"


def demo(db_path: str, out: TextIO) -> None:
    """Build an index and query it twice; the second run replays every model call.

    Example::

        import sys
        demo("/tmp/demo.db", sys.stdout)
    """
    from llama_index.core import Document, VectorStoreIndex

    llm = SlowMockLLM(delay=0.3)
    embed_model = SlowMockEmbedding(delay=0.02)
    instrument(db_path, llm=llm, embed_model=embed_model)
    try:
        answers = []
        for run in (1, 2):
            llm_before, emb_before = llm.calls, embed_model.calls
            t0 = time.perf_counter()
            index = VectorStoreIndex.from_documents(
                [Document(text=t) for t in DOCS], embed_model=embed_model
            )
            answer = str(index.as_query_engine(llm=llm, similarity_top_k=2).query(QUESTION))
            elapsed = time.perf_counter() - t0
            answers.append(answer)
            llm_n, emb_n = llm.calls - llm_before, embed_model.calls - emb_before
            what = "executed" if run == 1 else "executed (the rest replayed)"
            out.write(
                f"  run {run}: {elapsed:.2f}s  LLM calls {what}: {llm_n}, "
                f"texts embedded: {emb_n}\n"
            )
        out.write(f"  answer: {answers[0][:90]}\n")
        out.write(f"  same answer on replay: {answers[0] == answers[1]}\n")
    finally:
        uninstrument()
