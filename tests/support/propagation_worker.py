"""A job run in a worker process (``ProcessPoolExecutor``, spawn): embeds one text with a real
``OpenAIEmbedding`` against the local test server, after restoring the parent's propagation
context when it is given one. Importable by name, as a spawned worker needs."""

from __future__ import annotations

import os
from typing import Any


def embed(db: str, base_url: str, context: dict[str, Any] | None, text: str) -> int:
    """Embed ``text`` under musubi; returns this process's id."""
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.embeddings.openai import OpenAIEmbedding

    from musubi_llama_index import instrument, uninstrument

    model = OpenAIEmbedding(api_base=base_url, api_key="test", max_retries=0)
    instrument(db, embed_model=model, use_settings=False)
    try:
        if context is not None:
            get_dispatcher().restore_propagation_context(context)
        model.get_text_embedding(text)
    finally:
        uninstrument()  # flushes what the job recorded
    return os.getpid()
