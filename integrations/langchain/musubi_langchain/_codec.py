"""Allow-listed (de)serialisation of LangChain generations and messages.

Cache entries are stored as plain JSON-shaped dicts (the core codec stores those natively) and
rebuilt here through an explicit allow-list of classes. We never call ``langchain_core.load.loads``
on stored data: that would let whoever can write the SQLite file choose which classes get
constructed (and, with ``secrets_from_env``, read the environment). A tampered or unknown entry
raises :class:`EntryDecodeError`, which the cache turns into a miss plus one warning.

Example:
    >>> from langchain_core.messages import AIMessage
    >>> from langchain_core.outputs import ChatGeneration
    >>> data = encode_generations([ChatGeneration(message=AIMessage(content="hi"))])
    >>> decode_generations(data)[0].message.content
    'hi'
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import InputTokenDetails, OutputTokenDetails, UsageMetadata
from langchain_core.outputs import ChatGeneration, Generation
from pydantic import BaseModel

FORMAT_VERSION = 1

M = TypeVar("M", bound=BaseModel)

# The message classes a cache entry may rebuild, keyed by the message's ``type`` field.
# Chunks are stored as their full-message equivalent (see encode_message), so only the
# AI chunk needs an entry, for entries written by older formats or by hand.
_MESSAGE_TYPES: dict[str, type[BaseMessage]] = {
    "ai": AIMessage,
    "AIMessageChunk": AIMessageChunk,
    "human": HumanMessage,
    "system": SystemMessage,
    "tool": ToolMessage,
    "function": FunctionMessage,
    "chat": ChatMessage,
}


# Immutable leaf types a fresh copy may share.
_IMMUTABLE: frozenset[type] = frozenset({str, int, float, bool, type(None), bytes})


class EntryDecodeError(ValueError):
    """A stored entry is not something this adapter wrote (tampered, truncated or foreign)."""


def _plain(value: Any) -> Any:
    """Turn pydantic models nested in message fields (e.g. ``additional_kwargs["parsed"]``
    from structured output) into dicts, so the entry is plain JSON data.

    The structured-output parsers accept a dict there (``schema(**parsed)``), so a replayed
    message still parses into the user's model class without us ever naming that class.
    """
    kind = type(value)  # exact JSON types first: the ABC checks below are slow
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is dict:
        return {str(k): _plain(v) for k, v in value.items()}
    if kind is list:
        return [_plain(v) for v in value]
    if isinstance(value, BaseModel):
        return _plain(value.model_dump(mode="json"))
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def encode_message(message: BaseMessage) -> dict[str, Any]:
    """Encode one message as a plain dict (chunks become their full-message form)."""
    if isinstance(message, AIMessageChunk):
        # Merged stream chunks are stored as the AIMessage a non-streamed call would return;
        # tool_call_chunks have already been parsed into tool_calls by the merge.
        message = AIMessage(
            content=message.content,
            additional_kwargs=message.additional_kwargs,
            response_metadata=message.response_metadata,
            name=message.name,
            id=message.id,
            tool_calls=message.tool_calls,
            invalid_tool_calls=message.invalid_tool_calls,
            usage_metadata=message.usage_metadata,
        )
    data = message.model_dump(mode="python")
    return {str(k): _plain(v) for k, v in data.items()}


# What encode_message writes for an AI message, and the usage it may carry (LangChain's own
# TypedDicts name the keys): the shape of a plain answer, checked by _plain_answer.
_AI_FIELDS = (
    "content", "additional_kwargs", "response_metadata", "type", "name", "id", "tool_calls",
    "invalid_tool_calls", "usage_metadata",
)
_AI_KEYS = frozenset(_AI_FIELDS)
_USAGE_KEYS = frozenset(UsageMetadata.__annotations__)
_DETAIL_KEYS = {
    "input_token_details": frozenset(InputTokenDetails.__annotations__),
    "output_token_details": frozenset(OutputTokenDetails.__annotations__),
}
_TEXT_OR_NONE = (str, type(None))


def _counts(value: Any, keys: frozenset[str]) -> bool:
    """A dict of exactly-int counts under known keys."""
    return (
        type(value) is dict
        and value.keys() <= keys
        and all(type(v) is int for v in value.values())
    )


def _plain_usage(usage: Any) -> bool:
    if type(usage) is not dict:
        return False
    if len(usage) == 3:  # most usage: the three counts alone
        try:
            counts = (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"])
        except KeyError:
            return False
        return type(counts[0]) is int and type(counts[1]) is int and type(counts[2]) is int
    if not usage.keys() <= _USAGE_KEYS:
        return False
    for key, value in usage.items():
        details = _DETAIL_KEYS.get(key)
        if not (_counts(value, details) if details is not None else type(value) is int):
            return False
    return all(k in usage for k in _TOKEN_KEYS)


_new_object = object.__new__
_set_attr = object.__setattr__


class _Construct:
    """``cls.model_construct(**values)`` for one class and one tuple of field names, without
    its per-field loop: the instance pydantic's ``model_construct`` (pydantic 2) makes, the
    same ``__dict__`` (in field order), ``__pydantic_fields_set__``, ``__pydantic_extra__``
    and ``__pydantic_private__``, about a third of the time. Only for a layout where that is
    exactly all ``model_construct`` does (no aliases, no post-init hook, not a root model,
    every field not given has a plain immutable default); any other class is built by
    ``model_construct`` itself. A test compares both builds attribute by attribute."""

    def __init__(self, cls: type[M], names: tuple[str, ...]) -> None:
        self.cls = cls
        self.names = names
        fields = cls.__pydantic_fields__
        template: dict[str, Any] = {}
        lean = (
            not cls.__pydantic_root_model__
            and cls.__pydantic_post_init__ is None
            and set(names) <= fields.keys()
            and len(set(names)) == len(names)
        )
        for name, field in fields.items():
            if field.alias is not None or field.validation_alias is not None:
                lean = False
            if name in names:
                template[name] = None
            elif field.default_factory is None and type(field.default) in _IMMUTABLE:
                template[name] = field.default
            else:
                lean = False
        self.lean = lean
        self.template = template
        # The names are every field, in field order: the values alone make the __dict__.
        self.exact = lean and names == tuple(template)
        self.fields_set = frozenset(names)
        self.extra_allowed = cls.model_config.get("extra") == "allow"

    def __call__(self, *values: Any) -> Any:
        cls, names = self.cls, self.names
        if not self.lean:
            return cls.model_construct(**dict(zip(names, values, strict=True)))
        if len(values) != len(names):
            raise TypeError(f"{cls.__name__} takes {len(names)} values, got {len(values)}")
        if self.exact:
            fields = dict(zip(names, values, strict=False))  # lengths checked above
        else:
            fields = self.template.copy()  # field order, defaults in place
            fields.update(zip(names, values, strict=False))
        return self._made(fields)

    def adopt(self, fields: dict[str, Any]) -> Any:
        """The instance whose ``__dict__`` is ``fields`` itself: a dict holding every field,
        in field order, that nothing else holds (a tree decoded for this call). Saves
        copying the values into a new dict; any other layout is built by ``__call__``."""
        if not self.exact or tuple(fields) != self.names:
            return self(*(fields[name] for name in self.names))
        return self._made(fields)

    def _made(self, fields: dict[str, Any]) -> Any:
        """The instance of ``fields`` (a complete ``__dict__`` in field order), as
        ``model_construct`` leaves it."""
        made = _new_object(self.cls)
        _set_attr(made, "__dict__", fields)
        _set_attr(made, "__pydantic_fields_set__", set(self.fields_set))
        _set_attr(made, "__pydantic_extra__", {} if self.extra_allowed else None)
        _set_attr(made, "__pydantic_private__", None)
        return made


def _plain_answer(data: Mapping[str, Any]) -> AIMessage | None:
    """An AI message of the exact shape a plain answer has (text content, no tool calls, no
    extra kwargs, token counts under LangChain's own keys), each field checked here, built
    without pydantic's validation pass: that pass (with AIMessage's tool-call compatibility
    hook) is most of what a cold hit costs, and for this shape it changes nothing (a test
    compares the two field by field). Anything else returns None and is validated.

    ``data`` is taken, not copied: it becomes the message's ``__dict__`` (the caller hands
    over a tree decoded for this call)."""
    if type(data) is not dict or data.keys() != _AI_KEYS:
        return None
    content = data["content"]
    metadata = data["response_metadata"]
    name = data["name"]
    message_id = data["id"]
    if (
        type(content) is not str
        or data["type"] != "ai"
        or data["additional_kwargs"] != {}
        or data["tool_calls"] != []
        or data["invalid_tool_calls"] != []
        or type(metadata) is not dict
        or not (name is None or type(name) is str)
        or not (message_id is None or type(message_id) is str)
    ):
        return None
    usage = data["usage_metadata"]
    if usage is None:
        data["usage_metadata"] = complete_usage(None)
    elif not _plain_usage(usage):
        return None
    message: AIMessage = _BUILD_AI.adopt(data)
    return message


_BUILD_AI = _Construct(AIMessage, _AI_FIELDS)
_BUILD_CHAT = _Construct(ChatGeneration, ("message", "generation_info", "text"))


def decode_message(data: Any) -> BaseMessage:
    """Rebuild a message from :func:`encode_message` output, allow-listed by ``type``
    (``data`` decoded for this call: a plain answer takes it as its fields)."""
    if type(data) is not dict and not isinstance(data, Mapping):
        raise EntryDecodeError("message entry is not a mapping")
    plain = _plain_answer(data)
    if plain is not None:
        return plain
    kind = data.get("type")
    cls = _MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise EntryDecodeError(f"message type {kind!r} is not allow-listed")
    fields = dict(data)
    if cls is AIMessage:
        fields["usage_metadata"] = complete_usage(fields.get("usage_metadata"))
    try:
        return cls.model_validate(fields)
    except Exception as exc:  # pydantic ValidationError and friends
        raise EntryDecodeError(f"invalid {kind} message: {exc}") from exc


_TOKEN_KEYS = ("input_tokens", "output_tokens", "total_tokens")


def complete_usage(usage: Any) -> Any:
    """A replayed AI message's ``usage_metadata`` with every token count present (0 when the
    provider reported none).

    LangChain marks a cache hit by adding ``total_cost: 0`` to the message's usage; on a
    message that had none, that leaves ``{"total_cost": 0}``, which is not valid usage: in
    langchain-core 1.8.3, replaying such a hit as v3 stream events (``stream_events(
    version="v3")`` of a graph) fails validation when the events are assembled back into a
    message. With the counts present the replayed events assemble.

    >>> complete_usage(None)
    {'input_tokens': 0, 'output_tokens': 0, 'total_tokens': 0}
    >>> complete_usage({"input_tokens": 3, "output_tokens": 2, "total_tokens": 5})["total_tokens"]
    5
    """
    if isinstance(usage, Mapping) and all(isinstance(usage.get(k), int) for k in _TOKEN_KEYS):
        return usage
    done: dict[str, Any] = dict(usage) if isinstance(usage, Mapping) else {}
    given_in, given_out = done.get("input_tokens"), done.get("output_tokens")
    tokens_in = given_in if isinstance(given_in, int) else 0
    tokens_out = given_out if isinstance(given_out, int) else 0
    done["input_tokens"], done["output_tokens"] = tokens_in, tokens_out
    if not isinstance(done.get("total_tokens"), int):
        done["total_tokens"] = tokens_in + tokens_out
    return done


def encode_generations(generations: Sequence[Generation]) -> dict[str, Any]:
    """Encode a cache value (a sequence of generations) as a plain, versioned dict."""
    items: list[dict[str, Any]] = []
    for gen in generations:
        info = _plain(gen.generation_info) if gen.generation_info is not None else None
        if isinstance(gen, ChatGeneration):
            items.append(
                {"kind": "chat", "generation_info": info, "message": encode_message(gen.message)}
            )
        else:
            items.append({"kind": "text", "text": gen.text, "generation_info": info})
    return {"format": FORMAT_VERSION, "generations": items}


def decode_generations(data: Any) -> list[Generation]:
    """Rebuild a fresh ``list`` of fresh generations from :func:`encode_generations` output.
    ``data`` must be a tree decoded for this call: the generations take its containers."""
    # Exact dicts (what a decoded tree holds) are told first: ABC checks are slow on a hit.
    if (type(data) is not dict and not isinstance(data, Mapping)) or data.get(
        "format"
    ) != FORMAT_VERSION:
        raise EntryDecodeError("not a musubi_langchain cache entry")
    items = data.get("generations")
    if not isinstance(items, list) or not items:
        raise EntryDecodeError("cache entry has no generations")
    out: list[Generation] = []
    for item in items:
        if type(item) is not dict and not isinstance(item, Mapping):
            raise EntryDecodeError("generation entry is not a mapping")
        info = item.get("generation_info")
        if info is not None and not isinstance(info, dict):
            raise EntryDecodeError("generation_info is not a mapping")
        kind = item.get("kind")
        try:
            if kind == "chat":
                message = decode_message(item.get("message"))
                if type(message) is AIMessage and type(message.content) is str:
                    # What ChatGeneration's validation would do for a text message (its
                    # text is the message's); the message is already checked.
                    out.append(_BUILD_CHAT(message, info, message.text))
                else:
                    out.append(ChatGeneration(message=message, generation_info=info))
            elif kind == "text":
                text = item.get("text")
                if not isinstance(text, str):
                    raise EntryDecodeError("text generation without text")
                out.append(Generation(text=text, generation_info=info))
            else:
                raise EntryDecodeError(f"generation kind {kind!r} is not allow-listed")
        except EntryDecodeError:
            raise
        except Exception as exc:
            raise EntryDecodeError(f"invalid generation: {exc}") from exc
    return out


def usage_of(generations: Sequence[Generation]) -> tuple[int | None, int | None]:
    """Sum input/output tokens over the generations' ``usage_metadata`` (None if unknown)."""
    tokens_in = tokens_out = 0
    seen = False
    for gen in generations:
        message = getattr(gen, "message", None)
        usage = getattr(message, "usage_metadata", None)
        if isinstance(usage, Mapping):
            seen = True
            tokens_in += int(usage.get("input_tokens") or 0)
            tokens_out += int(usage.get("output_tokens") or 0)
    return (tokens_in, tokens_out) if seen else (None, None)


