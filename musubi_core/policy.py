"""Replay policy: when may a stored result stand in for running the step again?

The decision is a pure function of the stored node, the step's configuration
and the clock, and always comes with a reason a person can read.

| step type         | replayed when the node is done, fresh and its artifact present |
|-------------------|-----------------------------------------------------------------|
| DETERMINISTIC     | always                                                          |
| STOCHASTIC        | only within ``ttl_seconds`` (no TTL: forever)                   |
| EXTERNAL_EFFECT   | always; the effect is never repeated. A started-but-unfinished  |
|                   | effect is "in doubt" and blocks until ``force_reexecution``     |

>>> decide(None, StepConfiguration(), now=0.0).reason
<ReplayReason.NOT_FOUND: 'not_found'>
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "RECORDED_ONLY_KINDS",
    "Decision",
    "NodeState",
    "ReplayReason",
    "StepConfiguration",
    "StepType",
    "decide",
    "expiry",
    "is_replayable_kind",
]


# Kinds that never replay: chains, spans, retrievers, tools (unless declared as a step), LlamaIndex
# query engines and workflows, and a durable run's own node. Their record is the call (version 1
# recorded some of them as nodes too); explain() says so instead of a verdict, and `musubi stats`
# leaves them out of the replay rate. Every other kind is replayable (see is_replayable_kind).
RECORDED_ONLY_KINDS = frozenset(
    {"chain", "span", "retriever", "tool", "workflow_step", "run", "query", "workflow"}
)


def is_replayable_kind(kind: str) -> bool:
    """Can a node or call of ``kind`` be served from the store (an LLM, chat model, embedding,
    ``@step``, durable step, KV entry, ...)? The one definition the replay rate uses.

    >>> is_replayable_kind("chat_model"), is_replayable_kind("chain")
    (True, False)
    """
    return kind not in RECORDED_ONLY_KINDS


class StepType(str, enum.Enum):
    """How a step's stored result may be reused."""

    DETERMINISTIC = "deterministic"
    STOCHASTIC = "stochastic"
    EXTERNAL_EFFECT = "external_effect"


