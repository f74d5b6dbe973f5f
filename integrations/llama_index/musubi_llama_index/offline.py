"""Offline stand-ins for a provider: a slow mock LLM and a slow mock embedding model.

Used by the demo, the examples and the docs so they run without network or keys, while the
delay makes "the second run replayed" visible. Vectors are derived from the text (hash
seeded), so retrieval is meaningful and deterministic.

Example::

    llm, embed_model = SlowMockLLM(delay=0.2), SlowMockEmbedding(delay=0.01)
"""

from __future__ import annotations

import hashlib
import struct
import time
from typing import Any

from llama_index.core.base.llms.types import CompletionResponse, CompletionResponseGen
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM
from llama_index.core.llms.callbacks import llm_completion_callback
from pydantic import PrivateAttr

__all__ = ["SlowMockEmbedding", "SlowMockLLM"]


class SlowMockLLM(MockLLM):
    """A MockLLM that sleeps ``delay`` seconds per call and answers from the prompt's end."""

    delay: float = 0.2
    _calls: int = PrivateAttr(default=0)

    def __init__(self, delay: float = 0.2, **kwargs: Any) -> None:
        # MockLLM.__init__ takes named arguments only; pass ours through as a field.
        super().__init__(**kwargs)
        self.delay = delay

    @property
    def calls(self) -> int:
        """How many calls actually executed (replays do not count)."""
        return self._calls

    def _answer(self, prompt: str) -> str:
        digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
        tail = " ".join(prompt.split()[-8:])
        return f"[mock answer {digest}] {tail}"

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        self._calls += 1
        time.sleep(self.delay)
        return CompletionResponse(text=self._answer(prompt))

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        self._calls += 1
        time.sleep(self.delay)
        text = self._answer(prompt)

        def gen() -> CompletionResponseGen:
            acc = ""
            for word in text.split(" "):
                piece = word if not acc else " " + word
                acc += piece
                yield CompletionResponse(text=acc, delta=piece)

        return gen()


class SlowMockEmbedding(MockEmbedding):
    """A MockEmbedding with text-derived vectors and ``delay`` seconds per text."""

    embed_dim: int = 16
    delay: float = 0.01
    _calls: int = PrivateAttr(default=0)

    def __init__(self, embed_dim: int = 16, delay: float = 0.01, **kwargs: Any) -> None:
        super().__init__(embed_dim=embed_dim, **kwargs)
        self.delay = delay

    @property
    def calls(self) -> int:
        """How many texts were actually embedded (replays do not count)."""
        return self._calls

    def _vector(self, text: str) -> list[float]:
        self._calls += 1
        time.sleep(self.delay)
        raw = hashlib.sha256(text.lower().encode()).digest() * (1 + self.embed_dim // 8)
        vals = [struct.unpack("<I", raw[i * 4 : i * 4 + 4])[0] / 2**32 for i in range(self.embed_dim)]
        return vals

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)
