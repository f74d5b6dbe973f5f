"""``MusubiKVStore``: a LlamaIndex ``BaseKVStore`` over the musubi store.

A drop-in for ``IngestionCache(cache=...)`` and ``BaseEmbedding.embeddings_cache``. Each
entry is a musubi node (op ``llama_index.kv:<scope>/<collection>``, input = the key), so
entries show up in ``musubi stats`` as replays, can be invalidated, and live in the same
SQLite file as the lineage.

Every ``get``/``put`` is also a *call* (kind ``kv``, with the entry's node): under the current
span's call when LlamaIndex lineage is recorded (an ``IngestionPipeline.run``), else under the
current musubi frame's call (a ``@step``, a durable step, a ``trace()`` block), else in a run
of the store's own: calls made outside any run are grouped into one ``kv`` run per store
object, which ends when the store is flushed or closed, or has been idle for
:data:`SESSION_IDLE_S` seconds. A get that finds nothing is a call without a node.

It pickles as its path (``IngestionPipeline(num_workers=2)`` spawns processes): each worker
reopens the file and writes its cache entries directly (a ``put`` commits the entry and its
call before it returns), so nothing is lost when the pool terminates its workers (LlamaIndex
only merges worker writes back for in-memory stores).

Example::

    from llama_index.core.ingestion import IngestionCache, IngestionPipeline
    kv = MusubiKVStore("musubi.db")
    pipeline = IngestionPipeline(transformations=[...], cache=IngestionCache(cache=kv))
"""

from __future__ import annotations

import json
import threading
import time
import weakref
from typing import Any

from llama_index.core.storage.kvstore.types import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_COLLECTION,
    BaseKVStore,
)

from musubi_core import Engine, StepConfiguration, StepType
from musubi_core.identity import DEFAULT_NAMESPACE, check_namespace
from musubi_core.record import RunState
from musubi_core.store import open_store
from musubi_llama_index import _calls
from musubi_llama_index._content import brief
from musubi_llama_index._runtime import guarded, warn_once

__all__ = ["SESSION_IDLE_S", "MusubiKVStore"]

SESSION_IDLE_S = 2.0


class _Session:
    """The run that groups a store's calls made outside any run."""

    __slots__ = ("calls", "last", "trace")

    def __init__(self, trace: _calls.Trace) -> None:
        self.trace = trace
        self.last = time.monotonic()
        self.calls = 0

    def end(self) -> None:
        state = self.trace.state
        if not state.recorder.closed:
            self.trace.flush(state.row("done"))


def _end_session(holder: list[_Session]) -> None:
    """End the open session in ``holder`` (at flush, close, or interpreter exit)."""
    if holder:
        session = holder.pop()
        guarded(session.end, None, topic="kv run")


def _json(val: dict[str, Any]) -> Any:
    # LlamaIndex values are JSON documents but may hold str-Enums (ObjectType) and tuples;
    # a JSON round trip stores exactly what SimpleKVStore would persist.
    return json.loads(json.dumps(val))


_CONFIG = StepConfiguration(step_type=StepType.DETERMINISTIC)
_MAX_LIST = 1_000_000


