"""Editing a store the way another tool would (a second ``sqlite3`` connection or the
``sqlite3`` shell; on PostgreSQL a second connection), for the tests of what musubi serves
from a changed store.

Two kinds of edit:

* :func:`edit_payload` rewrites an artifact's payload in place and keeps its id: the content id
  no longer matches, so musubi must treat it as a miss (never serve it);
* :func:`readdress` replaces an artifact by another payload stored under that payload's own
  content id and points every node and durable step at it: the ids match, and only the decoder
  (its allow-list, its limits) stands between the payload and the caller.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from tests.support.storedb import execute, rows


def content_id(encoding: str, payload: bytes) -> str:
    """``sha256(encoding + b"\\0" + payload)``: musubi's artifact id, computed independently."""
    return hashlib.sha256(encoding.encode() + b"\0" + payload).hexdigest()


def _one(db: str | Path, sql: str, param: str) -> object:
    found = rows(db, sql, (param,))
    assert found and found[0][0] is not None, f"nothing for {param}"
    return found[0][0]


def payload_of(db: str | Path, artifact_id: str) -> bytes:
    """The stored bytes of ``artifact_id`` (TEXT as its UTF-8 bytes)."""
    value = _one(db, "SELECT payload FROM musubi_artifacts WHERE artifact_id = ?", artifact_id)
    return value if isinstance(value, bytes) else str(value).encode()


def artifact_of(db: str | Path, node_id: str) -> str:
    """The artifact id ``node_id`` points at."""
    return str(_one(db, "SELECT artifact_id FROM musubi_nodes WHERE node_id = ?", node_id))


def edit_payload(db: str | Path, artifact_id: str, payload: bytes, *, shell: bool = False) -> None:
    """Overwrite the payload of ``artifact_id``, keeping its id (committed when this returns).

    ``shell``: through the ``sqlite3`` command-line shell, which stores a quoted literal as
    TEXT, as someone editing the file by hand would."""
    if shell:
        exe = shutil.which("sqlite3")
        assert exe is not None, "the sqlite3 shell is not installed"
        literal = payload.decode().replace("'", "''")
        sql = f"UPDATE musubi_artifacts SET payload = '{literal}' WHERE artifact_id = '{artifact_id}';"
        proc = subprocess.run([exe, str(db), sql], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    else:
        changed = execute(
            db, "UPDATE musubi_artifacts SET payload = ? WHERE artifact_id = ?", (payload, artifact_id)
        )
        assert changed == 1, f"no artifact {artifact_id}"
    assert payload_of(db, artifact_id) == payload


def readdress(
    db: str | Path, artifact_id: str, *, payload: bytes | None = None, encoding: str | None = None
) -> str:
    """Replace ``artifact_id`` by ``payload``/``encoding`` stored under their own content id;
    repoint its nodes and durable steps. Returns the new id."""
    ((old_encoding, old_payload),) = rows(
        db, "SELECT encoding, payload FROM musubi_artifacts WHERE artifact_id = ?", (artifact_id,)
    )
    enc = old_encoding if encoding is None else encoding
    data = bytes(old_payload) if payload is None else payload
    new_id = content_id(enc, data)
    # A new artifact row, then the references, then the old row: the same end state as an
    # in-place rename, in an order any backend's foreign keys accept.
    execute(
        db,
        "INSERT INTO musubi_artifacts (artifact_id, encoding, payload, size, producer_node_id, "
        "created_at) SELECT ?, ?, ?, ?, producer_node_id, created_at FROM musubi_artifacts "
        "WHERE artifact_id = ?",
        (new_id, enc, data, len(data), artifact_id),
    )
    execute(db, "UPDATE musubi_nodes SET artifact_id = ? WHERE artifact_id = ?", (new_id, artifact_id))
    execute(
        db, "UPDATE musubi_run_steps SET artifact_id = ? WHERE artifact_id = ?", (new_id, artifact_id)
    )
    execute(db, "DELETE FROM musubi_artifacts WHERE artifact_id = ?", (artifact_id,))
    return new_id
