"""Rendering store contents for people (tables, lineage graphs) and machines (JSON)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import html
import json
from collections.abc import Iterable, Sequence
from typing import Any

from .store import EdgeRecord, NodeRecord

__all__ = [
    "lineage_dot",
    "lineage_json",
    "lineage_mermaid",
    "lineage_text",
    "node_dict",
    "table",
    "when",
]


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def short(node_id: str | None) -> str:
    return (node_id or "-")[:12]


def title(node: NodeRecord) -> str:
    return node.label or node.op_name


def node_dict(node: NodeRecord) -> dict[str, Any]:
    data = node._asdict()
    if node.meta:
        with contextlib.suppress(ValueError):
            data["meta"] = json.loads(node.meta)
    return data


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def lineage_text(root: str, nodes: list[NodeRecord], edges: list[EdgeRecord]) -> str:
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
    return "\n".join(lines)


def _dot_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _label(node: NodeRecord) -> str:
    return f"{_dot_text(node.kind + ': ' + title(node))}\\n{short(node.node_id)} {node.status}"


def lineage_dot(root: str, nodes: list[NodeRecord], edges: list[EdgeRecord]) -> str:
    # Full node ids as graph identifiers: 12-character prefixes can collide.
    lines = ["digraph lineage {", "  rankdir=LR;", "  node [shape=box];"]
    for node in nodes:
        style = ", style=bold" if node.node_id == root else ""
        lines.append(f'  "{node.node_id}" [label="{_label(node)}"{style}];')
    for edge in edges:
        style = "" if edge.kind == "data" else " [style=dashed]"
        lines.append(f'  "{edge.parent}" -> "{edge.child}"{style};')
    lines.append("}")
    return "\n".join(lines)


def lineage_mermaid(root: str, nodes: list[NodeRecord], edges: list[EdgeRecord]) -> str:
    lines = ["graph LR"]
    for node in nodes:
        name = html.escape(f"{node.kind}: {title(node)}", quote=True)
        lines.append(f'  n{node.node_id}["{name}<br/>{short(node.node_id)} {node.status}"]')
    for edge in edges:
        arrow = "-->" if edge.kind == "data" else "-.->"
        lines.append(f"  n{edge.parent} {arrow} n{edge.child}")
    return "\n".join(lines)


def lineage_json(root: str, nodes: list[NodeRecord], edges: list[EdgeRecord]) -> str:
    return json.dumps(
        {
            "root": root,
            "nodes": [node_dict(n) for n in nodes],
            "edges": [dataclasses.asdict(e) for e in edges],
        },
        indent=2,
    )
