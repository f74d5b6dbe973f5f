"""Rendering store contents for people (tables, call trees, lineage graphs) and machines (JSON)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import heapq
import html
import json
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, TypeVar

from .store import CallRecord, EdgeRecord, FlowRecord, NodeRecord

__all__ = [
    "CallGraph",
    "call_dict",
    "call_tree",
    "clip",
    "duration",
    "lineage_dot",
    "lineage_json",
    "lineage_mermaid",
    "lineage_text",
    "node_dict",
    "short",
    "table",
    "tokens",
    "topological",
    "value_text",
    "when",
]

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

# What a lineage notice says when depth or size cut the walk.
CUT_NOTICE = "notice: output cut by --depth or --limit; more {what} exist beyond the ones shown"


def when(ts: float | None) -> str:
    """A timestamp in local time, to the second."""
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: float | None) -> str:
    """``0.0123`` -> ``12ms``, ``75`` -> ``1m15s``, ``7260`` -> ``2h01m``."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f}ms" if seconds < 0.01 else f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def tokens(tokens_in: int | None, tokens_out: int | None) -> str:
    total = (tokens_in or 0) + (tokens_out or 0)
    return str(total) if total else "-"


def short(node_id: str | None) -> str:
    return (node_id or "-")[:12]


def clip(text: str | None, limit: int) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def value_text(value: Any, limit: int = 2000) -> str:
    """A stored value for people: strings as they are, anything else as its repr."""
    rendered = value if isinstance(value, str) else repr(value)
    return rendered if len(rendered) <= limit else rendered[:limit] + " ..."


def title(node: NodeRecord) -> str:
    return node.label or node.op_name


def node_dict(node: NodeRecord) -> dict[str, Any]:
    data = node._asdict()
    if node.meta:
        with contextlib.suppress(ValueError):
            data["meta"] = json.loads(node.meta)
    return data


