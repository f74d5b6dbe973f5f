"""``MusubiCache``: a drop-in LangChain ``BaseCache`` whose entries are musubi lineage nodes.

Example:
    >>> from langchain_core.globals import set_llm_cache
    >>> from langchain_core.language_models import FakeListChatModel
    >>> import tempfile, os
    >>> db = os.path.join(tempfile.mkdtemp(), "m.db")
    >>> model = FakeListChatModel(responses=["hello"], cache=MusubiCache(db))
    >>> model.invoke("hi").content, model.invoke("hi").content  # second call replays
    ('hello', 'hello')
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from langchain_core.caches import RETURN_VAL_TYPE, BaseCache
from langchain_core.outputs import Generation

from musubi_core.engine import Engine
from musubi_core.errors import ReplayMissError
from musubi_core.fastpath import AliasHit, HitMemo
from musubi_core.flight import DEFAULT_TIMEOUT as FLIGHT_TIMEOUT
from musubi_core.flight import flights_for
from musubi_core.identity import AliasPrefix, NodeKey, make_op, resolve_namespace
from musubi_core.modes import Mode, resolve_mode
from musubi_core.policy import Decision, ReplayReason, StepConfiguration, StepType
from musubi_core.probe import EncodedHit
from musubi_core.record import current_frame, joinable, new_call_id
from musubi_core.record.ambient import AmbientRun

from . import _correlate
from ._codec import (
    EntryDecodeError,
    Template,
    decode_generations,
    encode_generations,
    usage_of,
)
from ._engine import Guard, MusubiLangChainWarning, make_engine
from ._keys import KeyParts, chat_key_parts, llm_key_parts
from ._replaymode import call_material, miss_error, store_failure

# Per-call kwargs of the BaseLLM call in progress (set by the patch instrument() installs):
# LangChain leaves them out of an LLM's llm_string (langchain#40403).
llm_call_kwargs: ContextVar[Mapping[str, Any] | None] = ContextVar(
    "musubi_langchain_llm_call_kwargs", default=None
)

# The ``_type``/class part of the llm_string tells chat models from text LLMs only loosely, so
# the prompt decides: chat prompts are LangChain-serialised JSON message lists.
_CHAT_PROMPT_PREFIX = '[{"lc": 1'
# Bounds of the per-cache memos (prompt -> key, artifact -> decoded template).
_MAX_KEYS = 2048
# The key scheme of aliases (identity.alias_of): bump it whenever chat_key_parts or
# llm_key_parts would map the same two strings to another node.
_ALIAS_SCHEME = "musubi_langchain/1"
_MAX_DECODED = 1024


@dataclass(frozen=True, slots=True)
class _Flight:
    """A miss that, with single flight, waits for (or takes) the node's flight."""

    prompt: str
    llm_string: str
    key: NodeKey
    run_id: UUID | None


@functools.lru_cache(maxsize=1024)
def _call_kind(op_name: str) -> tuple[str, str]:
    """A node's operation name (``chat_model:ChatOpenAI``) as a call's (kind, op name)."""
    kind, _, name = op_name.partition(":")
    return (kind if kind in ("chat_model", "llm") else "llm"), name


