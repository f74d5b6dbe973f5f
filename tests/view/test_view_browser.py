"""``musubi view`` in a real browser (the machine's headless Chromium, driven with Selenium)
against the page of a recorded app: a LangChain RAG chain and a LlamaIndex query, each run
twice on real provider clients talking to a local OpenAI-compatible server.

What a person checks: the runs and their counts; the LLM call's prompt and the documents
retrieved upstream of it; what-if highlights exactly the calls whose nodes ``musubi
invalidate`` marks; the savings show the tokens ``musubi stats`` shows; stale nodes are
marked; a large run opens collapsed and expands on click; and no request leaves 127.0.0.1.
Each view is saved as a screenshot (``$MUSUBI_SCREENSHOTS``, else a temporary folder).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from conftest import Served, musubi, wait_until
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.support import lineage
from tests.support.view_app import DOCS, Recorded

# Chromium's own housekeeping (component updates, sign-in, the default search engine's
# preconnect), sent with or without any page open: the tripwire catches it like everything
# else that is not on the loopback address, and it is told apart by host.
BROWSER_HOUSEKEEPING = (".google.com", ".googleapis.com", ".gstatic.com", ".gvt1.com",
                        "duckduckgo.com")


def _tripwire_host(entry: str) -> str:
    """``CONNECT host:443`` or ``GET http://host/path`` -> ``host``."""
    target = entry.split(" ", 1)[1]
    if "://" in target:
        return urlparse(target).hostname or ""
    return target.rsplit(":", 1)[0]


def ready(b: Any, what: str) -> None:
    wait_until(lambda: b.driver.find_element(By.ID, "main").get_attribute("data-ready") == what,
               what=f"the {what} view")


def goto(b: Any, url: str, what: str) -> None:
    b.driver.get("about:blank")
    b.driver.get(url)
    ready(b, what)


def css(b: Any, selector: str) -> list[Any]:
    return list(b.driver.find_elements(By.CSS_SELECTOR, selector))


def click(b: Any, element: Any) -> None:
    """A click where the element is on screen; a graph box scrolled out of the SVG's view gets
    the same click event dispatched to it."""
    try:
        element.click()
    except Exception:
        b.driver.execute_script(
            "arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", element)


def box(b: Any, call_id: str) -> Any:
    return wait_until(lambda: css(b, f'[data-testid="call-box"][data-call-id="{call_id}"]')[0],
                      what=f"the box of call {call_id}")


def select_call(b: Any, call_id: str) -> Any:
    click(b, box(b, call_id))
    return wait_until(
        lambda: css(b, f'[data-testid="details"][data-call-id="{call_id}"]')[0],
        what=f"the details of call {call_id}",
    )


def one(calls: list[dict[str, Any]], kind: str, op: str | None = None, nth: int = 0) -> dict[str, Any]:
    found = [c for c in calls if c["kind"] == kind and (op is None or c["op_name"] == op)]
    return found[nth]


def invalidated_by_cli(db: str, node_id: str, tmp_path: Path) -> set[str]:
    """The nodes the real ``musubi invalidate`` marks stale, on a copy of the store."""
    copy = tmp_path / "copy.db"
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(FULL)")
    con.close()
    shutil.copy(db, copy)
    before = {n for n, r in lineage.nodes(str(copy)).items() if r["status"] == "stale"}
    musubi("--db", str(copy), "invalidate", node_id)
    after = {n for n, r in lineage.nodes(str(copy)).items() if r["status"] == "stale"}
    assert not before, "the recorded app starts with no stale node"
    return after