# Per type seen in a template: 0 immutable (shared; str subclasses such as LangChain's
# TextAccessor included), 1 pydantic model, 2 anything else (deep-copied). isinstance checks
# against pydantic's metaclass are too slow for a cache hit's hot path.
_KINDS: dict[type, int] = {}


def _kind_of(kind: type) -> int:
    found = _KINDS.get(kind)
    if found is None:
        if issubclass(kind, str | bytes | int | float | bool) and not issubclass(kind, enum.Enum):
            found = 0
        elif issubclass(kind, BaseModel):
            found = 1
        else:
            found = 2
        _KINDS[kind] = found
    return found


def _fresh_value(value: Any) -> Any:
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    if kind is dict:
        if not value:
            return {}
        return {k: v if type(v) in _IMMUTABLE else _fresh_value(v) for k, v in value.items()}
    if kind is list:
        if not value:
            return []
        return [v if type(v) in _IMMUTABLE else _fresh_value(v) for v in value]
    if kind is tuple:
        return tuple(_fresh_value(v) for v in value)
    found = _kind_of(kind)
    if found == 0:
        return value
    if found == 1:
        return fresh_model(value)
    return copy.deepcopy(value)


def fresh_model(model: M) -> M:
    """A deep copy of an already-validated model, built without validating again.

    Decoding validates an entry once (:func:`decode_generations`); the cache keeps that result
    as a private template and hands out copies: same class, same field values, no object (list,
    dict, nested message) shared with the template or with an earlier copy.

    >>> from langchain_core.messages import AIMessage
    >>> a = AIMessage(content="hi", tool_calls=[{"name": "f", "args": {"x": 1}, "id": "c1"}])
    >>> b = fresh_model(a)
    >>> b == a, b is a, b.tool_calls[0]["args"] is a.tool_calls[0]["args"]
    (True, False, False)
    """
    if getattr(model, "__pydantic_private__", None) is not None:
        return model.model_copy(deep=True)  # private attributes: rare, take the general path
    cls = type(model)
    new = cls.__new__(cls)
    setattr_ = object.__setattr__
    setattr_(
        new,
        "__dict__",
        {k: v if type(v) in _IMMUTABLE else _fresh_value(v) for k, v in model.__dict__.items()},
    )
    extra = model.__pydantic_extra__
    setattr_(new, "__pydantic_extra__", None if extra is None else _fresh_value(extra))
    setattr_(new, "__pydantic_fields_set__", set(model.__pydantic_fields_set__))
    setattr_(new, "__pydantic_private__", None)
    return new


