"""Fixtures every suite may use: one private PostgreSQL server per test session
(``pg_server`` / ``pg_dsn``) and ``backend``, which a module opts into running on both
stores with ``BOTH_BACKENDS = True`` (see ``pytest_generate_tests``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.postgres import PgServer, fresh_database, start_server

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    pytest.importorskip("psycopg", reason='pip install "musubi-lineage[postgres]"')
    server = start_server()
    if server is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_dsn(pg_server: PgServer) -> str:
    return pg_server.dsn


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module with ``BOTH_BACKENDS = True`` runs each test that uses ``backend`` (directly
    or through a store fixture) once on SQLite and once on PostgreSQL."""
    if "backend" in metafunc.fixturenames and getattr(metafunc.module, "BOTH_BACKENDS", False):
        metafunc.parametrize("backend", BACKENDS, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def store_target(backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Where a test's store lives: a SQLite file, or a fresh PostgreSQL database's URL."""
    if backend == "postgresql":
        return fresh_database(request.getfixturevalue("pg_dsn"))
    return str(tmp_path_factory.mktemp("store") / "musubi.db")