def call_dict(call: CallRecord) -> dict[str, Any]:
    data = call._asdict()
    data["replayed"] = bool(call.replayed)
    return data


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def topological(
    items: Sequence[T],
    key: Callable[[T], K],
    order: Callable[[T], Any],
    arrows: Iterable[tuple[K, K]],
) -> list[T]:
    """``items`` so that every arrow's source comes before its target, and otherwise by
    ``order`` (a cycle, which a store should not hold, is broken in ``order``)."""
    by_key = {key(item): item for item in items}
    rank = {k: i for i, k in enumerate(sorted(by_key, key=lambda k: order(by_key[k])))}
    waiting: dict[K, int] = dict.fromkeys(by_key, 0)
    after: dict[K, list[K]] = {}
    for src, dst in set(arrows):
        if src in by_key and dst in by_key and src != dst:
            waiting[dst] += 1
            after.setdefault(src, []).append(dst)
    ready = [rank[k] for k, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    keys = sorted(by_key, key=rank.__getitem__)
    result: list[T] = []
    placed: set[K] = set()
    while len(result) < len(by_key):
        if not ready:  # a cycle: take the earliest item not placed yet
            heapq.heappush(ready, next(rank[k] for k in keys if k not in placed))
        k = keys[heapq.heappop(ready)]
        if k in placed:
            continue
        placed.add(k)
        result.append(by_key[k])
        for nxt in after.get(k, ()):
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                heapq.heappush(ready, rank[nxt])
    return result


def call_tree(calls: Sequence[CallRecord]) -> list[tuple[int, CallRecord]]:
    """A run's calls as (depth, call) in tree order: each call after its parent, siblings in
    the order they started. A call whose parent is not among ``calls`` is a root."""
    ids = {c.call_id for c in calls}
    children: dict[str | None, list[CallRecord]] = {}
    for c in sorted(calls, key=lambda c: c.seq):
        parent = c.parent_call_id if c.parent_call_id in ids else None
        children.setdefault(parent, []).append(c)
    out: list[tuple[int, CallRecord]] = []
    stack = [(0, c) for c in reversed(children.get(None, []))]
    seen: set[str] = set()
    while stack:
        depth, c = stack.pop()
        if c.call_id in seen:
            continue
        seen.add(c.call_id)
        out.append((depth, c))
        stack.extend((depth + 1, k) for k in reversed(children.get(c.call_id, [])))
    # Calls on a parent cycle (a damaged store) still appear, at the top level.
    out.extend((0, c) for c in calls if c.call_id not in seen)
    return out


# -- graphs: the same shapes for nodes (memo lineage) and calls (what flowed in a run) -------


@dataclasses.dataclass(frozen=True)
class _Box:
    ident: str
    label: str
    detail: str
    root: bool


def _dot_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _dot(boxes: list[_Box], arrows: list[tuple[str, str, bool]]) -> str:
    # Full ids as graph identifiers: short prefixes can collide.
    lines = ["digraph lineage {", "  rankdir=LR;", "  node [shape=box];"]
    for box in boxes:
        style = ", style=bold" if box.root else ""
        label = f"{_dot_text(box.label)}\\n{_dot_text(box.detail)}"
        lines.append(f'  "{box.ident}" [label="{label}"{style}];')
    for src, dst, dashed in arrows:
        lines.append(f'  "{src}" -> "{dst}"{" [style=dashed]" if dashed else ""};')
    lines.append("}")
    return "\n".join(lines)


def _mermaid(prefix: str, boxes: list[_Box], arrows: list[tuple[str, str, bool]]) -> str:
    lines = ["graph LR"]
    for box in boxes:
        name = html.escape(box.label, quote=True)
        lines.append(f'  {prefix}{box.ident}["{name}<br/>{html.escape(box.detail)}"]')
    for src, dst, dashed in arrows:
        lines.append(f"  {prefix}{src} {'-.->' if dashed else '-->'} {prefix}{dst}")
    return "\n".join(lines)


def _node_boxes(root: str, nodes: list[NodeRecord]) -> list[_Box]:
    return [
        _Box(n.node_id, f"{n.kind}: {title(n)}", f"{short(n.node_id)} {n.status}", n.node_id == root)
        for n in nodes
    ]


def _edge_arrows(edges: list[EdgeRecord]) -> list[tuple[str, str, bool]]:
    return [(e.parent, e.child, e.kind != "data") for e in edges]


def lineage_text(
    root: str, nodes: list[NodeRecord], edges: list[EdgeRecord], truncated: bool = False
) -> str:
    by_id = {n.node_id: n for n in nodes}
    lines = []
    for node in nodes:
        marker = "*" if node.node_id == root else " "
        replays = f", replayed {node.replay_count}x" if node.replay_count else ""
        lines.append(
            f"{marker} {short(node.node_id)}  {node.kind:<10} {title(node)}  [{node.status}{replays}]"
        )
    if edges:
        lines.append("")
        lines.append("edges (parent -> child):")
        for edge in sorted(edges, key=lambda e: (e.kind, e.parent, e.child)):
            parent = by_id.get(edge.parent)
            child = by_id.get(edge.child)
            lines.append(
                f"  {short(edge.parent)} {title(parent) if parent else '?'}"
                f"  --{edge.kind}-->  {short(edge.child)} {title(child) if child else '?'}"
            )
    if truncated:
        lines += ["", CUT_NOTICE.format(what="nodes")]
    return "\n".join(lines)


def lineage_dot(
    root: str, nodes: list[NodeRecord], edges: list[EdgeRecord], truncated: bool = False
) -> str:
    text = _dot(_node_boxes(root, nodes), _edge_arrows(edges))
    return text + (f"\n// {CUT_NOTICE.format(what='nodes')}" if truncated else "")


def lineage_mermaid(
    root: str, nodes: list[NodeRecord], edges: list[EdgeRecord], truncated: bool = False
) -> str:
    text = _mermaid("n", _node_boxes(root, nodes), _edge_arrows(edges))
    return text + (f"\n%% {CUT_NOTICE.format(what='nodes')}" if truncated else "")


def lineage_json(
    root: str, nodes: list[NodeRecord], edges: list[EdgeRecord], truncated: bool = False
) -> str:
    return json.dumps(
        {
            "root": root,
            "nodes": [node_dict(n) for n in nodes],
            "edges": [dataclasses.asdict(e) for e in edges],
            "truncated": truncated,
        },
        indent=2,
    )


def _value_lines(value: Any, items: int = 8) -> list[str]:
    """A kept value under its call: a list one item a line (retrieved documents each show
    their text), anything else on one line."""
    if not isinstance(value, list | tuple) or not value:
        return [f"      value:  {clip(value_text(value), 600)}"]
    lines = [f"      value:  ({len(value)} item{'s' if len(value) != 1 else ''})"]
    lines += [f"        - {clip(value_text(item), 300)}" for item in value[:items]]
    if len(value) > items:
        lines.append(f"        ... {len(value) - items} more (--json shows all)")
    return lines


@dataclasses.dataclass(frozen=True)
class CallGraph:
    """What flowed into (or out of) one call in its run: the calls in topological order, the
    flows between them, the decoded values of kept artifacts, and whether the walk was cut."""

    root: str
    direction: str  # "up" | "down"
    calls: list[CallRecord]
    flows: list[FlowRecord]
    values: dict[str, Any]
    truncated: bool

    def _boxes(self) -> list[_Box]:
        return [
            _Box(
                c.call_id,
                f"{c.kind}: {c.op_name}",
                f"{c.call_id} {c.status}{' replayed' if c.replayed else ''}",
                c.call_id == self.root,
            )
            for c in self.calls
        ]

    def _arrows(self) -> list[tuple[str, str, bool]]:
        return [(f.src_call_id, f.dst_call_id, False) for f in self.flows]

    def text(self) -> str:
        by_id = {c.call_id: c for c in self.calls}
        root = by_id.get(self.root)
        run = root.run_id if root else None
        where = "upstream of" if self.direction == "up" else "downstream of"
        lines = [f"calls {where} call {self.root} (run {run}), in the order they ran:", ""]
        for c in self.calls:
            marker = "*" if c.call_id == self.root else " "
            flags = ", replayed" if c.replayed else ""
            other_run = f"  (run {c.run_id})" if c.run_id != run else ""
            node = f"  node {short(c.node_id)}" if c.node_id else ""
            lines.append(
                f"{marker} {c.call_id}  {c.kind:<10} {c.op_name}  [{c.status}{flags}]{node}"
                f"{other_run}"
            )
            if c.error:
                lines.append(f"      error:  {clip(c.error, 300)}")
            if c.call_id in self.values:
                lines += _value_lines(self.values[c.call_id])
            elif c.output_preview:
                lines.append(f"      output: {clip(c.output_preview, 300)}")
        if self.flows:
            lines += ["", "flows (the output of -> fed):"]
            for f in sorted(self.flows, key=lambda f: (f.src_call_id, f.dst_call_id)):
                src, dst = by_id.get(f.src_call_id), by_id.get(f.dst_call_id)
                artifact = f"  (artifact {short(f.artifact_id)})" if f.artifact_id else ""
                lines.append(
                    f"  {f.src_call_id} {src.op_name if src else '?'}  -->  "
                    f"{f.dst_call_id} {dst.op_name if dst else '?'}{artifact}"
                )
        if self.truncated:
            lines += ["", CUT_NOTICE.format(what="calls")]
        return "\n".join(lines)

    def dot(self) -> str:
        text = _dot(self._boxes(), self._arrows())
        return text + (f"\n// {CUT_NOTICE.format(what='calls')}" if self.truncated else "")

    def mermaid(self) -> str:
        text = _mermaid("c", self._boxes(), self._arrows())
        return text + (f"\n%% {CUT_NOTICE.format(what='calls')}" if self.truncated else "")

    def json(self) -> str:
        calls = []
        for c in self.calls:
            data = call_dict(c)
            if c.call_id in self.values:
                data["value"] = self.values[c.call_id]
            calls.append(data)
        return json.dumps(
            {
                "root": self.root,
                "direction": self.direction,
                "calls": calls,
                "flows": [f._asdict() for f in self.flows],
                "truncated": self.truncated,
            },
            indent=2,
            default=str,
        )