class StepConfiguration(BaseModel):
    """Per-step replay settings.

    ``ttl_seconds`` bounds how long a STOCHASTIC result is reused; it is
    rejected for the other types, whose results do not go stale with time.
    ``force_reexecution`` always
    runs the step and replaces what was stored. ``version`` pins the code
    fingerprint: while it stays the same, edits to the function body do not
    invalidate stored results. ``strict_upstream`` turns off replay by content
    across upstream nodes (see :attr:`ReplayReason.CONTENT_HIT`).
    ``single_flight`` makes concurrent workers that miss the same node wait for
    one execution instead of each running it (see :mod:`musubi_core.flight`).

    >>> StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=3600).ttl_seconds
    3600.0
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    step_type: StepType = StepType.DETERMINISTIC
    ttl_seconds: float | None = Field(default=None, gt=0)
    force_reexecution: bool = False
    version: str | None = None
    # A call reaching a new node whose operation and input content (artifact ids included)
    # match a stored node's, through other upstream nodes, replays that node's output (see
    # ReplayReason.CONTENT_HIT). True keeps the strict rule: other upstream nodes, other node.
    strict_upstream: bool = False
    # Several workers reaching this missing node at once: one executes, the others wait for
    # its result (musubi_core.flight). Not part of identity.
    single_flight: bool = False

    @model_validator(mode="after")
    def _ttl_only_for_stochastic(self) -> StepConfiguration:
        if self.ttl_seconds is not None and self.step_type is not StepType.STOCHASTIC:
            raise ValueError(
                f"ttl_seconds applies to StepType.STOCHASTIC only ({self.step_type.name} "
                "results do not expire); drop ttl_seconds or use STOCHASTIC"
            )
        return self


class ReplayReason(str, enum.Enum):
    HIT = "hit"
    NOT_FOUND = "not_found"
    STALE = "stale"
    TTL_EXPIRED = "ttl_expired"
    FORCED = "forced"
    FAILED = "failed"
    PENDING = "pending"
    EFFECT_IN_DOUBT = "effect_in_doubt"
    ARTIFACT_MISSING = "artifact_missing"
    ARTIFACT_CORRUPT = "artifact_corrupt"
    NODE_CORRUPT = "node_corrupt"
    CODE_CHANGED = "code_changed"
    UPSTREAM_CHANGED = "upstream_changed"
    INPUT_CHANGED = "input_changed"
    # Reached through other upstream nodes, with the same operation and input content as a
    # stored node (the upstream outputs are the same artifacts): that node's output replays.
    CONTENT_HIT = "content_hit"
    # The node's kind is recorded, never replayed (chains, spans, retrievers, tools).
    RECORDED_ONLY = "recorded_only"


@dataclass(frozen=True, slots=True)
class Decision:
    """Whether to replay, and why (``detail`` is for people)."""

    replay: bool
    reason: ReplayReason
    detail: str = ""
    # The node the call reaches (set by explain()).
    node_id: str | None = None

    def __str__(self) -> str:
        verdict = "replay" if self.replay else "execute"
        return f"{verdict} ({self.reason.value}){': ' + self.detail if self.detail else ''}"


# The configuration of a step that sets none (immutable, so one shared instance).
DEFAULT_CONFIG = StepConfiguration()

# The decision of every plain hit (immutable, so one shared instance).
PLAIN_HIT = Decision(True, ReplayReason.HIT, "")


class NodeState(Protocol):
    """What the decision needs to know about a stored node."""

    @property
    def status(self) -> str: ...
    @property
    def finished_at(self) -> float | None: ...
    @property
    def expires_at(self) -> float | None: ...
    @property
    def artifact_id(self) -> str | None: ...


def decide(
    node: NodeState | None,
    config: StepConfiguration,
    *,
    now: float,
    artifact_present: bool = True,
    upstream_fresh: bool = False,
) -> Decision:
    """The replay decision for ``node`` under ``config`` at time ``now``.

    ``upstream_fresh`` is true when a node marked stale only because an
    ancestor was invalidated finds every data parent back with the very
    artifact it consumed (early cutoff): it replays.
    """
    if config.force_reexecution:
        return Decision(False, ReplayReason.FORCED, "force_reexecution=True")
    if node is None:
        return Decision(False, ReplayReason.NOT_FOUND, "no stored node with this identity")
    status = node.status
    if status == "pending":
        if config.step_type is StepType.EXTERNAL_EFFECT:
            return Decision(
                False,
                ReplayReason.EFFECT_IN_DOUBT,
                "the effect was started and never recorded an outcome",
            )
        return Decision(False, ReplayReason.PENDING, "a previous execution did not finish")
    if status == "failed":
        return Decision(False, ReplayReason.FAILED, "the last execution raised")
    if status == "stale" and not upstream_fresh:
        return Decision(False, ReplayReason.STALE, "invalidated (itself or an upstream node)")
    if status not in ("done", "stale"):
        return Decision(False, ReplayReason.NOT_FOUND, f"unknown status {status!r}")
    # A stale node revived by early cutoff gets every check a done node gets.
    if node.artifact_id is None or not artifact_present:
        return Decision(False, ReplayReason.ARTIFACT_MISSING, "the stored output is gone")
    expires_at = _effective_expiry(node, config)
    if expires_at is not None and now >= expires_at:
        return Decision(False, ReplayReason.TTL_EXPIRED, f"expired {now - expires_at:.0f}s ago")
    if status == "stale":
        return Decision(True, ReplayReason.HIT, "upstream re-ran with identical output")
    return PLAIN_HIT


def _effective_expiry(node: NodeState, config: StepConfiguration) -> float | None:
    """The stored expiry, tightened by the caller's current TTL: shortening a
    STOCHASTIC step's TTL (or making a step STOCHASTIC) applies to results
    already stored, not only to new ones."""
    expires_at = node.expires_at
    finished_at = node.finished_at
    if (
        config.step_type is StepType.STOCHASTIC
        and config.ttl_seconds is not None
        and finished_at is not None
    ):
        now_rule = finished_at + config.ttl_seconds
        return now_rule if expires_at is None else min(expires_at, now_rule)
    return expires_at


def expiry(config: StepConfiguration, finished_at: float) -> float | None:
    """When a result recorded at ``finished_at`` stops being replayable."""
    if config.step_type is not StepType.STOCHASTIC or config.ttl_seconds is None:
        return None
    return finished_at + config.ttl_seconds
