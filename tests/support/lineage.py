"""What a user checks of recorded lineage, read straight from the store (the SQLite file with
sqlite3, or a PostgreSQL database with psycopg, schema ``musubi``).

* every run's calls form a tree (each parent is a call of the same run; no cycles);
* a call's upstream (the calls whose output flowed into it, transitively) stays in its run;
* what flowed: the previews and kept artifacts of upstream calls.
"""

from __future__ import annotations

import json
from typing import Any

from tests.support.storedb import REPLAYS, dict_rows


def _rows(db: str, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    return dict_rows(db, sql, params)


def raw_bytes(db: str) -> bytes:
    """Everything the store holds, as bytes: the SQLite file and its WAL, or every row of
    every musubi table on PostgreSQL (what a leaked secret would be found in)."""
    if db.startswith("postgresql://"):
        import psycopg

        out = []
        with psycopg.connect(db) as pg:
            for (table,) in pg.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'musubi'"
            ).fetchall():
                for (row,) in pg.execute(f"SELECT t::text FROM musubi.{table} t").fetchall():
                    out.append(row.encode())
            for (payload,) in pg.execute("SELECT payload FROM musubi.musubi_artifacts").fetchall():
                out.append(bytes(payload))
        return b"\n".join(out)
    raw = b""
    for suffix in ("", "-wal"):
        try:
            with open(db + suffix, "rb") as fh:
                raw += fh.read()
        except FileNotFoundError:
            pass
    return raw


def runs(db: str, kind: str | None = None) -> list[dict[str, Any]]:
    """Runs, oldest first."""
    where = "WHERE kind = ?" if kind else ""
    return _rows(
        db, f"SELECT * FROM musubi_runs {where} ORDER BY started_at", (kind,) if kind else ()
    )


def calls(db: str, run_id: str | None = None) -> list[dict[str, Any]]:
    """Calls (of one run, or all), in run order."""
    if run_id is None:
        return _rows(db, "SELECT * FROM musubi_calls ORDER BY started_at, seq")
    return _rows(db, "SELECT * FROM musubi_calls WHERE run_id = ? ORDER BY seq", (run_id,))


def flows(db: str) -> set[tuple[str, str]]:
    """(source call, destination call) pairs."""
    return {(r["src_call_id"], r["dst_call_id"]) for r in _rows(db, "SELECT * FROM musubi_flows")}


def nodes(db: str) -> dict[str, dict[str, Any]]:
    """Every node row by id, its ``replay_count`` the node's whole count (see REPLAYS)."""
    found = {}
    for row in _rows(db, f"SELECT *, {REPLAYS} AS counted FROM musubi_nodes"):
        row["replay_count"] = row.pop("counted")
        found[row["node_id"]] = row
    return found


def node_edges(db: str, kind: str = "data") -> set[tuple[str, str]]:
    return {
        (r["parent"], r["child"])
        for r in _rows(db, "SELECT parent, child FROM musubi_edges WHERE kind = ?", (kind,))
    }


def assert_runs_are_trees(db: str) -> None:
    """Every call's parent is a call of the same run, and following parents always ends."""
    every = {c["call_id"]: c for c in calls(db)}
    for call in every.values():
        seen = {call["call_id"]}
        cur = call
        while cur["parent_call_id"] is not None:
            parent = every.get(cur["parent_call_id"])
            assert parent is not None, f"call {cur['call_id']} has a parent that is not recorded"
            assert parent["run_id"] == call["run_id"], "a call's parent is in another run"
            assert parent["call_id"] not in seen, "the call tree has a cycle"
            seen.add(parent["call_id"])
            cur = parent


def upstream(db: str, call_id: str) -> list[dict[str, Any]]:
    """The calls whose output flowed into ``call_id``, transitively (not including it)."""
    every = {c["call_id"]: c for c in calls(db)}
    edges = flows(db)
    found: dict[str, dict[str, Any]] = {}
    frontier = [call_id]
    while frontier:
        cur = frontier.pop()
        for src, dst in edges:
            if dst == cur and src not in found:
                found[src] = every[src]
                frontier.append(src)
    return sorted(found.values(), key=lambda c: (c["started_at"], c["seq"]))


def ancestors(db: str, call_id: str) -> list[dict[str, Any]]:
    """The chain of parent calls of ``call_id`` (nearest first)."""
    every = {c["call_id"]: c for c in calls(db)}
    out = []
    cur = every[call_id]
    while cur["parent_call_id"] is not None:
        cur = every[cur["parent_call_id"]]
        out.append(cur)
    return out


def artifact_text(db: str, artifact_id: str | None) -> str:
    """The stored payload of an artifact, as text (JSON payloads are decoded for reading)."""
    if artifact_id is None:
        return ""
    rows = _rows(db, "SELECT payload FROM musubi_artifacts WHERE artifact_id = ?", (artifact_id,))
    if not rows:
        return ""
    payload = rows[0]["payload"]
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else str(payload)
    try:
        return json.dumps(json.loads(text), ensure_ascii=False)
    except ValueError:
        return text


def what_flowed(db: str, call_id: str) -> str:
    """Everything a reader could see of the calls upstream of ``call_id``: previews and kept
    artifacts, concatenated."""
    parts = []
    for call in upstream(db, call_id):
        parts += [call["input_preview"] or "", call["output_preview"] or ""]
        parts.append(artifact_text(db, call["artifact_id"]))
    return "\n".join(parts)
