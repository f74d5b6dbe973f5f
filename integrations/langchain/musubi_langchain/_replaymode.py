"""Replay mode for the LangChain cache: the :class:`~musubi_core.errors.ReplayMissError` of a
model call that has no recording, and the identity material kept with every recording so that
such an error can say what changed.

What is kept (in the node's ``meta``, see :mod:`musubi_core.replay_miss`): the canonical key
parts, that is the prompt's messages with their volatile fields removed (ids, usage and
response metadata, provider tool-call ids replaced by positional aliases), the call parameters
(bound tools, stop words, structured-output schema) and the model parameters. API keys never
enter the key parts (``_keys`` drops LangChain's secrets), and values under names such as
``api_key`` or ``authorization`` are redacted again when the material is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from musubi_core.errors import ReplayMissError
from musubi_core.identity import NodeKey
from musubi_core.replay_miss import material, store_failure_error
from musubi_core.replay_miss import miss_error as core_miss_error

from ._keys import KeyParts

if TYPE_CHECKING:
    from .cache import MusubiCache

__all__ = ["call_material", "miss_error", "store_failure"]


def call_material(parts: KeyParts) -> dict[str, Any]:
    """The material of one model call (its canonical inputs and model parameters)."""
    return material(parts.inputs, parts.fingerprint)


def _kind(op_name: str) -> str:
    return "chat_model" if op_name.startswith("chat_model:") else "llm"


def _model(parts: KeyParts) -> str | None:
    fingerprint = parts.fingerprint if isinstance(parts.fingerprint, dict) else {}
    params = fingerprint.get("params")
    if isinstance(params, dict):
        for name in ("model_name", "model", "model_id", "deployment_name"):
            value = params.get(name)
            if isinstance(value, str):
                return value
    return None


def miss_error(
    cache: MusubiCache, prompt: str, llm_string: str, key: NodeKey | None = None
) -> ReplayMissError:
    """The error of a call with no recording to replay (reads the store; never writes)."""
    parts = cache.key_parts(prompt, llm_string)
    try:
        if key is None:
            key = cache.node_key(prompt, llm_string)
        decision = cache.decision(key)
    except Exception as exc:
        return store_failure(cache, prompt, llm_string, exc)
    return core_miss_error(
        cache.engine,
        key,
        decision,
        kind=_kind(key.op_name),
        model=_model(parts),
        material_of=lambda: call_material(parts),
    )


def store_failure(
    cache: MusubiCache, prompt: str, llm_string: str, error: BaseException
) -> ReplayMissError:
    """Replay mode and the store failed: the call still must not reach the provider."""
    try:
        parts = cache.key_parts(prompt, llm_string)
        op_name = parts.op_name
    except Exception:
        op_name = "chat_model"
    return store_failure_error(
        kind=_kind(op_name),
        op_name=op_name,
        node_id=None,
        store=str(cache._path) if cache._path is not None else None,
        error=error,
    )
