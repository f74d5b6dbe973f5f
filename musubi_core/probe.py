"""Reading what replays: the one probe every replay path starts with.

A replay needs to know whether a node replays under the plain rule (done, its output present
and intact, not expired) and what its stored bytes are. :func:`probe_replay` answers that with
one primary-key statement (the node's row and its artifact, nothing else) and no decoding:
:meth:`Engine.lookup <musubi_core.engine.Engine.lookup>` serves a plain hit from it, and the
adapters' per-process memo (:class:`musubi_core.fastpath.HitMemo`) remembers its answers.
Anything that is not the plain case (a deferred write, a stale node that early cutoff might
revive, a failed or pending node, an expired TTL, a missing or damaged artifact,
``force_reexecution``, a garbled row, a store without the statement) answers ``None``: the
full lookup decides with the whole policy and says why.

Example:
    >>> import tempfile, os
    >>> from musubi_core import SQLiteStore
    >>> from musubi_core.engine import Engine
    >>> engine = Engine(SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db")))
    >>> key = engine.key("demo.add", {"a": 1, "b": 2})
    >>> probe_replay(engine, key).reason.value  # never recorded: a definite miss
    'not_found'
    >>> _ = engine.record(key, 3)
    >>> hit = probe_replay(engine, key)
    >>> engine.codec.decode(hit.encoding, hit.payload), hit.producer_node_id == key.node_id
    (3, True)
    >>> engine.close()
"""

from __future__ import annotations

import hashlib
import sqlite3
from typing import TYPE_CHECKING, Any, NamedTuple

from .policy import DEFAULT_CONFIG, Decision, ReplayReason, StepConfiguration, StepType
from .store import PostgresStore, SQLiteStore

if TYPE_CHECKING:
    from .engine import Engine
    from .identity import NodeKey

__all__ = ["EncodedHit", "artifact_id_for", "content_matches", "hit_of", "probe_replay"]


def artifact_id_for(encoding: str, payload: bytes) -> str:
    """The content id of an encoded output: ``sha256(encoding + b"\\0" + payload)``, hex."""
    digest = hashlib.sha256(encoding.encode("utf-8"))
    digest.update(b"\x00")
    digest.update(payload)
    return digest.hexdigest()


def content_matches(artifact_id: str | None, encoding: str, payload: bytes | str) -> bool:
    """Does ``payload`` hash to ``artifact_id``? Checked before a stored output is served: an
    artifact edited in the store file, even into another valid value, fails it. (SQLite hands
    back text for a payload an editor stored as TEXT; its UTF-8 bytes are what is checked.)"""
    if artifact_id is None:
        return False
    if not isinstance(payload, bytes):
        try:
            payload = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        except (TypeError, ValueError):
            return False
    return artifact_id_for(encoding, payload) == artifact_id


# The node's replay columns and its artifact: one probe of each primary key. The last two
# columns serve nothing but are type-checked: a garbled row is never served (Engine.lookup
# makes it a miss and names the column).
PROBE_COLUMNS = (
    "n.status, n.expires_at, n.artifact_id, n.tokens_in, n.tokens_out, n.duration_s, "
    "a.encoding, a.payload, n.finished_at, n.namespace, a.producer_node_id, n.created_at, "
    "n.replay_count"
)
PROBE_SQL = (
    f"SELECT {PROBE_COLUMNS} "
    "FROM musubi_nodes n LEFT JOIN musubi_artifacts a ON a.artifact_id = n.artifact_id "
    "WHERE n.node_id = ?"
)

# What each PROBE_COLUMNS column holds in a row musubi wrote (see store._sqlbase._COLUMN_TYPES).
_NUMBER = (float, int, type(None))
_TEXT = (str, type(None))
_PROBE_TYPES: tuple[type | tuple[type, ...], ...] = (
    str, _NUMBER, _TEXT, (int, type(None)), (int, type(None)), _NUMBER, _TEXT,
    (bytes, str, type(None)), _NUMBER, str, _TEXT, (float, int), int,
)

_PROBED = (SQLiteStore, PostgresStore)  # the stores PROBE_SQL is written for

_new_tuple = tuple.__new__

NOT_FOUND = Decision(False, ReplayReason.NOT_FOUND, "no stored node with this identity")


