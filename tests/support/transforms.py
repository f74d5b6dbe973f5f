"""Picklable, offline LlamaIndex transformations for multi-process ingestion tests.

LlamaIndex's ``SentenceSplitter``/``TokenTextSplitter`` drop their tokenizer when pickled and
the spawned ingestion workers then hang offline (tiktoken wants to download its vocabulary),
so ``IngestionPipeline(num_workers=2)`` tests split with this instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.schema import BaseNode, TextNode, TransformComponent


class SentenceChunker(TransformComponent):
    """Split each node's text on ". " into one TextNode per sentence (deterministic ids)."""

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[BaseNode]:
        out: list[BaseNode] = []
        for node in nodes:
            parts = [p.strip() for p in node.get_content().split(". ") if p.strip()]
            for i, part in enumerate(parts):
                out.append(TextNode(text=part, id_=f"{node.node_id}-{i}"))
        return out
