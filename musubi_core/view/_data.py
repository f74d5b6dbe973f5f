"""What the page shows, read from a store: one JSON-able answer per question the page asks.

The questions are paths, the same whether the page is a file (every answer it can ask for is
written into it) or served (it asks ``/api/...`` as the person clicks):

- ``summary``: the store's totals and the price table;
- ``runs``: the runs, newest first, with their counts, tokens and what replay saved;
- ``run/RUN``: a run's calls (compact rows), the flows between them and their nodes' status;
- ``call/CALL``: one call's details: previews, kept value, what flowed into it, its node and
  the node's calls, and the replay decision with its reason;
- ``whatif/NODE``: what invalidating a node would recompute (the store's own recursive query,
  :meth:`~musubi_core.store.base.Store.invalidation_set`), with its tokens and time;
- ``savings``: spent and saved per model and per day (:mod:`musubi_core.usage`).

Nothing here writes to the store.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from .. import _render, cli_runs
from ..engine import Engine
from ..errors import MusubiError
from ..policy import RECORDED_ONLY_KINDS
from ..prices import Prices
from ..store.base import CallRecord, NodeRecord, RunRecord
from ..usage import BUCKET_S, run_money, summarize

__all__ = ["CALL_COLUMNS", "NotFound", "ViewData"]

# A run's calls travel as rows of these columns (a 5,000-call run is ~0.5 MB, not 2).
CALL_COLUMNS = (
    "id", "parent", "seq", "kind", "op", "node", "replayed", "status", "started", "duration",
    "tokens_in", "tokens_out", "saved", "model", "error", "node_status", "stale_cause",
)

VALUE_CHARS = 4000  # a kept value shown in full up to this many characters
UPSTREAM_WALK = 500  # a call's upstream walk stops after this many calls
UPSTREAM_CALLS = 50  # of which the nearest are listed (previews and values: kept/CALL)
HISTORY_CALLS = 50  # a node's calls shown, most recent first
WHATIF_MONEY = 2000  # what-if: money is priced for sets up to this many nodes


class NotFound(MusubiError):
    """The page asked for a run, a call or a question this store does not have."""


def _clip(text: str | None, limit: int) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f" … ({len(text) - limit} more characters)"


def documents_of(value: Any) -> list[dict[str, Any]] | None:
    """The documents in a kept value, when it is a list of them: LangChain ``Document``s
    (``page_content``) or LlamaIndex nodes with scores (``text``)."""
    if not isinstance(value, list) or not value:
        return None
    docs = []
    for item in value:
        if not isinstance(item, dict):
            return None
        text = item.get("page_content", item.get("text"))
        if not isinstance(text, str):
            node = item.get("node")
            text = node.get("text") if isinstance(node, dict) else None
        if not isinstance(text, str):
            return None
        doc: dict[str, Any] = {"text": _clip(text, VALUE_CHARS)}
        if item.get("score") is not None:
            doc["score"] = str(item["score"])
        if isinstance(item.get("metadata"), dict) and item["metadata"]:
            doc["metadata"] = _clip(json.dumps(item["metadata"], default=str), 300)
        docs.append(doc)
    return docs


def answer_of(value: Any) -> str | None:
    """The text a model answered, in a kept model call: LangChain's generations (message
    content, or text) or LlamaIndex's response (message blocks or content)."""
    if not isinstance(value, dict):
        return None
    generations = value.get("generations")
    if isinstance(generations, list) and generations and isinstance(generations[0], dict):
        first = generations[0]
        message = first.get("message")
        content = message.get("content") if isinstance(message, dict) else first.get("text")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return json.dumps(content, default=str)
    final = value.get("final")
    if isinstance(final, dict):
        message = final.get("message")
        if isinstance(message, dict):
            blocks = message.get("blocks")
            if isinstance(blocks, list):
                texts = [b.get("text") for b in blocks if isinstance(b, dict)]
                if texts and all(isinstance(t, str) for t in texts):
                    return "".join(str(t) for t in texts)
            if isinstance(message.get("content"), str):
                return str(message["content"])
        if isinstance(final.get("text"), str):
            return str(final["text"])
    return None


