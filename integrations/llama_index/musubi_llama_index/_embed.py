"""Replay for embedding models: the private provider hooks (``_get_query_embedding``,
``_get_text_embedding(s)`` and their async forms) are overridden, one node per text, so the
public spans, events and ``embeddings_cache`` logic of ``BaseEmbedding`` stay intact and a
batch with one new text embeds only that text. Each text is a call of its own (executed or
replayed from its node) under the span it was embedded in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from musubi_core import ReplayMissError, StepConfiguration, StepType
from musubi_core.modes import Mode
from musubi_core.replay_miss import material, miss_error, store_failure_error
from musubi_llama_index import _models as _m
from musubi_llama_index._identity import model_fingerprint
from musubi_llama_index._runtime import Runtime, guarded, warn_once

__all__ = ["OP_EMBED", "make_embedding_methods"]

OP_EMBED = "llama_index.embedding"
_CONFIG = StepConfiguration(step_type=StepType.DETERMINISTIC)


def _floats(vector: Sequence[float]) -> str:
    return f"<{len(vector)} floats>"


class _Embedder:
    """The requests of one embedding model call (one text, or a batch)."""

    def __init__(self, obj: Any, rt: Runtime) -> None:
        self.obj = obj
        self.rt = rt
        original = type(obj).__dict__.get("__musubi_original__", type(obj))
        self.fp = model_fingerprint(obj, original_cls=original)
        self.label = f"{type(obj).__name__}.embedding"
        self.model = _m.model_name(obj)

    def key(self, mode: str, text: str) -> Any:
        return guarded(
            lambda: self.rt.engine().key(
                OP_EMBED, {"mode": mode, "text": text}, fingerprint=self.fp
            ),
            None,
            topic="key",
        )

    def miss(self, key: Any, mode: str, text: str) -> ReplayMissError:
        """Replay mode: the error of a text with no recorded embedding (nothing was sent)."""
        try:
            if key is None:
                raise ValueError("the text has no identity")
            engine = self.rt.engine()
            decision = engine.explain(key, _CONFIG)
        except Exception as exc:
            return store_failure_error(
                kind="embedding", op_name=OP_EMBED, node_id=None, store=self.rt.path, error=exc
            )
        return miss_error(
            engine,
            key,
            decision,
            kind="embedding",
            model=self.model,
            material_of=lambda: material({"mode": mode, "text": text}, self.fp),
        )

    def begin(self, text: str) -> Any:
        return _m.begin(self.rt, "embedding", self.label, self.model, text)

    def served(self, key: Any, text: str) -> list[float] | None:
        """The stored vector of ``text`` (its replayed call recorded), else None."""
        if key is None:
            return None
        hit = guarded(lambda: self.rt.engine().lookup(key, config=_CONFIG), None)
        if hit is None or not hit.replay:
            return None
        value = hit.value
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value):
            warn_once("decode", "stored embedding is not a list of numbers; re-executing")
            return None
        _m.end(
            self.begin(text),
            node_id=key.node_id,
            artifact_id=hit.artifact_id,
            replayed=True,
            tokens=(None, None),
            saved_s=hit.duration_s,
            texts=[],
            output_preview=_floats(value),
        )
        return [float(v) for v in value]

    def record(
        self, key: Any, vector: Sequence[float], duration: float, call: Any, mode: str, text: str
    ) -> None:
        recorded = None
        if key is not None:
            recorded = guarded(
                lambda: self.rt.engine().record(
                    key,
                    [float(v) for v in vector],
                    _CONFIG,
                    kind="embedding",
                    duration_s=duration,
                    label=self.label,
                    defer=True,  # ingestion embeds thousands of texts: batch the writes
                    meta=material({"mode": mode, "text": text}, self.fp),
                ),
                None,
                topic="record",
            )
        _m.end(
            call,
            node_id=recorded.node_id if recorded is not None else None,
            artifact_id=recorded.artifact_id if recorded is not None else None,
            replayed=False,
            tokens=(None, None),
            saved_s=None,
            texts=[],
            output_preview=_floats(vector),
        )


def _embedder(obj: Any) -> _Embedder:
    rt = _m.runtime_of(obj)
    assert rt is not None
    return _Embedder(obj, rt)


class _Batch:
    """Texts to embed: the ones served from the store, and calls for the rest."""

    def __init__(self, obj: Any, texts: Sequence[str], mode: str) -> None:
        self.emb = emb = _embedder(obj)
        self.mode = mode
        self.texts = list(texts)
        self.keys = [emb.key(mode, t) for t in self.texts]
        self.found: list[Any] = [
            emb.served(k, t) for k, t in zip(self.keys, self.texts, strict=False)
        ]
        self.missing = [i for i, v in enumerate(self.found) if v is None]
        if self.missing and emb.rt.mode is Mode.REPLAY:
            first = self.missing[0]
            raise emb.miss(self.keys[first], mode, self.texts[first])
        self.calls: list[Any] = []
        self.t0 = 0.0

    def start(self) -> list[str]:
        """The texts to embed (their calls opened)."""
        self.calls = [self.emb.begin(self.texts[i]) for i in self.missing]
        self.t0 = time.perf_counter()
        return [self.texts[i] for i in self.missing]

    def guard(self) -> _m.Guard:
        # One text: the provider's own spans belong to its call.
        return _m.Guard(self.emb.obj, self.calls[0] if len(self.calls) == 1 else None)

    def failed(self, err: BaseException) -> None:
        for call in self.calls:
            _m.failed(call, err)

    def finish(self, vectors: Sequence[Sequence[float]]) -> None:
        per = (time.perf_counter() - self.t0) / max(1, len(self.missing))
        found = self.found
        for i, vec, call in zip(self.missing, vectors, self.calls, strict=False):
            found[i] = list(vec)
            self.emb.record(self.keys[i], vec, per, call, self.mode, self.texts[i])


def _override(cls: type, name: str, mode: str, *, one: bool, is_async: bool) -> Callable[..., Any]:
    """The replaying override of ``cls.name``: one text (``one``) or a list of texts."""
    original = getattr(cls, name)

    if is_async:

        async def amethod(self: Any, arg: Any) -> Any:
            if _m.passthrough(self):
                return await original(self, arg)
            batch = _Batch(self, [arg] if one else arg, mode)
            if batch.missing:
                todo = batch.start()
                try:
                    with batch.guard():
                        got = await original(self, todo[0] if one else todo)
                except BaseException as err:
                    batch.failed(err)
                    raise
                batch.finish([got] if one else got)
            return batch.found[0] if one else batch.found

        amethod.__name__ = name
        return _m.mark(amethod)

    def method(self: Any, arg: Any) -> Any:
        if _m.passthrough(self):
            return original(self, arg)
        batch = _Batch(self, [arg] if one else arg, mode)
        if batch.missing:
            todo = batch.start()
            try:
                with batch.guard():
                    got = original(self, todo[0] if one else todo)
            except BaseException as err:
                batch.failed(err)
                raise
            batch.finish([got] if one else got)
        return batch.found[0] if one else batch.found

    method.__name__ = name
    return _m.mark(method)


def make_embedding_methods(cls: type) -> dict[str, Any]:
    """The replaying overrides of an embedding class ``cls``."""
    forms = (
        ("_get_query_embedding", "query", True, False),
        ("_aget_query_embedding", "query", True, True),
        ("_get_text_embedding", "text", True, False),
        ("_aget_text_embedding", "text", True, True),
        ("_get_text_embeddings", "text", False, False),
        ("_aget_text_embeddings", "text", False, True),
    )
    return {
        name: _override(cls, name, mode, one=one, is_async=is_async)
        for name, mode, one, is_async in forms
    }
