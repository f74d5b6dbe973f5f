"""What the ``musubi`` fixture shows (skipped when pytest runs without ``--musubi-mode``)."""

from tested_app.rag import answer


def test_a_replayed_answer_costs_nothing(musubi) -> None:  # type: ignore[no-untyped-def]
    answer("Where does musubi keep its records?")
    counts = musubi.counts()
    assert counts.replayed + counts.executed == 1
    if musubi.mode.value == "replay":
        assert counts.executed == 0 and counts.replayed == 1
