"""``@step``, ``merge()`` and the plumbing that turns a call into a node.

>>> import tempfile, os
>>> from musubi_core import Engine, SQLiteStore, use_engine
>>> calls = []
>>> @step()
... def shout(text: str) -> str:
...     calls.append(text)
...     return text.upper()
>>> with Engine(SQLiteStore(os.path.join(tempfile.mkdtemp(), "m.db"))) as engine:
...     with use_engine(engine):
...         first, second = shout("hi"), shout("hi")
>>> (first.value, second.replayed, len(calls))
('HI', True, 1)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import typing
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import Any, Generic, ParamSpec, TypeVar, overload

from .codec import allow_annotation
from .engine import Engine, Outcome, get_engine
from .errors import IdentityError
from .fastpath import seen_before
from .identity import (
    NodeKey,
    function_fingerprint,
    input_hash,
    make_node_id,
    make_op,
    receiver_identity,
)
from .modes import Mode
from .policy import Decision, StepConfiguration, StepType
from .record.scope import CallScope
from .replay_miss import material
from .result import Result

__all__ = ["StepFunction", "merge", "step"]

P = ParamSpec("P")
R = TypeVar("R")

_MERGED: ContextVar[tuple[Result[Any], ...]] = ContextVar("musubi_merged", default=())

# Keys a step remembers (StepFunction._identity), and the longest string argument remembered.
_MAX_KEYS = 4096
_MAX_KEY_TEXT = 256


def _key_atom(value: object) -> bool:
    """An argument whose equality is its identity: an exact ``int``, ``None`` or a short
    ``str`` (``True == 1`` and ``0.0 == -0.0`` hash alike but encode differently, so bools
    and floats are not)."""
    kind = type(value)
    return kind is int or value is None or (kind is str and len(value) <= _MAX_KEY_TEXT)  # type: ignore[arg-type]


@contextlib.contextmanager
def merge(*parents: Result[Any]) -> Iterator[None]:
    """Declare explicit upstream results for the steps called inside the block.

    Use it for fan-in, or when a step depends on results it does not take as
    arguments. The parents enter each step's identity and get ``data`` edges.

    >>> with merge():
    ...     pass
    """
    for parent in parents:
        if not isinstance(parent, Result):
            raise TypeError(
                f"merge() takes Result objects returned by steps, got {type(parent).__name__}"
            )
    token = _MERGED.set(_MERGED.get() + parents)
    try:
        yield
    finally:
        _MERGED.reset(token)


_UNBOUND: Any = object()
_RECEIVER_NAMES = ("self", "cls")

# What a call's identity is made of: its node key, its upstream (node id -> artifact id), the
# Results it consumes, its identity arguments, and the engine the key was made for.
_Identity = tuple[NodeKey, dict[str, str], list[Result[Any]], dict[str, Any], Engine]


def _receiver(
    fn: Callable[..., Any], param_names: list[str], binds: str
) -> tuple[str | None, Any, bool]:
    """The name of ``fn``'s receiver parameter (``None``: it has none); the receiver itself
    when ``fn`` already carries it (a bound method, or a partial over a method given its first
    argument), else ``_UNBOUND`` (it is the first argument of each call); and whether it is
    that partial's first argument."""
    if binds == "nothing":
        return None, _UNBOUND, False
    if binds == "class":
        return (param_names[0] if param_names else None), _UNBOUND, False
    inner = fn.func if isinstance(fn, functools.partial) else fn
    if inspect.ismethod(inner):  # step(obj.method): the receiver came with it
        names = list(inspect.signature(inner.__func__).parameters)
        return (names[0] if names else "self"), inner.__self__, False
    if isinstance(fn, functools.partial) and fn.args:
        names = list(inspect.signature(inner).parameters)
        if names[:1] and names[0] in _RECEIVER_NAMES:  # partial(Worker.run, worker)
            return names[0], fn.args[0], True
    if param_names[:1] and param_names[0] in _RECEIVER_NAMES:
        return param_names[0], _UNBOUND, False
    return None, _UNBOUND, False


