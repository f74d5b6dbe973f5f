"""The engine: identity + policy + store. Replay, or execute and record.

Adapters and the ``@step`` decorator both go through :class:`Engine`, so a
LangChain cache hit, a LlamaIndex replay and a decorated function share one
notion of a node, one replay policy and one set of statistics.

>>> import tempfile, os
>>> from musubi_core import SQLiteStore
>>> engine = Engine(SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db")))
>>> key = engine.key("demo.add", {"a": 1, "b": 2})
>>> engine.lookup(key).replay
False
>>> _ = engine.record(key, 3)
>>> engine.lookup(key).value
3
>>> engine.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from .codec import Codec, JSONCodec
from .context import current_run, running_node
from .errors import (
    ConfigError,
    CorruptNodeError,
    DecodeError,
    EffectInDoubtError,
    MusubiError,
    NodeNotFoundError,
)
from .fastpath import HitMemo
from .flight import DEFAULT_TIMEOUT as FLIGHT_TIMEOUT
from .flight import SingleFlight, flights_for
from .identity import NodeKey, check_namespace, input_hash, make_node_id, make_op
from .modes import Mode, resolve_mode
from .policy import (
    DEFAULT_CONFIG,
    PLAIN_HIT,
    RECORDED_ONLY_KINDS,
    Decision,
    ReplayReason,
    StepConfiguration,
    StepType,
    decide,
    expiry,
)
from .probe import EncodedHit, artifact_id_for, content_matches
from .record import Recorder, flush_recorders, recorder_for
from .replay_miss import miss_error
from .store import ArtifactWrite, EdgeWrite, NodeRecord, NodeWrite, Store, open_store

__all__ = ["Engine", "Lookup", "Outcome", "Recorded", "get_engine", "use_engine"]

T = TypeVar("T")

DEFAULT_PATH = os.path.join(".musubi", "musubi.db")

# How long a writer waits for an EXTERNAL_EFFECT another process is executing.
EFFECT_WAIT_SECONDS = 600.0
# An effect claimed on another machine is presumed alive this long.
EFFECT_LEASE_SECONDS = 3600.0


_UNREAD: Any = object()  # a Lookup's node not read yet


class Lookup:
    """What :meth:`Engine.lookup` found: whether it ``replay``\\ s and why (``decision``),
    ``value`` (a freshly decoded object on a replay, else None) and ``node``, the stored node
    (None when none is stored).

    On a replay, ``node_id``, ``artifact_id``, ``producer_node_id``, ``tokens_in``, ``tokens_out`` and
    ``duration_s`` say what was served: the artifact, the node whose execution produced it and
    what that execution cost. A plain hit reads only what serving needs
    (:func:`musubi_core.probe.probe_replay`): its ``node`` is read from the store when first
    asked for."""

    __slots__ = ("_hit", "_node", "_store", "decision", "replay", "value")

    def __init__(
        self,
        replay: bool,
        decision: Decision,
        value: Any,
        node: NodeRecord | None,
        *,
        hit: EncodedHit | None = None,
        store: Store | None = None,
    ) -> None:
        self.replay = replay
        self.decision = decision
        self.value = value
        self._node = node if hit is None else _UNREAD
        self._hit = hit
        self._store = store  # where a plain hit's node is read from, when asked for

    @property
    def node(self) -> NodeRecord | None:
        node = self._node
        if node is _UNREAD:
            assert self._store is not None and self._hit is not None
            node = self._node = self._store.get_node(self._hit.node_id)
        return cast("NodeRecord | None", node)

    def _served(self) -> EncodedHit | NodeRecord | None:
        """The probe's answer of a plain hit, else the node (both carry the fields below)."""
        return self._hit if self._hit is not None else self.node

    @property
    def node_id(self) -> str | None:
        """The stored node's id (None when none is stored)."""
        served = self._served()
        return None if served is None else served.node_id

    @property
    def artifact_id(self) -> str | None:
        served = self._served()
        return None if served is None else served.artifact_id

    @property
    def producer_node_id(self) -> str | None:
        served = self._served()
        return None if served is None else (served.producer_node_id or served.node_id)

    @property
    def tokens_in(self) -> int | None:
        served = self._served()
        return None if served is None else served.tokens_in

    @property
    def tokens_out(self) -> int | None:
        served = self._served()
        return None if served is None else served.tokens_out

    @property
    def duration_s(self) -> float | None:
        served = self._served()
        return None if served is None else served.duration_s

    def __repr__(self) -> str:
        return (
            f"Lookup(replay={self.replay!r}, decision={self.decision!r}, "
            f"node_id={self.node_id!r}, artifact_id={self.artifact_id!r})"
        )


@dataclass(frozen=True, slots=True)
class Recorded:
    node_id: str
    artifact_id: str | None
    producer_node_id: str | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """Result of :meth:`Engine.execute`."""

    value: Any
    node_id: str
    artifact_id: str
    producer_node_id: str
    replayed: bool
    # A replay: the tokens and seconds of the execution it stands in for.
    tokens_in: int | None = None
    tokens_out: int | None = None
    saved_s: float | None = None


_HOST = socket.gethostname()
_PROCESS_TOKEN = uuid.uuid4().hex[:12]


# Owners of the EXTERNAL_EFFECT calls executing in this process right now. A
# pending intent row of this process whose owner is not in here belongs to a
# call that ended without recording its outcome: its effect is in doubt.
_INFLIGHT: set[str] = set()