def test_runs_page_lists_every_run_with_its_counts(
    recorded: Recorded, served: Served, browser: Any, shots: Path
) -> None:
    goto(browser, served.url, "runs")
    rows = {r.get_attribute("data-run-id"): r for r in css(browser, '[data-testid="run-row"]')}
    expected = {r["run_id"]: r for r in lineage.runs(recorded.db)}
    assert set(rows) == set(expected)
    for run_id, row in rows.items():
        want = expected[run_id]
        assert (row.get_attribute("data-kind"), int(row.get_attribute("data-calls")),
                int(row.get_attribute("data-replays"))) == (want["kind"], want["calls"],
                                                            want["replays"])
        assert want["calls"] == len(lineage.calls(recorded.db, run_id))
    assert len(lineage.runs(recorded.db, "langchain")) == recorded.langchain_runs
    # The second pass replayed every model call of each LangChain run: two per run.
    assert sorted(r["replays"] for r in lineage.runs(recorded.db, "langchain")) == [0, 0, 2, 2]
    card = css(browser, '[data-testid="card-runs"] .card-value')[0].text
    assert card == str(len(expected))
    browser.screenshot(shots / "view-runs.png")
    # Filter by kind: only the LlamaIndex runs stay.
    Select(css(browser, '[data-testid="filter-kind"]')[0]).select_by_value("llama_index")
    wait_until(lambda: {r.get_attribute("data-kind") for r in css(browser, '[data-testid="run-row"]')}
               == {"llama_index"}, what="the kind filter")
    shown = {r.get_attribute("data-run-id") for r in css(browser, '[data-testid="run-row"]')}
    assert shown == {r["run_id"] for r in lineage.runs(recorded.db, "llama_index")}
    Select(css(browser, '[data-testid="filter-kind"]')[0]).select_by_value("")
    ready(browser, "runs")


def test_llm_call_shows_its_prompt_and_the_documents_retrieved_upstream(
    recorded: Recorded, served: Served, browser: Any, shots: Path
) -> None:
    run = lineage.runs(recorded.db, "langchain")[0]
    calls = lineage.calls(recorded.db, run["run_id"])
    answer = one(calls, "chat_model", nth=1)  # the second model call writes the answer
    retriever = one(calls, "retriever")
    retrieved = json.loads(lineage.artifact_text(recorded.db, retriever["artifact_id"]))
    assert [d["page_content"] for d in retrieved] == [DOCS[0]]
    goto(browser, served.url + f"#run/{run['run_id']}", "run")
    select_call(browser, answer["call_id"])
    prompt = wait_until(lambda: css(browser, '[data-testid="call-input"]')[0].text)
    assert prompt == answer["input_preview"] and "Answer from the context" in prompt
    assert css(browser, '[data-testid="call-output"]')[0].text == answer["output_preview"]
    upstream = {e.get_attribute("data-call-id") for e in css(browser, '[data-testid="upstream-call"]')}
    assert retriever["call_id"] in upstream
    assert {c["call_id"] for c in lineage.upstream(recorded.db, answer["call_id"])} == upstream
    docs = wait_until(lambda: [d.text for d in css(
        browser, '[data-testid="upstream-documents"] [data-testid="document"]')],
        what="the retrieved documents")
    assert any(DOCS[0] in d for d in docs) and not any(DOCS[3] in d for d in docs)
    decision = css(browser, '[data-testid="decision"]')[0].text
    assert decision.startswith("executed (not_found)")
    assert "replay (hit)" in css(browser, '[data-testid="decision-now"]')[0].text
    history = [r.get_attribute("data-call-id") for r in css(browser, '[data-testid="history-row"]')]
    assert answer["call_id"] in history and len(history) == 2  # executed, then replayed
    browser.screenshot(shots / "view-call.png")
    browser.driver.execute_script(
        "document.querySelector('[data-testid=upstream]').scrollIntoView({block: 'start'})")
    browser.screenshot(shots / "view-call-upstream.png")


def test_llama_index_llm_call_shows_the_retrieved_nodes(
    recorded: Recorded, served: Served, browser: Any, shots: Path
) -> None:
    (run, _) = [r for r in lineage.runs(recorded.db, "llama_index")
                if r["name"] == "RetrieverQueryEngine.query"]
    calls = lineage.calls(recorded.db, run["run_id"])
    chat = one(calls, "llm", "OpenAI.chat")
    retrieve = one(calls, "retriever", "VectorIndexRetriever.retrieve")
    kept = [d["text"] for d in json.loads(lineage.artifact_text(recorded.db, retrieve["artifact_id"]))]
    assert len(kept) == 2
    goto(browser, served.url + f"#run/{run['run_id']}", "run")
    browser.screenshot(shots / "view-run-llama-index.png")
    select_call(browser, chat["call_id"])
    assert css(browser, '[data-testid="call-input"]')[0].text == chat["input_preview"]
    docs = wait_until(lambda: [d.text for d in css(
        browser, '[data-testid="upstream-documents"] [data-testid="document"]')],
        what="the retrieved nodes")
    for text in kept:
        assert any(text in d for d in docs), (text, docs)


