"""pytest fixtures shared by the adapter test suites.

Import them from a per-adapter ``conftest.py``::

    from tests.support.fixtures import openai_server, openai_server_session  # noqa: F401

``openai_server`` is function-scoped: the same (session-wide) server, reset before each
test, so request counts start at zero, queues/rules are empty and delay is 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.openai_server import OpenAIServer


@pytest.fixture(scope="session")
def openai_server_session() -> Iterator[OpenAIServer]:
    server = OpenAIServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def openai_server(openai_server_session: OpenAIServer) -> Iterator[OpenAIServer]:
    openai_server_session.reset()
    yield openai_server_session
    openai_server_session.reset()