def _after_fork_in_child() -> None:
    global _PROCESS_TOKEN
    _PROCESS_TOKEN = uuid.uuid4().hex[:12]
    _INFLIGHT.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def _effect_owner() -> Iterator[str]:
    """A fresh claim owner, registered as in flight for the whole call."""
    owner = _new_owner()
    _INFLIGHT.add(owner)
    try:
        yield owner
    finally:
        _INFLIGHT.discard(owner)


def _new_owner() -> str:
    """A claim owner unique to one call: host, pid, process token, nonce."""
    return f"{_HOST}:{os.getpid()}:{_PROCESS_TOKEN}:{uuid.uuid4().hex[:12]}"


def _owner_alive(node: NodeRecord) -> bool:
    """Is the call that claimed ``node`` still running?"""
    parts = (node.owner or "").split(":")
    if len(parts) != 4:
        return False
    host, pid_text, token, _nonce = parts
    if host != _HOST:
        started = node.started_at or node.created_at
        return time.time() - started < EFFECT_LEASE_SECONDS
    pid = int(pid_text) if pid_text.isdigit() else -1
    if pid == os.getpid():
        return token == _PROCESS_TOKEN and node.owner in _INFLIGHT
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Before every expiry: what ``Engine._now`` answers in replay and refresh mode.
_FROZEN_NOW = 0.0

_TAMPERED = (
    "the stored output does not match its content id (the store was changed outside musubi)"
)


