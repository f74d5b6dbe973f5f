"""``pg_ctl restart`` in the middle of a fleet's run: every call is answered (a lookup that
cannot reach the server waits for it, within a bound, or misses with one warning), and no
acknowledged write is lost (every call each worker made is recorded)."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg

from tests.langchain.test_lc_single_flight import (
    DISTINCT,
    PROMPTS,
    expected_answers,
    fleet_reports,
    start_fleet,
)
from tests.support.openai_server import OpenAIServer
from tests.support.postgres import PgServer, fresh_database

WORKERS = 4


def test_a_server_restart_mid_run_loses_nothing(
    pg_server: PgServer, openai_server: OpenAIServer, tmp_path: Path, monkeypatch: object
) -> None:
    if pg_server.bindir is None:
        import pytest

        pytest.skip("restarts only a private test cluster (not $MUSUBI_TEST_PG_DSN)")
    import tests.langchain.test_lc_single_flight as fleet

    fleet.WORKERS, workers = WORKERS, fleet.WORKERS
    try:
        url = fresh_database(pg_server.dsn)
        openai_server.delay_s = 0.05
        distinct, procs = start_fleet(url, openai_server, tmp_path)
        deadline = time.monotonic() + 120
        while openai_server.count("chat") < 5:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pg_server.restart()  # every worker's connections are cut mid-run
        restarted_at = openai_server.count("chat")
        reports = fleet_reports(procs)
    finally:
        fleet.WORKERS = workers
    assert restarted_at < DISTINCT  # the restart really was mid-run
    assert [r["errors"] for r in reports] == [[]] * WORKERS
    expected = expected_answers(openai_server, distinct)
    assert all(r["answers"] == expected for r in reports)
    for r in reports:
        assert len(r["warnings"]) <= 1, r["warnings"]
    with psycopg.connect(url) as pg:
        recorded = pg.execute(
            "SELECT COUNT(*) FROM musubi.musubi_calls WHERE kind = 'chat_model'"
        ).fetchone()
        nodes = pg.execute(
            "SELECT COUNT(*) FROM musubi.musubi_nodes WHERE kind = 'chat_model' AND status = 'done'"
        ).fetchone()
    # Every chat-model call of every worker was acknowledged to the recorder: all are stored.
    assert recorded == (WORKERS * PROMPTS,)
    assert nodes == (DISTINCT,)
