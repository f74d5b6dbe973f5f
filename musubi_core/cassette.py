"""Exports that diff well: a store's recordings as JSON lines, and back.

``musubi export`` writes one JSON object per line for every recorded node that can replay
(done, with its output): its identity (node id, operation, input hash, namespace), its replay
policy (step type, expiry), what the replay saves (tokens, seconds), the identity material
kept to explain a miss (see :mod:`musubi_core.replay_miss`), the data edges it was computed
from, and its output (the artifact: its content id, encoding and value). Lines are sorted by
namespace, operation and node id, and keys within a line are sorted, so a re-recorded call
shows in ``git diff`` as the lines that really changed. Nothing volatile is written (no run or
call ids, hosts, process ids, replay counts) and nothing secret (credentials never enter
identity, and the material is redacted).

``musubi import`` loads such a file into a store (a new one, or an existing one: the
imported recordings then replace what the store holds for the same nodes). Every artifact is
checked against its content id first: an edited output is refused, naming its line. An
imported export replays exactly like the store it came from.

>>> import io, os, tempfile
>>> from musubi_core import Engine, SQLiteStore, step, use_engine
>>> @step
... def shout(text: str) -> str:
...     return text.upper()
>>> folder = tempfile.mkdtemp()
>>> with Engine(SQLiteStore(os.path.join(folder, "a.db"))) as engine, use_engine(engine):
...     _ = shout("hi")
...     lines = list(export_lines(engine.store))
>>> with Engine(SQLiteStore(os.path.join(folder, "b.db")), mode="replay") as engine:
...     print(import_lines(engine.store, lines).imported)
...     with use_engine(engine):
...         print(shout("hi").replayed)
1
True
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ._plain import COMPACT_JSON
from .errors import MusubiError
from .policy import RECORDED_ONLY_KINDS
from .probe import artifact_id_for
from .record import flush_recorders
from .store import ArtifactWrite, EdgeWrite, NodeRecord, NodeWrite, Store

__all__ = ["FORMAT", "ImportLineError", "ImportReport", "export_lines", "import_lines"]

FORMAT = 1  # the "musubi_export" field of every line
_BATCH = 500
_ALL = 2**62  # list_nodes' limit for "every node"


class ImportLineError(MusubiError):
    """A line of an export could not be imported (``line``: its number, from 1)."""

    def __init__(self, message: str, *, line: int) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass(frozen=True)
class ImportReport:
    """What :func:`import_lines` did: new nodes, nodes whose recording it replaced, and nodes
    the store already held exactly so."""

    imported: int
    replaced: int
    unchanged: int


def _artifact(encoding: str, payload: bytes, artifact_id: str) -> dict[str, Any]:
    """The artifact as a line holds it: its JSON value when the payload is JSON that writes
    back to the same bytes (readable, diffable), else its text, else base64."""
    out: dict[str, Any] = {"id": artifact_id, "encoding": encoding}
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        out["base64"] = base64.b64encode(payload).decode("ascii")
        return out
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    else:
        if COMPACT_JSON(value).encode("utf-8", "surrogatepass") == payload:
            out["value"] = value
            return out
    out["text"] = text
    return out


def _payload(artifact: dict[str, Any]) -> bytes:
    if "value" in artifact:
        return COMPACT_JSON(artifact["value"]).encode("utf-8", "surrogatepass")
    if "text" in artifact:
        return str(artifact["text"]).encode("utf-8", "surrogatepass")
    if "base64" in artifact:
        return base64.b64decode(str(artifact["base64"]), validate=True)
    raise ValueError("the artifact has no value, text or base64")


def _meta(node: NodeRecord) -> Any:
    if not node.meta:
        return None
    try:
        return json.loads(node.meta)
    except ValueError:
        return None


def _line(store: Store, node: NodeRecord) -> dict[str, Any] | None:
    found = store.get_node_and_artifact(node.node_id)
    if found is None:
        return None
    node, encoding, payload = found
    if encoding is None or payload is None or node.artifact_id is None:
        return None
    upstream = sorted(
        ({"artifact": p.consumed_artifact_id, "node": p.parent}
         for p in store.data_parents(node.node_id)),
        key=lambda e: (e["node"] or "", e["artifact"] or ""),
    )
    line: dict[str, Any] = {
        "musubi_export": FORMAT,
        "node": node.node_id,
        "namespace": node.namespace,
        "kind": node.kind,
        "op": node.op,
        "op_name": node.op_name,
        "input_hash": node.input_hash,
        "step_type": node.step_type,
        "label": node.label,
        "finished_at": node.finished_at,
        "expires_at": node.expires_at,
        "duration_s": node.duration_s,
        "tokens_in": node.tokens_in,
        "tokens_out": node.tokens_out,
        "upstream": upstream,
        "meta": _meta(node),
        "artifact": _artifact(encoding, bytes(payload), node.artifact_id),
    }
    # Keys in sorted order, written as they are (not sort_keys: an artifact's value must keep
    # its own key order, or its bytes, and so its content id, would change).
    return {k: line[k] for k in sorted(line) if line[k] is not None}


def export_lines(
    store: Store,
    *,
    run: str | None = None,
    since: float | None = None,
    namespace: str | None = None,
) -> Iterator[str]:
    """One JSON line (no newline) per recorded node that can replay, in a stable order:
    every one, or those a run's calls reached (``run``: a run id), recorded since ``since``
    (epoch seconds), of ``namespace``."""
    flush_recorders(store.path)
    nodes = store.list_nodes(
        limit=_ALL, status="done", since=since, run=run, namespace=namespace
    )
    nodes = [n for n in nodes if n.kind not in RECORDED_ONLY_KINDS]
    nodes.sort(key=lambda n: (n.namespace, n.op_name, n.node_id))
    for node in nodes:
        line = _line(store, node)
        if line is not None:
            yield COMPACT_JSON(line)


def _field(record: dict[str, Any], name: str, kind: type | tuple[type, ...], number: int) -> Any:
    value = record.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ImportLineError(f"field {name!r} is missing or not a {getattr(kind, '__name__', kind)}",
                           line=number)
    return value


def _optional(record: dict[str, Any], name: str, number: int) -> float | None:
    value = record.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ImportLineError(f"field {name!r} must be a number", line=number)
    return value


def _parse(text: str, number: int) -> tuple[NodeWrite, ArtifactWrite, list[EdgeWrite]]:
    try:
        record = json.loads(text)
    except ValueError as exc:
        raise ImportLineError(f"not JSON ({exc})", line=number) from None
    if not isinstance(record, dict) or record.get("musubi_export") != FORMAT:
        raise ImportLineError(
            f"not a line of a musubi export (format {FORMAT}): write one with `musubi export`",
            line=number,
        )
    node_id = _field(record, "node", str, number)
    artifact = _field(record, "artifact", dict, number)
    artifact_id = _field(artifact, "id", str, number)
    encoding = _field(artifact, "encoding", str, number)
    try:
        payload = _payload(artifact)
    except ValueError as exc:
        raise ImportLineError(f"node {node_id[:12]}: {exc}", line=number) from None
    if artifact_id_for(encoding, payload) != artifact_id:
        raise ImportLineError(
            f"node {node_id[:12]}: the output does not match its content id {artifact_id[:12]} "
            "(it was edited after the export); export it again instead",
            line=number,
        )
    tokens = [_optional(record, name, number) for name in ("tokens_in", "tokens_out")]
    meta = record.get("meta")
    node = NodeWrite(
        node_id=node_id,
        op=_field(record, "op", str, number),
        op_name=_field(record, "op_name", str, number),
        kind=_field(record, "kind", str, number),
        step_type=_field(record, "step_type", str, number),
        input_hash=_field(record, "input_hash", str, number),
        status="done",
        artifact_id=artifact_id,
        namespace=_field(record, "namespace", str, number),
        finished_at=_optional(record, "finished_at", number),
        expires_at=_optional(record, "expires_at", number),
        duration_s=_optional(record, "duration_s", number),
        tokens_in=None if tokens[0] is None else int(tokens[0]),
        tokens_out=None if tokens[1] is None else int(tokens[1]),
        label=record.get("label") if isinstance(record.get("label"), str) else None,
        meta=json.dumps(meta, sort_keys=True) if meta is not None else None,
        executed=0,  # loaded, not executed here
    )
    edges = []
    for parent in record.get("upstream") or []:
        if not isinstance(parent, dict) or not isinstance(parent.get("node"), str):
            raise ImportLineError("an upstream entry must be {\"node\": ..., \"artifact\": ...}",
                               line=number)
        consumed = parent.get("artifact")
        edges.append(EdgeWrite(parent["node"], node_id, "data",
                               consumed if isinstance(consumed, str) else None))
    return node, ArtifactWrite(artifact_id, encoding, payload, node_id), edges


def import_lines(store: Store, lines: Iterable[str]) -> ImportReport:
    """Load the lines of an export into ``store``. Every line is checked (format, fields, the
    output against its content id) before anything is written; a bad line raises
    :class:`ImportLineError` naming it, and the store is left as it was."""
    parsed = [
        _parse(text, number)
        for number, text in enumerate(lines, start=1)
        if text.strip()
    ]
    imported = replaced = unchanged = 0
    todo: list[tuple[NodeWrite, ArtifactWrite, list[EdgeWrite]]] = []
    for node, artifact, edges in parsed:
        held = store.get_node(node.node_id)
        if held is None:
            imported += 1
        elif held.status == "done" and held.artifact_id == node.artifact_id:
            unchanged += 1
            continue
        else:
            replaced += 1
        todo.append((node, artifact, edges))
    for start in range(0, len(todo), _BATCH):
        batch = todo[start : start + _BATCH]
        store.write(
            [n for n, _, _ in batch],
            [a for _, a, _ in batch],
            [e for _, _, edges in batch for e in edges],
        )
    return ImportReport(imported, replaced, unchanged)
