"""The store conformance suite (musubi_core.testing.conformance) against PostgresStore."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable

import pytest

from musubi_core.store import Store
from musubi_core.store.postgres import PostgresStore
from musubi_core.testing.conformance import *  # noqa: F403


@pytest.fixture
def store_factory(pg_dsn: str) -> Callable[[], Store]:
    # Each store gets its own PostgreSQL schema: a new, empty store per call.
    prefix = f"t{uuid.uuid4().hex[:8]}"
    counter = itertools.count()
    return lambda: PostgresStore(pg_dsn, schema=f"{prefix}_{next(counter)}")
