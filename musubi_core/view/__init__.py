"""``musubi view``: a store in the browser (runs, a run's graph, a call's details, what-if and
savings), as one self-contained page.

Every script and style the page runs ships in this package (``static/``: the page's own code
and a vendored copy of dagre, the graph-layout library, with its license); the page asks no
other host for anything, and says so to the browser in its Content-Security-Policy. It is
either written to a file (the answers it can ask for are written into it, see
:func:`build_page`) or served on 127.0.0.1 (:mod:`musubi_core.view._server`), where it asks
the store as the person clicks. Either way nothing writes to the store.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

from ._data import NotFound, ViewData

__all__ = ["ViewData", "answer", "build_page", "content_security_policy", "page_html"]

# The page's scripts, in the order they run (each inlined into the page).
SCRIPTS = ("dagre.min.js", "util.js", "graph.js", "details.js", "app.js")
STYLES = ("view.css",)

# Budgets of a page written to a file: the answers it carries (a served page has none).
FILE_DETAIL_CALLS = 3000  # calls whose details (and whose nodes' what-if) are in the file
FILE_WHATIF_NODES = 200_000  # nodes listed across the what-if answers in the file

_PATH = re.compile(r"^(summary|runs|savings|run/[^/]+|call/[0-9a-f]+|kept/[0-9a-f]+|"
                   r"whatif/[0-9a-f]+)$")


def _static(name: str) -> str:
    return resources.files(__name__).joinpath("static").joinpath(name).read_text("utf-8")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _json_for_script(data: Any) -> str:
    """JSON that cannot end its <script> element early (``<`` is written ``\\u003c``)."""
    return json.dumps(data, separators=(",", ":"), default=str).replace("<", "\\u003c")


def content_security_policy() -> str:
    """What the page may load and run: its own inline scripts and style (by hash) and, when
    served, requests to the host it came from; nothing else."""
    return "; ".join([
        "default-src 'none'",
        "script-src " + " ".join(_sha256(_static(name)) for name in SCRIPTS),
        "style-src " + " ".join(_sha256(_static(name)) for name in STYLES),
        "img-src data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
    ])


def page_html(boot: dict[str, Any]) -> str:
    """The page, with ``boot`` (its mode and the answers it carries) in it."""
    parts = {
        "@CSP@": content_security_policy(),
        "@STYLE@": "".join(f"<style>{_static(name)}</style>" for name in STYLES),
        "@DATA@": _json_for_script(boot),
        "@SCRIPTS@": "".join(f"<script>{_static(name)}</script>" for name in SCRIPTS),
    }
    template = _static("page.html")
    return re.sub("|".join(map(re.escape, parts)), lambda m: parts[m.group(0)], template)


def answer(data: ViewData, path: str) -> Any:
    """The answer to one of the page's questions (``runs?kind=step&since=...`` and the like;
    see :mod:`musubi_core.view._data`). An unknown question is a :class:`MusubiError`."""
    route, _, query = path.partition("?")
    if not _PATH.match(route):
        raise NotFound(f"the page asks no such thing: {route!r}")
    what, _, ref = route.partition("/")
    if what == "summary":
        return data.summary()
    if what == "savings":
        return data.savings()
    if what == "runs":
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        since = float(params["since"]) if params.get("since") else None
        limit = min(max(int(params.get("limit") or 500), 1), 10_000)
        return data.runs(kind=params.get("kind") or None, since=since, limit=limit)
    if what == "run":
        return data.run(ref)
    if what == "call":
        return data.call(ref)
    if what == "kept":
        return data.kept_answer(ref)
    return data.whatif(ref)


def build_page(data: ViewData, *, run_id: str | None = None, limit: int = 500) -> str:
    """A page for a file: the store's runs (``limit`` newest), its savings, and the details of
    ``run_id`` (else of the newest runs, up to :data:`FILE_DETAIL_CALLS` calls in all)."""
    answers: dict[str, Any] = {
        "summary": data.summary(), "runs": data.runs(limit=limit), "savings": data.savings()
    }
    runs = [r["run_id"] for r in answers["runs"]["runs"]]
    if run_id is not None:
        runs = [run_id, *[r for r in runs if r != run_id]]
    budget, listed = FILE_DETAIL_CALLS, 0
    nodes_done: set[str] = set()
    for rid in runs:
        run = data.run(rid)
        answers[f"run/{rid}"] = run
        for row in run["calls"]:
            if budget <= 0:
                break
            budget -= 1
            call_id, node_id = row[0], row[5]
            answers[f"call/{call_id}"] = data.call(call_id)
            answers[f"kept/{call_id}"] = data.kept_answer(call_id)
            if node_id and node_id not in nodes_done and listed < FILE_WHATIF_NODES:
                nodes_done.add(node_id)
                whatif = data.whatif(node_id)
                listed += len(whatif["nodes"])
                answers[f"whatif/{node_id}"] = whatif
        if budget <= 0:
            break
    boot = {
        "mode": "file",
        "answers": answers,
        "focus": run_id,
        "budget": {"calls": FILE_DETAIL_CALLS, "runs": limit},
    }
    return page_html(boot)