class StepFunction(Generic[P, R]):
    """A function wrapped by :func:`step`. Calling it returns ``Result[R]``
    (awaitable for ``async def`` functions)."""

    def __init__(
        self,
        fn: Callable[P, Any],
        *,
        semantics: StepConfiguration,
        name: str | None,
        engine: Engine | None,
        ignore: tuple[str, ...] = (),
    ) -> None:
        # @step over @staticmethod / @classmethod: the step is the descriptor (see __get__).
        self._binds: str = "instance"
        if isinstance(fn, staticmethod | classmethod):
            self._binds = "nothing" if isinstance(fn, staticmethod) else "class"
            fn = fn.__func__
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"@step cannot wrap generator function {getattr(fn, '__qualname__', fn)!r}: "
                "its output is produced lazily; return a list instead"
            )
        self.fn = fn
        self.semantics = semantics
        # A functools.partial is named after the function it wraps; its bound
        # arguments join the fingerprint below.
        target = fn.func if isinstance(fn, functools.partial) else fn
        qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
        self.label = qualname
        self.name = name or f"{getattr(target, '__module__', None) or 'builtins'}.{qualname}"
        self._engine = engine
        self._signature = inspect.signature(fn)
        param_names = list(self._signature.parameters)
        # A method's receiver is an input like any other: Worker("a").run(x) and
        # Worker("b").run(x) are different calls. It enters identity under its parameter name
        # (see identity.receiver_identity) unless ``ignore`` names it.
        receiver, self._bound_receiver, in_partial = _receiver(fn, param_names, self._binds)
        self.ignore = frozenset(ignore)
        unknown = set(ignore) - set(param_names) - {receiver}
        if unknown:
            raise TypeError(f"@step(ignore=...) names no parameter of {qualname}: {sorted(unknown)}")
        self._receiver = receiver if receiver not in self.ignore else None
        self.is_async = inspect.iscoroutinefunction(fn)
        # The code fingerprint: a version pin wins over the AST hash, so a
        # user can refactor without invalidating stored results.
        self.fingerprint: dict[str, Any] = (
            {"version": semantics.version}
            if semantics.version is not None
            else {"code": function_fingerprint(target)}
        )
        if isinstance(fn, functools.partial):
            # A receiver the partial binds enters each call's input hash, as any receiver.
            bound_args = fn.args[1:] if in_partial else fn.args
            self.fingerprint["partial"] = [list(bound_args), dict(fn.keywords)]
        with contextlib.suppress(Exception):
            hints = typing.get_type_hints(fn)
            if "return" in hints:
                allow_annotation(hints["return"])
        # Hot path: the op (name + fingerprint digest) is computed once, not per
        # call; and a call with positional arguments only, to a function whose
        # parameters are all plain positional ones, skips Signature.bind.
        self._op_for: tuple[str, Any] = (self.name, self.fingerprint)
        self._op = make_op(self.name, self.fingerprint)
        params = tuple(self._signature.parameters.values())
        simple = all(
            p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            for p in params
        )
        self._names: tuple[str, ...] | None = tuple(p.name for p in params) if simple else None
        self._defaults: tuple[Any, ...] = tuple(p.default for p in params)
        # Keys of calls made with short strings, ints and None only, by their arguments as
        # passed (see _key_atom): such arguments, with defaults of those kinds, hash alike
        # exactly when they are equal. Receivers, ignored parameters and merge() change what
        # enters the hash, so their calls are not remembered.
        empty = inspect.Parameter.empty
        self._remembers_keys = (
            self._names is not None
            and self._receiver is None
            and not self.ignore
            and all(d is empty or _key_atom(d) for d in self._defaults)
        )
        self._keys: dict[tuple[Any, ...], tuple[NodeKey, dict[str, Any]]] = {}
        self._keys_seen: set[int] = set()  # hashes of the arguments met once (seen_before)
        with contextlib.suppress(AttributeError, TypeError):
            functools.update_wrapper(self, fn)
        if self.is_async and hasattr(inspect, "markcoroutinefunction"):
            # 3.12+: inspect.iscoroutinefunction(step_fn) stays true.
            inspect.markcoroutinefunction(self)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        """Decorating a method: ``obj.method(x)`` calls the step with ``obj`` bound (and, as
        the receiver, part of identity); over a classmethod, with the class; over a
        staticmethod, with nothing."""
        if self._binds == "class":
            return _BoundStep(self, owner if owner is not None else type(instance))
        if instance is None or self._binds == "nothing":
            return self
        return _BoundStep(self, instance)

    @property
    def engine(self) -> Engine:
        return self._engine or get_engine()

    def key(self, *args: Any, **kwargs: Any) -> tuple[NodeKey, dict[str, str]]:
        """The node identity a call with these arguments reaches."""
        key, upstream_artifacts, _found, _arguments, _engine = self._identity(args, kwargs)
        return key, upstream_artifacts

    def _identity(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Identity:
        """The node key, its upstream (node id -> artifact id), the Results the arguments
        hold (and merge() adds), the identity arguments, and the engine the key was made
        for (its namespace is part of the node id)."""
        if self._op_for[0] is not self.name or self._op_for[1] is not self.fingerprint:
            # name or fingerprint was reassigned after decoration
            self._op_for = (self.name, self.fingerprint)
            self._op = make_op(self.name, self.fingerprint)
            self._keys = {}
        remember = (
            self._remembers_keys
            and all(map(_key_atom, args))
            and (not kwargs or all(map(_key_atom, kwargs.values())))
            and not _MERGED.get()
        )
        passed: tuple[Any, ...] = ()
        if remember:
            # The same arguments passed the same way bind the same way (f(1, 2) and
            # f(1, b=2) are two entries for one key).
            passed = args if not kwargs else (args, tuple(kwargs.items()))
            known = self._keys.get(passed)
            if known is not None:
                engine = self.engine
                if known[0].namespace == engine.namespace:
                    return known[0], {}, [], dict(known[1]), engine
        arguments = self._arguments(args, kwargs)
        receiver = self._receiver
        if receiver is not None:
            raw = arguments[receiver] if self._bound_receiver is _UNBOUND else self._bound_receiver
            arguments[receiver] = receiver_identity(raw, self.label, receiver)
        # Same recipe as Engine.key, with the op computed once per function.
        # The hash walk collects every Result it hashes, however nested.
        found: list[Result[Any]] = []
        merged = _MERGED.get()
        try:
            if merged:
                # merge() parents enter by artifact too: a parent re-executed with
                # a different output must not leave this node replaying.
                inputs: Any = {"args": arguments, "merged": sorted({r.artifact_id for r in merged})}
                in_hash = input_hash(inputs, found)
                found.extend(merged)
            else:
                in_hash = input_hash(arguments, found)
        except IdentityError as err:
            if receiver is None or not re.match(rf"\$(\.args)?\.{receiver}($|[.\[])", err.path):
                raise
            raise IdentityError(
                f"{err}. This is inside `{receiver}`, the receiver of @step method {self.label}: "
                f"define {type(raw).__qualname__}.__musubi_identity__(self) returning only the "
                f"values that decide the result, or opt out with @step(ignore=({receiver!r},))",
                err.path,
            ) from None
        upstream_artifacts = {r.node_id: r.artifact_id for r in found}
        ups = tuple(sorted(upstream_artifacts)) if upstream_artifacts else ()
        # The engine is resolved after hashing: a bad input raises before any store opens.
        engine = self.engine
        ns = engine.namespace
        node_id = make_node_id(self._op, in_hash, ups, ns)
        key = NodeKey(node_id, self._op, self.name, in_hash, ups, ns)
        if remember and seen_before(self._keys_seen, hash(passed), _MAX_KEYS):
            if len(self._keys) >= _MAX_KEYS:
                self._keys = {}
            self._keys[passed] = (key, dict(arguments))
        return key, upstream_artifacts, found, arguments, engine

    def _arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The arguments that make up identity: bound, defaults applied,
        ignored names dropped, in parameter order."""
        arguments = self._bind(args, kwargs)
        if self.ignore:
            for name in self.ignore:
                arguments.pop(name, None)
        return arguments

    def _bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """``Signature.bind`` + ``apply_defaults``, as a dict in parameter order."""
        names = self._names
        if names is not None and not kwargs and len(args) <= len(names):
            arguments = dict(zip(names, args, strict=False))
            empty = inspect.Parameter.empty
            for index in range(len(args), len(names)):
                default = self._defaults[index]
                if default is empty:
                    break  # a missing argument: let bind() raise its TypeError
                arguments[names[index]] = default
            else:
                return arguments
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments)

    def explain(self, *args: Any, **kwargs: Any) -> Decision:
        """Would this call replay? Returns the decision and its reason (and, as
        ``.node_id``, the node the call reaches) without running anything or counting a
        replay."""
        key, _upstream, _found, _arguments, engine = self._identity(args, kwargs)
        return engine.explain(key, self.semantics)

    def _scope(
        self, engine: Engine, found: list[Result[Any]], arguments: dict[str, Any]
    ) -> CallScope:
        """The record of this call: in the current run (or a run of its own), with a flow
        from each call whose Result it consumes."""
        return CallScope(
            engine.recorder,
            "step",
            self.name,
            run_kind="step",
            run_name=self.label,
            namespace=engine.namespace,
            inputs=arguments,
            flows_from=[(r.call_id, r.artifact_id) for r in found if r.call_id],
        )

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        # Identity is settled at the call, for async steps too: a bad input or an undeclared
        # receiver raises here, not when (or if) the coroutine is awaited.
        identity = self._identity(args, kwargs)
        if self.is_async:
            return self._acall(identity, args, kwargs)
        key, upstream_artifacts, found, arguments, engine = identity
        if engine.mode is Mode.OFF:  # musubi steps aside: no lookup, no record
            return _unrecorded(engine.execute(key, lambda: self.fn(*args, **kwargs)))
        with self._scope(engine, found, arguments) as scope:
            outcome = engine.execute(
                key,
                lambda: self.fn(*args, **kwargs),
                self.semantics,
                kind="step",
                label=self.label,
                upstream_artifacts=upstream_artifacts,
                material=_material_of(arguments),
            )
            return _result(scope, outcome)

    async def _acall(
        self, identity: _Identity, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Result[Any]:
        key, upstream_artifacts, found, arguments, engine = identity
        fn = typing.cast(Callable[..., Awaitable[Any]], self.fn)
        if engine.mode is Mode.OFF:
            return _unrecorded(await engine.aexecute(key, lambda: fn(*args, **kwargs)))
        with self._scope(engine, found, arguments) as scope:
            outcome = await engine.aexecute(
                key,
                lambda: fn(*args, **kwargs),
                self.semantics,
                kind="step",
                label=self.label,
                upstream_artifacts=upstream_artifacts,
                material=_material_of(arguments),
            )
            return _result(scope, outcome)

    def __repr__(self) -> str:
        return f"<musubi step {self.name} ({self.semantics.step_type.value})>"


def _material_of(arguments: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """The identity material of a call (kept with its recording; see ``replay_miss``)."""
    merged = _MERGED.get()

    def make() -> dict[str, Any]:
        if merged:
            return material({"args": arguments, "merged": sorted({r.artifact_id for r in merged})})
        return material(arguments)

    return make


def _unrecorded(outcome: Outcome) -> Result[Any]:
    """Off mode's Result: the value as executed, no call recorded."""
    return Result(outcome.value, outcome.node_id, outcome.node_id, outcome.artifact_id, False)


def _result(scope: CallScope, outcome: Outcome) -> Result[Any]:
    """Record the call's outcome and hand the caller its Result."""
    scope.done(
        node_id=outcome.node_id,
        artifact_id=outcome.artifact_id,
        replayed=outcome.replayed,
        output=outcome.value,
        tokens_in=outcome.tokens_in,
        tokens_out=outcome.tokens_out,
        saved_s=outcome.saved_s,
    )
    return Result(
        outcome.value,
        outcome.node_id,
        outcome.producer_node_id,
        outcome.artifact_id,
        outcome.replayed,
        scope.call_id,
    )


class _BoundStep:
    """A step method bound to its instance (or, over a classmethod, its class)."""

    def __init__(self, step: StepFunction[Any, Any], instance: Any) -> None:
        self.step = step
        self.instance = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.step(self.instance, *args, **kwargs)

    def explain(self, *args: Any, **kwargs: Any) -> Decision:
        return self.step.explain(self.instance, *args, **kwargs)

    def key(self, *args: Any, **kwargs: Any) -> tuple[NodeKey, dict[str, str]]:
        return self.step.key(self.instance, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<bound {self.step!r} of {type(self.instance).__name__}>"


@overload
def step(fn: Callable[P, R], /) -> StepFunction[P, R]: ...


@overload
def step(
    *,
    semantics: StepConfiguration | None = None,
    name: str | None = None,
    version: str | None = None,
    step_type: StepType | None = None,
    ttl_seconds: float | None = None,
    engine: Engine | None = None,
    ignore: tuple[str, ...] = (),
    strict_upstream: bool | None = None,
    single_flight: bool | None = None,
) -> Callable[[Callable[P, R]], StepFunction[P, R]]: ...


def step(
    fn: Callable[P, R] | None = None,
    /,
    *,
    semantics: StepConfiguration | None = None,
    name: str | None = None,
    version: str | None = None,
    step_type: StepType | None = None,
    ttl_seconds: float | None = None,
    engine: Engine | None = None,
    ignore: tuple[str, ...] = (),
    strict_upstream: bool | None = None,
    single_flight: bool | None = None,
) -> StepFunction[P, R] | Callable[[Callable[P, R]], StepFunction[P, R]]:
    """Make a function a lineage node: same inputs, same code, same upstream
    results -> the stored output is returned instead of running it again.

    ``@step`` and ``@step()`` use the defaults (DETERMINISTIC). ``semantics``
    takes a full :class:`StepConfiguration`; ``step_type``, ``ttl_seconds`` and
    ``version`` are shortcuts for its fields. ``name`` overrides the operation
    name (default ``module.qualname``): keep it stable if you move the code.
    ``ignore`` names parameters that do not enter identity (a client, a
    logger). A method's receiver does enter it: a dataclass, pydantic or attrs
    instance by its fields, any object by its ``__musubi_identity__()``, a
    classmethod's ``cls`` by its qualified name; any other receiver raises a
    ``TypeError`` at the call unless ``ignore=("self",)`` opts out.
    ``strict_upstream=True`` turns off replay by content across upstream nodes:
    a call reaching the same inputs through other upstream nodes then executes.
    ``single_flight=True``: when several workers (threads, processes, machines
    sharing the store) miss the same call at once, one executes it and the
    others wait for its stored result (:mod:`musubi_core.flight`).
    """
    config = semantics or StepConfiguration()
    overrides: dict[str, Any] = {}
    if step_type is not None:
        overrides["step_type"] = step_type
    if ttl_seconds is not None:
        overrides["ttl_seconds"] = ttl_seconds
    if version is not None:
        overrides["version"] = version
    if strict_upstream is not None:
        overrides["strict_upstream"] = strict_upstream
    if single_flight is not None:
        overrides["single_flight"] = single_flight
    if overrides:
        config = StepConfiguration(**{**config.model_dump(), **overrides})

    def wrap(f: Callable[P, R]) -> StepFunction[P, R]:
        if not callable(f) and not isinstance(f, staticmethod | classmethod):
            raise TypeError(f"@step decorates functions, got {type(f).__name__}")
        return StepFunction(f, semantics=config, name=name, engine=engine, ignore=tuple(ignore))

    if fn is not None:
        return wrap(fn)
    return wrap
