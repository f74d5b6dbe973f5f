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
    "ConfigError",
    "CorruptNodeError",
    "DecodeError",
    "DivergenceError",
    "DuplicateStepError",
    "EffectInDoubtError",
    "IdentityError",
    "InvalidStepNameError",
    "LockedError",
    "MusubiError",
    "NodeNotFoundError",
    "ReadOnlyStoreError",
    "ReplayMissError",
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


class IdentityError(MusubiError, TypeError):
    """An input (or a method's receiver) cannot be given a stable identity; ``path`` names
    where (``$.messages[3]``, ``$.self``). Also a ``TypeError``."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


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


class ConfigError(MusubiError, ValueError):
    """A setting names something musubi cannot use: ``--db`` / ``$MUSUBI_DB``
    with an unknown URL scheme, or a directory where a store file belongs.
    ``target`` is the value as given (with any password hidden)."""

    def __init__(self, message: str, *, target: str) -> None:
        super().__init__(message)
        self.target = target


class ReadOnlyStoreError(StoreError):
    """The store is read-only (its file, folder or file system): it serves reads and
    replays, but nothing can be written to it. An :class:`~musubi_core.engine.Engine`
    skips its writes instead (one warning); the store's own write methods raise this."""

    def __init__(self, path: str, *, action: str = "write", hint: str | None = None) -> None:
        super().__init__(
            f"cannot {action}: {path} is read-only (the file, its folder or its file system); "
            "musubi replays from a read-only store but records nothing in it. "
            + (
                hint[:1].upper() + hint[1:]
                if hint
                else "Make the file and its folder writable for this user, or record into a "
                f"writable copy (`musubi --db {path} backup COPY`, then MUSUBI_DB=COPY)"
            ),
            path=path,
        )
        self.action = action


class CorruptNodeError(StoreError):
    """A stored node has a column whose value cannot be what musubi wrote (text in a
    timestamp, a number that is not a number, a missing required value), e.g. after a
    hand edit or damage. Replays treat the node as a miss (one warning); other reads raise."""

    def __init__(self, node_id: str, column: str, value: Any, *, path: str | None = None) -> None:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        where = f" in {path}" if path else ""
        super().__init__(
            f"node {node_id[:16]}{where} has an unreadable {column} ({shown}); run "
            f"`musubi{f' --db {path}' if path else ''} check` to list such rows, then fix or "
            "delete them (a deleted node is recomputed on its next call)",
            path=path,
        )
        self.node_id = node_id
        self.column = column
        self.value = value


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
    """A step name (or a durable run id: ``what="run id"``) does not match
    ``^[A-Za-z0-9][A-Za-z0-9._-]*$``, or is longer than ``max_length``."""

    def __init__(
        self, name: object, *, what: str = "step name", max_length: int | None = None
    ) -> None:
        shown = repr(name)
        if isinstance(name, str) and len(name) > 60:
            shown = f"{name[:40]!r}... ({len(name)} characters)"
        limit = ""
        if max_length is not None:
            limit = f", at most {max_length} characters (the run's lock file is named after it)"
        super().__init__(
            f"invalid {what} {shown}: use letters, digits, '.', '_' or '-', "
            f"starting with a letter or digit{limit}"
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
            if what in ("node", "node or call"):
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


class ReplayMissError(MusubiError):
    """Replay mode (``MUSUBI_MODE=replay``, ``--musubi-mode=replay``, ``mode="replay"``) reached
    a call that has no recording it may replay: nothing was sent to the provider and the step
    did not run. The message names the call and the nearest recorded node of the same
    operation, with what differs (``differences``: one readable line each, e.g.
    ``messages[0].content: "...old..." -> "...new..."``).

    Fields: ``kind`` (``chat_model``, ``llm``, ``embedding``, ``step``, ...), ``op_name``,
    ``model`` (when known), ``node_id`` (the node the call reached), ``reason`` (why it did not
    replay, a :class:`~musubi_core.policy.ReplayReason` value), ``nearest_node_id`` and
    ``differences``, ``store`` (the store's path)."""

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        op_name: str,
        node_id: str,
        reason: str,
        model: str | None = None,
        nearest_node_id: str | None = None,
        differences: list[str] | None = None,
        store: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.op_name = op_name
        self.node_id = node_id
        self.reason = reason
        self.model = model
        self.nearest_node_id = nearest_node_id
        self.differences = list(differences or [])
        self.store = store