class Engine:
    """Replay-or-execute over a :class:`~musubi_core.store.Store`.

    ``namespace`` keeps several caches apart in one store: outside ``"default"`` it is part
    of every node id the engine makes, so the same call in two namespaces reaches two nodes,
    and an engine serves only nodes of its own namespace. It is recorded on every node,
    call and run; :meth:`clear` forgets exactly the namespace's entries.

    ``mode`` (default: ``$MUSUBI_MODE``, else ``"record"``; see :mod:`musubi_core.modes`):
    ``"replay"`` serves recordings only (a miss raises
    :class:`~musubi_core.errors.ReplayMissError` and nothing runs), ``"refresh"`` replays what
    matches and executes what does not, ``"off"`` executes every step and stores nothing.
    """

    def __init__(
        self,
        store: Store,
        *,
        codec: Codec | None = None,
        namespace: str = "default",
        mode: Mode | str | None = None,
    ) -> None:
        self.store = store
        self.codec: Codec = codec or JSONCodec()
        self.namespace = check_namespace(namespace)
        self.mode: Mode = resolve_mode(mode)
        # The store's one writer, shared with every other engine and adapter writing to it.
        self.recorder: Recorder = recorder_for(store)
        self._closed = False
        self._tamper_warned = False
        self._tamper_lock = threading.Lock()
        self._hits: HitMemo | None = None

    # Whether every stored output is checked against its content id before it is served (see
    # :meth:`intact`). Always on; the benchmarks turn it off to measure what it costs.
    _verify_artifacts = True

    # The category of the warnings about the store (a read-only file, a garbled node) that
    # degrade a call instead of failing it; adapters use their own.
    warning_category: type[Warning] = RuntimeWarning
    # How long a single-flight waiter waits for another worker's execution (musubi_core.flight).
    single_flight_timeout: float = FLIGHT_TIMEOUT

    def _now(self) -> float:
        """The clock replay decisions use: in replay and refresh mode a recording's TTL does
        not expire it (a suite recorded once replays forever), so time stands still."""
        return _FROZEN_NOW if self.mode.frozen_clock else time.time()

    def _skips_writes(self) -> bool:
        """True when the store is read-only (``store.read_only``): the engine still replays
        from it, but skips every write (results, failures, edges, replay counts) instead of
        failing the call, and the store's recorder says so once."""
        recorder = self.recorder
        if not recorder.read_only:
            return False
        recorder.skip_read_only(self.warning_category)
        return True

    # -- identity -------------------------------------------------------------

    def key(
        self,
        op_name: str,
        inputs: Any,
        *,
        fingerprint: Any = None,
        upstream: Iterable[str] = (),
        op: str | None = None,
    ) -> NodeKey:
        """Compute a node's identity (raises ``TypeError`` naming the path of
        an input that has no stable encoding). ``op`` is ``make_op(op_name, fingerprint)``
        when the caller memoises it (hashing a model's parameters on every call would
        dominate a cold cache hit); ``fingerprint`` is then not read."""
        if op is None:
            op = make_op(op_name, fingerprint)
        in_hash = input_hash(inputs)
        ups = tuple(sorted(set(upstream)))
        ns = self.namespace
        return NodeKey(make_node_id(op, in_hash, ups, ns), op, op_name, in_hash, ups, ns)

    def _own(self, key: NodeKey) -> None:
        """Refuse a key made in another namespace (it would read or take over a node of
        that namespace)."""
        if key.namespace != self.namespace:
            raise ConfigError(
                f"node key {key.node_id[:12]} ({key.op_name}) was made in namespace "
                f"{key.namespace!r}, but this engine's namespace is {self.namespace!r}: make "
                "keys with the engine that uses them",
                target=key.namespace,
            )

    # -- reading --------------------------------------------------------------

    @property
    def hits(self) -> HitMemo:
        """This engine's memo of plain hits (:class:`~musubi_core.fastpath.HitMemo`): every
        replay path probes through it, so a hit read again while the store file is unchanged
        runs no SQL and hashes nothing."""
        hits = self._hits
        if hits is None:
            with self._tamper_lock:
                if self._hits is None:
                    self._hits = HitMemo(self)
                hits = self._hits
        return hits

    def lookup(self, key: NodeKey, config: StepConfiguration = DEFAULT_CONFIG) -> Lookup:
        """Replay ``key`` if policy allows; counts the replay."""
        self._own(key)
        hits = self.hits
        probed = hits.probe(key, config)
        if isinstance(probed, EncodedHit):
            # A plain hit: one statement read it and its bytes matched their content id.
            try:
                value = hits.decode(probed)
            except DecodeError:
                pass  # the full lookup below warns and makes it a miss
            else:
                self._count_replay(probed.node_id)
                return Lookup(True, PLAIN_HIT, value, None, hit=probed, store=self.store)
        elif probed is not None:  # no node with this identity
            return Lookup(False, probed, None, None)
        try:
            found = self._find(key.node_id, self.namespace)
        except CorruptNodeError as err:
            # A garbled row (a hand edit, damage) is a miss: the call runs, and its record
            # rewrites the row.
            warnings.warn(f"musubi: {err}; recomputing it", self.warning_category, stacklevel=3)
            return Lookup(False, Decision(False, ReplayReason.NODE_CORRUPT, str(err)), None, None)
        if found is None:
            decision = decide(None, config, now=self._now())
            return Lookup(False, decision, None, None)
        node, encoding, payload = found
        upstream_fresh = False
        if node.status == "stale" and node.stale_cause == "upstream":
            upstream_fresh = self._parents_unchanged(node.node_id)
        decision = decide(
            node,
            config,
            now=self._now(),
            artifact_present=payload is not None,
            upstream_fresh=upstream_fresh,
        )
        if not decision.replay:
            return Lookup(False, decision, None, node)
        assert encoding is not None and payload is not None
        if self._verify_artifacts and not self.intact(node, encoding, payload):
            # Tampered or damaged bytes are never decoded: a miss. The call runs, and its
            # record rewrites the artifact (an id has one right payload).
            return Lookup(False, Decision(False, ReplayReason.ARTIFACT_CORRUPT, _TAMPERED), None, node)
        try:
            value = self.codec.decode(encoding, payload)
        except DecodeError as err:
            warnings.warn(
                f"musubi: stored output of node {node.node_id[:12]} ({node.op_name}) could not "
                f"be decoded ({err}); recomputing it",
                RuntimeWarning,
                stacklevel=3,
            )
            return Lookup(
                False, Decision(False, ReplayReason.ARTIFACT_CORRUPT, str(err)), None, node
            )
        if upstream_fresh and not self._skips_writes() and not self.store.mark_fresh(node.node_id):
            # A parent changed again between our check and the revival.
            stale = Decision(False, ReplayReason.STALE, "an upstream node changed again")
            return Lookup(False, stale, None, node)
        self._count_replay(node.node_id)
        return Lookup(True, decision, value, node)

    def intact(self, node: NodeRecord, encoding: str, payload: bytes) -> bool:
        """Does ``payload`` (the stored output of ``node``) hash to the artifact id the node
        names? Every replay checks this before decoding (about 1 µs per KB): an artifact edited
        in the store file (even into another valid value) is then a miss, never served. The
        first mismatch an engine sees warns (one warning per engine, that is, per store and
        adapter); the recomputation that follows rewrites the artifact."""
        artifact_id = node.artifact_id
        if not self._verify_artifacts or content_matches(artifact_id, encoding, payload):
            return True
        with self._tamper_lock:
            first = not self._tamper_warned
            self._tamper_warned = True
        if first:
            warnings.warn(
                f"musubi: the stored output of node {node.node_id[:12]} ({node.op_name}) does "
                f"not match its content id {str(artifact_id)[:12]}: the store file was changed "
                "outside musubi; recomputing it (the new result repairs the store; further "
                "mismatches of this store are recomputed without a warning)",
                self.warning_category,
                stacklevel=4,
            )
        return False

    def _find(
        self, node_id: str, namespace: str | None = None
    ) -> tuple[NodeRecord, str | None, bytes | None] | None:
        """The node ``node_id`` with its artifact; with ``namespace``, a node of another
        namespace is not found (a row an older musubi wrote in a non-default namespace
        holds what is now a default-namespace id: it is never served there)."""
        pending = self.recorder.pending_node(node_id)
        if pending is not None:
            node, artifact = pending
            if artifact is not None and namespace in (None, node.namespace):
                return _record_from_write(node), artifact.encoding, artifact.payload
            self.recorder.flush()
        found = self.store.get_node_and_artifact(node_id)
        if found is not None and namespace is not None and found[0].namespace != namespace:
            return None
        return found

    def _parents_unchanged(self, node_id: str) -> bool:
        parents = self.store.data_parents(node_id)
        return bool(parents) and all(
            p.status == "done"
            and p.consumed_artifact_id is not None
            and p.current_artifact_id == p.consumed_artifact_id
            for p in parents
        )

    def explain(self, key: NodeKey, config: StepConfiguration = DEFAULT_CONFIG) -> Decision:
        """Why ``key`` would replay or execute now (``.node_id`` is the node it reaches).
        Reads only; counts nothing."""
        self._own(key)
        return dataclasses.replace(self._explain(key, config), node_id=key.node_id)

    def _explain(self, key: NodeKey, config: StepConfiguration) -> Decision:
        found = self._find(key.node_id, self.namespace)
        if found is not None:
            node, encoding, payload = found
            return self._decide_found(node, config, encoding, payload)
        if config.force_reexecution:
            return decide(None, config, now=self._now())
        similar = self.store.similar_nodes(key.op_name, key.input_hash, namespace=self.namespace)
        other_code = [n for n in similar if n.op != key.op]
        if similar and not other_code:
            source = self._content_source(key, config, similar)
            if source is not None:
                return _content_decision(source[0])
            return Decision(
                False,
                ReplayReason.UPSTREAM_CHANGED,
                "same operation and inputs were recorded with different upstream nodes"
                + (" (strict_upstream=True)" if config.strict_upstream else ""),
            )
        if other_code:
            return Decision(
                False,
                ReplayReason.CODE_CHANGED,
                f"recorded under {other_code[0].op}, now {key.op} (code, version or parameters changed)",
            )
        if self.store.nodes_of_op(key.op_name, limit=1, namespace=self.namespace):
            return Decision(False, ReplayReason.INPUT_CHANGED, "no earlier call with these inputs")
        return Decision(False, ReplayReason.NOT_FOUND, f"{key.op_name} was never recorded")

    def _decide_found(
        self, node: NodeRecord, config: StepConfiguration, encoding: str | None, payload: bytes | None
    ) -> Decision:
        """:meth:`_decide` for a stored node and its artifact, which a replay would check
        against its content id (reads only: no warning)."""
        decision = self._decide(node, config, payload is not None)
        if (
            decision.replay
            and self._verify_artifacts
            and encoding is not None
            and payload is not None
            and not content_matches(node.artifact_id, encoding, payload)
        ):
            return Decision(False, ReplayReason.ARTIFACT_CORRUPT, _TAMPERED)
        return decision

    def _decide(self, node: NodeRecord, config: StepConfiguration, artifact_present: bool) -> Decision:
        fresh = (
            node.status == "stale"
            and node.stale_cause == "upstream"
            and self._parents_unchanged(node.node_id)
        )
        return decide(
            node, config, now=self._now(), artifact_present=artifact_present, upstream_fresh=fresh
        )

    def explain_node(self, ref: str) -> tuple[NodeRecord, Decision]:
        """The decision a call reaching stored node ``ref`` (id or unique
        prefix) would get now, under the step type it was recorded with."""
        node_id = self.store.resolve(ref)
        found = self._find(node_id)
        if found is None:
            raise NodeNotFoundError(ref)
        node, encoding, payload = found
        if node.kind in RECORDED_ONLY_KINDS:
            return node, Decision(
                False,
                ReplayReason.RECORDED_ONLY,
                f"{node.kind} calls are recorded, never replayed (they run every time)",
                node.node_id,
            )
        try:
            config = StepConfiguration(step_type=StepType(node.step_type))
        except ValueError:
            raise MusubiError(
                f"node {node.node_id[:12]} has unknown step type {node.step_type!r}; "
                "the store was written by a newer musubi or edited by hand"
            ) from None
        decision = self._decide_found(node, config, encoding, payload)
        return node, dataclasses.replace(decision, node_id=node.node_id)

    # -- replay by content across upstreams -----------------------------------

    def _content_source(
        self,
        key: NodeKey,
        config: StepConfiguration,
        similar: list[NodeRecord] | None = None,
        *,
        warn: bool = False,
    ) -> tuple[NodeRecord, str, bytes] | None:
        """A stored node of the same operation (code included) and the same input content
        as ``key``, reached through other upstream nodes, whose output replays now (and
        matches its content id; ``warn``: a mismatch warns as in :meth:`lookup`)."""
        if config.strict_upstream or config.force_reexecution or not key.upstream:
            return None
        if config.step_type is StepType.EXTERNAL_EFFECT:
            return None  # an effect is identified by its node: never served from another
        if similar is None:
            similar = self.store.similar_nodes(
                key.op_name, key.input_hash, namespace=self.namespace
            )
        for node in similar:
            if node.op != key.op or node.node_id == key.node_id:
                continue
            found = self.store.get_node_and_artifact(node.node_id)
            if found is None:
                continue
            stored, encoding, payload = found
            if encoding is None or payload is None:
                continue
            if not self._decide(stored, config, True).replay:
                continue
            if self.intact(stored, encoding, payload) if warn else (
                not self._verify_artifacts
                or content_matches(stored.artifact_id, encoding, payload)
            ):
                return stored, encoding, payload
        return None

    def _replay_by_content(
        self, call: _Call, miss: Lookup
    ) -> Outcome | None:
        """On a miss of a node never recorded: replay the output of a node with the same
        operation and input content (see :meth:`_content_source`). The new node gets its own
        lineage (its upstream edges) and the source's artifact; the replay is counted on it,
        with the tokens and seconds of the execution it stands in for."""
        if miss.node is not None or miss.decision.reason is not ReplayReason.NOT_FOUND:
            return None
        key, config = call.key, call.config
        source = self._content_source(key, config, warn=True)
        if source is None:
            return None
        node, encoding, payload = source
        try:
            value = self.codec.decode(encoding, payload)
        except DecodeError:
            return None
        assert node.artifact_id is not None
        now = time.time()
        write = NodeWrite(
            node_id=key.node_id,
            op=key.op,
            op_name=key.op_name,
            kind=call.kind,
            step_type=config.step_type.value,
            input_hash=key.input_hash,
            status="done",
            artifact_id=node.artifact_id,
            namespace=self.namespace,
            started_at=now,
            finished_at=now,
            expires_at=node.expires_at,
            duration_s=node.duration_s,
            tokens_in=node.tokens_in,
            tokens_out=node.tokens_out,
            label=call.label,
            run_id=current_run(),
            meta=json.dumps({"replayed_from": node.node_id}),
            executed=0,
        )
        self._unbuffer(key.node_id)
        self.store.write([write], (), self._edges_for(key, call.parent, call.upstream_artifacts))
        self._count_replay(key.node_id)
        return Outcome(
            value,
            key.node_id,
            node.artifact_id,
            node.producer_node_id or node.node_id,
            True,
            node.tokens_in,
            node.tokens_out,
            node.duration_s,
        )

    # -- writing --------------------------------------------------------------

    def record(
        self,
        key: NodeKey,
        value: Any,
        config: StepConfiguration = DEFAULT_CONFIG,
        *,
        kind: str = "step",
        started_at: float | None = None,
        duration_s: float | None = None,
        tokens_in: int | None = None,
        tokens_out: int | None = None,
        parent: str | None = None,
        label: str | None = None,
        run_id: str | None = None,
        meta: Mapping[str, Any] | None = None,
        upstream_artifacts: Mapping[str, str] | None = None,
        defer: bool = False,
        aliases: Sequence[bytes] = (),
    ) -> Recorded:
        """Store ``value`` as the output of ``key``.

        The value is encoded before anything is written: a codec failure
        raises :class:`~musubi_core.errors.SerializationError` carrying the
        value, and the store is left untouched. ``aliases``
        (:func:`~musubi_core.identity.alias_of` digests of the raw request) are stored with
        the node, in the same transaction, for :meth:`HitMemo.probe_alias
        <musubi_core.fastpath.HitMemo.probe_alias>`.
        """
        self._own(key)
        encoding, payload = self.codec.encode(value)
        artifact_id = artifact_id_for(encoding, payload)
        if self._skips_writes():
            return Recorded(key.node_id, artifact_id, key.node_id)
        now = time.time()
        node = NodeWrite(
            node_id=key.node_id,
            op=key.op,
            op_name=key.op_name,
            kind=kind,
            step_type=config.step_type.value,
            input_hash=key.input_hash,
            status="done",
            artifact_id=artifact_id,
            namespace=self.namespace,
            started_at=started_at,
            finished_at=now,
            expires_at=expiry(config, now),
            duration_s=duration_s,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            label=label,
            run_id=run_id or current_run(),
            meta=json.dumps(dict(meta), sort_keys=True, default=str) if meta else None,
        )
        artifact = ArtifactWrite(artifact_id, encoding, payload, key.node_id)
        edges = self._edges_for(key, parent, upstream_artifacts)
        pairs = [(alias, key.node_id) for alias in aliases]
        if defer:
            self.recorder.submit(nodes=(node,), artifacts=(artifact,), edges=edges, aliases=pairs)
            return Recorded(key.node_id, artifact_id, key.node_id)
        self._unbuffer(key.node_id)
        self.store.write([node], [artifact], edges, aliases=pairs)
        producer = self.store.artifact_producer(artifact_id) or key.node_id
        return Recorded(key.node_id, artifact_id, producer)

    def record_failure(
        self,
        key: NodeKey,
        error: BaseException | str,
        config: StepConfiguration = DEFAULT_CONFIG,
        *,
        kind: str = "step",
        started_at: float | None = None,
        duration_s: float | None = None,
        parent: str | None = None,
        label: str | None = None,
        run_id: str | None = None,
        defer: bool = False,
    ) -> Recorded:
        """Record that ``key`` raised. Failed nodes are never replayed."""
        self._own(key)
        if self._skips_writes():
            return Recorded(key.node_id, None, None)
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        node = NodeWrite(
            node_id=key.node_id,
            op=key.op,
            op_name=key.op_name,
            kind=kind,
            step_type=config.step_type.value,
            input_hash=key.input_hash,
            status="failed",
            namespace=self.namespace,
            started_at=started_at,
            finished_at=time.time(),
            duration_s=duration_s,
            error=text[:4000],
            label=label,
            run_id=run_id or current_run(),
        )
        edges = self._edges_for(key, parent, None)
        self._unbuffer(key.node_id)
        if defer:
            self.recorder.submit(edges=edges)
            self.store.write([node], (), ())
            return Recorded(key.node_id, None, None)
        self.store.write([node], (), edges)
        return Recorded(key.node_id, None, None)

    def add_edge(
        self,
        parent: str,
        child: str,
        kind: str = "contains",
        *,
        defer: bool = False,
        parent_artifact_id: str | None = None,
    ) -> None:
        """Record an edge between two nodes (``data`` edges drive invalidation)."""
        if kind not in ("data", "contains"):
            raise ValueError(f"edge kind must be 'data' or 'contains', not {kind!r}")
        if self._skips_writes():
            return
        edge = EdgeWrite(parent, child, kind, parent_artifact_id)
        if defer:
            self.recorder.submit(edges=(edge,))
            return
        self.store.write((), (), [edge])

    def _edges_for(
        self, key: NodeKey, parent: str | None, upstream_artifacts: Mapping[str, str] | None
    ) -> list[EdgeWrite]:
        arts = upstream_artifacts or {}
        edges = [EdgeWrite(u, key.node_id, "data", arts.get(u)) for u in key.upstream]
        if parent is not None and parent != key.node_id:
            edges.append(EdgeWrite(parent, key.node_id, "contains"))
        return edges

    def _count_replay(self, node_id: str) -> None:
        """Count a replay (committed with the recorder's next batch; a failing store only
        delays it: the recorder keeps and retries what it acknowledged; a read-only store
        skips it)."""
        if self._skips_writes():
            return
        self.recorder.replay(node_id)

    def _unbuffer(self, node_id: str) -> None:
        """A direct write of ``node_id`` is about to happen: a deferred write of it that is
        still waiting is older and must land first, not overwrite it afterwards."""
        if self.recorder.pending_node(node_id) is not None:
            self.recorder.flush()

    def invalidate(self, node_id: str) -> int:
        """Mark ``node_id`` and its data-descendants stale; returns how many
        nodes changed. The next run recomputes exactly those (and, by early
        cutoff, fewer when a recomputed node yields the same output)."""
        # What every recorder of this process holds for this store goes first, or a
        # deferred node or edge would escape the invalidation.
        flush_recorders(self.store.path)
        return self.store.invalidate(self.store.resolve(node_id))

    def clear(
        self, *, kinds: Iterable[str] | None = None, ops: Iterable[str] | None = None
    ) -> int:
        """Forget this namespace's entries: every node of the engine's namespace (of
        ``kinds`` only, and of the operation names ``ops`` only, when given) is marked stale,
        so its next call executes again; no node of another namespace changes. Nodes stay for
        lineage. Returns how many nodes changed (one statement, however many nodes the store
        holds)."""
        flush_recorders(self.store.path)
        if ops is None:  # the call every store implements
            return self.store.invalidate_namespace(
                self.namespace, kinds=None if kinds is None else tuple(kinds)
            )
        return self.store.invalidate_namespace(
            self.namespace, kinds=None if kinds is None else tuple(kinds), ops=tuple(ops)
        )

    def flush(self) -> None:
        """Commit everything recorded so far (calls, runs, deferred nodes, replay counts)."""
        self.recorder.flush()

    def close(self) -> None:
        """Flush and close the store."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self.store.close()
            if self._hits is not None:
                self._hits.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- replay-or-execute ----------------------------------------------------

    def execute(
        self,
        key: NodeKey,
        fn: Callable[[], T],
        config: StepConfiguration = DEFAULT_CONFIG,
        *,
        kind: str = "step",
        parent: str | None = None,
        label: str | None = None,
        upstream_artifacts: Mapping[str, str] | None = None,
        material: Callable[[], Mapping[str, Any] | None] | None = None,
    ) -> Outcome:
        """Replay ``key`` or run ``fn`` and record its output. ``material`` returns what the
        call's identity was made from (:func:`musubi_core.replay_miss.material`): kept with
        the recording, it lets a later replay miss say what changed."""
        call = _Call(key, config, kind, parent, label, upstream_artifacts, material)
        if self.mode is not Mode.RECORD and self.mode is not Mode.REFRESH:
            if self.mode is Mode.OFF:
                return self._unrecorded(key, fn())
            return self._replay_only(call)
        if config.step_type is not StepType.EXTERNAL_EFFECT:
            # Plain steps: no intent row, no owner; one lookup, then run.
            found = self.lookup(key, config)
            if found.replay:
                return _outcome_from(found)
            served = self._replay_by_content(call, found)
            if served is not None:
                return served
            if not config.single_flight:
                return self._run(call, fn)
            waited, held = self.flights().wait_or_claim(
                key.node_id, lambda: self._stored(key, config), category=self.warning_category,
                timeout=self.single_flight_timeout,
            )
            if waited is not None:
                return waited
            try:
                return self._run(call, fn)
            finally:
                if held:
                    self.flights().release(key.node_id)
        with _effect_owner() as owner:
            deadline = time.monotonic() + EFFECT_WAIT_SECONDS
            while isinstance(replay := self._before(key, config, owner, kind), _Waiting):
                self._check_deadline(key, deadline)
                time.sleep(0.05)
            return replay if isinstance(replay, Outcome) else self._run(call, fn)

    async def aexecute(
        self,
        key: NodeKey,
        fn: Callable[[], Awaitable[T]],
        config: StepConfiguration = DEFAULT_CONFIG,
        *,
        kind: str = "step",
        parent: str | None = None,
        label: str | None = None,
        upstream_artifacts: Mapping[str, str] | None = None,
        material: Callable[[], Mapping[str, Any] | None] | None = None,
    ) -> Outcome:
        """Async :meth:`execute`."""
        call = _Call(key, config, kind, parent, label, upstream_artifacts, material)
        if self.mode is not Mode.RECORD and self.mode is not Mode.REFRESH:
            if self.mode is Mode.OFF:
                return self._unrecorded(key, await fn())
            return self._replay_only(call)
        if config.step_type is not StepType.EXTERNAL_EFFECT:
            found = self.lookup(key, config)
            if found.replay:
                return _outcome_from(found)
            served = self._replay_by_content(call, found)
            if served is not None:
                return served
            if not config.single_flight:
                return await self._arun(call, fn)
            waited, held = await self.flights().await_or_claim(
                key.node_id, lambda: self._stored(key, config), category=self.warning_category,
                timeout=self.single_flight_timeout,
            )
            if waited is not None:
                return waited
            try:
                return await self._arun(call, fn)
            finally:
                if held:
                    self.flights().release(key.node_id)
        # The owner stays registered until the effect's outcome is recorded,
        # so a concurrent task of this process waits instead of seeing doubt.
        with _effect_owner() as owner:
            deadline = time.monotonic() + EFFECT_WAIT_SECONDS
            while isinstance(replay := self._before(key, config, owner, kind), _Waiting):
                self._check_deadline(key, deadline)
                await asyncio.sleep(0.05)
            return replay if isinstance(replay, Outcome) else await self._arun(call, fn)

    def flights(self) -> SingleFlight:
        """The single-flight table of this engine's store (:mod:`musubi_core.flight`)."""
        return flights_for(self.store)

    def _stored(self, key: NodeKey, config: StepConfiguration) -> Outcome | None:
        """The replay of ``key`` if another worker has stored it by now, else None."""
        found = self.lookup(key, config)
        return _outcome_from(found) if found.replay else None

    def _replay_only(self, call: _Call) -> Outcome:
        """Replay mode: the recording, or a :class:`ReplayMissError` (nothing runs, no intent
        row is written; ``force_reexecution`` cannot make a step run)."""
        config = call.config
        if config.force_reexecution:
            config = config.model_copy(update={"force_reexecution": False})
            call = dataclasses.replace(call, config=config)
        found = self.lookup(call.key, config)
        if found.replay:
            return _outcome_from(found)
        served = self._replay_by_content(call, found)
        if served is not None:
            return served
        decision = found.decision
        if decision.reason is ReplayReason.NOT_FOUND:  # why: new input, code or upstream
            decision = self._explain(call.key, config)
        material = call.material
        raise miss_error(
            self, call.key, decision, kind=call.kind,
            material_of=(lambda: dict(material() or {})) if material is not None else None,
        )

    def _unrecorded(self, key: NodeKey, value: Any) -> Outcome:
        """Off mode: the value as executed; nothing read or written. Its artifact id is its
        content id when it can be encoded (a downstream step's identity uses it)."""
        try:
            artifact_id = artifact_id_for(*self.codec.encode(value))
        except MusubiError:
            artifact_id = ""
        return Outcome(value, key.node_id, artifact_id, key.node_id, False)

    def _run(self, call: _Call, fn: Callable[[], Any]) -> Outcome:
        """Execute ``fn`` as the node of ``call`` and record its output (or failure)."""
        started, t0 = time.time(), time.perf_counter()
        try:
            with running_node(call.key.node_id):
                value = fn()
        except BaseException as exc:
            self._fail(call.key, exc, call.config, call.kind, started, t0, call.parent, call.label)
            raise
        return self._finish(call, value, started, t0)

    async def _arun(self, call: _Call, fn: Callable[[], Awaitable[Any]]) -> Outcome:
        """Async :meth:`_run`."""
        started, t0 = time.time(), time.perf_counter()
        try:
            with running_node(call.key.node_id):
                value = await fn()
        except BaseException as exc:
            self._fail(call.key, exc, call.config, call.kind, started, t0, call.parent, call.label)
            raise
        return self._finish(call, value, started, t0)

    def _finish(self, call: _Call, value: Any, started: float, t0: float) -> Outcome:
        return self._after(
            call.key,
            value,
            call.config,
            call.kind,
            started,
            t0,
            call.parent,
            call.label,
            call.upstream_artifacts,
            call.material,
        )

    def _check_deadline(self, key: NodeKey, deadline: float) -> None:
        if time.monotonic() > deadline:
            node = self.store.get_node(key.node_id)
            raise EffectInDoubtError(
                key.node_id,
                op=key.op_name,
                owner=node.owner if node else None,
                reason="timeout",
                waited_s=EFFECT_WAIT_SECONDS,
            )

    def _before(
        self, key: NodeKey, config: StepConfiguration, owner: str, kind: str = "step"
    ) -> Outcome | _Waiting | None:
        """Replay, or (for an EXTERNAL_EFFECT) claim the node, or report that
        another live call is executing it (``_WAIT``). ``None``: execute."""
        found = self.lookup(key, config)
        if found.replay:
            return _outcome_from(found)
        if config.step_type is not StepType.EXTERNAL_EFFECT:
            return None
        # Intent first: the row says "this effect is being issued by me" before
        # the call, so a crash leaves evidence instead of a silent repeat.
        self._unbuffer(key.node_id)
        claim = self.store.claim(
            self._intent(key, config, owner=owner, kind=kind),
            owner_alive=_owner_alive_or_doubt(config),
            force=config.force_reexecution,
        )
        if claim.state == "claimed":
            return None
        if claim.state == "done":
            # Another call finished it between our lookup and our claim.
            again = self.lookup(key, config)
            if again.replay:
                return _outcome_from(again)
            raise EffectInDoubtError(key.node_id, op=key.op_name, reason="lost")
        return _WAIT

    def _after(
        self,
        key: NodeKey,
        value: Any,
        config: StepConfiguration,
        kind: str,
        started: float,
        t0: float,
        parent: str | None,
        label: str | None,
        upstream_artifacts: Mapping[str, str] | None,
        material: Callable[[], Mapping[str, Any] | None] | None = None,
    ) -> Outcome:
        try:
            recorded = self.record(
                key,
                value,
                config,
                kind=kind,
                started_at=started,
                duration_s=time.perf_counter() - t0,
                parent=parent,
                label=label,
                upstream_artifacts=upstream_artifacts,
                meta=_material_meta(material),
            )
        except BaseException as err:
            # The effect happened; if its outcome cannot be recorded (codec or
            # store failure), the next call must not silently repeat it.
            if config.step_type is StepType.EXTERNAL_EFFECT:
                self._leave_in_doubt(key, config, err)
            raise
        assert recorded.artifact_id is not None
        return Outcome(
            value,
            key.node_id,
            recorded.artifact_id,
            recorded.producer_node_id or key.node_id,
            False,
        )

    def _leave_in_doubt(self, key: NodeKey, config: StepConfiguration, err: BaseException) -> None:
        """The effect happened but its result cannot be stored. Keep the intent
        row pending with no live owner, so the next call (in this process or
        another) raises EffectInDoubtError instead of silently repeating it."""
        with contextlib.suppress(MusubiError):
            error = f"effect ran; result not stored: {err}"[:4000]
            # The effect did run: this write counts as its execution.
            self.store.write([self._intent(key, config, owner=None, error=error, executed=1)])

    def _intent(
        self,
        key: NodeKey,
        config: StepConfiguration,
        *,
        owner: str | None,
        error: str | None = None,
        executed: int = 0,
        kind: str = "step",
    ) -> NodeWrite:
        """The pending row of an EXTERNAL_EFFECT: claimed by ``owner`` before
        the call, or left ownerless (in doubt) when its outcome was lost."""
        return NodeWrite(
            node_id=key.node_id,
            op=key.op,
            op_name=key.op_name,
            kind=kind,
            step_type=config.step_type.value,
            input_hash=key.input_hash,
            status="pending",
            namespace=self.namespace,
            started_at=time.time(),
            owner=owner,
            error=error,
            executed=executed,
            run_id=current_run(),
        )

    def _fail(
        self,
        key: NodeKey,
        exc: BaseException,
        config: StepConfiguration,
        kind: str,
        started: float,
        t0: float,
        parent: str | None,
        label: str | None,
    ) -> None:
        # Recording the failure must never hide the user's exception.
        with contextlib.suppress(MusubiError):
            self.record_failure(
                key,
                exc,
                config,
                kind=kind,
                started_at=started,
                duration_s=time.perf_counter() - t0,
                parent=parent,
                label=label,
            )