class EncodedHit(NamedTuple):
    """A node that replays, with its artifact still encoded (decode with ``engine.codec``):
    its id, the artifact's id, encoding and bytes, the tokens and seconds of the execution a
    replay stands in for, when it expires, and the node whose execution produced the artifact
    (the node itself, or the one a replay by content was served from)."""

    node_id: str
    artifact_id: str
    encoding: str
    payload: bytes
    tokens_in: int | None
    tokens_out: int | None
    duration_s: float | None
    expires_at: float | None = None
    producer_node_id: str | None = None


def probe_replay(
    engine: Engine,
    key: NodeKey,
    config: StepConfiguration = DEFAULT_CONFIG,
    *,
    verify: bool = True,
) -> EncodedHit | Decision | None:
    """Would ``key`` replay under the plain rule? Reads only; counts nothing.

    Returns an :class:`EncodedHit` (done, artifact present and matching its content id, not
    expired), the ``not_found`` :class:`Decision` when no node exists, or ``None`` when only
    the full lookup can tell (a payload that does not hash to the node's artifact id is such a
    case: ``Engine.lookup`` makes it a miss with a warning). Store errors propagate as from
    ``Engine.lookup``. ``verify=False`` leaves the content-id check to the caller (who must
    make it before serving the payload).
    """
    store = engine.store
    if config.force_reexecution or not isinstance(store, _PROBED):
        return None
    if key.namespace != engine.namespace:
        return None  # Engine.lookup says why
    recorder = engine.recorder
    if recorder.pending_node(key.node_id) is not None:
        return None  # a deferred write: the full lookup serves it from the recorder
    node_id = key.node_id
    if isinstance(store, PostgresStore):
        # One statement on a pooled autocommit connection: one round trip.
        pg = store
        row = pg.query(lambda conn: pg._ex(conn, PROBE_SQL, (node_id,)).fetchone(), "lookup")
    else:
        try:
            # This thread's connection, without the error-wrapping context of ``store.query``.
            row = store._conn().execute(PROBE_SQL, (node_id,)).fetchone()
        except sqlite3.Error:
            # Again through ``query``, which raises the StoreError (with its hint) lookup()
            # would.
            row = store.query(
                lambda conn: conn.execute(PROBE_SQL, (node_id,)).fetchone(), "lookup"
            )
    if row is None:
        if recorder.pending_node(node_id) is not None:
            return None  # deferred while we read
        return NOT_FOUND
    return hit_of(engine, node_id, row, config, verify)


def hit_of(
    engine: Engine, node_id: str, row: tuple[Any, ...], config: StepConfiguration, verify: bool
) -> EncodedHit | None:
    """The plain replay rule over a :data:`PROBE_SQL` row: the hit, or ``None`` when only
    the full lookup can tell."""
    (
        status, expires_at, artifact_id, tokens_in, tokens_out, duration_s, encoding, payload,
        done_at, namespace, producer, _created, _count,
    ) = row
    if not all(map(isinstance, row, _PROBE_TYPES)):
        return None  # a garbled column: Engine.lookup makes it a miss and says which
    # Each column has its type now: a number or None where a number is kept.
    if namespace != engine.namespace:
        return None  # a row of another namespace (see Engine._find): Engine.lookup decides
    if status != "done" or artifact_id is None or encoding is None or payload is None:
        return None
    if (
        config.step_type is StepType.STOCHASTIC
        and config.ttl_seconds is not None
        and done_at is not None
    ):
        # The caller's current TTL tightens the stored expiry (as in policy.decide).
        tightened = done_at + config.ttl_seconds
        expires_at = tightened if expires_at is None else min(expires_at, tightened)
    if expires_at is not None and engine._now() >= expires_at:
        return None  # expired: the full lookup says so
    if type(payload) is not bytes:
        payload = payload.encode("utf-8")
    if verify and engine._verify_artifacts and artifact_id_for(encoding, payload) != artifact_id:
        return None  # tampered or damaged bytes: Engine.lookup makes it a miss and warns
    # EncodedHit(...) without the Python-level __new__ a NamedTuple has (a cold hit's path).
    return _new_tuple(
        EncodedHit,
        (
            node_id,
            artifact_id,
            encoding,
            payload,
            tokens_in,
            tokens_out,
            None if duration_s is None else float(duration_s),
            None if expires_at is None else float(expires_at),
            producer,
        ),
    )