class MusubiKVStore(BaseKVStore):
    """Key/value collections stored as musubi nodes in a SQLite file.

    Args:
        path: the musubi SQLite file (shared with ``instrument(path)`` if you like).
        scope: keeps caches apart inside one file, e.g. one scope per embedding model (the
            built-in ``embeddings_cache`` keys by raw text only, without the model).
        namespace: a separate store inside the file: its collections hold only what was put
            in the same namespace (``get``, ``get_all`` and ``delete`` never see or touch
            another namespace's entries).

    Values must be JSON-like dicts (what LlamaIndex stores). Store failures degrade to misses
    (``get`` returns ``None``) and skipped writes, with one warning.
    """

    def __init__(
        self,
        path: str,
        *,
        scope: str = "default",
        namespace: str = "default",
    ) -> None:
        self.path = str(path)
        self.scope = scope
        self.namespace = check_namespace(namespace)
        self._engine_obj: Engine | None = None
        self._lock = threading.Lock()
        self._init_session()

    def _init_session(self) -> None:
        self._session: list[_Session] = []
        # Ends the open session's run at interpreter exit (before the recorder's last flush).
        weakref.finalize(self, _end_session, self._session)

    # ------------------------------------------------------------------ plumbing
    def _engine(self) -> Engine:
        # Opened lazily: cheap to construct, and reopened after unpickling in a worker.
        with self._lock:
            if self._engine_obj is None:
                self._engine_obj = Engine(open_store(self.path), namespace=self.namespace)
            return self._engine_obj

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "scope": self.scope, "namespace": self.namespace}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.scope = state["scope"]
        self.namespace = state["namespace"]
        self._engine_obj = None
        self._lock = threading.Lock()
        self._init_session()

    def __repr__(self) -> str:
        # No memory address: IngestionPipeline hashes str(to_dict()) of transformations.
        namespace = "" if self.namespace == DEFAULT_NAMESPACE else f", namespace={self.namespace!r}"
        return f"MusubiKVStore(path={self.path!r}, scope={self.scope!r}{namespace})"

    def _op(self, collection: str) -> str:
        return f"llama_index.kv:{self.scope}/{collection}"

    def _key(self, key: str, collection: str) -> Any:
        return self._engine().key(self._op(collection), str(key))

    def _record(self, key: str, val: dict[str, Any], collection: str) -> None:
        """Queue the entry's node and its call (the caller flushes)."""
        eng = self._engine()
        k = self._key(key, collection)
        recorded = eng.record(
            k, {"k": str(key), "v": _json(val)}, _CONFIG, kind="kv", label=f"kv:{collection}",
            defer=True,
        )
        self._call(eng, "put", collection, key, k.node_id, recorded.artifact_id, False, None)

    def _call(
        self,
        eng: Engine,
        action: str,
        collection: str,
        key: str | None,
        node_id: str | None,
        artifact_id: str | None,
        replayed: bool,
        output: str | None,
    ) -> None:
        """Record one call of this store where it belongs (see the module docstring)."""
        recorder = eng.recorder
        where = _calls.place(recorder)
        if where is None:
            trace, parent, parent_call_id = self._session_trace(eng), None, None
        else:
            trace, parent, parent_call_id = where
        call = _calls.Call(
            None, parent, trace, parent_call_id, "kv", f"MusubiKVStore.{action}"
        )
        call.node_id, call.artifact_id = node_id, artifact_id
        call.input_preview = brief(f"{self.scope}/{collection}: {key}" if key else collection)
        _calls.finish(call, "done", output, replayed=replayed)

    def _session_trace(self, eng: Engine) -> _calls.Trace:
        holder = self._session
        now = time.monotonic()
        session = holder[0] if holder else None
        if session is not None and (
            now - session.last > SESSION_IDLE_S or session.trace.state.recorder is not eng.recorder
        ):
            _end_session(holder)
            session = None
        if session is None:
            state = RunState(eng.recorder, "kv", repr(self), namespace=self.namespace)
            state.start()
            session = _Session(_calls.Trace(state, False, open_ended=True))
            holder.append(session)
        session.last = now
        return session.trace

    def _commit(self, eng: Engine) -> None:
        """Commit this store's entries and calls now (pool workers are terminated without
        running exit handlers)."""
        if self._session:
            self._session[0].trace.flush()
        eng.flush()

    def flush(self) -> None:
        """End the store's own run (if one is open) and commit what it recorded."""
        _end_session(self._session)
        eng = self._engine_obj
        if eng is not None:
            guarded(eng.flush, None, topic="kv flush")

    def close(self) -> None:
        _end_session(self._session)
        with self._lock:
            eng, self._engine_obj = self._engine_obj, None
        if eng is not None:
            guarded(eng.close, None, topic="kv close")

    # ------------------------------------------------------------------ sync API
    def put(self, key: str, val: dict[str, Any], collection: str = DEFAULT_COLLECTION) -> None:
        """Store ``val`` under ``key``; the entry and its call are committed before this
        returns (pool workers are terminated without running exit handlers)."""

        def write() -> None:
            self._record(key, val, collection)
            self._commit(self._engine())

        guarded(write, None, topic="kv put")

    def put_all(
        self,
        kv_pairs: list[tuple[str, dict[str, Any]]],
        collection: str = DEFAULT_COLLECTION,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        """Store many pairs in one transaction (one call per pair)."""

        def write() -> None:
            for key, val in kv_pairs:
                self._record(key, val, collection)
            self._commit(self._engine())

        guarded(write, None, topic="kv put")

    def get(self, key: str, collection: str = DEFAULT_COLLECTION) -> dict[str, Any] | None:
        """The stored dict, or ``None`` (missing, deleted, or the store failed)."""

        def read() -> dict[str, Any] | None:
            eng = self._engine()
            k = self._key(key, collection)
            hit = eng.lookup(k, _CONFIG)
            found = self._unwrap(hit.value, key) if hit.replay else None
            if found is None:
                self._call(eng, "get", collection, key, None, None, False, "miss")
            else:
                self._call(eng, "get", collection, key, k.node_id, hit.artifact_id, True, brief(found))
            return found

        return guarded(read, None, topic="kv get")

    def _unwrap(self, stored: Any, key: str | None) -> dict[str, Any] | None:
        if (
            isinstance(stored, dict)
            and isinstance(stored.get("v"), dict)
            and (key is None or stored.get("k") == str(key))
        ):
            return dict(stored["v"])
        warn_once("kv decode", "a stored key/value entry has an unexpected shape; ignoring it")
        return None

    def get_all(self, collection: str = DEFAULT_COLLECTION) -> dict[str, dict[str, Any]]:
        """Every live entry of ``collection``."""

        def read() -> dict[str, dict[str, Any]]:
            eng = self._engine()
            eng.flush()
            out: dict[str, dict[str, Any]] = {}
            self._call(eng, "get_all", collection, None, None, None, False, None)
            nodes = eng.store.nodes_of_op(
                self._op(collection), limit=_MAX_LIST, namespace=eng.namespace
            )
            for node in nodes:
                if node.status != "done" or node.artifact_id is None:
                    continue
                art = eng.store.get_artifact(node.artifact_id)
                if art is None or not eng.intact(node, art[0], art[1]):
                    continue  # gone, or changed outside musubi (a warning, as from get)
                stored = eng.codec.decode(art[0], art[1])
                val = self._unwrap(stored, None)
                if val is not None:
                    out[str(stored["k"])] = val
            return out

        return guarded(read, {}, topic="kv get_all")

    def delete(self, key: str, collection: str = DEFAULT_COLLECTION) -> bool:
        """Forget ``key`` (the node is marked stale). True if it was present."""

        def remove() -> bool:
            eng = self._engine()
            k = self._key(key, collection)
            eng.flush()
            node = eng.store.get_node(k.node_id)
            if node is None or node.status != "done":
                return False
            eng.invalidate(k.node_id)
            self._call(eng, "delete", collection, key, k.node_id, None, False, None)
            return True

        return guarded(remove, False, topic="kv delete")

    # ------------------------------------------------------------------ async API
    # SQLite calls here are sub-millisecond; running them inline avoids a thread hop that
    # would cost more than the call itself.
    async def aput(
        self, key: str, val: dict[str, Any], collection: str = DEFAULT_COLLECTION
    ) -> None:
        self.put(key, val, collection)

    async def aput_all(
        self,
        kv_pairs: list[tuple[str, dict[str, Any]]],
        collection: str = DEFAULT_COLLECTION,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self.put_all(kv_pairs, collection, batch_size)

    async def aget(self, key: str, collection: str = DEFAULT_COLLECTION) -> dict[str, Any] | None:
        return self.get(key, collection)

    async def aget_all(self, collection: str = DEFAULT_COLLECTION) -> dict[str, dict[str, Any]]:
        return self.get_all(collection)

    async def adelete(self, key: str, collection: str = DEFAULT_COLLECTION) -> bool:
        return self.delete(key, collection)
