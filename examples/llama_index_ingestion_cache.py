"""IngestionPipeline with MusubiKVStore: the second run embeds nothing.

    python examples/llama_index_ingestion_cache.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from llama_index.core import Document
from llama_index.core.ingestion import IngestionCache, IngestionPipeline
from llama_index.core.node_parser import SentenceSplitter

from musubi_llama_index import MusubiKVStore
from musubi_llama_index.offline import SlowMockEmbedding


def main() -> None:
    db_path = str(Path(tempfile.mkdtemp()) / "musubi.db")
    docs = [Document(text=f"Chapter {i}. Musubi ties step {i} to its inputs.") for i in range(6)]
    embed_model = SlowMockEmbedding(delay=0.05)
    for run in (1, 2):
        pipeline = IngestionPipeline(
            transformations=[SentenceSplitter(chunk_size=64, chunk_overlap=0), embed_model],
            cache=IngestionCache(cache=MusubiKVStore(db_path), collection="ingest"),
        )
        t0 = time.perf_counter()
        nodes = pipeline.run(documents=docs)
        print(f"run {run}: {len(nodes)} nodes in {time.perf_counter() - t0:.2f}s, "
              f"texts embedded so far: {embed_model.calls}")


if __name__ == "__main__":
    main()