class Template:
    """Validated generations kept private, and a plan to copy them fast.

    The plan is worked out once per entry: which fields may be shared (immutable values),
    which need a C-level shallow copy (a dict or list holding only immutable values), which
    nest a model (its own plan) and which need a full :func:`_fresh_value` copy.

    >>> from langchain_core.messages import AIMessage
    >>> from langchain_core.outputs import ChatGeneration
    >>> t = Template([ChatGeneration(message=AIMessage("hi", usage_metadata={
    ...     "input_tokens": 1, "output_tokens": 2, "total_tokens": 3}))])
    >>> a, b = t.fresh()[0], t.fresh()[0]
    >>> a == b, a is b, a.message.usage_metadata is b.message.usage_metadata
    (True, False, False)
    """

    __slots__ = ("_builders",)

    def __init__(self, generations: Sequence[Generation]) -> None:
        self._builders = [_builder(g) for g in generations]

    def fresh(self) -> list[Generation]:
        """A fresh ``list`` of fresh generations (nothing shared with the template)."""
        return [build() for build in self._builders]


def _rebuild(build: Callable[[], Any]) -> Callable[[Any], Any]:
    """A copier (old value -> fresh value) that builds a nested model by its own plan."""
    return lambda _value: build()


def _builder(model: BaseModel) -> Callable[[], Any]:
    """A function that builds a fresh copy of ``model`` by its plan: fields that may be shared
    (immutable values) are, a dict or list holding only immutable values gets a C-level
    shallow copy, a nested model its own builder, anything else a full :func:`_fresh_value`
    copy. Everything it needs is bound once here (a hit's hot path)."""
    if getattr(model, "__pydantic_private__", None) is not None:
        return lambda: fresh_model(model)  # private attributes: rare, the general path
    cls = type(model)
    fields = dict(model.__dict__)
    fields_set = frozenset(model.__pydantic_fields_set__)
    extra = model.__pydantic_extra__
    copiers: list[tuple[str, Callable[[Any], Any]]] = []
    for name, value in fields.items():
        kind = type(value)
        if kind in _IMMUTABLE or _kind_of(kind) == 0:
            continue
        if kind is dict and all(type(v) in _IMMUTABLE for v in value.values()):
            copiers.append((name, dict.copy))
        elif kind is list and all(type(v) in _IMMUTABLE for v in value):
            copiers.append((name, list.copy))
        elif _kind_of(kind) == 1:
            copiers.append((name, _rebuild(_builder(value))))
        else:
            copiers.append((name, _fresh_value))
    plan = tuple(copiers)
    new_object, set_attr, copy_fields = _new_object, _set_attr, fields.copy

    def build() -> Any:
        new = new_object(cls)
        made = copy_fields()
        for name, copier in plan:
            made[name] = copier(made[name])
        set_attr(new, "__dict__", made)
        set_attr(new, "__pydantic_extra__", extra if extra is None else _fresh_value(extra))
        set_attr(new, "__pydantic_fields_set__", set(fields_set))
        set_attr(new, "__pydantic_private__", None)
        return new

    return build


def fresh_generations(template: Sequence[Generation]) -> list[Generation]:
    """A fresh ``list`` of fresh copies of decoded generations (see :func:`fresh_model`)."""
    return [fresh_model(g) for g in template]
