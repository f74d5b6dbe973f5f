"""The steps and workflow of the version-1 store fixture (see make_v1_store.py)."""

from __future__ import annotations

from typing import Any

from musubi_core import Result, step


@step(version="1")
def v1_extract(text: str) -> list[str]:
    return [s.strip() for s in text.split(".") if s.strip()]


@step(version="1")
def v1_count(facts: Result[list[str]]) -> int:
    return len(facts.value)


def v1_workflow(ctx: Any) -> int:
    a = ctx.step("load", lambda: "a b c")
    b = ctx.step("split", lambda: a.split())
    return ctx.step("count", lambda: len(b))