@pytest.mark.parametrize("app", ["langchain", "llama_index"])
def test_whatif_highlights_exactly_the_calls_musubi_invalidate_marks(
    app: str, recorded: Recorded, served: Served, browser: Any, shots: Path, tmp_path: Path
) -> None:
    if app == "langchain":
        run = lineage.runs(recorded.db, "langchain")[0]
        calls = lineage.calls(recorded.db, run["run_id"])
        chosen = one(calls, "chat_model", nth=0)  # the rewrite: the answer depends on it
    else:
        run = next(r for r in lineage.runs(recorded.db, "llama_index")
               if r["name"] == "RetrieverQueryEngine.query")
        calls = lineage.calls(recorded.db, run["run_id"])
        chosen = one(calls, "embedding")  # the query's embedding: the LLM call depends on it
    marked = invalidated_by_cli(recorded.db, chosen["node_id"], tmp_path)
    expected = {c["call_id"] for c in calls if c["node_id"] in marked}
    assert len(marked) >= 2 and len(expected) >= 2  # more than the chosen node itself
    goto(browser, served.url + f"#run/{run['run_id']}", "run")
    select_call(browser, chosen["call_id"])
    click(browser, css(browser, '[data-testid="whatif-button"]')[0])
    wait_until(lambda: css(browser, '[data-testid="whatif"]'), what="the what-if answer")
    highlighted = {e.get_attribute("data-call-id") for e in css(browser, ".box.whatif")}
    listed = {e.get_attribute("data-call-id") for e in css(browser, '[data-testid="whatif-call"]')}
    nodes = {e.get_attribute("data-node-id") for e in css(browser, '[data-testid="whatif-node"]')}
    assert highlighted == expected
    assert listed == expected
    assert nodes == marked
    tokens = int(css(browser, '[data-testid="whatif"]')[0].get_attribute("data-tokens"))
    every = lineage.nodes(recorded.db)
    assert tokens == sum((every[n]["tokens_in"] or 0) + (every[n]["tokens_out"] or 0) for n in marked)
    browser.screenshot(shots / f"view-whatif-{app}.png")


def test_savings_show_the_tokens_saved_that_musubi_stats_shows(
    recorded: Recorded, served: Served, browser: Any, shots: Path
) -> None:
    stats = json.loads(musubi("--db", recorded.db, "--json", "stats", "--cost").stdout)
    assert stats["tokens_saved"] > 0
    goto(browser, served.url + "#savings", "savings")
    shown = css(browser, '[data-testid="saved-tokens"] .card-value')[0].text
    assert int(shown.replace(",", "")) == stats["tokens_saved"]
    assert stats["cost"]["totals"]["saved"]["tokens"] == stats["tokens_saved"]
    per_model = {r.get_attribute("data-key"): int(r.get_attribute("data-tokens-saved"))
                 for r in css(browser, '[data-testid="savings-model-row"]')}
    assert per_model["gpt-4o-mini"] == stats["tokens_saved"]
    assert sum(per_model.values()) == stats["tokens_saved"]
    money = css(browser, '[data-testid="saved-money"] .card-value')[0].text
    assert money.startswith("$") and money != "$0.00"
    browser.screenshot(shots / "view-savings.png")
    goto(browser, served.url, "runs")
    assert css(browser, '[data-testid="card-tokens-saved"] .card-value')[0].text.replace(",", "") \
        == str(stats["tokens_saved"])


def test_stale_nodes_are_marked_in_the_graph(
    recorded: Recorded, browser: Any, shots: Path, tmp_path: Path
) -> None:
    run = lineage.runs(recorded.db, "langchain")[0]
    calls = lineage.calls(recorded.db, run["run_id"])
    rewrite = one(calls, "chat_model", nth=0)
    marked = invalidated_by_cli(recorded.db, rewrite["node_id"], tmp_path)
    page = tmp_path / "stale.html"
    musubi("--db", str(tmp_path / "copy.db"), "view", "--run", run["run_id"], "--out", str(page))
    goto(browser, page.as_uri(), "run")
    stale = {e.get_attribute("data-call-id") for e in css(browser, ".box.stale")}
    assert stale == {c["call_id"] for c in calls if c["node_id"] in marked}
    browser.screenshot(shots / "view-stale.png")


