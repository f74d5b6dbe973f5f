"""An ``@step`` pipeline: two LLM steps (the OpenAI SDK, no framework) and a plain one."""

from __future__ import annotations

from openai import OpenAI

from musubi_core import Result, StepConfiguration, StepType, step
from tested_app.config import MODEL, api_key, base_url
from tested_app.prompts import DRAFT_PROMPT, OUTLINE_PROMPT

_CHAT = StepConfiguration(step_type=StepType.STOCHASTIC)


def _complete(prompt: str) -> str:
    client = OpenAI(base_url=base_url(), api_key=api_key())
    reply = client.chat.completions.create(
        model=MODEL, temperature=0, messages=[{"role": "user", "content": prompt}]
    )
    return reply.choices[0].message.content or ""


@step(semantics=_CHAT)
def outline(topic: str, template: str = OUTLINE_PROMPT) -> list[str]:
    """Three points about ``topic`` (the prompt is an argument: it is part of the identity)."""
    text = _complete(template.format(topic=topic))
    return [text[i : i + 24].strip() for i in range(0, min(len(text), 72), 24)]


@step(semantics=_CHAT)
def draft(points: Result[list[str]], template: str = DRAFT_PROMPT) -> str:
    return _complete(template.format(points="; ".join(points.value)))


@step
def word_count(text: Result[str]) -> int:
    return len(text.value.split())


def report(topic: str) -> dict[str, object]:
    points = outline(topic)
    text = draft(points)
    return {"points": points.value, "draft": text.value, "words": word_count(text).value}
