"""``musubi view`` without a browser: the price tables, ``musubi stats --cost``, what-if
against ``invalidate``, the page's self-containment, and the served page's limits (loopback
only, read only, its own host only)."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from conftest import Served, musubi

from musubi_core import Engine, SQLiteStore, step, use_engine
from musubi_core.errors import ConfigError
from musubi_core.prices import load_prices
from musubi_core.view import SCRIPTS, ViewData, build_page, content_security_policy


def test_default_prices_are_dated_and_names_match_their_variants(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("MUSUBI_PRICES", raising=False)
    prices = load_prices()
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", prices.as_of or "")
    mini = prices.find("gpt-4o-mini")
    assert mini is not None and (mini.input_per_million, mini.output_per_million) == (0.15, 0.60)
    for name in ("gpt-4o-mini-2024-07-18", "openai/gpt-4o-mini", "GPT-4o-mini"):
        assert prices.find(name) == mini, name
    assert prices.find("claude-3-5-haiku-20241022") == prices.find("claude-3-5-haiku")
    assert prices.find("gpt-4o") != mini  # a prefix is not a match
    assert prices.find("my-own-model") is None
    assert prices.cost("gpt-4o-mini", 1_000_000, 2_000_000) == pytest.approx(0.15 + 1.20)


def test_a_users_table_is_laid_over_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "prices.toml"
    table.write_text('[models."gpt-4o-mini"]\ninput_per_million = 1.0\noutput_per_million = 2.0\n'
                     '[models."house-model"]\ninput_per_million = 0.5\n')
    monkeypatch.setenv("MUSUBI_PRICES", str(table))
    prices = load_prices()
    assert prices.cost("gpt-4o-mini", 1_000_000, 1_000_000) == pytest.approx(3.0)
    assert prices.cost("house-model", 2_000_000, 5) == pytest.approx(1.0)
    assert prices.find("gpt-4o") is not None  # the default's other models stay
    assert str(table) in prices.describe()
    monkeypatch.delenv("MUSUBI_PRICES")
    assert load_prices().cost("gpt-4o-mini", 1_000_000, 0) == pytest.approx(0.15)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[models."m"]\noutput_per_million = 1\n', "needs input_per_million"),
        ('[models."m"]\ninput_per_million = "cheap"\n', "input_per_million must be a number"),
        ('[models."m"]\ninput_per_million = -1\n', "zero or more"),
        ('[models."m"]\ninput_per_million = 1\ninput_per_token = 2\n', "unknown keys"),
        ("[models\n", "not a valid TOML"),
        ("as_of = 1\n", 'no [models."NAME"] tables'),
    ],
)
def test_a_malformed_table_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    table = tmp_path / "bad.toml"
    table.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_prices(str(table))


def test_stats_cost_shows_spent_and_saved_per_model(recorded: Any, tmp_path: Path) -> None:
    text = musubi("--db", recorded.db, "stats", "--cost").stdout
    data = json.loads(musubi("--db", recorded.db, "--json", "stats", "--cost").stdout)
    con = sqlite3.connect(recorded.db)
    spent_in, spent_out, saved_in, saved_out = con.execute(
        "SELECT SUM(CASE WHEN replayed = 0 THEN tokens_in END), "
        "SUM(CASE WHEN replayed = 0 THEN tokens_out END), "
        "SUM(CASE WHEN replayed = 1 THEN tokens_in END), "
        "SUM(CASE WHEN replayed = 1 THEN tokens_out END) FROM musubi_calls "
        "WHERE model = 'gpt-4o-mini'").fetchone()
    con.close()
    (mini,) = [m for m in data["cost"]["by_model"] if m["model"] == "gpt-4o-mini"]
    assert mini["spent"]["money"] == pytest.approx((spent_in * 0.15 + spent_out * 0.60) / 1e6)
    assert mini["saved"]["money"] == pytest.approx((saved_in * 0.15 + saved_out * 0.60) / 1e6)
    assert mini["saved"]["tokens"] == data["tokens_saved"]
    assert "cost: prices from musubi's default table of" in text
    line = next(row for row in text.splitlines() if row.startswith("gpt-4o-mini"))
    assert f"{mini['saved']['tokens']}" in line.split() and line.count("$") == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("[models\n")
    proc = musubi("--db", recorded.db, "stats", "--cost", "--prices", str(bad), check=False)
    assert proc.returncode == 2 and "not a valid TOML" in proc.stderr


def _diamond_store(path: str) -> dict[str, str]:
    @step
    def source(tag: str) -> str:
        return f"facts {tag}"

    @step
    def left(x: Any) -> str:
        return x.value + " left"

    @step
    def right(x: Any) -> str:
        return x.value + " right"

    @step
    def join(a: Any, b: Any) -> str:
        return a.value + b.value

    with Engine(SQLiteStore(path)) as engine, use_engine(engine):
        s = source("a")
        lft, rgt = left(s), right(s)
        j = join(lft, rgt)
        other = source("b")
    return {"source": s.node_id, "left": lft.node_id, "right": rgt.node_id, "join": j.node_id,
            "other": other.node_id}


def test_whatif_lists_exactly_what_invalidate_marks(tmp_path: Path) -> None:
    db = str(tmp_path / "diamond.db")
    ids = _diamond_store(db)
    with Engine(SQLiteStore(db, read_only=True)) as engine:
        data = ViewData(engine, load_prices())
        preview = {n["node_id"] for n in data.whatif(ids["left"])["nodes"]}
        whole = data.whatif(ids["source"])
    copy = tmp_path / "copy.db"
    shutil.copy(db, copy)
    musubi("--db", str(copy), "invalidate", ids["left"])
    con = sqlite3.connect(copy)
    stale = {r[0] for r in con.execute("SELECT node_id FROM musubi_nodes WHERE status = 'stale'")}
    con.close()
    assert preview == stale == {ids["left"], ids["join"]}
    assert {n["node_id"] for n in whole["nodes"]} == {ids[k] for k in ("source", "left", "right",
                                                                        "join")}
    assert whole["command"] == f"musubi invalidate {ids['source']}"


def test_the_page_asks_nothing_of_any_other_host(recorded: Any, tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    musubi("--db", recorded.db, "view", "--out", str(page))
    html = page.read_text(encoding="utf-8")
    # No element that loads anything: every script and style is inline, there is no link.
    assert not re.search(r"<(script|img|iframe|link|source|video|audio)\b[^>]*\b(src|href)=", html)
    assert "@import" not in html and "url(" not in html.replace("url(#arrow-data)", "")
    addresses = set(re.findall(r"https?://[^\s\"'<>)]+", html))
    assert addresses <= {"http://www.w3.org/2000/svg"}, addresses  # SVG's namespace name
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    assert csp is not None and csp.group(1) == content_security_policy()
    assert "default-src 'none'" in csp.group(1) and "connect-src 'self'" in csp.group(1)
    assert html.count("<script>") == len(SCRIPTS)  # each one allowed by its hash
    # The answers in it: every run, and the details of its calls.
    boot = json.loads(re.search(r'id="musubi-data">(.*?)</script>', html, re.S).group(1))
    con = sqlite3.connect(recorded.db)
    runs = {r[0] for r in con.execute("SELECT run_id FROM musubi_runs")}
    calls = {r[0] for r in con.execute("SELECT call_id FROM musubi_calls")}
    con.close()
    assert {r["run_id"] for r in boot["answers"]["runs"]["runs"]} == runs
    assert {k[5:] for k in boot["answers"] if k.startswith("call/")} == calls


def _request(port: int, method: str, path: str, host: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Host": host} if host else {}
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def test_the_served_page_is_local_and_read_only(recorded: Any, served: Served) -> None:
    status, page = _request(served.port, "GET", "/")
    assert status == 200 and b"musubi-data" in page
    status, body = _request(served.port, "GET", "/api/runs")
    con = sqlite3.connect(recorded.db)
    runs = {r[0]: r[1] for r in con.execute("SELECT run_id, calls FROM musubi_runs")}
    con.close()
    assert status == 200
    assert {r["run_id"]: r["calls"] for r in json.loads(body)["runs"]} == runs
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert _request(served.port, method, "/api/runs")[0] == 405
    # A page that renamed itself to 127.0.0.1 through DNS sends its own host name: refused.
    assert _request(served.port, "GET", "/api/runs", host="attacker.example:80")[0] == 403
    assert _request(served.port, "GET", "/api/runs", host=f"localhost:{served.port}")[0] == 200
    assert _request(served.port, "GET", "/api/../../etc/passwd")[0] == 404
    assert _request(served.port, "GET", "/api/call/0123")[0] == 404
    assert _request(served.port, "GET", "/static/app.js")[0] == 404
    # It listens on the loopback address only.
    with open("/proc/net/tcp") as fh:
        listening = [line.split() for line in fh.readlines()[1:]]
    mine = [row for row in listening if int(row[1].split(":")[1], 16) == served.port
            and row[3] == "0A"]
    assert mine and all(row[1].split(":")[0] == "0100007F" for row in mine)
    # Nothing was written: the file's content is what the app left.
    assert served.proc.poll() is None


def test_build_page_of_a_run_carries_that_runs_details(recorded: Any) -> None:
    con = sqlite3.connect(recorded.db)
    run_id = con.execute("SELECT run_id FROM musubi_runs ORDER BY started_at LIMIT 1").fetchone()[0]
    con.close()
    with Engine(SQLiteStore(recorded.db, read_only=True)) as engine:
        html = build_page(ViewData(engine, load_prices()), run_id=run_id)
    boot = json.loads(re.search(r'id="musubi-data">(.*?)</script>', html, re.S).group(1))
    assert boot["focus"] == run_id and f"run/{run_id}" in boot["answers"]
