"""One exception tree for everything musubi raises.

Every error is a :class:`MusubiError`; each subclass carries the structured
fields a caller needs to act on it (a node id, a path, what was expected versus
what was recorded) and a message that says what to do next.

>>> try:
...     raise LockedError("/tmp/x.db")
... except MusubiError as err:
...     print(type(err).__name__, err.path)
LockedError /tmp/x.db
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "DecodeError",
    "DivergenceError",
    "DuplicateStepError",
    "EffectInDoubtError",
    "InvalidStepNameError",
    "LockedError",
    "MusubiError",
    "NodeNotFoundError",
    "SchemaError",
    "SerializationError",
    "StepFailedError",
    "StoreError",
]


class MusubiError(Exception):
    """Root of every error musubi raises on purpose."""


class SerializationError(MusubiError):
    """A value could not be encoded (or would not survive the round trip).

    ``path`` names the offending spot (``$.items[2].when``); ``value`` is the
    whole computed value, attached so an expensive result is never lost just
    because it could not be stored.
    """

    def __init__(self, message: str, *, path: str = "$", value: Any = None) -> None:
        super().__init__(message)
        self.path = path
        self.value = value


class DecodeError(MusubiError):
    """A stored artifact could not be decoded (unknown encoding, tampered or
    not allow-listed class). Callers treat it as a miss and recompute."""

    def __init__(self, message: str, *, artifact_id: str | None = None) -> None:
        super().__init__(message)
        self.artifact_id = artifact_id


class SchemaError(MusubiError):
    """The file is not a musubi store this version can open."""

    def __init__(
        self, message: str, *, path: str, expected: str | None = None, found: str | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.found = found


class StoreError(MusubiError):
    """The store could not be read or written (disk full, read-only file,
    file removed, corrupt database). Adapters degrade to a miss on it."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class LockedError(MusubiError):
    """Another live process holds the run's lock."""

    def __init__(self, path: str, *, run_id: str | None = None) -> None:
        target = f"run {run_id!r} in {path}" if run_id else path
        super().__init__(
            f"{target} is being executed by another process; wait for it to finish "
            "or stop it, then run again (the lock is released automatically when "
            "its holder exits, even on kill -9)"
        )
        self.path = path
        self.run_id = run_id


class DuplicateStepError(MusubiError):
    """A durable-run body used the same step name twice."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"step name {name!r} is used twice in this run; give each ctx.step/ctx.sleep "
            "a unique name (e.g. suffix a loop index: f'{name}-{i}')"
        )
        self.name = name


class InvalidStepNameError(MusubiError, ValueError):
    """A step name does not match ``^[A-Za-z0-9][A-Za-z0-9._-]*$``."""

    def __init__(self, name: object) -> None:
        super().__init__(
            f"invalid step name {name!r}: use letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
        self.name = name


class StepFailedError(MusubiError):
    """A durable step raised; ``original`` is the exception it raised. The step
    is recorded as failed and runs again on the next invocation."""

    def __init__(self, name: str, original: BaseException) -> None:
        super().__init__(
            f"step {name!r} failed: {original!r}; fix the cause and run again "
            "(completed steps will not re-run)"
        )
        self.name = name
        self.original = original


class EffectInDoubtError(MusubiError):
    """An EXTERNAL_EFFECT step cannot be replayed and must not be repeated
    blindly: it started earlier and never recorded an outcome (``reason``
    ``"died"``), its recorded outcome is unreadable (``"lost"``), or another
    process is still executing it past the wait limit (``"timeout"``)."""

    def __init__(
        self,
        node_id: str,
        *,
        op: str | None = None,
        owner: str | None = None,
        reason: str = "died",
        waited_s: float | None = None,
    ) -> None:
        what = f"external effect {op or ''} (node {node_id[:12]})"
        if reason == "timeout":
            message = (
                f"{what} is still being executed by {owner or 'another process'} after "
                f"{waited_s or 0:.0f}s; wait for it, or raise "
                "musubi_core.engine.EFFECT_WAIT_SECONDS"
            )
        elif reason == "lost":
            message = (
                f"{what} ran, but its stored result is missing or unreadable, so musubi cannot "
                "replay it and will not repeat it blindly; check the external system, then re-run "
                "with StepConfiguration(step_type=EXTERNAL_EFFECT, force_reexecution=True)"
            )
        else:
            message = (
                f"{what} was started by {owner or 'a process'} that stopped before recording "
                "its outcome, so the effect may already have happened; check the external "
                "system, then re-run with "
                "StepConfiguration(step_type=EXTERNAL_EFFECT, force_reexecution=True)"
            )
        super().__init__(message)
        self.node_id = node_id
        self.op = op
        self.owner = owner
        self.reason = reason


class NodeNotFoundError(MusubiError, LookupError):
    """No node (or call, or run: ``what``) matches the given id or prefix, or the prefix is
    ambiguous. The message names a command that lists what exists."""

    _LISTINGS: ClassVar[dict[str, str]] = {
        "node": "musubi nodes",
        "call": "musubi steps RUN",
        "run": "musubi runs",
    }

    def __init__(
        self,
        ref: str,
        *,
        candidates: list[str] | None = None,
        what: str = "node",
        listing: str | None = None,
    ) -> None:
        listing = listing or self._LISTINGS.get(what, "musubi nodes")
        if candidates:
            shown = ", ".join(c[:16] for c in candidates[:5])
            message = f"{what} prefix {ref!r} is ambiguous ({shown}, ...); give more characters"
        else:
            message = f"no {what} matches {ref!r}; list them with `{listing}`"
            if what == "node":
                message += " (or `musubi runs`, then `musubi steps RUN` for a run's calls)"
        super().__init__(message)
        self.ref = ref
        self.what = what
        self.candidates = candidates or []


class DivergenceError(MusubiError):
    """A resumed durable run reached a step whose recorded kind or code differs
    from what the body now does."""

    def __init__(
        self, name: str, *, what: str, expected: str, recorded: str, run_id: str | None = None
    ) -> None:
        super().__init__(
            f"step {name!r} changed since it was recorded ({what}: recorded {recorded!r}, "
            f"now {expected!r}); to accept the change and re-run from this step, call "
            f"run(..., rerun_from={name!r}) or `musubi steps RUN` to inspect"
        )
        self.name = name
        self.what = what
        self.expected = expected
        self.recorded = recorded
        self.run_id = run_id
