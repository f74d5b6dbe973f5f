"""``MusubiKVStore``: a LlamaIndex ``BaseKVStore`` over the musubi store.

A drop-in for ``IngestionCache(cache=...)`` and ``BaseEmbedding.embeddings_cache``. Each
entry is a musubi node (op ``llama_index.kv:<scope>/<collection>``, input = the key), so
entries show up in ``musubi stats`` as replays, can be invalidated, and live in the same
SQLite file as the lineage.

It pickles as its path (``IngestionPipeline(num_workers=2)`` spawns processes): each worker
reopens the file and writes its cache entries directly, so nothing is lost when the pool
exits (LlamaIndex only merges worker writes back for in-memory stores).

Example::

    from llama_index.core.ingestion import IngestionCache, IngestionPipeline
    kv = MusubiKVStore("musubi.db")
    pipeline = IngestionPipeline(transformations=[...], cache=IngestionCache(cache=kv))
"""

from __future__ import annotations

import json
import threading
from typing import Any

from llama_index.core.storage.kvstore.types import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_COLLECTION,
    BaseKVStore,
)

from musubi_core import Engine, SQLiteStore, StepConfiguration, StepType
from musubi_llama_index._runtime import guarded, warn_once

__all__ = ["MusubiKVStore"]

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
        namespace: musubi namespace recorded on the nodes.

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
        self.namespace = namespace
        self._engine_obj: Engine | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing
    def _engine(self) -> Engine:
        # Opened lazily: cheap to construct, and reopened after unpickling in a worker.
        with self._lock:
            if self._engine_obj is None:
                self._engine_obj = Engine(SQLiteStore(self.path), namespace=self.namespace)
            return self._engine_obj

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "scope": self.scope, "namespace": self.namespace}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self.scope = state["scope"]
        self.namespace = state["namespace"]
        self._engine_obj = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        # No memory address: IngestionPipeline hashes str(to_dict()) of transformations.
        return f"MusubiKVStore(path={self.path!r}, scope={self.scope!r})"

    def _op(self, collection: str) -> str:
        return f"llama_index.kv:{self.scope}/{collection}"

    def _key(self, key: str, collection: str) -> Any:
        return self._engine().key(self._op(collection), str(key))

    def _record(
        self, key: str, val: dict[str, Any], collection: str, *, defer: bool = False
    ) -> None:
        self._engine().record(
            self._key(key, collection),
            {"k": str(key), "v": _json(val)},
            _CONFIG,
            kind="kv",
            label=f"kv:{collection}",
            defer=defer,
        )

    def close(self) -> None:
        with self._lock:
            eng, self._engine_obj = self._engine_obj, None
        if eng is not None:
            guarded(eng.close, None, topic="kv close")

    # ------------------------------------------------------------------ sync API
    def put(self, key: str, val: dict[str, Any], collection: str = DEFAULT_COLLECTION) -> None:
        """Store ``val`` under ``key`` (written at once: workers may exit without atexit)."""
        guarded(lambda: self._record(key, val, collection), None, topic="kv put")

    def put_all(
        self,
        kv_pairs: list[tuple[str, dict[str, Any]]],
        collection: str = DEFAULT_COLLECTION,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        """Store many pairs in one transaction per buffer flush."""

        def write() -> None:
            eng = self._engine()
            for key, val in kv_pairs:
                self._record(key, val, collection, defer=True)
            eng.flush()

        guarded(write, None, topic="kv put")

    def get(self, key: str, collection: str = DEFAULT_COLLECTION) -> dict[str, Any] | None:
        """The stored dict, or ``None`` (missing, deleted, or the store failed)."""

        def read() -> dict[str, Any] | None:
            eng = self._engine()
            hit = eng.lookup(self._key(key, collection), _CONFIG)
            if not hit.replay:
                return None
            return self._unwrap(hit.value, key)

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
            for node in eng.store.nodes_of_op(self._op(collection), limit=_MAX_LIST):
                if node.status != "done" or node.artifact_id is None:
                    continue
                art = eng.store.get_artifact(node.artifact_id)
                if art is None:
                    continue
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
