"""Replay for LLM and embedding *instances*, keeping their class for ``isinstance``.

LlamaIndex's dispatcher is observational (a handler cannot return a cached value), so replay
happens at the component: the instance's class is swapped for a generated subclass of its own
class (``OpenAI`` -> a class also named ``OpenAI``, subclass of it), so

* ``isinstance(llm, FunctionCallingLLM)`` and every provider method keep working;
* query engines built *before* instrumenting hold the same object, so they replay too;
* ``uninstrument`` swaps the original class back: nothing is added to the instance ``__dict__``
  and pydantic fields / ``model_dump()`` / ``to_dict()`` are untouched.

Overrides are marked as already span-decorated so ``DispatcherSpanMixin`` does not wrap them a
second time: on a miss the provider's own spans and events fire exactly as before; on a hit the
provider is never called.

LLM: ``chat``, ``complete``, ``stream_chat``, ``stream_complete`` and the ``a*`` forms. Streams
are recorded when the stream is exhausted and replayed as (async) generators yielding the
stored deltas. Embeddings: the private provider hooks (``_get_query_embedding``,
``_get_text_embedding(s)`` and async forms) are overridden, per text, so the public spans,
events and ``embeddings_cache`` logic of ``BaseEmbedding`` stay intact.

Example::

    patch_llm(llm, runtime)        # llm.chat(...) now replays
    unpatch(llm)                   # exactly as before
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse

from musubi_core import StepConfiguration, StepType
from musubi_llama_index import _lineage
from musubi_llama_index._identity import llm_call_inputs, model_fingerprint
from musubi_llama_index._runtime import Runtime, guarded, warn_once
from musubi_llama_index._serde import (
    DecodeFailure,
    dump_chat_response,
    dump_completion_response,
    load_chat_response,
    load_completion_response,
)

__all__ = ["is_patched", "patch_embedding", "patch_llm", "patched_objects", "unpatch"]

_SPAN_ATTR = "__dispatcher_span_decorated__"
OP_CHAT = "llama_index.llm.chat"
OP_COMPLETE = "llama_index.llm.complete"
OP_EMBED = "llama_index.embedding"

# id(instance) of objects currently executing their *original* method: nested calls made by
# the provider itself (MockLLM.acomplete -> self.complete, base _get_text_embeddings ->
# self._get_text_embedding) pass straight through, so only the outermost call is a node.
_inside: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "musubi_li_inside", default=frozenset()
)

_lock = threading.RLock()
_subclasses: dict[type, type] = {}
# id(obj) -> (obj, original class, runtime)
_patched: dict[int, tuple[Any, type, Runtime]] = {}


# ----------------------------------------------------------------------------- helpers
def _runtime_of(obj: Any) -> Runtime | None:
    with _lock:
        entry = _patched.get(id(obj))
    return entry[2] if entry is not None and entry[0] is obj else None


def _mark(fn: Callable[..., Any]) -> Callable[..., Any]:
    setattr(fn, _SPAN_ATTR, True)  # DispatcherSpanMixin: "already a span", do not wrap
    return fn


class _Guard:
    """Marks ``obj`` as running its original method in the current context."""

    __slots__ = ("_obj", "_token")

    def __init__(self, obj: Any) -> None:
        self._obj = obj
        self._token: contextvars.Token[frozenset[int]] | None = None

    def __enter__(self) -> None:
        self._token = _inside.set(_inside.get() | {id(self._obj)})

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            try:
                _inside.reset(self._token)
            except ValueError:  # token from another context (generator moved): best effort
                _inside.set(_inside.get() - {id(self._obj)})


def _passthrough(obj: Any) -> bool:
    return id(obj) in _inside.get() or _runtime_of(obj) is None


def _usage(resp: Any) -> tuple[int | None, int | None]:
    raw = getattr(resp, "raw", None)
    usage = raw.get("usage") if isinstance(raw, dict) else getattr(raw, "usage", None)
    if isinstance(usage, dict):
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
    else:
        p, c = getattr(usage, "prompt_tokens", None), getattr(usage, "completion_tokens", None)
    ak = getattr(resp, "additional_kwargs", None) or {}
    p = p if isinstance(p, int) else ak.get("prompt_tokens")
    c = c if isinstance(c, int) else ak.get("completion_tokens")
    return (p if isinstance(p, int) else None, c if isinstance(c, int) else None)


class _Call:
    """One LLM call: its key, and how to look it up / record it."""

    def __init__(self, obj: Any, rt: Runtime, kind: str, payload: Any, kwargs: dict[str, Any]):
        self.obj = obj
        self.rt = rt
        self.kind = kind
        self.op = OP_CHAT if kind == "chat" else OP_COMPLETE
        self.config = StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=rt.ttl_seconds)
        self.inputs = llm_call_inputs(kind, payload, kwargs)
        self.input_text = _lineage.input_text(payload)
        # The span the call was made in: a stream is recorded after that span has exited.
        self.span_id = _lineage.current_span_id()
        original = type(obj).__dict__.get("__musubi_original__", type(obj))
        fp = model_fingerprint(obj, original_cls=original)
        self.key = guarded(
            lambda: rt.engine().key(self.op, self.inputs, fingerprint=fp), None, topic="key"
        )
        self.t0 = time.perf_counter()

    def lookup(self) -> Any | None:
        """The stored value on a replay, else None."""
        key = self.key
        if key is None:
            return None
        hit = guarded(lambda: self.rt.engine().lookup(key, config=self.config), None)
        if hit is None or not hit.replay:
            return None
        _lineage.on_leaf(
            key.node_id, "llm", self.input_text, _atoms_of_value(hit.value), self.span_id
        )
        return hit.value

    def record(self, resp: Any, deltas: list[str] | None) -> None:
        key = self.key
        if key is None:
            return
        final = (
            dump_chat_response(resp)
            if isinstance(resp, ChatResponse)
            else dump_completion_response(resp)
        )
        value = {"final": final, "deltas": deltas}
        tin, tout = _usage(resp)
        duration = time.perf_counter() - self.t0
        guarded(
            lambda: self.rt.engine().record(
                key,
                value,
                self.config,
                kind="llm",
                duration_s=duration,
                tokens_in=tin,
                tokens_out=tout,
                label=f"{type(self.obj).__name__}.{self.kind}",
            ),
            None,
            topic="record",
        )
        _lineage.on_leaf(
            key.node_id, "llm", self.input_text, _atoms_of_value(value), self.span_id
        )


def _atoms_of_value(value: Any) -> list[str]:
    try:
        final = value["final"]
        if final.get("type") == "completion":
            return [final["text"]] if final["text"] else []
        texts = [b.get("text") for b in final["message"]["blocks"] if b.get("text")]
        return [t for t in texts if isinstance(t, str)]
    except (KeyError, TypeError, AttributeError):
        return []


def _decode(kind: str, stored: Any, *, delta: str | None = None, text: str | None = None) -> Any:
    final = stored["final"] if isinstance(stored, dict) else None
    if kind == "chat":
        return load_chat_response(final, delta=delta)
    return load_completion_response(final, text=text, delta=delta)


def _decode_or_none(kind: str, stored: Any) -> Any | None:
    try:
        return _decode(kind, stored)
    except (DecodeFailure, KeyError, TypeError, ValueError) as exc:
        warn_once("decode", f"stored LLM response could not be decoded ({exc}); re-executing")
        return None


def _replay_chunks(kind: str, stored: Any) -> list[Any]:
    """Rebuild the stream: one response per stored delta, the last one the full final."""
    final = _decode(kind, stored)
    deltas = stored.get("deltas") if isinstance(stored, dict) else None
    full = final.message.content if kind == "chat" else final.text
    if not isinstance(deltas, list) or not deltas:
        deltas = [full or ""]
    chunks: list[Any] = []
    acc = ""
    for i, d in enumerate(deltas):
        d = d if isinstance(d, str) else ""
        acc += d
        if i == len(deltas) - 1:
            chunks.append(_decode(kind, stored, delta=d))
        elif kind == "chat":
            # Intermediate chunks carry the text so far; tool calls arrive with the last one.
            msg = ChatMessage(role=final.message.role, content=acc)
            chunks.append(ChatResponse(message=msg, delta=d, raw=None))
        else:
            chunks.append(CompletionResponse(text=acc, delta=d))
    return chunks


# ----------------------------------------------------------------------------- LLM overrides
def _make_llm_methods(cls: type) -> dict[str, Any]:
    def _sync(kind: str, name: str) -> Callable[..., Any]:
        original = getattr(cls, name)

        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            if _passthrough(self):
                return original(self, *args, **kwargs)
            rt = _runtime_of(self)
            assert rt is not None
            payload, call_kwargs = _split_args(kind, args, kwargs)
            call = _Call(self, rt, kind, payload, call_kwargs)
            stored = call.lookup()
            if stored is not None:
                resp = _decode_or_none(kind, stored)
                if resp is not None:
                    return resp
            with _Guard(self):
                resp = original(self, *args, **kwargs)
            call.record(resp, None)
            return resp

        method.__name__ = name
        return _mark(method)

    def _async(kind: str, name: str) -> Callable[..., Any]:
        original = getattr(cls, name)

        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            if _passthrough(self):
                return await original(self, *args, **kwargs)
            rt = _runtime_of(self)
            assert rt is not None
            payload, call_kwargs = _split_args(kind, args, kwargs)
            call = _Call(self, rt, kind, payload, call_kwargs)
            stored = call.lookup()
            if stored is not None:
                resp = _decode_or_none(kind, stored)
                if resp is not None:
                    return resp
            with _Guard(self):
                resp = await original(self, *args, **kwargs)
            call.record(resp, None)
            return resp

        method.__name__ = name
        return _mark(method)

    def _stream(kind: str, name: str) -> Callable[..., Any]:
        original = getattr(cls, name)

        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            if _passthrough(self):
                return original(self, *args, **kwargs)
            rt = _runtime_of(self)
            assert rt is not None
            payload, call_kwargs = _split_args(kind, args, kwargs)
            call = _Call(self, rt, kind, payload, call_kwargs)
            stored = call.lookup()
            if stored is not None:
                try:
                    return iter(_replay_chunks(kind, stored))
                except (DecodeFailure, KeyError, TypeError, ValueError) as exc:
                    warn_once("decode", f"stored stream could not be decoded ({exc})")
            with _Guard(self):
                inner = original(self, *args, **kwargs)
            return _recording_gen(self, call, inner)

        method.__name__ = name
        return _mark(method)

    def _astream(kind: str, name: str) -> Callable[..., Any]:
        original = getattr(cls, name)

        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            if _passthrough(self):
                return await original(self, *args, **kwargs)
            rt = _runtime_of(self)
            assert rt is not None
            payload, call_kwargs = _split_args(kind, args, kwargs)
            call = _Call(self, rt, kind, payload, call_kwargs)
            stored = call.lookup()
            if stored is not None:
                try:
                    return _async_iter(_replay_chunks(kind, stored))
                except (DecodeFailure, KeyError, TypeError, ValueError) as exc:
                    warn_once("decode", f"stored stream could not be decoded ({exc})")
            with _Guard(self):
                inner = await original(self, *args, **kwargs)
            return _recording_agen(self, call, inner)

        method.__name__ = name
        return _mark(method)

    return {
        "chat": _sync("chat", "chat"),
        "complete": _sync("complete", "complete"),
        "achat": _async("chat", "achat"),
        "acomplete": _async("complete", "acomplete"),
        "stream_chat": _stream("chat", "stream_chat"),
        "stream_complete": _stream("complete", "stream_complete"),
        "astream_chat": _astream("chat", "astream_chat"),
        "astream_complete": _astream("complete", "astream_complete"),
    }


def _split_args(
    kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """(payload, identity kwargs) from chat(messages, **kw) / complete(prompt, formatted, **kw).

    Callers pass the payload positionally or by name (``chat_with_tools`` does
    ``self.chat(messages=..., tools=...)``).
    """
    out = dict(kwargs)
    rest = list(args)
    name = "messages" if kind == "chat" else "prompt"
    payload = rest.pop(0) if rest else out.pop(name, None)
    if kind == "complete":
        # `formatted` changes what is sent to the provider, so it is part of identity.
        formatted = rest.pop(0) if rest else out.pop("formatted", False)
        out["formatted"] = bool(formatted)
    return payload, out


def _recording_gen(obj: Any, call: _Call, inner: Iterator[Any]) -> Iterator[Any]:
    deltas: list[str] = []
    last = None
    while True:
        with _Guard(obj):
            try:
                chunk = next(inner)
            except StopIteration:
                break
        last = chunk
        deltas.append(chunk.delta or "")
        yield chunk
    if last is not None:
        call.record(last, deltas)


async def _recording_agen(obj: Any, call: _Call, inner: AsyncIterator[Any]) -> AsyncIterator[Any]:
    deltas: list[str] = []
    last = None
    while True:
        with _Guard(obj):
            try:
                chunk = await inner.__anext__()
            except StopAsyncIteration:
                break
        last = chunk
        deltas.append(chunk.delta or "")
        yield chunk
    if last is not None:
        call.record(last, deltas)


async def _async_iter(items: Sequence[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


# ----------------------------------------------------------------------------- embeddings
class _EmbedCall:
    def __init__(self, obj: Any, rt: Runtime) -> None:
        self.obj = obj
        self.rt = rt
        original = type(obj).__dict__.get("__musubi_original__", type(obj))
        self.fp = model_fingerprint(obj, original_cls=original)
        self.config = StepConfiguration(step_type=StepType.DETERMINISTIC)
        self.span_id = _lineage.current_span_id()

    def key(self, mode: str, text: str) -> Any:
        return guarded(
            lambda: self.rt.engine().key(
                OP_EMBED, {"mode": mode, "text": text}, fingerprint=self.fp
            ),
            None,
            topic="key",
        )

    def lookup(self, key: Any, text: str) -> list[float] | None:
        if key is None:
            return None
        hit = guarded(lambda: self.rt.engine().lookup(key, config=self.config), None)
        if hit is None or not hit.replay:
            return None
        value = hit.value
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value):
            warn_once("decode", "stored embedding is not a list of numbers; re-executing")
            return None
        _lineage.on_leaf(key.node_id, "embedding", text, [], self.span_id)
        return [float(v) for v in value]

    def record(self, key: Any, text: str, vector: Sequence[float], duration: float) -> None:
        if key is None:
            return
        guarded(
            lambda: self.rt.engine().record(
                key,
                [float(v) for v in vector],
                self.config,
                kind="embedding",
                duration_s=duration,
                label=f"{type(self.obj).__name__}.embedding",
                defer=True,  # ingestion embeds thousands of texts: batch the writes
            ),
            None,
            topic="record",
        )
        _lineage.on_leaf(key.node_id, "embedding", text, [], self.span_id)


def _make_embedding_methods(cls: type) -> dict[str, Any]:
    def _single(name: str, mode: str, is_async: bool) -> Callable[..., Any]:
        original = getattr(cls, name)

        if is_async:

            async def amethod(self: Any, text: str) -> Any:
                if _passthrough(self):
                    return await original(self, text)
                rt = _runtime_of(self)
                assert rt is not None
                call = _EmbedCall(self, rt)
                key = call.key(mode, text)
                got = call.lookup(key, text)
                if got is not None:
                    return got
                t0 = time.perf_counter()
                with _Guard(self):
                    vec = await original(self, text)
                call.record(key, text, vec, time.perf_counter() - t0)
                return vec

            amethod.__name__ = name
            return _mark(amethod)

        def method(self: Any, text: str) -> Any:
            if _passthrough(self):
                return original(self, text)
            rt = _runtime_of(self)
            assert rt is not None
            call = _EmbedCall(self, rt)
            key = call.key(mode, text)
            got = call.lookup(key, text)
            if got is not None:
                return got
            t0 = time.perf_counter()
            with _Guard(self):
                vec = original(self, text)
            call.record(key, text, vec, time.perf_counter() - t0)
            return vec

        method.__name__ = name
        return _mark(method)

    def _batch(name: str, is_async: bool) -> Callable[..., Any]:
        original = getattr(cls, name)

        def prepare(self: Any, texts: list[str]) -> tuple[_EmbedCall, list[Any], list[Any]]:
            rt = _runtime_of(self)
            assert rt is not None
            call = _EmbedCall(self, rt)
            keys = [call.key("text", t) for t in texts]
            found = [call.lookup(k, t) for k, t in zip(keys, texts, strict=False)]
            return call, keys, found

        def finish(
            call: _EmbedCall,
            texts: list[str],
            keys: list[Any],
            found: list[Any],
            missing: list[int],
            vectors: Sequence[Sequence[float]],
            duration: float,
        ) -> list[list[float]]:
            per = duration / max(1, len(missing))
            for i, vec in zip(missing, vectors, strict=False):
                found[i] = list(vec)
                call.record(keys[i], texts[i], vec, per)
            return found

        if is_async:

            async def amethod(self: Any, texts: list[str]) -> Any:
                if _passthrough(self):
                    return await original(self, texts)
                texts = list(texts)
                call, keys, found = prepare(self, texts)
                missing = [i for i, v in enumerate(found) if v is None]
                if not missing:
                    return found
                t0 = time.perf_counter()
                with _Guard(self):
                    vectors = await original(self, [texts[i] for i in missing])
                return finish(call, texts, keys, found, missing, vectors, time.perf_counter() - t0)

            amethod.__name__ = name
            return _mark(amethod)

        def method(self: Any, texts: list[str]) -> Any:
            if _passthrough(self):
                return original(self, texts)
            texts = list(texts)
            call, keys, found = prepare(self, texts)
            missing = [i for i, v in enumerate(found) if v is None]
            if not missing:
                return found
            t0 = time.perf_counter()
            with _Guard(self):
                vectors = original(self, [texts[i] for i in missing])
            return finish(call, texts, keys, found, missing, vectors, time.perf_counter() - t0)

        method.__name__ = name
        return _mark(method)

    return {
        "_get_query_embedding": _single("_get_query_embedding", "query", False),
        "_aget_query_embedding": _single("_aget_query_embedding", "query", True),
        "_get_text_embedding": _single("_get_text_embedding", "text", False),
        "_aget_text_embedding": _single("_aget_text_embedding", "text", True),
        "_get_text_embeddings": _batch("_get_text_embeddings", False),
        "_aget_text_embeddings": _batch("_aget_text_embeddings", True),
    }


# ----------------------------------------------------------------------------- class swap
def _rebuild_original(cls: Any, state: Any) -> Any:
    """Unpickle a patched object as its original class (worker processes get no replay)."""
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


def _replay_class(cls: type, kind: str) -> type:
    with _lock:
        cached = _subclasses.get(cls)
        if cached is not None:
            return cached
        methods = _make_llm_methods(cls) if kind == "llm" else _make_embedding_methods(cls)

        def __reduce_ex__(self: Any, protocol: Any) -> Any:
            return (_rebuild_original, (cls, self.__getstate__()))

        ns: dict[str, Any] = {
            **methods,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
            "__musubi_original__": cls,
            "__reduce_ex__": __reduce_ex__,
        }
        # Same name as the original: span ids ("OpenAI.chat-<uuid>") and class_name() unchanged.
        meta: Any = type(cls)  # pydantic's model metaclass
        sub: type = meta(cls.__name__, (cls,), ns)
        _subclasses[cls] = sub
        return sub


def _patch(obj: Any, rt: Runtime, kind: str) -> bool:
    with _lock:
        entry = _patched.get(id(obj))
        if entry is not None and entry[0] is obj:
            _patched[id(obj)] = (obj, entry[1], rt)  # re-instrument: new runtime, same class
            return False
        cls = type(obj)
        sub = _replay_class(cls, kind)
        object.__setattr__(obj, "__class__", sub)
        _patched[id(obj)] = (obj, cls, rt)
        return True


def patch_llm(llm: Any, rt: Runtime) -> bool:
    """Make ``llm`` replayable (class swap). Returns False if it was already patched."""
    return _patch(llm, rt, "llm")


def patch_embedding(embed_model: Any, rt: Runtime) -> bool:
    """Make ``embed_model`` replayable (class swap). Returns False if already patched."""
    return _patch(embed_model, rt, "embedding")


def is_patched(obj: Any) -> bool:
    with _lock:
        entry = _patched.get(id(obj))
    return entry is not None and entry[0] is obj


def unpatch(obj: Any) -> None:
    """Restore the original class of ``obj`` (no-op if not patched)."""
    with _lock:
        entry = _patched.pop(id(obj), None)
        if entry is None or entry[0] is not obj:
            return
        object.__setattr__(obj, "__class__", entry[1])


def patched_objects() -> list[Any]:
    with _lock:
        return [e[0] for e in _patched.values()]
