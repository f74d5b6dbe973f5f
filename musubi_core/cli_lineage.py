"""``musubi nodes``, ``musubi show REF``, ``musubi lineage REF`` and ``musubi explain REF``.

``REF`` is a node id or a call id, or a unique prefix of one. A *node* is the reusable memo
(what replays); a *call* is one execution or replay as it happened, in one run. So the lineage
of a call is exactly what flowed into it in its run (the documents that answer was made from),
and the lineage of a node is its memo lineage: the data edges that drive invalidation.

    $ musubi nodes --kind llm --since 1d
    $ musubi show 3fa9c1
    $ musubi lineage 5c1e0f7a2b4d --up --format mermaid
    $ musubi explain 3fa9c1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from typing import Any, NamedTuple

from . import _render
from ._cli import EXIT_OK, AddCommand, emit, open_engine, since
from .engine import Engine
from .errors import MusubiError, NodeNotFoundError
from .policy import RECORDED_ONLY_KINDS
from .store import CallRecord, EdgeRecord, NodeRecord
from .store.base import NODE_STATUSES

__all__ = ["Ref", "add_commands", "resolve_ref"]


def add_commands(add: AddCommand) -> None:
    """Register ``nodes``, ``show``, ``lineage`` and ``explain``."""
    nodes = add("nodes", cmd_nodes, "stored nodes (the reusable memo), newest first")
    nodes.add_argument("--kind", help="e.g. step, llm, chat_model, embedding, run_step")
    nodes.add_argument("--op", help="operation name, or its beginning")
    nodes.add_argument("--status", choices=NODE_STATUSES)
    nodes.add_argument("--since", type=since, metavar="AGE", help="created within, e.g. 90s, 1d")
    nodes.add_argument("--run", metavar="RUN", help="only nodes this run's calls reached")
    nodes.add_argument("--namespace")
    nodes.add_argument("--limit", type=int, default=50)

    show = add("show", cmd_show, "one node or call: fields, calls or flows, stored value")
    show.add_argument("ref", metavar="REF", help="node or call id, or a unique prefix")

    lineage = add(
        "lineage", cmd_lineage,
        "of a call: what flowed into it in its run; of a node: its memo (data) lineage",
    )
    lineage.add_argument("ref", metavar="REF", help="node or call id, or a unique prefix")
    lineage.add_argument("--format", choices=("text", "dot", "mermaid", "json"), default="text")
    lineage.add_argument("--depth", type=int, default=50, help="at most this many steps away")
    lineage.add_argument("--limit", type=int, default=500, help="at most this many nodes/calls")
    direction = lineage.add_mutually_exclusive_group()
    direction.add_argument("--up", action="store_true", help="upstream only (a call's default)")
    direction.add_argument("--down", action="store_true", help="downstream only")

    explain = add("explain", cmd_explain, "would this node (or this call's node) replay now, and why")
    explain.add_argument("ref", metavar="REF", help="node or call id, or a unique prefix")


class Ref(NamedTuple):
    what: str  # "node" | "call"
    id: str


def _attempt(resolve: Callable[[str], str | None], ref: str) -> tuple[str | None, list[str]]:
    try:
        return resolve(ref), []
    except NodeNotFoundError as err:
        return None, err.candidates


def resolve_ref(store: Any, ref: str) -> Ref:
    """The node or call ``ref`` names (a full id, or a prefix of exactly one of either)."""
    call_id, calls = _attempt(store.resolve_call, ref)
    node_id, nodes = _attempt(store.resolve, ref)
    key = ref.strip().lower()
    if key and key == call_id:
        return Ref("call", key)
    if key and key == node_id:
        return Ref("node", key)
    matches = [Ref("call", c) for c in ([call_id] if call_id else calls)]
    matches += [Ref("node", n) for n in ([node_id] if node_id else nodes)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NodeNotFoundError(ref, what="node or call")
    shown = ", ".join(f"{m.what} {m.id}" for m in matches[:6])
    raise MusubiError(f"prefix {ref!r} is ambiguous: it matches {shown}; give more characters")


# -- nodes --------------------------------------------------------------------------------


def cmd_nodes(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        store: Any = engine.store
        run_id = store.resolve_run(args.run) if args.run else None
        nodes: list[NodeRecord] = store.list_nodes(
            limit=max(1, args.limit), kind=args.kind, status=args.status, op=args.op,
            since=args.since, run=run_id, namespace=args.namespace,
        )
    rows = [
        (
            _render.short(n.node_id), n.kind, _render.clip(n.op_name, 48), n.status,
            _render.when(n.created_at), n.exec_count, n.replay_count,
            _render.tokens(n.tokens_in, n.tokens_out), _render.duration(n.duration_s),
        )
        for n in nodes
    ]
    text = _render.table(
        ("NODE", "KIND", "OP", "STATUS", "CREATED", "EXECUTED", "REPLAYED", "TOKENS", "TOOK"), rows
    ) if rows else "no nodes match"
    emit(args, [_render.node_dict(n) for n in nodes], text)
    return EXIT_OK


# -- show ---------------------------------------------------------------------------------


def _value(engine: Engine, artifact_id: str | None) -> tuple[bool, Any]:
    """(kept, decoded value) of an artifact; a value that does not decode here (a class this
    process has not allow-listed) is shown as the stored JSON tree."""
    if not artifact_id:
        return False, None
    artifact = engine.store.get_artifact(artifact_id)
    if artifact is None:
        return False, None
    try:
        return True, engine.codec.decode(*artifact)
    except MusubiError as err:
        try:
            return True, json.loads(artifact[1])
        except ValueError:
            return True, f"<undecodable: {err}>"


def _fields(pairs: list[tuple[str, Any]]) -> list[str]:
    return [f"{k:<17} {v}" for k, v in pairs if v not in (None, "")]


def cmd_show(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        ref = resolve_ref(engine.store, args.ref)
        data, text = (_show_call if ref.what == "call" else _show_node)(engine, ref.id)
    emit(args, data, text)
    return EXIT_OK


_TIMES = ("created_at", "started_at", "finished_at", "expires_at")


def _show_node(engine: Engine, node_id: str) -> tuple[dict[str, Any], str]:
    store: Any = engine.store
    node = store.get_node(node_id)
    assert node is not None
    edges: list[EdgeRecord] = store.edges(node_id)
    calls: list[CallRecord] = store.node_calls(node_id)
    kept, value = _value(engine, node.artifact_id)
    data = _render.node_dict(node)
    data["edges"] = [dataclasses.asdict(e) for e in edges]
    data["value"] = value
    data["calls"] = [_render.call_dict(c) for c in calls]
    latest = calls[0] if calls else None
    data["input_preview"] = latest.input_preview if latest else None
    data["output_preview"] = latest.output_preview if latest else None

    readable: dict[str, Callable[[Any], str]] = dict.fromkeys(_TIMES, _render.when)
    readable["duration_s"] = _render.duration
    fields = [
        (k, readable[k](v) if k in readable else v)
        for k, v in _render.node_dict(node).items()
        if k != "meta"
    ]
    lines = _fields([("what", "node"), *fields, ("meta", node.meta)])
    if latest:
        lines += ["", f"input:  {latest.input_preview or '-'}",
                  f"output: {latest.output_preview or '-'}"]
    lines += ["", f"calls ({len(calls)}, most recent first; one per execution or replay):"]
    lines += ["  " + line for line in _render.table(
        ("CALL", "RUN", "STARTED", "REPLAYED", "TOOK", "STATUS"),
        [(c.call_id, c.run_id, _render.when(c.started_at), "yes" if c.replayed else "-",
          _render.duration(c.duration_s), c.status) for c in calls],
    ).splitlines()] if calls else ["  (none recorded)"]
    shown = edges[:50]
    lines += ["", f"edges ({len(edges)}):"] + [
        f"  {e.kind:<8} {_render.short(e.parent)} -> {_render.short(e.child)}" for e in shown
    ]
    if len(edges) > len(shown):
        lines.append(f"  ... {len(edges) - len(shown)} more (musubi show --json)")
    lines += ["", "value:", "  " + (_render.value_text(value) if kept else "(not kept)")]
    return data, "\n".join(lines)


def _show_call(engine: Engine, call_id: str) -> tuple[dict[str, Any], str]:
    store: Any = engine.store
    call: CallRecord = store.get_call(call_id)
    run = store.get_run(call.run_id)
    parent = store.get_call(call.parent_call_id) if call.parent_call_id else None
    flows = store.call_flows(call_id)
    others = {
        fid: store.get_call(fid)
        for fid in {f.src_call_id for f in flows} | {f.dst_call_id for f in flows}
        if fid != call_id
    }
    kept, value = _value(engine, call.artifact_id)

    def op_of(cid: str) -> str:
        other = others.get(cid)
        return other.op_name if other else "?"

    flows_in = [f for f in flows if f.dst_call_id == call_id]
    flows_out = [f for f in flows if f.src_call_id == call_id]
    data = _render.call_dict(call)
    data.update(
        what="call",
        run={"run_id": call.run_id, "kind": run.kind if run else None,
             "name": run.name if run else None},
        parent={"call_id": parent.call_id, "op_name": parent.op_name} if parent else None,
        value=value if kept else None,
        flows_in=[{**f._asdict(), "src_op_name": op_of(f.src_call_id)} for f in flows_in],
        flows_out=[{**f._asdict(), "dst_op_name": op_of(f.dst_call_id)} for f in flows_out],
    )
    lines = _fields([
        ("what", "call"),
        ("call_id", call.call_id),
        ("run", f"{call.run_id} ({run.kind} {run.name or '-'})" if run else call.run_id),
        ("parent", f"{parent.call_id} {parent.op_name}" if parent else "-"),
        ("seq", call.seq),
        ("kind", call.kind),
        ("op_name", call.op_name),
        ("node_id", call.node_id or "- (recorded only: calls of this kind never replay)"),
        ("replayed", "yes" if call.replayed else "no"),
        ("status", call.status),
        ("error", call.error),
        ("started", _render.when(call.started_at)),
        ("duration", _render.duration(call.duration_s)),
        ("tokens", f"{call.tokens_in or 0} in, {call.tokens_out or 0} out"
         if call.tokens_in or call.tokens_out else None),
        ("saved", _render.duration(call.saved_s) if call.saved_s else None),
        ("model", call.model),
        ("artifact_id", call.artifact_id),
        ("namespace", call.namespace),
    ])
    lines += ["", f"input:  {call.input_preview or '-'}", f"output: {call.output_preview or '-'}"]
    lines += ["", "flows in (the output of these calls fed this one):"]
    lines += [f"  {f.src_call_id} {op_of(f.src_call_id)}" for f in flows_in] or ["  (none)"]
    lines += ["flows out (this call's output fed):"]
    lines += [f"  {f.dst_call_id} {op_of(f.dst_call_id)}" for f in flows_out] or ["  (none)"]
    lines += ["", "value:", "  " + (_render.value_text(value) if kept else "(not kept)")]
    return data, "\n".join(lines)


# -- lineage ------------------------------------------------------------------------------


def _node_lineage(
    store: Any, root: str, *, up: bool, down: bool, depth: int, limit: int
) -> tuple[list[NodeRecord], list[EdgeRecord], bool]:
    """A node's memo lineage: the nodes reached over ``data`` edges only. Contains edges are
    left out: a node is shared by every run that reaches it, so following them would wander
    into other runs' call trees (a run's tree is ``musubi steps RUN``)."""
    seen = {root}
    edges: dict[tuple[str, str], EdgeRecord] = {}
    cut = False
    for going_up, enabled in ((True, up), (False, down)):
        frontier = [root] if enabled else []
        for level in range(depth + 1):
            found: list[str] = []
            for node_id in frontier:
                for edge in store.edges(node_id):
                    here, other = (edge.child, edge.parent) if going_up else (edge.parent, edge.child)
                    if edge.kind != "data" or here != node_id:
                        continue
                    if other not in seen:
                        if level == depth or len(seen) >= limit:
                            cut = True
                            continue
                        seen.add(other)
                        found.append(other)
                    edges[(edge.parent, edge.child)] = edge
            frontier = found
    nodes = [n for n in (store.get_node(i) for i in seen) if n is not None]
    ordered = _render.topological(
        nodes, lambda n: n.node_id, lambda n: (n.created_at, n.node_id),
        ((e.parent, e.child) for e in edges.values()),
    )
    return ordered, list(edges.values()), cut


def _call_lineage(
    engine: Engine, root: str, *, down: bool, depth: int, limit: int
) -> _render.CallGraph:
    store: Any = engine.store
    calls, flows, cut = store.call_lineage(
        root, upstream=not down, downstream=down, depth=depth, limit=limit
    )
    ordered = _render.topological(
        calls, lambda c: c.call_id, lambda c: (c.started_at, c.seq, c.call_id),
        ((f.src_call_id, f.dst_call_id) for f in flows),
    )
    values = {}
    for c in ordered:
        kept, value = _value(engine, c.artifact_id)
        if kept:
            values[c.call_id] = value
    return _render.CallGraph(root, "down" if down else "up", ordered, flows, values, cut)


def cmd_lineage(args: argparse.Namespace) -> int:
    fmt = "json" if args.json else args.format
    depth, limit = max(0, args.depth), max(1, args.limit)
    with open_engine(args) as engine:
        ref = resolve_ref(engine.store, args.ref)
        if ref.what == "call":
            graph = _call_lineage(engine, ref.id, down=args.down, depth=depth, limit=limit)
            print({"text": graph.text, "dot": graph.dot, "mermaid": graph.mermaid,
                   "json": graph.json}[fmt]())
            return EXIT_OK
        nodes, edges, cut = _node_lineage(
            engine.store, ref.id, up=not args.down, down=not args.up, depth=depth, limit=limit
        )
    renderers: dict[str, Callable[..., str]] = {
        "text": _render.lineage_text,
        "dot": _render.lineage_dot,
        "mermaid": _render.lineage_mermaid,
        "json": _render.lineage_json,
    }
    print(renderers[fmt](ref.id, nodes, edges, cut))
    return EXIT_OK


# -- explain ------------------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace) -> int:
    with open_engine(args) as engine:
        store: Any = engine.store
        ref = resolve_ref(store, args.ref)
        call: CallRecord | None = store.get_call(ref.id) if ref.what == "call" else None
        node_id = call.node_id if call is not None else ref.id
        if node_id is not None and store.get_node(node_id) is not None:
            node, decision = engine.explain_node(node_id)
            data: dict[str, Any] = {
                "node_id": node.node_id, "op": node.op, "op_name": node.op_name,
                "kind": node.kind, "step_type": node.step_type, "replay": decision.replay,
                "reason": decision.reason.value, "detail": decision.detail,
            }
            if decision.reason.value == "recorded_only":
                verdict = "recorded, never replayed"
            else:
                verdict = "would REPLAY" if decision.replay else "would EXECUTE"
            text = (f"node {_render.short(node.node_id)} {node.kind} {node.op_name}: {verdict} "
                    f"({decision.reason.value})")
            if decision.detail:
                text += f"\n  {decision.detail}"
        else:
            assert call is not None
            data, text = _explain_nodeless(call)
    if call is not None:
        data = {"call_id": call.call_id, "call_kind": call.kind, **data}
        text = f"call {call.call_id} {call.kind} {call.op_name}" + (
            f" reached node {_render.short(call.node_id)}\n" if call.node_id else "\n"
        ) + text
    emit(args, data, text)
    return EXIT_OK


def _explain_nodeless(call: CallRecord) -> tuple[dict[str, Any], str]:
    """A call that reached no node: recorded-only kinds never replay; another call without
    its node (it failed first, or ``gc`` removed the node) has nothing to replay."""
    if call.kind in RECORDED_ONLY_KINDS or (call.node_id is None and call.status == "done"):
        reason = "recorded_only"
        detail = f"{call.kind} calls are recorded, never replayed (they run every time)"
        verdict = "recorded, never replayed"
    else:
        reason = "not_found"
        detail = ("its node is no longer stored (gc removed it?)" if call.node_id else
                  "the call reached no stored node (it failed before recording one)")
        verdict = "would EXECUTE"
    data = {"node_id": call.node_id, "op_name": call.op_name, "kind": call.kind,
            "replay": False, "reason": reason, "detail": detail}
    return data, f"{verdict} ({reason})\n  {detail}"