class ViewData:
    """The page's answers, from one store (opened read-only by the caller)."""

    def __init__(self, engine: Engine, prices: Prices) -> None:
        self.engine = engine
        self.store: Any = engine.store
        self.prices = prices

    # -- the store as a whole ---------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        stats = self.store.stats()
        return {
            "store": self.store.path,
            "generated_at": time.time(),
            "nodes": stats["nodes"],
            "runs": stats["runs"],
            "calls": stats["calls"],
            "call_replays": stats["call_replays"],
            "replays": stats["replays"],
            "replay_rate": stats["replay_rate"],
            "tokens_saved": stats["tokens_saved"],
            "seconds_saved": stats["seconds_saved"],
            "statuses": stats["statuses"],
            "runs_by_kind": stats["runs_by_kind"],
            "prices": {"as_of": self.prices.as_of, "path": self.prices.path,
                       "describe": self.prices.describe()},
        }

    def runs(
        self, *, kind: str | None = None, since: float | None = None, limit: int = 500
    ) -> dict[str, Any]:
        rows: list[RunRecord] = self.store.list_runs(limit=limit + 1, kind=kind, since=since)
        more = len(rows) > limit
        rows = rows[:limit]
        money = run_money(self.store.call_usage(run_ids=[r.run_id for r in rows]), self.prices)
        out = [self._entry(run, money.get(run.run_id, {})) for run in rows]
        return {"runs": out, "more": more, "limit": limit}

    def savings(self) -> dict[str, Any]:
        return summarize(self.store.call_usage(bucket_s=BUCKET_S), self.prices)

    # -- one run --------------------------------------------------------------------

    def run(self, run_id: str) -> dict[str, Any]:
        run = self.store.get_run(run_id)
        if run is None:
            raise NotFound(f"no run {run_id!r} in this store")
        calls: list[CallRecord] = self.store.run_calls(run_id)
        reached = {c.node_id for c in calls if c.node_id}
        nodes: dict[str, NodeRecord] = {
            n.node_id: n for n in self.store.list_nodes(run=run_id, limit=len(reached) + 1)
        }
        rows = []
        for c in calls:
            node = nodes.get(c.node_id) if c.node_id else None
            rows.append([
                c.call_id, c.parent_call_id, c.seq, c.kind, c.op_name, c.node_id,
                1 if c.replayed else 0, c.status, c.started_at, c.duration_s, c.tokens_in,
                c.tokens_out, c.saved_s, c.model, _render.clip(c.error, 200) or None,
                node.status if node else None, node.stale_cause if node else None,
            ])
        flows = [[f.src_call_id, f.dst_call_id] for f in self.store.run_flows(run_id)]
        money = run_money(self.store.call_usage(run_ids=[run_id]), self.prices)
        return {"run": self._entry(run, money.get(run_id, {})), "columns": list(CALL_COLUMNS), "calls": rows, "flows": flows}

    def _entry(self, run: RunRecord, money: dict[str, Any]) -> dict[str, Any]:
        return {
            "run_id": run.run_id, "kind": run.kind, "name": run.name,
            "status": cli_runs._status(run), "started_at": run.started_at or run.created_at,
            "duration_s": cli_runs._took(run), "calls": run.calls, "replays": run.replays,
            "tokens": run.tokens_in + run.tokens_out, "tokens_saved": run.tokens_saved,
            "seconds_saved": round(run.seconds_saved, 3),
            "money_saved": round(money.get("saved", 0.0), 9),
            "money_spent": round(money.get("spent", 0.0), 9),
            "unpriced": money.get("unpriced", False),
            "error": _render.clip(run.error, 300) or None,
        }

    # -- one call -------------------------------------------------------------------

    def _kept(self, artifact_id: str | None) -> dict[str, Any] | None:
        """A kept value for people: its text (clipped), and its documents when it is a list
        of them."""
        if not artifact_id:
            return None
        artifact = self.store.get_artifact(artifact_id)
        if artifact is None:
            return None
        try:
            value = self.engine.codec.decode(*artifact)
        except MusubiError:
            try:
                value = json.loads(artifact[1])
            except ValueError:
                return {"text": "(a stored value this process cannot decode)"}
        plain = value
        if not isinstance(value, (str, list, dict)):
            plain = getattr(value, "__dict__", value)
        text = value if isinstance(value, str) else _render.value_text(value, VALUE_CHARS)
        kept: dict[str, Any] = {"text": _clip(text, VALUE_CHARS)}
        said = answer_of(plain)
        if said is not None:
            kept["answer"] = _clip(said, VALUE_CHARS)
        docs = documents_of(plain)
        if docs is not None:
            kept["documents"] = docs
        return kept

    def kept_answer(self, call_id: str) -> dict[str, Any]:
        """What a call took and gave: its previews and its kept value."""
        c: CallRecord | None = self.store.get_call(call_id)
        if c is None:
            raise NotFound(f"no call {call_id!r} in this store")
        return {"id": c.call_id, "kind": c.kind, "op": c.op_name, "run_id": c.run_id,
                "input_preview": c.input_preview, "output_preview": c.output_preview,
                "value": self._kept(c.artifact_id)}

    def _brief(self, c: CallRecord) -> dict[str, Any]:
        return {
            "id": c.call_id, "kind": c.kind, "op": c.op_name, "run_id": c.run_id,
            "replayed": bool(c.replayed), "status": c.status, "started": c.started_at,
            "duration": c.duration_s, "model": c.model,
            "tokens": (c.tokens_in or 0) + (c.tokens_out or 0),
        }

    def call(self, call_id: str) -> dict[str, Any]:
        c: CallRecord | None = self.store.get_call(call_id)
        if c is None:
            raise NotFound(f"no call {call_id!r} in this store")
        data = _render.call_dict(c)
        up, flows, cut = self.store.call_lineage(call_id, limit=UPSTREAM_WALK)
        direct = {f.src_call_id for f in flows if f.dst_call_id == call_id}
        upstream = [
            {"id": o.call_id, "kind": o.kind, "op": o.op_name, "direct": o.call_id in direct,
             "kept": o.artifact_id is not None}
            for o in reversed(up)  # nearest (latest started) first
            if o.call_id != call_id
        ]
        data["upstream"] = upstream[:UPSTREAM_CALLS]
        data["upstream_total"] = len(upstream)
        data["upstream_cut"] = cut
        data["downstream"] = [
            f.dst_call_id for f in self.store.call_flows(call_id) if f.src_call_id == call_id
        ]
        data["node"] = None
        data["history"] = []
        if c.node_id:
            node: NodeRecord | None = self.store.get_node(c.node_id)
            if node is not None:
                data["node"] = {
                    "node_id": node.node_id, "kind": node.kind, "op_name": node.op_name,
                    "step_type": node.step_type, "status": node.status,
                    "stale_cause": node.stale_cause, "exec_count": node.exec_count,
                    "replay_count": node.replay_count, "tokens_in": node.tokens_in,
                    "tokens_out": node.tokens_out, "duration_s": node.duration_s,
                    "created_at": node.created_at,
                }
            data["history"] = [
                self._brief(h) for h in self.store.node_calls(c.node_id, limit=HISTORY_CALLS)
            ]
        data["decision"] = self._decision(c, data["history"])
        return data

    def _decision(self, c: CallRecord, history: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """What this call did and why, and what a call reaching its node would do now."""
        if c.replayed:
            saved = f" (it saved {_render.duration(c.saved_s)})" if c.saved_s else ""
            recorded = {"decision": "replayed", "reason": "hit",
                        "detail": f"served from the store: node {_render.short(c.node_id)} was "
                                  f"done with its output kept{saved}"}
        elif c.kind in RECORDED_ONLY_KINDS or not c.node_id:
            recorded = {"decision": "executed", "reason": "recorded_only",
                        "detail": f"{c.kind} calls are recorded, never replayed "
                                  "(they run every time)"}
        else:
            earlier = [h for h in history if h["started"] < c.started_at]
            if not earlier:
                recorded = {"decision": "executed", "reason": "not_found",
                            "detail": "the first call to reach this node: nothing was stored"}
            else:
                recorded = {"decision": "executed", "reason": "recomputed",
                            "detail": f"the node had {len(earlier)} earlier call(s) and was "
                                      "not served: it was stale, expired, forced or failed"}
        now = None
        if c.node_id and self.store.get_node(c.node_id) is not None:
            _node, decision = self.engine.explain_node(c.node_id)
            now = {"replay": decision.replay, "reason": decision.reason.value,
                   "detail": decision.detail}
        return {**recorded, "now": now}

    # -- what-if --------------------------------------------------------------------

    def whatif(self, node_id: str) -> dict[str, Any]:
        nodes: list[NodeRecord] = self.store.invalidation_set(node_id)
        nodes.sort(key=lambda n: n.created_at)
        money: float | None = 0.0
        if len(nodes) <= WHATIF_MONEY:
            for n in nodes:
                if not (n.tokens_in or n.tokens_out):
                    continue
                latest = self.store.node_calls(n.node_id, limit=1)
                cost = self.prices.cost(latest[0].model if latest else None,
                                        n.tokens_in or 0, n.tokens_out or 0)
                money = None if money is None or cost is None else money + cost
        else:
            money = None
        return {
            "node_id": node_id,
            "nodes": [
                {"node_id": n.node_id, "kind": n.kind, "op_name": n.op_name,
                 "status": n.status, "tokens": n.tokens, "duration_s": n.duration_s,
                 "step_type": n.step_type}
                for n in nodes
            ],
            "tokens": sum(n.tokens for n in nodes),
            "seconds": round(sum(n.duration_s or 0.0 for n in nodes), 6),
            "money": None if money is None else round(money, 9),
            "command": f"musubi invalidate {node_id}",
        }
