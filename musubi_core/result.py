"""``Result[T]``: what a ``@step`` call returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Result"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Result(Generic[T]):
    """The output of a step plus where it came from.

    ``value`` is the output. ``node_id`` is the lineage node this call reached;
    ``producer_node_id`` is the node that first produced this exact artifact
    (the same node unless another node had already produced identical content);
    ``artifact_id`` is the content address of the stored output; ``replayed``
    says whether the function body was skipped; ``call_id`` is the call (the record of this
    execution or replay) that returned it.

    Passing a ``Result`` to another step makes that step depend on it: the
    edge is recorded and the artifact id (not the node id) enters the input
    hash, so a re-executed upstream that yields the same output leaves its
    descendants replayable.

    >>> r = Result(value=3, node_id="n", producer_node_id="n", artifact_id="a", replayed=False)
    >>> r.value
    3
    """

    value: T
    node_id: str
    producer_node_id: str
    artifact_id: str
    replayed: bool
    # The call that returned it (the record of this execution or replay, see `musubi steps`).
    call_id: str | None = None
