"""Deterministic node identity: canonical encoding and the ``musubi/1`` hash scheme.

A node is identified by ``sha256("musubi/1", op, input_hash, sorted(upstream))``.
``input_hash`` is the SHA-256 of the type-tagged canonical JSON of the inputs
(see :mod:`musubi_core._tagged`). Nothing here uses ``hash()``, ``repr()`` of
arbitrary objects, ``pickle`` or memory addresses, so identities agree across
processes, ``PYTHONHASHSEED`` values, machines and Python versions.

>>> input_hash(1) != input_hash(1.0) != input_hash(True) != input_hash("1")
True
>>> input_hash({"a": 1, "b": 2}) == input_hash({"b": 2, "a": 1})
True
"""

from __future__ import annotations

import ast
import enum
import hashlib
import inspect
import json
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, is_dataclass
from typing import Any

from pydantic import BaseModel

from ._plain import NOT_PLAIN, SORTED_JSON, plain_tree
from ._tagged import (
    MAX_DEPTH,
    TagError,
    class_path,
    encode,
    register_encoder,
    registered_encoders,
    with_fresh_stack,
)
from .errors import ConfigError, IdentityError
from .result import Result

__all__ = [
    "DEFAULT_NAMESPACE",
    "AliasPrefix",
    "alias_of",
    "HASH_SCHEME",
    "NodeKey",
    "canonical_bytes",
    "check_namespace",
    "collect_results",
    "function_fingerprint",
    "input_hash",
    "make_node_id",
    "make_op",
    "receiver_identity",
    "register_encoder",
    "resolve_namespace",
]

HASH_SCHEME = "musubi/1"
# The namespace of every node written before namespaces entered identity, and the one whose
# node ids are exactly the ``musubi/1`` ids (existing stores keep replaying).
DEFAULT_NAMESPACE = "default"
# The first field of a node id's material in any other namespace: never equal to HASH_SCHEME
# (whose material goes on with \x1f), so no id of one namespace can be an id of another.
_NAMESPACED_SCHEME = HASH_SCHEME + "+namespace"


# Inputs may nest as deep as stored values, below the containers musubi itself wraps them in
# (a step's argument mapping, merge()'s {"args": ..., "merged": ...}, a receiver's
# [kind, class, fields] form): a stored output passed on as an argument is always hashable.
INPUT_MAX_DEPTH = MAX_DEPTH + 4


def _result_hook(value: Any) -> Any:
    if type(value) is Result:
        # The artifact id, not the node id: an upstream re-executed with the
        # same output leaves this input hash, and so its descendants, unchanged.
        return {"$result": value.artifact_id}
    return NotImplemented


def _collecting_hook(found: list[Result[Any]]) -> Any:
    def hook(value: Any) -> Any:
        if type(value) is Result:
            found.append(value)
            return {"$result": value.artifact_id}
        return NotImplemented

    return hook


def canonical_bytes(value: Any, results: list[Result[Any]] | None = None) -> bytes:
    """The canonical, type-tagged JSON encoding of ``value`` as UTF-8 bytes.

    Every :class:`Result` met on the way (however deeply nested: in lists,
    dicts, dataclasses, models) is appended to ``results`` when given, so the
    caller links exactly the upstream nodes whose artifacts were hashed.

    Raises ``TypeError`` (an ``IdentityError``) naming the JSON-path of the
    first value that has no stable encoding.
    """
    try:
        # Plain JSON data (no Result in it: a Result is not plain) is its own canonical tree:
        # the C encoder with sorted keys writes the same bytes as the tagged encoder would.
        plain = plain_tree(value)
        if plain is not NOT_PLAIN:
            return SORTED_JSON(plain).encode("utf-8", "surrogatepass")
    except (RecursionError, ValueError):
        pass  # a cycle, deep nesting, a huge int: the tagged encoder says which
    return _tagged_bytes(value, results)


def _tagged_bytes(value: Any, results: list[Result[Any]] | None) -> bytes:
    """:func:`canonical_bytes` through the type-tagged encoder (any value)."""
    hook = _result_hook if results is None else _collecting_hook(results)
    try:
        found = (results, len(results)) if results is not None else None
        text = with_fresh_stack(_canonical_text, (value, hook, found))
    except TagError as err:
        raise IdentityError(f"cannot hash input: {err}", err.path) from None
    except RecursionError:
        raise IdentityError(
            "cannot hash input: nesting too deep; flatten it, or pass it as a JSON string", "$"
        ) from None
    except ValueError as exc:  # an int beyond sys.get_int_max_str_digits()
        raise IdentityError(f"cannot hash input: {exc}", "$") from None
    # surrogatepass: strings with lone surrogates still get a stable identity.
    return text.encode("utf-8", "surrogatepass")


def _canonical_text(
    job: tuple[Any, Callable[[Any], Any], tuple[list[Result[Any]], int] | None],
) -> str:
    value, hook, found = job
    if found is not None:  # a second try (on a fresh stack) collects the Results afresh
        del found[0][found[1] :]
    return _CANONICAL_JSON(encode(value, canonical=True, hook=hook, max_depth=INPUT_MAX_DEPTH))