@dataclass(frozen=True, slots=True)
class _Call:
    """What recording one execution needs besides its value."""

    key: NodeKey
    config: StepConfiguration
    kind: str
    parent: str | None
    label: str | None
    upstream_artifacts: Mapping[str, str] | None
    material: Callable[[], Mapping[str, Any] | None] | None = None


def _material_meta(
    material: Callable[[], Mapping[str, Any] | None] | None,
) -> Mapping[str, Any] | None:
    """A node's ``meta`` keeping its identity material (never fails the recording)."""
    if material is None:
        return None
    try:
        return material()
    except Exception:
        return None


class _Waiting:
    """Another live process is executing the effect: poll again."""


_WAIT = _Waiting()


def _sleep_sync(seconds: float) -> None:
    time.sleep(seconds)


def _owner_alive_or_doubt(config: StepConfiguration) -> Callable[[NodeRecord], bool]:
    def check(node: NodeRecord) -> bool:
        if _owner_alive(node):
            return True
        if config.force_reexecution:
            return False
        raise EffectInDoubtError(node.node_id, op=node.op_name, owner=node.owner)

    return check


def _content_decision(source: NodeRecord) -> Decision:
    return Decision(
        True,
        ReplayReason.CONTENT_HIT,
        f"same operation and input content as node {source.node_id[:12]}, reached through "
        "other upstream nodes: its output replays (strict_upstream=True turns this off)",
    )