class MusubiCache(BaseCache):
    """LangChain cache backed by a musubi store; every entry is a lineage node.

    Args:
        path: SQLite file or PostgreSQL URL (default: ``$MUSUBI_DB`` or
            ``.musubi/musubi.db``).
        store: an existing core store (``SQLiteStore``, ``PostgresStore``) instead of ``path``.
        namespace: keeps projects/experiments apart inside one file: a separate cache (its
            own nodes; :meth:`clear` forgets only its entries). Default: ``engine``'s, else
            ``"default"``.
        ttl_seconds: replay a completion only this long after it was made (None: forever).
        engine: an existing :class:`musubi_core.engine.Engine` (shares its write buffer).
        replay_streams: let ``.stream()``/``.astream()`` be served from this cache
            (requires :func:`musubi_langchain.instrument` or :func:`install_stream_replay`).
        mode: ``"record"`` (default: ``$MUSUBI_MODE``, else record), ``"replay"`` (a miss
            raises :class:`~musubi_core.errors.ReplayMissError` and nothing reaches the
            provider; streams are served from the cache without ``replay_streams``),
            ``"refresh"`` (replay what matches, record what does not) or ``"off"`` (an inert
            cache: every call goes to the provider and nothing is stored).
        single_flight: when several workers (threads, processes, machines sharing the store)
            miss the same call at once, one sends it to the provider and the others wait for
            its stored answer (at most ``single_flight_timeout`` seconds; past it they call
            the provider too, with one warning). A worker that dies mid-call releases it.

    Keys are canonical (volatile message fields, provider tool-call ids and the hit marker are
    dropped; structured-output classes key by JSON schema), hits return a fresh ``list`` of freshly
    decoded generations, and a store failure is a miss plus one warning.

    >>> cache = MusubiCache(":memory:")
    >>> cache.lookup("p", "[('_type', 'x')]") is None
    True
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        store: Any | None = None,
        namespace: str | None = None,
        ttl_seconds: float | None = None,
        engine: Engine | None = None,
        replay_streams: bool = False,
        mode: Mode | str | None = None,
        single_flight: bool = False,
        single_flight_timeout: float = FLIGHT_TIMEOUT,
    ) -> None:
        self._path = path
        self._store = store
        self._namespace = resolve_namespace(namespace, engine.namespace if engine else None)
        self.mode: Mode = resolve_mode(mode, engine.mode if engine else None)
        self._engine: Engine | None = engine
        self._engine_lock = threading.Lock()
        self.config = StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=ttl_seconds)
        # Replay mode serves streams with no opt-in: the provider is not there.
        replay_streams = replay_streams or self.mode is Mode.REPLAY
        self.replay_streams = replay_streams
        self._guard = Guard("MusubiCache")
        # (prompt, llm_string) -> (key, monotonic time of the miss, the handler's run id);
        # consumed by update() so the node records how long the provider call took (the
        # seconds a replay saves) and the handler learns the artifact it stored.
        self._inflight: dict[tuple[str, str], tuple[NodeKey, float, UUID | None]] = {}
        self._inflight_lock = threading.Lock()
        self._keys: dict[tuple[str, str], NodeKey] = {}
        self._ops: dict[tuple[str, str], str] = {}  # (op name, llm_string) -> make_op(...)
        self._prefixes: dict[str, AliasPrefix] = {}  # llm_string -> its aliases' hash state
        # artifact id -> (encoding, payload, validated generations or None before the second
        # hit). A hit whose stored bytes are exactly these copies the template instead of
        # decoding and validating again;
        # the template itself is never handed out. Only hits of the HitMemo enter it, whose
        # payloads hash to their artifact ids (it checks), so bytes equal to these do too.
        self._decoded: dict[str, tuple[str, bytes, Template | None]] = {}
        self._hits: HitMemo | None = None
        self._ambient: AmbientRun | None = None  # the run of lookups made outside any trace
        self.single_flight = single_flight
        self.single_flight_timeout = single_flight_timeout
        # (prompt, llm_string) -> node id of a flight this cache holds until update() stores
        # the provider's answer (see musubi_core.flight).
        self._flying: dict[tuple[str, str], tuple[str, UUID | None]] = {}
        if replay_streams:
            from .streaming import install_stream_replay  # cycle: streaming imports this module

            install_stream_replay()

    # ------------------------------------------------------------------ plumbing
    @property
    def engine(self) -> Engine:
        """The engine (created on first use, so constructing a cache never touches disk)."""
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    engine = make_engine(self._path, self._store, self._namespace, self.mode)
                    if engine.recorder.on_error is None:
                        engine.recorder.on_error = self._guard.warn
                    self._engine = engine
        return self._engine

    @property
    def _hit_memo(self) -> HitMemo:
        if self._hits is None:
            self._hits = self.engine.hits  # shared with every other replay path of the engine
        return self._hits

    def key_parts(self, prompt: str, llm_string: str) -> KeyParts:
        """Canonical key parts for a LangChain ``(prompt, llm_string)`` pair."""
        if prompt.startswith(_CHAT_PROMPT_PREFIX):
            return chat_key_parts(prompt, llm_string)
        return llm_key_parts(prompt, llm_string, llm_call_kwargs.get())

    def node_key(self, prompt: str, llm_string: str) -> NodeKey:
        """The node a ``(prompt, llm_string)`` pair maps to.

        Memoised: the key is a pure function of the two strings (parsing + canonical hashing
        would dominate a hit). A text LLM's per-call kwargs (captured by ``instrument()``) are
        part of the identity but not of the two strings, so calls carrying them skip the memo.
        """
        memo = llm_call_kwargs.get() is None
        if memo:
            cached = self._keys.get((prompt, llm_string))
            if cached is not None:
                return cached
        parts = self.key_parts(prompt, llm_string)
        # The operation (its name plus a digest of the model's parameters) depends on the
        # llm_string alone: hashed once per model, not once per prompt.
        op = self._ops.get((parts.op_name, llm_string))
        if op is None:
            op = make_op(parts.op_name, parts.fingerprint)
            if len(self._ops) >= _MAX_KEYS:
                self._ops.clear()
            self._ops[(parts.op_name, llm_string)] = op
        key = self.engine.key(parts.op_name, parts.inputs, op=op)
        if memo:
            if len(self._keys) >= _MAX_KEYS:
                self._keys.clear()
            self._keys[(prompt, llm_string)] = key
        return key

    def _remember(
        self, prompt: str, llm_string: str, key: NodeKey, run_id: UUID | None = None
    ) -> None:
        with self._inflight_lock:
            if len(self._inflight) > 4096:  # abandoned misses (errors) must not pile up
                self._inflight.clear()
            self._inflight[(prompt, llm_string)] = (key, time.monotonic(), run_id)

    def _own_call(
        self,
        node_id: str,
        op_name: str,
        *,
        artifact_id: str | None,
        replayed: bool,
        tokens_in: int | None,
        tokens_out: int | None,
        duration_s: float | None,
        saved_s: float | None = None,
        count_replay: bool = False,
    ) -> None:
        """Record a lookup no callback handler saw (no handler installed, or a text-LLM hit,
        for which LangChain fires no callbacks) as a call: of the current run (inside a
        ``@step`` or a durable step), else of this cache's run of calls outside any trace (one
        run per burst of calls, see ``musubi_core.record.ambient``). ``count_replay``: the
        call is a hit whose replay nobody counted yet (it is counted with the call)."""
        kind, name = _call_kind(op_name)
        frame = current_frame()
        if frame is not None and joinable(frame, self.engine.recorder) is not None:
            if count_replay:
                self.engine.recorder.replay(node_id)
            frame.run.record(
                new_call_id(), frame.call_id, kind, name, node_id=node_id,
                artifact_id=artifact_id, replayed=replayed, duration_s=duration_s,
                tokens_in=tokens_in, tokens_out=tokens_out, saved_s=saved_s,
            )
            return
        ambient = self._ambient
        if ambient is None:
            with self._engine_lock:
                ambient = self._ambient
                if ambient is None:
                    ambient = self._ambient = AmbientRun(
                        self.engine.recorder, "langchain", "LLM calls outside a trace",
                        namespace=self._namespace,
                    )
        ambient.add(
            kind, name, node_id, artifact_id, replayed, duration_s, tokens_in, tokens_out,
            saved_s, count_replay=count_replay,
        )

    def _generations(
        self, hit: EncodedHit, memo: tuple[str, bytes, Template | None] | None
    ) -> list[Generation]:
        """Fresh generations for a hit. The first hit of an entry decodes it (allow-listed,
        validated) and hands out what it decoded: nothing else holds those objects, and a
        cold hit (the next run reads each entry once) pays for no copy plan. The entry's
        bytes are remembered; a second hit of the same bytes decodes them once more into a
        private template that later hits copy instead of decoding. ``memo``: what
        ``_decoded`` holds for the artifact."""
        same = memo is not None and memo[1] == hit.payload and memo[0] == hit.encoding
        decoded = decode_generations(self.engine.codec.decode(hit.encoding, hit.payload))
        if not same:
            if len(self._decoded) >= _MAX_DECODED:
                self._decoded.clear()
            self._decoded[hit.artifact_id] = (hit.encoding, hit.payload, None)
            return decoded
        template = Template(decoded)
        self._decoded[hit.artifact_id] = (hit.encoding, hit.payload, template)
        return template.fresh()

    def _alias(self, prompt: str, llm_string: str) -> bytes:
        """The alias of a ``(prompt, llm_string)`` pair (see ``identity.alias_of``): stored
        with the node, so the next process finds the node without computing its key. The
        hash state of the scheme, namespace and ``llm_string`` is kept per model."""
        prefix = self._prefixes.get(llm_string)
        if prefix is None:
            if len(self._prefixes) >= _MAX_KEYS:
                self._prefixes.clear()
            prefix = self._prefixes[llm_string] = AliasPrefix(
                _ALIAS_SCHEME, self._namespace, llm_string
            )
        return prefix.alias(prompt)

    def _serve(
        self, node_id: str, op_name: str, hit: EncodedHit, run_id: UUID | None
    ) -> list[Generation] | None:
        """Fresh generations of a plain hit, its replay counted and its call recorded; None
        when the bytes do not decode (the full lookup then decides and warns)."""
        try:
            memo = self._decoded.get(hit.artifact_id)
            if (
                memo is not None
                and memo[2] is not None
                and memo[1] == hit.payload
                and memo[0] == hit.encoding
            ):
                generations = memo[2].fresh()
            else:
                generations = self._generations(hit, memo)
        except Exception:
            return None
        if run_id is not None:
            engine = self._engine if self._engine is not None else self.engine
            engine.recorder.replay(node_id)  # committed with the recorder's next batch
            _correlate.report(
                run_id,
                _correlate.CacheReport(
                    node_id=node_id,
                    replayed=True,
                    artifact_id=hit.artifact_id,
                    tokens_in=hit.tokens_in,
                    tokens_out=hit.tokens_out,
                    saved_s=hit.duration_s,
                ),
            )
        else:
            self._own_call(
                node_id,
                op_name,
                artifact_id=hit.artifact_id,
                replayed=True,
                tokens_in=hit.tokens_in,
                tokens_out=hit.tokens_out,
                duration_s=0.0,
                saved_s=hit.duration_s,
                count_replay=True,
            )
        return generations

    def _lookup(self, prompt: str, llm_string: str) -> list[Generation] | _Flight | None:
        run_id = _correlate.claim() if _correlate.pending() else None
        # A text LLM's per-call kwargs (captured by instrument()) are part of the key but not
        # of the two strings: such calls use neither the key memo nor aliases.
        plain = llm_call_kwargs.get() is None
        key = self._keys.get((prompt, llm_string)) if plain else None
        hits = self._hits if self._hits is not None else self._hit_memo
        alias: bytes | None = None
        if key is None and plain:
            # The next run's first hit of this request: the alias leads to the node.
            alias = self._alias(prompt, llm_string)
            via = hits.probe_alias(alias, self.config)
            if isinstance(via, AliasHit):
                served = self._serve(via.node_id, via.op_name, via.hit, run_id)
                if served is not None:
                    return served
            elif via is not None:
                alias = None  # stored; the node is not a plain hit: the full lookup decides
        if key is None:
            key = self.node_key(prompt, llm_string)
        probed = hits.probe(key, self.config)
        generations: list[Generation] | None = None
        if isinstance(probed, EncodedHit):
            generations = self._serve(key.node_id, key.op_name, probed, run_id)
            if generations is None:
                generations = self._slow_lookup(key, run_id)
            elif alias is not None:
                # An entry stored before aliases existed: the next run finds it by its alias.
                self.engine.recorder.submit(aliases=((alias, key.node_id),))
        elif probed is None:
            generations = self._slow_lookup(key, run_id)
        if generations is not None:
            return generations
        if self.mode is Mode.REPLAY:
            raise self.miss_error(prompt, llm_string, key)
        if self.single_flight and (prompt, llm_string) not in self._flying:
            return _Flight(prompt, llm_string, key, run_id)
        self._missed(prompt, llm_string, key, run_id)
        return None

    def _missed(
        self, prompt: str, llm_string: str, key: NodeKey, run_id: UUID | None
    ) -> None:
        if run_id is not None:
            _correlate.report(run_id, _correlate.CacheReport(node_id=key.node_id, replayed=False))
        self._remember(prompt, llm_string, key, run_id)

    def _landed(
        self, flight: _Flight, state: tuple[list[Generation] | None, bool]
    ) -> list[Generation] | None:
        """After waiting: the answer another worker stored, or this cache's flight (held
        until :meth:`update`), or (timed out) a plain miss."""
        found, held = state
        if found is not None:
            return found
        if held:
            with self._inflight_lock:
                self._flying[(flight.prompt, flight.llm_string)] = (
                    flight.key.node_id, flight.run_id
                )
            if flight.run_id is not None:
                # Under instrument(), the handler sees the call fail: the flight is released
                # then (without the handler, only a later update() or the waiters' timeout).
                prompt, llm_string = flight.prompt, flight.llm_string
                _correlate.on_failure(flight.run_id, lambda: self._land(prompt, llm_string))
        self._missed(flight.prompt, flight.llm_string, flight.key, flight.run_id)
        return None

    def _ready(self, flight: _Flight) -> Callable[[], list[Generation] | None]:
        return lambda: self._slow_lookup(flight.key, flight.run_id)

    def _fly(self, flight: _Flight) -> list[Generation] | None:
        try:
            state = flights_for(self.engine.store).wait_or_claim(
                flight.key.node_id, self._ready(flight), timeout=self.single_flight_timeout,
                category=MusubiLangChainWarning,
            )
            return self._landed(flight, state)
        except Exception as exc:  # never break the host: a miss plus one warning
            self._guard.warn(exc)
            return None

    async def _afly(self, flight: _Flight) -> list[Generation] | None:
        try:
            state = await flights_for(self.engine.store).await_or_claim(
                flight.key.node_id, self._ready(flight), timeout=self.single_flight_timeout,
                category=MusubiLangChainWarning,
            )
            return self._landed(flight, state)
        except Exception as exc:
            self._guard.warn(exc)
            return None

    def _land(self, prompt: str, llm_string: str) -> None:
        """Release the flight held for this call, if any (its answer is stored, or failed)."""
        with self._inflight_lock:
            flying = self._flying.pop((prompt, llm_string), None)
        if flying is not None:
            node_id, run_id = flying
            if run_id is not None:
                _correlate.on_failure(run_id, None)
            self._guard.call(lambda: flights_for(self.engine.store).release(node_id), None)

    def _slow_lookup(self, key: NodeKey, run_id: UUID | None) -> list[Generation] | None:
        """The full engine lookup (stale-but-revivable nodes, buffered writes, corrupt bytes)."""
        got = self.engine.lookup(key, self.config)
        if not got.replay:
            return None
        try:
            generations = decode_generations(got.value)
        except EntryDecodeError as exc:
            self._guard.warn(exc)
            return None
        tokens_in, tokens_out = got.tokens_in, got.tokens_out
        saved_s, artifact_id = got.duration_s, got.artifact_id
        if run_id is not None:
            _correlate.report(
                run_id,
                _correlate.CacheReport(
                    node_id=key.node_id,
                    replayed=True,
                    artifact_id=artifact_id,
                    tokens_in=tokens_in,
                    tokens_out=tokens_out,
                    saved_s=saved_s,
                ),
            )
        else:
            self._own_call(
                key.node_id,
                key.op_name,
                artifact_id=artifact_id,
                replayed=True,
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                duration_s=0.0,
                saved_s=saved_s,
            )
        return generations

    def _update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        with self._inflight_lock:
            pending = self._inflight.pop((prompt, llm_string), None)
        run_id: UUID | None = None
        if pending is None:
            key, duration = self.node_key(prompt, llm_string), None
        else:
            key, duration, run_id = pending[0], time.monotonic() - pending[1], pending[2]
        tokens_in, tokens_out = usage_of(return_val)
        kind = "chat_model" if key.op_name.startswith("chat_model:") else "llm"
        recorded = self.engine.record(
            key,
            encode_generations(return_val),
            self.config,
            kind=kind,
            duration_s=duration,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            label=key.op_name.split(":", 1)[-1],
            meta=call_material(self.key_parts(prompt, llm_string)),
            # The alias maps the two strings to this node only when they alone made its key.
            aliases=(self._alias(prompt, llm_string),)
            if llm_call_kwargs.get() is None and self.node_key(prompt, llm_string) == key
            else (),
        )
        if run_id is not None:
            # The handler records this run's call when it ends: tell it what was stored.
            _correlate.report(
                run_id,
                _correlate.CacheReport(
                    node_id=key.node_id, replayed=False, artifact_id=recorded.artifact_id
                ),
            )
        else:
            self._own_call(
                key.node_id,
                key.op_name,
                artifact_id=recorded.artifact_id,
                replayed=False,
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                duration_s=duration,
            )

    # ------------------------------------------------------------------ BaseCache
    def lookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        """A fresh list of generations stored for this key, or None (miss / store failure).

        In replay mode a miss (or a store that cannot be read) raises
        :class:`~musubi_core.errors.ReplayMissError` instead: it is the one error the cache
        lets reach LangChain, so that nothing is sent to the provider."""
        found = self._lookup_guarded(prompt, llm_string)
        return self._fly(found) if isinstance(found, _Flight) else found

    def _lookup_guarded(self, prompt: str, llm_string: str) -> list[Generation] | _Flight | None:
        if self.mode is Mode.OFF:
            return None
        try:
            return self._lookup(prompt, llm_string)
        except ReplayMissError:
            raise
        except Exception as exc:  # never break the host: a miss plus one warning
            if self.mode is Mode.REPLAY:
                raise store_failure(self, prompt, llm_string, exc) from exc
            self._guard.warn(exc)
            return None

    def update(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        """Record the generations as the node's artifact (a failure only warns once)."""
        if self.mode is Mode.OFF:
            return
        try:
            self._guard.call(lambda: self._update(prompt, llm_string, return_val), None)
        finally:
            self._land(prompt, llm_string)

    def miss_error(
        self, prompt: str, llm_string: str, key: NodeKey | None = None
    ) -> ReplayMissError:
        """The :class:`~musubi_core.errors.ReplayMissError` for a call that has no recording:
        the nearest recorded call of the same model, and what differs."""
        return miss_error(self, prompt, llm_string, key)

    def decision(self, key: NodeKey) -> Decision:
        """Why ``key`` does not replay now (reads only)."""
        return self.engine.explain(key, self.config)

    def clear(self, **kwargs: Any) -> None:
        """Mark every LLM/chat-model node of this namespace stale (history stays for lineage).

        LangChain calls this to drop cached completions; musubi keeps the nodes (they are part
        of recorded lineage) and makes them miss. Other namespaces keep every entry.
        """
        self._guard.call(lambda: self._clear(), None)

    def _clear(self) -> None:
        self.engine.clear(kinds=("chat_model", "llm"))

    # Native async: the default runs the sync method in a thread pool, which costs a thread hop
    # per call and loses the context variable the handler uses to correlate runs.
    async def alookup(self, prompt: str, llm_string: str) -> RETURN_VAL_TYPE | None:
        """Async :meth:`lookup` (runs inline: a SQLite probe is faster than a thread hop; a
        single-flight wait awaits, so the event loop keeps running)."""
        found = self._lookup_guarded(prompt, llm_string)
        return await self._afly(found) if isinstance(found, _Flight) else found

    async def aupdate(self, prompt: str, llm_string: str, return_val: RETURN_VAL_TYPE) -> None:
        """Async :meth:`update`."""
        self.update(prompt, llm_string, return_val)

    async def aclear(self, **kwargs: Any) -> None:
        """Async :meth:`clear`."""
        self.clear(**kwargs)

    # ------------------------------------------------------------------ stream replay hooks
    def would_replay(self, prompt: str, llm_string: str) -> bool:
        """Would :meth:`lookup` hit? Reads only (counts no replay). In replay mode a stream
        that would not is a :class:`~musubi_core.errors.ReplayMissError`."""
        if self.mode is Mode.OFF:
            return False
        if self.mode is Mode.REPLAY:
            try:
                key = self.node_key(prompt, llm_string)
                replays = self.engine.explain(key, self.config).replay
            except Exception as exc:
                raise store_failure(self, prompt, llm_string, exc) from exc
            if not replays:
                raise self.miss_error(prompt, llm_string, key)
            return True

        def peek() -> bool:
            key = self.node_key(prompt, llm_string)
            decision = self.engine.explain(key, self.config)
            if decision.reason is ReplayReason.ARTIFACT_CORRUPT:
                # Edited in the file: the stream runs live. The lookup (a miss, nothing
                # counted) says why, in the one warning a non-streamed call would give.
                self.engine.lookup(key, self.config)
            return bool(decision.replay)

        return self._guard.call(peek, False)

    def begin_stream(self, prompt: str, llm_string: str) -> None:
        """A streamed call missed and started: claim its run for the handler, start the clock."""

        def begin() -> None:
            run_id = _correlate.claim()
            key = self.node_key(prompt, llm_string)
            if run_id is not None:
                _correlate.report(run_id, _correlate.CacheReport(key.node_id, replayed=False))
            self._remember(prompt, llm_string, key, run_id)

        self._guard.call(begin, None)