# The exact encoder ``json.dumps(tree, separators=(",", ":"), ensure_ascii=False)``
# builds on every call, made once: identical bytes, without the per-call setup.
_CANONICAL_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def input_hash(value: Any, results: list[Result[Any]] | None = None) -> str:
    """SHA-256 hex digest of :func:`canonical_bytes` (``results`` as there)."""
    return hashlib.sha256(canonical_bytes(value, results)).hexdigest()


def receiver_identity(receiver: Any, step: str, name: str = "self") -> Any:
    """What a method's receiver contributes to its step's input hash (under the key ``name``).

    A class (a classmethod's ``cls``) enters by its module and qualified name; an object by
    its ``__musubi_identity__()`` if it defines one, else by its fields (a dataclass, a
    pydantic model, an attrs class, found by ``__attrs_attrs__`` without importing attrs), its
    value (an enum member) or its registered encoder. The forms cannot be confused with one
    another: a dataclass, model, enum or registered type is encoded (and tagged with its
    class) by the encoder; the others are lists starting with what they are. Anything else
    raises an :class:`~musubi_core.errors.IdentityError` (a ``TypeError``) saying how to
    declare it, naming ``step``.

    >>> receiver_identity(int, "Parser.parse", "cls")
    ['class', 'builtins:int']
    """
    cls = type(receiver)
    declared = getattr(cls, "__musubi_identity__", None)
    if declared is not None:
        return ["__musubi_identity__", class_path(cls), receiver.__musubi_identity__()]
    if isinstance(receiver, type):
        return ["class", class_path(receiver)]
    attributes = getattr(cls, "__attrs_attrs__", None)
    if attributes is not None:
        fields = {a.name: getattr(receiver, a.name) for a in attributes}
        return ["attrs", class_path(cls), fields]
    if (
        isinstance(receiver, BaseModel | enum.Enum)
        or is_dataclass(receiver)
        or cls in registered_encoders()
    ):
        return receiver  # the encoder tags it with its class
    raise IdentityError(
        f"@step method {step} cannot tell one {cls.__qualname__} from another: `{name}` is "
        "part of the call, so it must enter the step's identity, or the result stored for one "
        f"{cls.__qualname__} would be replayed for all of them. Make {cls.__qualname__} a "
        "dataclass, an attrs class or a pydantic model (its fields become the identity), or "
        f"define {cls.__qualname__}.__musubi_identity__(self) returning the values that decide "
        "the result (e.g. `return (self.model, self.temperature)`), or, if every instance "
        f"gives the same result, opt out with @step(ignore=({name!r},))",
        f"$.{name}",
    )


def make_op(op_name: str, fingerprint: Any = None) -> str:
    """``op_name`` plus a short digest of the fingerprint (code hash, model
    parameters, version pin). Changing the fingerprint changes every node id of
    the operation, while ``op_name`` stays the same so ``explain`` can say
    "code changed"."""
    if fingerprint is None:
        return op_name
    digest = hashlib.sha256(canonical_bytes(fingerprint)).hexdigest()[:16]
    return f"{op_name}#{digest}"


def check_namespace(namespace: object) -> str:
    """``namespace`` if it can name a namespace (a non-empty string), else a clear error."""
    if not isinstance(namespace, str):
        raise TypeError(f"a musubi namespace is a string, not {type(namespace).__name__}")
    if not namespace:
        raise ConfigError(
            'a musubi namespace cannot be empty (the default one is "default")', target=namespace
        )
    return namespace


def resolve_namespace(namespace: str | None, engine_namespace: str | None = None) -> str:
    """The namespace an adapter object works in: ``namespace`` as given, else that of the
    engine it was given (``engine_namespace``), else ``"default"``. A namespace that
    contradicts the given engine's is a :class:`~musubi_core.errors.ConfigError`: the
    engine's namespace is part of every node id it makes."""
    if namespace is None:
        return DEFAULT_NAMESPACE if engine_namespace is None else engine_namespace
    check_namespace(namespace)
    if engine_namespace is not None and engine_namespace != namespace:
        raise ConfigError(
            f"namespace={namespace!r}, but the engine given has namespace "
            f"{engine_namespace!r}: pass only one of them, or an engine made with "
            f"Engine(store, namespace={namespace!r})",
            target=namespace,
        )
    return namespace


def alias_of(scheme: str, namespace: str, *parts: str) -> bytes:
    """An alias of a raw request: 16 bytes of BLAKE2b over ``scheme`` (the adapter's name and
    key version: bump it whenever the adapter's canonical key of the same raw parts changes),
    the namespace and the parts. An adapter stores it beside the node the request's canonical
    key reaches (``Engine.record(..., aliases=...)``) and probes it on the next run
    (``HitMemo.probe_alias``) instead of computing that key. Length-prefixed: no two lists of
    parts share a digest input.

    >>> len(alias_of("demo/1", "default", "prompt", "model"))
    16
    >>> alias_of("demo/1", "default", "ab", "c") != alias_of("demo/1", "default", "a", "bc")
    True
    """
    return AliasPrefix(scheme, namespace, *parts).digest()


