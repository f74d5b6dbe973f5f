"""A PostgreSQL store outlives its server's restart: pooled connections the server cut are
replaced and the operation retried; a server that stays away is one typed StoreError naming
it, after the store's reconnect bound (a real ``pg_ctl restart`` / ``stop``)."""

from __future__ import annotations

import uuid

import pytest

from musubi_core.errors import StoreError
from musubi_core.store import NodeWrite
from musubi_core.store.postgres import PostgresStore
from tests.support.postgres import PgServer


def _private(pg_server: PgServer) -> None:
    if pg_server.bindir is None:
        pytest.skip("restarts only a private test cluster (not $MUSUBI_TEST_PG_DSN)")


def _node(n: str) -> NodeWrite:
    return NodeWrite(n, "op", "op", "step", "deterministic", "h" + n, "done", None)


def test_reads_and_writes_continue_after_a_restart(pg_server: PgServer) -> None:
    _private(pg_server)
    with PostgresStore(pg_server.dsn, schema=f"r{uuid.uuid4().hex[:8]}") as store:
        store.write([_node("a" * 64)])
        assert store.get_node("a" * 64) is not None  # a pooled connection is open now
        pg_server.restart()
        assert store.get_node("a" * 64) is not None  # read: the cut connection replaced
        store.write([_node("b" * 64)])  # write: its BEGIN failed, so it ran again
        assert store.get_node("b" * 64) is not None
        assert store.reconnects >= 1
        assert store.stats()["nodes"] == 2


def test_a_server_that_stays_away_is_one_store_error_naming_it(pg_server: PgServer) -> None:
    _private(pg_server)
    store = PostgresStore(pg_server.dsn, schema=f"r{uuid.uuid4().hex[:8]}", reconnect_timeout=1.0)
    store.write([_node("c" * 64)])
    pg_server.pg_ctl("-m", "fast", "-w", "stop")
    try:
        with pytest.raises(StoreError) as err:
            store.get_node("c" * 64)
        message = str(err.value)
        assert "127.0.0.1" in message and "cannot reach the PostgreSQL server" in message
        assert "reconnect_timeout" in message  # says what to do
    finally:
        pg_server.pg_ctl("-o", pg_server.options, "-l", f"{pg_server.folder}/log", "-w", "start")
    assert store.get_node("c" * 64) is not None  # back: the same store object works again
    store.close()
