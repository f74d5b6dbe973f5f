from tested_app.query_engine import ask, ask_streaming


def test_query() -> None:
    assert ask("What lives in a tide pool?").strip()


def test_streamed_query() -> None:
    deltas = ask_streaming("When do tide pools fill?")
    assert deltas and "".join(deltas).strip()