class AliasPrefix:
    """The hash state of an alias's leading parts, kept so that the aliases of many requests
    sharing them (one model's ``llm_string``, say) hash only their last part:
    ``AliasPrefix(scheme, namespace, *head).alias(last) == alias_of(scheme, namespace, *head,
    last)``.

    >>> AliasPrefix("demo/1", "default", "model").alias("prompt") == alias_of(
    ...     "demo/1", "default", "model", "prompt")
    True
    """

    __slots__ = ("_state",)

    def __init__(self, scheme: str, namespace: str, *parts: str) -> None:
        self._state = hashlib.blake2b(digest_size=16)
        for part in (scheme, namespace, *parts):
            self._state.update(_alias_part(part))

    def alias(self, last: str) -> bytes:
        """The alias of the leading parts followed by ``last``."""
        state = self._state.copy()
        state.update(_alias_part(last))
        return state.digest()

    def digest(self) -> bytes:
        """The alias of the leading parts alone."""
        return self._state.digest()


def _alias_part(part: str) -> bytes:
    return f"{len(part)}:{part}".encode("utf-8", "surrogatepass")


def make_node_id(
    op: str, in_hash: str, upstream: Iterable[str] = (), namespace: str = DEFAULT_NAMESPACE
) -> str:
    """A node's id. Outside the default namespace the namespace is part of it: the same
    call in two namespaces reaches two nodes (the default namespace's ids are the
    ``musubi/1`` ids they always were)."""
    parents = ",".join(sorted(set(upstream)))
    if namespace == DEFAULT_NAMESPACE:
        material = "\x1f".join((HASH_SCHEME, op, in_hash, parents))
    else:
        # JSON escapes every control character: the namespace field holds no raw \x1f.
        material = "\x1f".join(
            (_NAMESPACED_SCHEME, json.dumps(namespace, ensure_ascii=True), op, in_hash, parents)
        )
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class NodeKey:
    """Everything that determines a node's identity, computed once."""

    node_id: str
    op: str
    op_name: str
    input_hash: str
    upstream: tuple[str, ...]
    # The namespace the id was made in: only an engine of this namespace looks it up or
    # records it.
    namespace: str = DEFAULT_NAMESPACE


def collect_results(value: Any, found: list[Result[Any]] | None = None) -> list[Result[Any]]:
    """Every :class:`Result` nested in plain containers of ``value``."""
    out = [] if found is None else found
    t = type(value)
    if t is Result:
        out.append(value)
    elif t is list or t is tuple or t is set or t is frozenset:
        for item in value:
            if type(item) in _CONTAINERS:
                collect_results(item, out)
    elif t is dict:
        for item in value.values():
            if type(item) in _CONTAINERS:
                collect_results(item, out)
    return out


_CONTAINERS = frozenset({Result, list, tuple, set, frozenset, dict})


# --- code fingerprints -------------------------------------------------------------


def _strip_docstrings(tree: ast.AST) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]


def _ast_tree(node: Any) -> Any:
    """A version-stable rendering of an AST: node type plus non-empty fields.

    ``ast.dump`` output differs between Python versions (3.12 added
    ``type_params=[]`` to every function); dropping empty and ``None`` fields
    keeps the same code hashing the same on 3.10 to 3.13.
    """
    if isinstance(node, ast.JoinedStr):
        node = ast.JoinedStr(values=_joined_values(node.values))
    if isinstance(node, ast.AST):
        fields = {}
        for name, value in ast.iter_fields(node):
            if value is None or value == [] or name in ("type_comment", "kind"):
                continue
            fields[name] = _ast_tree(value)
        return [type(node).__name__, fields]
    if isinstance(node, list):
        return [_ast_tree(item) for item in node]
    if isinstance(node, bytes | complex | float | int | str | bool) or node is Ellipsis:
        return repr(node)
    return type(node).__name__


def _joined_values(values: list[ast.expr]) -> list[ast.expr]:
    """f-string parts with empty constants dropped and adjacent constants
    merged: 3.12's parser emits ``Constant('')`` in nested format specs where
    3.10/3.11/3.13 do not."""
    out: list[ast.expr] = []
    for value in values:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            if not value.value:
                continue
            if out and isinstance(out[-1], ast.Constant) and isinstance(out[-1].value, str):
                out[-1] = ast.Constant(value=out[-1].value + value.value)
                continue
        out.append(value)
    return out


def function_fingerprint(fn: Callable[..., Any]) -> str:
    """A digest of ``fn``'s source AST with docstrings, comments and
    decorators ignored. Falls back to the qualified name when the source is not
    available (built-ins, some REPLs): then only ``version=`` can signal a change.
    """
    target = inspect.unwrap(fn)
    try:
        source = textwrap.dedent(inspect.getsource(target))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return "nosource:" + getattr(target, "__qualname__", type(target).__name__)
    _strip_docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            node.decorator_list = []
            break
    rendered = json.dumps(_ast_tree(tree), separators=(",", ":"))
    return hashlib.sha256(rendered.encode("utf-8")).hexdigest()[:32]
