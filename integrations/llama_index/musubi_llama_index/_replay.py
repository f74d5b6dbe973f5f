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

import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, CompletionResponse

from musubi_core import ReplayMissError, StepConfiguration, StepType
from musubi_core.modes import Mode
from musubi_core.replay_miss import material, miss_error, store_failure_error
from musubi_llama_index import _embed, _flight
from musubi_llama_index import _models as _m
from musubi_llama_index._content import brief, prompt_text, usage_of
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

OP_CHAT = "llama_index.llm.chat"
OP_COMPLETE = "llama_index.llm.complete"


class _Call:
    """One LLM call: its key, how to look it up / record it, and its call record."""

    def __init__(self, obj: Any, rt: Runtime, kind: str, payload: Any, kwargs: dict[str, Any]):
        self.obj = obj
        self.rt = rt
        self.kind = kind
        self.op = OP_CHAT if kind == "chat" else OP_COMPLETE
        self.label = f"{type(obj).__name__}.{kind}"
        self.config = StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=rt.ttl_seconds)
        self.inputs = llm_call_inputs(kind, payload, kwargs)
        original = type(obj).__dict__.get("__musubi_original__", type(obj))
        fp = self.fingerprint = model_fingerprint(obj, original_cls=original)
        self.key = guarded(
            lambda: rt.engine().key(self.op, self.inputs, fingerprint=fp), None, topic="key"
        )
        # Its call: under the span it is made in (a stream is recorded after that span has
        # exited, so the place is taken now).
        self.call = _m.begin(rt, "llm", self.label, _m.model_name(obj), prompt_text(payload))
        self.t0 = time.perf_counter()

    def guard(self) -> _m.Guard:
        return _m.Guard(self.obj, self.call)

    def lookup(self) -> Any | None:
        """What the store holds for this call when it replays (a ``Lookup``), else None."""
        key = self.key
        if key is None:
            return None
        hit = guarded(lambda: self.rt.engine().lookup(key, config=self.config), None)
        if hit is None or not hit.replay:
            return None
        return hit

    def miss(self) -> ReplayMissError:
        """Replay mode: the error of this call, which has no recording (nothing was sent)."""
        key = self.key
        model = _m.model_name(self.obj)
        try:
            if key is None:
                raise ValueError("the call has no identity")
            engine = self.rt.engine()
            decision = engine.explain(key, self.config)
        except Exception as exc:
            return store_failure_error(
                kind="llm", op_name=self.op, node_id=None, store=self.rt.path, error=exc
            )
        return miss_error(
            engine,
            key,
            decision,
            kind="llm",
            model=model,
            material_of=lambda: material(self.inputs, self.fingerprint),
        )

    def replayed(self, hit: Any) -> None:
        """Record the call as a replay of its node (served from ``hit``)."""
        tokens = (hit.tokens_in, hit.tokens_out)
        self._end(hit.value, hit.node_id, hit.artifact_id, True, tokens, hit.duration_s)

    def _end(
        self,
        value: Any,
        node_id: str | None,
        artifact_id: str | None,
        replayed: bool,
        tokens: tuple[int | None, int | None],
        saved_s: float | None,
    ) -> None:
        texts = _atoms_of_value(value)
        _m.end(
            self.call,
            node_id=node_id,
            artifact_id=artifact_id,
            replayed=replayed,
            tokens=tokens,
            saved_s=saved_s,
            texts=texts,
            output_preview=_preview(value, texts),
        )

    def failed(self, err: BaseException) -> None:
        _m.failed(self.call, err)

    def recorded(self, resp: Any) -> Any:
        """Record an executed response; returns it."""
        self.record(resp, None)
        return resp

    def record(self, resp: Any, deltas: list[str] | None) -> None:
        key = self.key
        final = (
            dump_chat_response(resp)
            if isinstance(resp, ChatResponse)
            else dump_completion_response(resp)
        )
        value = {"final": final, "deltas": deltas}
        tin, tout = usage_of(resp)
        duration = time.perf_counter() - self.t0
        recorded = None
        if key is not None:
            recorded = guarded(
                lambda: self.rt.engine().record(
                    key,
                    value,
                    self.config,
                    kind="llm",
                    duration_s=duration,
                    tokens_in=tin,
                    tokens_out=tout,
                    label=self.label,
                    meta=material(self.inputs, self.fingerprint),
                ),
                None,
                topic="record",
            )
        if recorded is None:
            self._end(value, None, None, False, (tin, tout), None)
        else:
            self._end(value, recorded.node_id, recorded.artifact_id, False, (tin, tout), None)


