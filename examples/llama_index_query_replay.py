"""Offline LlamaIndex query pipeline, run twice: the second run replays every model call.

    python examples/llama_index_query_replay.py [path/to/musubi.db]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from llama_index.core import Document, VectorStoreIndex

from musubi_llama_index import instrument, uninstrument
from musubi_llama_index.offline import SlowMockEmbedding, SlowMockLLM

DOCS = [
    "Musubi is the Japanese word for a knot that ties things together.",
    "SQLite keeps the whole lineage graph in one local file on disk.",
    "A replayed LLM call costs no tokens and returns in microseconds.",
    "Embeddings turn text into vectors so similar passages can be retrieved.",
]


def main(db_path: str) -> None:
    llm, embed_model = SlowMockLLM(delay=0.3), SlowMockEmbedding(delay=0.02)
    inst = instrument(db_path, llm=llm, embed_model=embed_model)
    try:
        for run in (1, 2):
            t0 = time.perf_counter()
            index = VectorStoreIndex.from_documents(
                [Document(text=t) for t in DOCS], embed_model=embed_model
            )
            answer = index.as_query_engine(llm=llm).query("Where is the lineage kept?")
            print(f"run {run}: {time.perf_counter() - t0:.2f}s  llm calls so far={llm.calls}  "
                  f"texts embedded so far={embed_model.calls}")
        print("answer:", str(answer)[:80])
        inst.flush()
    finally:
        uninstrument()
    print(f"lineage stored in {db_path}; try: musubi --db {db_path} stats")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(tempfile.mkdtemp()) / "musubi.db"))
