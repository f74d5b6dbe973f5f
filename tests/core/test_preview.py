"""Previews: the flat-dict shortcut gives exactly the text the general renderer gives."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from musubi_core.record.preview import PREVIEW_CHARS, _render, preview, storable_text

_SCALAR = st.one_of(
    st.integers(), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=80)
)


def _general(value: Any, limit: int = PREVIEW_CHARS) -> str:
    parts: list[str] = []
    _render(value, parts, limit, 0)
    text = "".join(parts)
    return storable_text(text if len(text) <= limit else text[: limit - 1] + "…")


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=15), _SCALAR, max_size=10))
def test_a_flat_dict_previews_as_the_general_renderer_does(value: dict[str, Any]) -> None:
    assert preview(value) == _general(value)


def test_nested_and_long_values_take_the_general_path() -> None:
    nested = {"doc": {"id": 3}, "tags": ["a", "b"]}
    assert preview(nested) == "{doc: {id: 3}, tags: ['a', 'b']}"
    long = {"text": "x" * 500}
    out = preview(long)
    assert out is not None and len(out) == PREVIEW_CHARS and out.endswith("…")
    assert out == _general(long)