def _atoms_of_value(value: Any) -> list[str]:
    try:
        final = value["final"]
        if final.get("type") == "completion":
            return [final["text"]] if final["text"] else []
        texts = [b.get("text") for b in final["message"]["blocks"] if b.get("text")]
        return [t for t in texts if isinstance(t, str)]
    except (KeyError, TypeError, AttributeError):
        return []


def _preview(value: Any, texts: list[str]) -> str | None:
    """An LLM answer's preview: its text, else the tools it called."""
    if texts:
        return brief(texts[0])
    try:
        message = value["final"]["message"]
        called = [
            f"{b.get('tool_name')}({b.get('tool_kwargs')})"
            for b in message["blocks"]
            if b.get("block_type") == "tool_call"
        ]
        if not called:
            extra = message.get("additional_kwargs") or {}
            for tc in (extra.get("tool_calls") or {}).get("__tool_calls__", []):
                fn = tc.get("function") or {}
                called.append(f"{fn.get('name')}({fn.get('arguments')})")
    except (KeyError, TypeError, AttributeError):
        return None
    return brief("tool calls: " + ", ".join(called)) if called else None


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
    def _start(self: Any, kind: str, args: Any, kwargs: Any) -> _Call:
        rt = _m.runtime_of(self)
        assert rt is not None
        payload, call_kwargs = _split_args(kind, args, kwargs)
        return _Call(self, rt, kind, payload, call_kwargs)

    def _served(call: _Call, kind: str, stream: bool) -> Any | None:
        """The stored response (a list of chunks for a stream) of a replay, its call
        recorded; None when the call executes (in replay mode a ReplayMissError instead)."""
        served = _stored(call, kind, stream)
        if served is None and call.rt.mode is Mode.REPLAY:
            error = call.miss()
            call.failed(error)
            raise error
        return served

    def _stored(call: _Call, kind: str, stream: bool) -> Any | None:
        hit = call.lookup()
        if hit is None:
            return None
        if stream:
            try:
                served: Any = _replay_chunks(kind, hit.value)
            except (DecodeFailure, KeyError, TypeError, ValueError) as exc:
                warn_once("decode", f"stored stream could not be decoded ({exc})")
                return None
        else:
            served = _decode_or_none(kind, hit.value)
            if served is None:
                return None
        call.replayed(hit)
        return served

    def _sync(kind: str, name: str, stream: bool) -> Callable[..., Any]:
        original = getattr(cls, name)

        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            if _m.passthrough(self):
                return original(self, *args, **kwargs)
            call = _start(self, kind, args, kwargs)
            served = _served(call, kind, stream)
            if served is not None:
                return iter(served) if stream else served
            held = False
            if not stream:
                served, held = _flight.fly(call.rt, call.key, lambda: _stored(call, kind, False))
                if served is not None:
                    return served
            try:
                with call.guard():
                    out = original(self, *args, **kwargs)
            except BaseException as err:
                call.failed(err)
                _flight.land(call.rt, call.key, held)
                raise
            if stream:
                return _recording_gen(call, out)
            try:
                return call.recorded(out)
            finally:
                _flight.land(call.rt, call.key, held)

        method.__name__ = name
        return _m.mark(method)

    def _async(kind: str, name: str, stream: bool) -> Callable[..., Any]:
        original = getattr(cls, name)

        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            if _m.passthrough(self):
                return await original(self, *args, **kwargs)
            call = _start(self, kind, args, kwargs)
            served = _served(call, kind, stream)
            if served is not None:
                return _async_iter(served) if stream else served
            held = False
            if not stream:
                served, held = await _flight.afly(
                    call.rt, call.key, lambda: _stored(call, kind, False)
                )
                if served is not None:
                    return served
            try:
                with call.guard():
                    out = await original(self, *args, **kwargs)
            except BaseException as err:
                call.failed(err)
                _flight.land(call.rt, call.key, held)
                raise
            if stream:
                return _recording_agen(call, out)
            try:
                return call.recorded(out)
            finally:
                _flight.land(call.rt, call.key, held)

        method.__name__ = name
        return _m.mark(method)

    return {
        "chat": _sync("chat", "chat", False),
        "complete": _sync("complete", "complete", False),
        "achat": _async("chat", "achat", False),
        "acomplete": _async("complete", "acomplete", False),
        "stream_chat": _sync("chat", "stream_chat", True),
        "stream_complete": _sync("complete", "stream_complete", True),
        "astream_chat": _async("chat", "astream_chat", True),
        "astream_complete": _async("complete", "astream_complete", True),
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


def _recording_gen(call: _Call, inner: Iterator[Any]) -> Iterator[Any]:
    """The provider's stream, recorded when it is exhausted."""
    deltas: list[str] = []
    last = None
    while True:
        try:
            with call.guard():
                chunk = next(inner)
        except StopIteration:
            break
        except BaseException as err:
            call.failed(err)
            raise
        last = chunk
        deltas.append(chunk.delta or "")
        yield chunk
    if last is not None:
        call.record(last, deltas)


async def _recording_agen(call: _Call, inner: AsyncIterator[Any]) -> AsyncIterator[Any]:
    deltas: list[str] = []
    last = None
    while True:
        try:
            with call.guard():
                chunk = await inner.__anext__()
        except StopAsyncIteration:
            break
        except BaseException as err:
            call.failed(err)
            raise
        last = chunk
        deltas.append(chunk.delta or "")
        yield chunk
    if last is not None:
        call.record(last, deltas)


async def _async_iter(items: Sequence[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


# ----------------------------------------------------------------------------- class swap
def _rebuild_original(cls: Any, state: Any) -> Any:
    """Unpickle a patched object as its original class (worker processes get no replay)."""
    obj = cls.__new__(cls)
    obj.__setstate__(state)
    return obj


def _replay_class(cls: type, kind: str) -> type:
    with _m.lock:
        cached = _m.subclasses.get(cls)
        if cached is not None:
            return cached
        methods = _make_llm_methods(cls) if kind == "llm" else _embed.make_embedding_methods(cls)

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
        _m.subclasses[cls] = sub
        return sub


def _patch(obj: Any, rt: Runtime, kind: str) -> bool:
    with _m.lock:
        entry = _m.patched.get(id(obj))
        if entry is not None and entry[0] is obj:
            _m.patched[id(obj)] = (obj, entry[1], rt)  # re-instrument: new runtime, same class
            return False
        cls = type(obj)
        sub = _replay_class(cls, kind)
        object.__setattr__(obj, "__class__", sub)
        _m.patched[id(obj)] = (obj, cls, rt)
        return True


def patch_llm(llm: Any, rt: Runtime) -> bool:
    """Make ``llm`` replayable (class swap). Returns False if it was already patched."""
    return _patch(llm, rt, "llm")


def patch_embedding(embed_model: Any, rt: Runtime) -> bool:
    """Make ``embed_model`` replayable (class swap). Returns False if already patched."""
    return _patch(embed_model, rt, "embedding")


def is_patched(obj: Any) -> bool:
    with _m.lock:
        entry = _m.patched.get(id(obj))
    return entry is not None and entry[0] is obj


def unpatch(obj: Any) -> None:
    """Restore the original class of ``obj`` (no-op if not patched)."""
    with _m.lock:
        entry = _m.patched.pop(id(obj), None)
        if entry is None or entry[0] is not obj:
            return
        object.__setattr__(obj, "__class__", entry[1])


def patched_objects() -> list[Any]:
    with _m.lock:
        return [e[0] for e in _m.patched.values()]
