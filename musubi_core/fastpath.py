"""Hit memos for adapters that decode (and memoise decodings) themselves.

A hot adapter path (a LangChain cache hit) keeps decoded entries by artifact id and rebuilds
fresh objects from them, so it only needs :func:`~musubi_core.probe.probe_replay`'s answer
(does the node replay under the plain rule, and what are its stored bytes) and then counts the
replay once it has served it (:func:`count_replay`). :class:`HitMemo` remembers those answers
while the store file is provably unchanged, and finds a node by an alias of the raw request
(:meth:`HitMemo.probe_alias`) so that the next process does not compute the request's key.
Anything that is not a plain hit answers ``None`` (or the node's id): the caller uses
``Engine.lookup``, which decides with the full policy (and says why).

Example:
    >>> import tempfile, os
    >>> from musubi_core import SQLiteStore
    >>> from musubi_core.engine import Engine
    >>> engine = Engine(SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db")))
    >>> key = engine.key("demo.add", {"a": 1, "b": 2})
    >>> _ = engine.record(key, 3)
    >>> hit = HitMemo(engine).probe(key)
    >>> engine.codec.decode(hit.encoding, hit.payload)
    3
    >>> count_replay(engine, hit.node_id)
    >>> engine.flush(); engine.store.get_node(key.node_id).replay_count
    1
    >>> engine.close()
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sqlite3
import threading
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from ._plain import NOT_PLAIN, is_plain_json, plain_input_hash, plain_payload, plain_tree
from .identity import NodeKey
from .policy import DEFAULT_CONFIG, Decision, StepConfiguration, StepType
from .probe import (
    _PROBED,
    PROBE_COLUMNS,
    EncodedHit,
    _new_tuple,
    artifact_id_for,
    hit_of,
    probe_replay,
)
from .store import PostgresStore, SQLiteStore

if TYPE_CHECKING:  # the engine owns a memo (Engine.hits): it imports this module
    from .engine import Engine

__all__ = [
    "NOT_PLAIN",
    "AliasHit",
    "HitMemo",
    "count_replay",
    "is_plain_json",
    "plain_tree",
    "plain_input_hash",
    "plain_payload",
]

# A node reached through an alias (a digest of the raw request, see identity.alias_of): what
# a new process's first hit of a request reads, instead of computing the node's key: its id
# and operation name, then the probe's columns (read by probe.hit_of).
_ALIAS_PROBE = (
    f"SELECT r.node_id, n.op_name, {PROBE_COLUMNS} "
    "FROM musubi_aliases r JOIN musubi_nodes n ON n.node_id = r.node_id "
    "LEFT JOIN musubi_artifacts a ON a.artifact_id = n.artifact_id "
    "WHERE r.alias = ?"
)


def _slot(key: object, config: StepConfiguration) -> object:
    """Where a memo keeps the hit of ``key`` (a node id or an alias) under ``config``: a
    caller's TTL tightens a stochastic hit's expiry (:func:`~musubi_core.probe.hit_of`), so
    such a hit is remembered for that TTL only."""
    if config.step_type is StepType.STOCHASTIC and config.ttl_seconds is not None:
        return (key, config.ttl_seconds)
    return key


def seen_before(seen: set[Any], item: Any, bound: int = 4096) -> bool:
    """Has ``item`` been offered to ``seen`` before (since it was last cleared)? Adds it.

    The memos here keep an answer only when it is asked for the second time: an entry read
    once (every entry of an application's next run) then leaves nothing behind but a string or
    a number in a set, which the garbage collector does not track. Keeping every first answer
    tripled the collections of a loop of cold replays (117 -> 335 in 20,000 replays, 1.6 ->
    3.4-4.0 µs a replay)."""
    if item in seen:
        return True
    if len(seen) >= bound:
        seen.clear()
    seen.add(item)
    return False


# Decoded values kept by HitMemo.decode: small outputs only.
_MAX_KEPT_PAYLOAD = 4096
_ATOMS = (str, int, float, bool, type(None))


def _own_copy(value: Any) -> Any:
    """A value of its own made from a kept :func:`_flat` value."""
    return value.copy() if type(value) is dict or type(value) is list else value


def _flat(value: object) -> bool:
    """Is ``value`` immutable, or a list or dict (string keys) of immutable atoms, so that a
    shallow copy of it is a value of its own?"""
    kind = type(value)
    if kind in _ATOMS:
        return True
    if kind is dict:
        return all(type(k) is str for k in value) and all(  # type: ignore[attr-defined]
            type(v) in _ATOMS for v in value.values()  # type: ignore[attr-defined]
        )
    if kind is list:
        return all(type(v) in _ATOMS for v in value)  # type: ignore[attr-defined]
    return False


class AliasHit(NamedTuple):
    """What :meth:`HitMemo.probe_alias` found: the node an alias leads to (its id and
    operation name) and the node's replayable output."""

    node_id: str
    op_name: str
    hit: EncodedHit


def _probe_alias_row(engine: Engine, alias: bytes) -> tuple[Any, ...] | None:
    store = engine.store
    if isinstance(store, SQLiteStore):
        try:
            # This thread's connection, without the error-wrapping context of ``store.query``
            # (a cold hit's path); on an error, again through it for lookup()'s StoreError.
            found: tuple[Any, ...] | None = store._conn().execute(_ALIAS_PROBE, (alias,)).fetchone()
        except sqlite3.Error:
            found = store.query(lambda conn: conn.execute(_ALIAS_PROBE, (alias,)).fetchone(), "lookup")
        return found
    assert isinstance(store, PostgresStore)
    pg = store
    row = pg.query(lambda conn: pg._ex(conn, _ALIAS_PROBE, (alias,)).fetchone(), "lookup")
    return cast("tuple[Any, ...] | None", row)


def count_replay(engine: Engine, node_id: str) -> None:
    """Count one replay of ``node_id`` (queued on the store's recorder, as
    ``Engine.lookup`` counts it)."""
    engine._count_replay(node_id)


class HitMemo:
    """:func:`probe_replay` that remembers hits while the store is provably unchanged.

    A hit is remembered together with a *change token* of the store file; while the token is
    unchanged the stored node cannot have changed, so the remembered hit stands (its TTL is
    still checked against the clock). Every hit it answers has a payload that hashes to its
    artifact id: a remembered hit holds the bytes that were checked when they were read, so
    serving it again needs no hashing (a file changed behind the token's back could make it
    stale, never make it serve bytes that were not checked). The payloads checked are kept too
    (by artifact id, within a byte budget) beyond the token: bytes read again after a commit
    that are equal to them hash to the same id, so comparing them (~0.05 µs per KB) stands for
    hashing them (~1 µs per KB). Any commit to the file, by any connection in this or
    another process (a CLI ``invalidate``, a ``gc``, another thread's write, our own replay
    counters), changes the token and forgets everything remembered.

    The token is read without running SQL when the store is in WAL mode: the first 96 bytes of
    the ``-shm`` file are SQLite's two copies of the WAL-index header, which every commit
    rewrites (frame count and checksums, or new salts after a WAL restart; see
    https://www.sqlite.org/walformat.html). Only equality is used; a torn read (copies differ),
    a missing file or any other surprise falls back to ``PRAGMA data_version`` plus this
    connection's ``total_changes``. (An SQL statement costs a read transaction with its
    file locks; on small VMs that alone is ~10% of a LangChain ``invoke``.)

    Once this process has read the store (so its connections hold the ``-shm`` file open, and
    with it SQLite's shared lock that keeps any other process from truncating it), the header
    is read through a read-only memory map of that file, as SQLite itself reads it, rather than
    with ``os.pread``: a system call releases the interpreter's lock, and when the recorder's
    thread is waiting for it each release costs a hand-off (13-17 µs a read measured in a loop
    of LangChain hits, against 0.06 µs through the map). The map is closed before the store's
    connections close (a close hook), and a forked child drops the one it inherited (it holds
    no lock on the file until its own connections open it).

    >>> import tempfile, os
    >>> from musubi_core import SQLiteStore
    >>> from musubi_core.engine import Engine
    >>> engine = Engine(SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db")))
    >>> key = engine.key("demo.add", {"a": 1, "b": 2})
    >>> _ = engine.record(key, 3)
    >>> memo = HitMemo(engine)
    >>> _ = memo.probe(key)  # read once: an answer is kept when asked for again
    >>> memo.probe(key) is memo.probe(key)  # asked again: remembered
    True
    >>> _ = engine.invalidate(key.node_id)  # any write forgets it
    >>> memo.probe(key) is None  # stale: only Engine.lookup can tell
    True
    >>> engine.close()
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_entries: int = 4096,
        max_checked_bytes: int = 32 << 20,
        max_memo_bytes: int = 16 << 20,
    ) -> None:
        self.engine = engine
        self._max = max_entries
        # Payload bytes one thread's memo holds at most (a hit larger than this is answered,
        # never remembered): @step outputs can be large, and each thread has its own memo.
        self._max_memo_bytes = max_memo_bytes
        # artifact id -> (encoding, payload) that hashed to it; shared by the threads.
        self._checked: dict[str, tuple[str, bytes]] = {}
        self._checked_bytes = 0
        self._max_checked_bytes = max_checked_bytes
        self._local = threading.local()
        self._shm_lock = threading.Lock()
        self._shm: tuple[int, int] | None = None  # (pid, fd) of the open -shm file
        # A read-only map of the -shm file's first page, once this process holds it (see the
        # class docstring); None until then, or where it cannot be mapped.
        self._map: mmap.mmap | None = None
        self._map_tried = False
        # artifact id -> (payload, decoded value) for small outputs whose decoded value is a
        # string, a number or a flat container of those (see :meth:`decode`).
        self._values: dict[str, tuple[bytes, Any]] = {}
        # Artifact ids decoded or checked once: the second time, the answer is kept.
        self._values_seen: set[str] = set()
        self._checked_seen: set[str] = set()
        _MEMOS.add(self)
        hook = getattr(engine.store, "add_close_hook", None)
        if hook is not None:
            hook(self._drop_map)

    def _shm_fd(self, store: SQLiteStore) -> int | None:
        shm = self._shm
        if shm is not None:
            return shm[1]
        with self._shm_lock:
            if self._shm is None:
                if store.path == ":memory:" or store.path.startswith("file:"):
                    return None
                try:
                    fd = os.open(store.path + "-shm", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    return None  # not (yet) in WAL mode: tried again on the next probe
                self._shm = (os.getpid(), fd)
            return self._shm[1]

    def _token(self, store: SQLiteStore) -> object:
        fd = self._shm_fd(store)
        if fd is not None:
            try:
                header = os.pread(fd, 96, 0)
            except OSError:
                header = b""
            if len(header) == 96 and header[:48] == header[48:] and any(header[:48]):
                return header
        conn = store._conn()
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        return (conn, version, conn.total_changes)  # data_version is per connection

    def probe(
        self, key: NodeKey, config: StepConfiguration = DEFAULT_CONFIG
    ) -> EncodedHit | Decision | None:
        """As :func:`probe_replay`."""
        engine = self.engine
        store = engine.store
        if isinstance(store, PostgresStore) and not config.force_reexecution:
            # No change token to remember hits by: every probe asks the server (one round
            # trip); bytes equal to ones already checked are not hashed again.
            found = probe_replay(engine, key, config, verify=False)
            if isinstance(found, EncodedHit) and engine._verify_artifacts and not self._intact(found):
                return None  # Engine.lookup makes it a miss and warns
            return found
        if config.force_reexecution or not isinstance(store, SQLiteStore) or store._closed:
            return probe_replay(engine, key, config)
        if engine.recorder.pending_node(key.node_id) is not None:
            return None
        memo = self._memo(store)
        if memo is None:
            return probe_replay(engine, key, config)  # raises lookup()'s StoreError
        slot = _slot(key.node_id, config)
        hit: EncodedHit | None = memo.get(slot)
        if hit is not None:
            if hit.expires_at is None or engine._now() < hit.expires_at:
                return hit
            del memo[slot]
        found = probe_replay(engine, key, config, verify=False)
        if not self._map_tried:
            self._map_shm()  # this process has read the store now: its shm is open
        if isinstance(found, EncodedHit):
            if engine._verify_artifacts and not self._intact(found):
                return None  # Engine.lookup makes it a miss and warns
            self._remember(memo, slot, found, len(found.payload))
        return found

    def _remember(self, memo: dict[Any, Any], slot: object, found: object, size: int) -> None:
        """Keep ``found`` in this thread's memo, within its entry and byte budgets."""
        local = self._local
        if size > self._max_memo_bytes or not seen_before(local.seen, slot, self._max):
            return
        held = local.bytes + size
        if len(memo) >= self._max or held > self._max_memo_bytes:
            memo.clear()
            held = size
        memo[slot] = found
        local.bytes = held

    def _memo(self, store: SQLiteStore) -> dict[Any, Any] | None:
        """This thread's remembered answers (node id -> EncodedHit, alias -> AliasHit), empty
        again once the store's change token moved; ``None`` when the token cannot be read."""
        view = self._map
        try:
            if view is not None:
                header = view[:96]  # the common case: no system call, the GIL kept
            else:
                shm = self._shm
                header = os.pread(shm[1], 96, 0) if shm is not None else b""
        except (OSError, ValueError):  # ValueError: the map was closed meanwhile
            header = b""
        local = self._local
        if header and header == getattr(local, "token", None):
            # Unchanged since this thread's memo was filled: a header is only ever kept as
            # the token once it was checked (below), so equal bytes are as good (the common
            # case: one 96-byte comparison).
            return local.memo  # type: ignore[no-any-return]
        if len(header) == 96 and header[:48] == header[48:] and any(header[:48]):
            token: object = header
        else:
            try:
                token = self._token(store)
            except (sqlite3.Error, OSError):
                return None
        memo: dict[Any, Any] | None = getattr(local, "memo", None)
        if memo is None or local.token != token:
            memo = local.memo = {}
            local.token = token
            local.bytes = 0
            local.seen = set()
        return memo

    def probe_alias(
        self, alias: bytes, config: StepConfiguration = DEFAULT_CONFIG
    ) -> AliasHit | str | None:
        """The node ``alias`` (see :func:`~musubi_core.identity.alias_of`) leads to, if it
        replays under the plain rule: one probe, no key computed. Otherwise compute the key
        and :meth:`probe` it: ``None`` when no alias (or no node behind it) is stored, the
        node's id when it is anything but a plain hit (a stale, failed, expired or deferred
        node, damaged bytes), which the full lookup decides and explains. Store errors
        propagate as from :meth:`probe`."""
        engine = self.engine
        store = engine.store
        if config.force_reexecution or not isinstance(store, _PROBED):
            return None
        if not store.has_aliases:
            return None
        memo: dict[Any, Any] | None = None
        slot = _slot(alias, config)
        if isinstance(store, SQLiteStore):
            if store._closed:
                return None
            memo = self._memo(store)
            if memo is not None:
                found: AliasHit | None = memo.get(slot)
                if found is not None:
                    expires = found.hit.expires_at
                    if expires is None or engine._now() < expires:
                        return found
                    del memo[slot]
        row = _probe_alias_row(engine, alias)
        if not self._map_tried and memo is not None:
            self._map_shm()  # this process has read the store now: its shm is open
        if row is None:
            return None
        node_id, op_name = row[0], row[1]
        if not isinstance(node_id, str) or not isinstance(op_name, str):
            return None
        if engine.recorder.pending_node(node_id) is not None:
            return node_id
        hit = hit_of(engine, node_id, row[2:], config, verify=False)
        if hit is None or (engine._verify_artifacts and not self._intact(hit)):
            return node_id
        found = _new_tuple(AliasHit, (node_id, op_name, hit))  # AliasHit(...), no Python __new__
        if memo is not None:
            self._remember(memo, slot, found, len(hit.payload))
        return found

    def decode(self, hit: EncodedHit) -> Any:
        """``hit``'s output, decoded by the engine's codec: a value of its own at every call.

        A hit this memo answered again is the same object with the same payload bytes; when
        its decoded value is a string, a number, None or a flat list or dict of those (most
        step outputs), it is kept, and each call gets a copy of it (``dict.copy()`` costs
        0.1 µs, decoding the bytes again 3-5 µs). Anything else is decoded every time. Raises
        :class:`~musubi_core.errors.DecodeError` as the codec does."""
        kept = self._values.get(hit.artifact_id)
        if kept is not None and kept[0] is hit.payload:
            return _own_copy(kept[1])
        value = self.engine.codec.decode(hit.encoding, hit.payload)
        if (
            len(hit.payload) <= _MAX_KEPT_PAYLOAD
            and seen_before(self._values_seen, hit.artifact_id, self._max)
            and _flat(value)
        ):
            if len(self._values) >= self._max:
                self._values = {}
            self._values[hit.artifact_id] = (hit.payload, value)
            return _own_copy(value)
        return value

    def _intact(self, hit: EncodedHit) -> bool:
        """Does ``hit``'s payload hash to its artifact id? Bytes equal to a payload that
        did are not hashed again."""
        checked = self._checked.get(hit.artifact_id)
        if checked is not None and checked[1] == hit.payload and checked[0] == hit.encoding:
            return True
        if artifact_id_for(hit.encoding, hit.payload) != hit.artifact_id:
            return False
        size = len(hit.payload)
        if not seen_before(self._checked_seen, hit.artifact_id, self._max):
            return True
        if len(self._checked) >= self._max or self._checked_bytes + size > self._max_checked_bytes:
            self._checked = {}
            self._checked_bytes = 0
        if size <= self._max_checked_bytes:
            self._checked[hit.artifact_id] = (hit.encoding, hit.payload)
            self._checked_bytes += size
        return True

    def _map_shm(self) -> None:
        """Map the ``-shm`` file's header read-only (once; see the class docstring)."""
        with self._shm_lock:
            shm = self._shm
            if self._map_tried or shm is None:
                return  # no -shm descriptor yet: tried again after the next probe
            self._map_tried = True
            store = self.engine.store
            if shm[0] != os.getpid() or not isinstance(store, SQLiteStore):
                return
            try:
                # Only the files this store's connections hold: the database is the one it
                # opened, and the -shm file under its name is the one this descriptor reads.
                if store._current_file_id() != store._file_id:
                    return
                if os.fstat(shm[1]).st_ino != os.stat(store.path + "-shm").st_ino:
                    return
                self._map = mmap.mmap(shm[1], 96, access=mmap.ACCESS_READ)
            except (OSError, ValueError):  # e.g. a file shorter than its header
                self._map = None

    def _drop_map(self) -> None:
        """Stop reading through the map and close it (before the store's connections close)."""
        with self._shm_lock:
            self._forget_map()

    def _forget_map(self) -> None:
        """Close the map and never map again (the pread path stays correct); the caller holds
        ``_shm_lock``, or is a forked child, where no other thread can hold it."""
        view, self._map = self._map, None
        self._map_tried = True
        if view is not None:
            with contextlib.suppress(Exception):
                view.close()

    def close(self) -> None:
        """Close the ``-shm`` file descriptor (also done when the memo is collected)."""
        self._drop_map()
        with self._shm_lock:
            shm, self._shm = self._shm, None
        if shm is not None and shm[0] == os.getpid():
            with contextlib.suppress(OSError):
                os.close(shm[1])

    def __del__(self) -> None:
        # No module globals here: at interpreter exit they may already be None.
        try:  # noqa: SIM105 - contextlib may be gone at exit
            self.close()
        except Exception:
            pass


# Every memo, for the fork hook below.
_MEMOS: weakref.WeakSet[HitMemo] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # The child holds no lock on any -shm file until its own connections open it: it reads the
    # header with pread again (the maps stay the parent's business; closing a copy is local).
    for memo in list(_MEMOS):
        memo._forget_map()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- plain JSON data ---------------------------------------------------------------
# The helpers live in ``musubi_core._plain`` (the core's encoders use them too); adapters use
# them from here.
