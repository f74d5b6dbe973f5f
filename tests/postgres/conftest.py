"""The PostgreSQL store's tests use the session's private server (``pg_dsn``, from
tests/conftest.py); they skip, saying why, only when no PostgreSQL server binaries exist."""

from __future__ import annotations

import pytest

psycopg = pytest.importorskip("psycopg", reason='pip install "musubi-lineage[postgres]"')