def _outcome_from(found: Lookup) -> Outcome:
    node_id, artifact_id, producer = found.node_id, found.artifact_id, found.producer_node_id
    assert node_id is not None and artifact_id is not None and producer is not None
    return Outcome(
        found.value,
        node_id,
        artifact_id,
        producer,
        True,
        found.tokens_in,
        found.tokens_out,
        found.duration_s,
    )


def _record_from_write(w: NodeWrite) -> NodeRecord:
    now = time.time()
    return NodeRecord(
        node_id=w.node_id,
        op=w.op,
        op_name=w.op_name,
        kind=w.kind,
        step_type=w.step_type,
        input_hash=w.input_hash,
        status=w.status,
        artifact_id=w.artifact_id,
        producer_node_id=w.node_id,
        namespace=w.namespace,
        created_at=now,
        started_at=w.started_at,
        finished_at=w.finished_at,
        expires_at=w.expires_at,
        duration_s=w.duration_s,
        tokens_in=w.tokens_in,
        tokens_out=w.tokens_out,
        replay_count=0,
        exec_count=w.executed,
        error=w.error,
        owner=w.owner,
        label=w.label,
        run_id=w.run_id,
        stale_cause=None,
        meta=w.meta,
    )


# -- the current engine -------------------------------------------------------------