def test_page_written_to_a_file_works_offline(
    recorded: Recorded, browser: Any, tmp_path: Path
) -> None:
    page = tmp_path / "app.html"
    out = musubi("--db", recorded.db, "view", "--out", str(page))
    assert "wrote" in out.stdout
    seen_before = len(browser.requests())
    goto(browser, page.as_uri(), "runs")
    assert len(css(browser, '[data-testid="run-row"]')) == len(lineage.runs(recorded.db))
    run = lineage.runs(recorded.db, "langchain")[0]
    answer = one(lineage.calls(recorded.db, run["run_id"]), "chat_model", nth=1)
    click(browser, css(browser, f'[data-testid="run-row"][data-run-id="{run["run_id"]}"]')[0])
    ready(browser, "run")
    select_call(browser, answer["call_id"])
    assert css(browser, '[data-testid="call-input"]')[0].text == answer["input_preview"]
    asked = [u for u in browser.requests()[seen_before:] if u != "about:blank"]
    assert asked and {urlparse(u).scheme for u in asked} <= {"file", "data"}, asked
    assert all(u.startswith(page.as_uri()) for u in asked if u.startswith("file:"))


def test_a_large_run_opens_collapsed_and_expands_on_click(
    browser: Any, shots: Path, tmp_path: Path
) -> None:
    from benchmarks.view_store import build_store

    db = str(tmp_path / "large.db")
    run_id = build_store(db, calls=3000, runs=1, big_run_calls=3000)
    server = Served(db)
    try:
        goto(browser, server.url + f"#run/{run_id}", "run")
        graph = css(browser, '[data-testid="graph"]')[0]
        shown = int(graph.get_attribute("data-boxes"))
        assert 0 < shown <= 140  # 3,000 calls, collapsed into groups
        groups = css(browser, '[data-testid="expand"]')
        assert groups, "collapsed groups show their counts"
        browser.screenshot(shots / "view-large-run.png")
        click(browser, groups[0])
        wait_until(lambda: int(css(browser, '[data-testid="graph"]')[0].get_attribute("data-boxes"))
                   > shown, what="the group to expand")
    finally:
        server.stop()


def test_no_request_leaves_loopback_while_the_page_is_open(
    recorded: Recorded, served: Served, browser: Any
) -> None:
    run = lineage.runs(recorded.db, "langchain")[0]
    answer = one(lineage.calls(recorded.db, run["run_id"]), "chat_model", nth=1)
    seen_before = len(browser.requests())
    tripped_before = len(browser.tripwire.seen)
    goto(browser, served.url, "runs")
    goto(browser, served.url + f"#run/{run['run_id']}", "run")
    select_call(browser, answer["call_id"])
    click(browser, css(browser, '[data-testid="whatif-button"]')[0])
    wait_until(lambda: css(browser, '[data-testid="whatif"]'), what="the what-if answer")
    goto(browser, served.url + "#savings", "savings")
    page_requests = browser.requests()[seen_before:]
    api = [u for u in page_requests if "/api/" in u]
    assert len(api) >= 4, page_requests  # the page did ask the server
    for url in page_requests:
        parsed = urlparse(url)
        assert url == "about:blank" or parsed.scheme == "data" or (
            parsed.scheme == "http" and parsed.hostname == "127.0.0.1"
            and parsed.port == served.port
        ), f"the page asked for {url}"
    outside = [r for r in browser.tripwire.seen[tripped_before:]
               if not _tripwire_host(r).endswith(BROWSER_HOUSEKEEPING)]
    assert outside == []
    # The guard catches what it should: a request to a host that is not 127.0.0.1.
    browser.driver.get("http://musubi-canary.invalid/probe")
    assert any("musubi-canary.invalid" in r for r in browser.tripwire.seen)
    assert any("musubi-canary.invalid" in u for u in browser.requests())
