"""Async EXTERNAL_EFFECT steps: concurrent tasks of one process share one execution."""

from __future__ import annotations

import asyncio
from pathlib import Path

from musubi_core import Engine, SQLiteStore, StepConfiguration, StepType, step, use_engine


def test_concurrent_async_tasks_execute_an_effect_once(tmp_path: Path) -> None:
    sent: list[str] = []

    @step(semantics=StepConfiguration(step_type=StepType.EXTERNAL_EFFECT))
    async def send(to: str) -> str:
        sent.append(to)
        await asyncio.sleep(0.2)  # the other task arrives while this one is in flight
        return f"sent to {to}"

    async def both() -> list[object]:
        return await asyncio.gather(send("ana"), send("ana"))

    with Engine(SQLiteStore(tmp_path / "m.db")) as engine, use_engine(engine):
        first, second = asyncio.run(both())
    assert sent == ["ana"]
    assert {first.value, second.value} == {"sent to ana"}  # type: ignore[attr-defined]
    assert sorted([first.replayed, second.replayed]) == [False, True]  # type: ignore[attr-defined]