_CURRENT: ContextVar[Engine | None] = ContextVar("musubi_engine", default=None)
_DEFAULT: Engine | None = None
_DEFAULT_LOCK = threading.Lock()


def get_engine() -> Engine:
    """The engine in effect: the one set by :func:`use_engine`, else a
    process-wide default on ``$MUSUBI_DB`` (a path, or a PostgreSQL URL) or
    ``.musubi/musubi.db``."""
    engine = _CURRENT.get()
    if engine is not None:
        return engine
    global _DEFAULT
    with _DEFAULT_LOCK:
        if _DEFAULT is None or _DEFAULT._closed:
            _DEFAULT = Engine(open_store(os.environ.get("MUSUBI_DB") or DEFAULT_PATH))
        return _DEFAULT


def swap_default_engine(engine: Engine | None) -> Engine | None:
    """Make ``engine`` the process-wide default (what :func:`get_engine` returns outside
    :func:`use_engine`, in every thread); returns the previous default. ``None`` goes back to
    opening one on ``$MUSUBI_DB`` when next asked. The pytest plugin uses it for a session."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        previous, _DEFAULT = _DEFAULT, engine
    return previous


@contextlib.contextmanager
def use_engine(engine: Engine) -> Iterator[Engine]:
    """Make ``engine`` current inside the block (per thread / asyncio task).

    >>> import tempfile, os
    >>> from musubi_core import SQLiteStore
    >>> with Engine(SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db"))) as engine:
    ...     with use_engine(engine):
    ...         assert get_engine() is engine
    """
    token = _CURRENT.set(engine)
    try:
        yield engine
    finally:
        _CURRENT.reset(token)
