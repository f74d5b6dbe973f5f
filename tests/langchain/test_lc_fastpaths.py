"""The adapter's hot paths give exactly the answers of the slow paths they stand in for."""

from __future__ import annotations

import json
import random
import time
import warnings
from typing import Any

import pytest
from langchain_core.language_models import FakeListChatModel
from langchain_core.load import dumpd, dumps
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, Generation

from musubi_core.codec import JSONCodec
from musubi_core.engine import Engine
from musubi_core.fastpath import (
    NOT_PLAIN,
    HitMemo,
    is_plain_json,
    plain_input_hash,
    plain_payload,
    plain_tree,
)
from musubi_core.identity import input_hash
from musubi_core.policy import StepConfiguration, StepType
from musubi_core.probe import EncodedHit, probe_replay
from musubi_core.store import open_store
from musubi_langchain import MusubiCache, MusubiCallbackHandler, MusubiLangChainWarning
from musubi_langchain._codec import (
    EntryDecodeError,
    Template,
    _Construct,
    _plain_answer,
    _plain_usage,
    complete_usage,
    decode_generations,
    decode_message,
    encode_generations,
    encode_message,
)
from musubi_langchain._engine import PlainAwareCodec, Precoded, storable
from musubi_langchain._keys import _fast_dumpd, canonical_message_objects, canonical_messages
from tests.support.storedb import REPLAYS, execute, is_postgres, rows
from tests.support.tamper import readdress

# Runs on SQLite and on PostgreSQL (tests/conftest.py).
BOTH_BACKENDS = True


def _random_plain(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(9 if depth < 4 else 5)
    if choice == 8 or (choice == 4 and depth >= 4):
        return rng.choice([0.0, -1.5, 1e300, 2.5e-8, 3.0])
    if choice == 0:
        return rng.choice(["", "a", "é東京", "line\nbreak", '"quoted"', "$dollar", "\u2028", "lone\udc80"])
    if choice == 1:
        return rng.choice([0, 1, -7, 2**70])
    if choice == 2:
        return rng.choice([True, False])
    if choice == 3:
        return None
    if choice in (4, 5):
        return [_random_plain(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["a", "B", "é", "z1", "_", "lc", "10", "2"]
    return {rng.choice(keys): _random_plain(rng, depth + 1) for _ in range(rng.randrange(4))}


def test_plain_json_hash_and_payload_match_the_core() -> None:
    rng = random.Random(7)
    codec = JSONCodec()
    checked = 0
    floats = 0
    for _ in range(1000):
        value = _random_plain(rng)
        tree = plain_tree(value)
        assert tree is not NOT_PLAIN
        floats += not is_plain_json(value)
        assert plain_input_hash(tree) == input_hash(value)
        assert plain_payload(tree) == codec.encode(value)[1]
        checked += 1
    assert checked == 1000 and floats > 50
    for not_plain in ((1, 2), {"$x": 1}, {1: "a"}, {"a": {"b": (1,)}}, b"x", float("nan"), [float("inf")]):
        assert plain_tree(not_plain) is NOT_PLAIN


def test_precoded_values_store_the_codec_bytes(db: str) -> None:
    engine = Engine(open_store(db), codec=PlainAwareCodec())
    value = {"q": ["a", 1, None]}
    stored = storable(engine, value)
    assert isinstance(stored, Precoded)
    assert engine.codec.encode(stored) == JSONCodec().encode(value)
    assert engine.codec.encode(storable(engine, {"t": 0.5})) == JSONCodec().encode({"t": 0.5})
    assert storable(engine, {"t": (1,)}) == {"t": (1,)}  # not JSON-shaped: the codec's path
    key = engine.key("op", 1)
    engine.record(key, stored)
    assert engine.lookup(key).value == value
    engine.close()


_MESSAGES = [
    HumanMessage("hi"),
    HumanMessage("hi", name="bob", id="x1"),
    SystemMessage("sys"),
    AIMessage(
        "",
        tool_calls=[{"name": "f", "args": {"a": 1, "b": [1, None, True]}, "id": "call_1"}],
        usage_metadata={"input_tokens": 1, "output_tokens": 2, "total_tokens": 3},
        response_metadata={"model": "x", "t": 0.5},
        id="run-1",
    ),
    AIMessage(
        content=[{"type": "text", "text": "hello"}, {"type": "tool_use", "id": "tu_1", "name": "f", "input": {}}],
        additional_kwargs={"tool_calls": [{"id": "c"}], "refusal": None, "x": {"lc": 1}},
    ),
    ToolMessage("42", tool_call_id="call_1"),
    ToolMessage("err", tool_call_id="call_1", status="error", artifact={"a": 1}),
    ChatMessage(content="c", role="critic"),
    FunctionMessage(content="f", name="fn"),
    AIMessageChunk(content="par", tool_call_chunks=[{"name": "f", "args": '{"a"', "id": "c1", "index": 0}]),
    AIMessage("x", example=True),
    HumanMessage("t", additional_kwargs={"k": (1, 2)}),
    AIMessage("y", additional_kwargs={"__lc_escaped__": {"a": 1}}),
    AIMessage("z", additional_kwargs={"n": 0, "f": False, "e": ""}),
    HumanMessage([{"type": "image_url", "image_url": {"url": "data:..."}}]),
]


@pytest.mark.parametrize("message", _MESSAGES, ids=lambda m: type(m).__name__)
def test_fast_message_serialisation_matches_dumpd(message: Any) -> None:
    fast = _fast_dumpd(message)
    if fast is not None:
        assert fast == dumpd(message)
    assert canonical_message_objects([message]) == canonical_messages([dumpd(message)])


def test_fast_path_covers_the_common_messages() -> None:
    assert sum(_fast_dumpd(m) is not None for m in _MESSAGES) >= 10
    # A whole conversation keys the same either way (tool-call aliases run across messages).
    assert canonical_message_objects(_MESSAGES) == canonical_messages([dumpd(m) for m in _MESSAGES])


def test_template_copies_share_nothing_and_equal_a_fresh_decode() -> None:
    gens = [
        ChatGeneration(
            message=AIMessage(
                "hi",
                tool_calls=[{"name": "f", "args": {"x": [1, {"y": 2}]}, "id": "c1"}],
                usage_metadata={"input_tokens": 1, "output_tokens": 2, "total_tokens": 3},
                response_metadata={"nested": {"a": [1, 2]}},
            ),
            generation_info={"finish_reason": "stop", "logprobs": {"x": [0.1]}},
        ),
        Generation(text="plain", generation_info={"k": ["v"]}),
    ]
    data = encode_generations(gens)
    template = Template(decode_generations(data))
    a, b = template.fresh(), template.fresh()
    assert a == b == decode_generations(data)
    assert a is not b and a[0] is not b[0] and a[0].message is not b[0].message  # type: ignore[attr-defined]
    a[0].message.tool_calls[0]["args"]["x"][1]["y"] = 99  # type: ignore[attr-defined]
    a[0].message.response_metadata["nested"]["a"].append(3)  # type: ignore[attr-defined]
    a[0].generation_info["logprobs"]["x"].append(0.2)  # type: ignore[index]
    a[1].generation_info["k"].append("w")  # type: ignore[index]
    assert template.fresh() == decode_generations(data)


def _engine(path: str) -> Engine:
    return Engine(open_store(path))


def test_hit_memo_sees_writes_by_other_connections(db: str) -> None:
    engine = _engine(db)
    key = engine.key("op", {"a": 1})
    engine.record(key, "v")
    memo = HitMemo(engine)
    first = memo.probe(key)
    assert isinstance(first, EncodedHit)
    again = memo.probe(key)  # asked for the second time: kept from now on
    assert again == first
    if not is_postgres(db):  # SQLite: remembered until the file changes; PostgreSQL asks
        assert memo.probe(key) is again
    # Another connection, as the CLI would be.
    execute(db, "UPDATE musubi_nodes SET status = 'stale', stale_cause = 'invalidated'")
    assert memo.probe(key) is None  # stale: Engine.lookup decides
    assert engine.lookup(key).replay is False
    memo.close()
    engine.close()


def test_hit_memo_respects_ttl_and_force(db: str) -> None:
    engine = _engine(db)
    config = StepConfiguration(step_type=StepType.STOCHASTIC, ttl_seconds=0.2)
    key = engine.key("op", 1)
    engine.record(key, "v", config)
    memo = HitMemo(engine)
    assert isinstance(memo.probe(key, config), EncodedHit)
    assert isinstance(memo.probe(key, config), EncodedHit)
    time.sleep(0.25)
    assert memo.probe(key, config) is None  # expired: lookup() says TTL_EXPIRED
    assert probe_replay(engine, key, StepConfiguration(force_reexecution=True)) is None
    memo.close()
    engine.close()


def test_tampered_after_memoised_hit_is_a_miss(db: str) -> None:
    cache = MusubiCache(db)
    model = FakeListChatModel(responses=["real", "again"], cache=cache)
    assert model.invoke("q").content == "real"
    assert model.invoke("q").content == "real"  # hit: decoded entry memoised
    for artifact_id, payload in rows(db, "SELECT artifact_id, payload FROM musubi_artifacts"):
        # Under the edited bytes' own content id: the allow-list, not the id check, refuses it.
        evil = bytes(payload).replace(b'"ai"', b'"langchain_community.llms.Evil"')
        readdress(db, artifact_id, payload=evil)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert model.invoke("q").content == "again"  # not served from the memo
    assert any(issubclass(w.category, MusubiLangChainWarning) for w in caught)


def test_hits_are_counted_and_keys_memoised(db: str) -> None:
    cache = MusubiCache(db)
    model = FakeListChatModel(responses=["one"], cache=cache)
    for _ in range(5):
        assert model.invoke("q").content == "one"
    cache.engine.flush()
    ((count,),) = rows(db, f"SELECT {REPLAYS} FROM musubi_nodes")
    assert count == 4
    prompt = dumps([HumanMessage("q")])
    key = cache.node_key(prompt, model._get_llm_string(stop=None))
    assert cache.node_key(prompt, model._get_llm_string(stop=None)) is key


def test_explicit_flush_is_synchronous(db: str) -> None:
    handler = MusubiCallbackHandler(db)
    from langchain_core.prompts import ChatPromptTemplate

    chain = ChatPromptTemplate.from_template("say {x}") | FakeListChatModel(responses=["ok"])
    for i in range(3):
        chain.invoke({"x": str(i)}, config={"callbacks": [handler]})
    handler.flush()
    ((n,),) = rows(db, "SELECT COUNT(*) FROM musubi_calls")
    assert n == 9  # 3 x (sequence, prompt, model)


def _validated(data: dict[str, Any]) -> AIMessage:
    """The slow path a plain answer skips: pydantic's validation of the stored fields."""
    fields = dict(data)
    fields["usage_metadata"] = complete_usage(fields.get("usage_metadata"))
    return AIMessage.model_validate(fields)


_PLAIN_ANSWERS = [
    AIMessage(content="Paris."),
    AIMessage(content="", id="run-1", name="bot"),
    AIMessage(
        content="Tokyo.",
        id="lc_run--1",
        response_metadata={"model_name": "gpt-4o-mini", "finish_reason": "stop", "logprobs": None},
        usage_metadata={
            "input_tokens": 12,
            "output_tokens": 3,
            "total_tokens": 15,
            "input_token_details": {"audio": 0, "cache_read": 0},
            "output_token_details": {"audio": 0, "reasoning": 0},
        },
    ),
    AIMessage(content="é東京\n\"quoted\"", usage_metadata={"input_tokens": 1, "output_tokens": 2, "total_tokens": 3}),
]

_OTHER_ANSWERS = [
    AIMessage(content=[{"type": "text", "text": "blocks"}]),
    AIMessage(content="", tool_calls=[{"name": "search", "args": {"q": "x"}, "id": "c1"}]),
    AIMessage(content="", additional_kwargs={"function_call": {"name": "f", "arguments": "{}"}}),
    AIMessage(
        content="x",
        usage_metadata={
            "input_tokens": 1, "output_tokens": 1, "total_tokens": 2,
            "input_token_details": {"audio": 0, "made_up": 4},  # type: ignore[typeddict-unknown-key]
        },
    ),
]


@pytest.mark.parametrize("message", _PLAIN_ANSWERS, ids=range(len(_PLAIN_ANSWERS)))
def test_a_plain_answer_is_built_exactly_as_validation_builds_it(message: AIMessage) -> None:
    data = json.loads(json.dumps(encode_message(message)))
    fast = _plain_answer(data)
    assert fast is not None  # this shape takes the fast path
    slow = _validated(data)
    assert fast == slow
    assert fast.model_fields_set == slow.model_fields_set
    assert dumpd(fast) == dumpd(slow)
    assert fast.text == slow.text and fast.usage_metadata == slow.usage_metadata
    # The generation around it too (ChatGeneration's text, its fields set, its dump).
    (gen,) = decode_generations(json.loads(json.dumps(encode_generations([ChatGeneration(message=message)]))))
    validated = ChatGeneration(message=slow, generation_info=None)  # as decoding validated it
    assert gen == validated and gen.text == validated.text
    assert gen.model_fields_set == validated.model_fields_set
    assert dumpd(gen) == dumpd(validated)


def _layout(model: Any) -> tuple[Any, ...]:
    """Everything pydantic keeps on an instance, the field order of ``__dict__`` included."""
    return (
        type(model),
        list(model.__dict__.items()),
        model.__pydantic_fields_set__,
        model.__pydantic_extra__,
        model.__pydantic_private__,
    )


def test_the_lean_constructor_makes_what_model_construct_makes() -> None:
    message = AIMessage(content="Paris.", id="r-1", usage_metadata=complete_usage(None))
    values = {name: getattr(message, name) for name in AIMessage.model_fields}
    build = _Construct(AIMessage, tuple(values))
    assert build.lean
    made, constructed = build(*values.values()), AIMessage.model_construct(**values)
    assert _layout(made) == _layout(constructed)
    assert made.__pydantic_fields_set__ is not build(*values.values()).__pydantic_fields_set__
    # Fields not given take their defaults, in field order (ChatGeneration's ``type``).
    gen_build = _Construct(ChatGeneration, ("message", "generation_info", "text"))
    assert gen_build.lean
    gen = gen_build(made, None, "Paris.")
    assert _layout(gen) == _layout(
        ChatGeneration.model_construct(message=made, generation_info=None, text="Paris.")
    )
    assert list(gen.__dict__) == list(ChatGeneration.model_fields)
    # A field left out that has a factory default needs a fresh value: model_construct does it.
    partial = _Construct(AIMessage, ("content",))
    assert not partial.lean
    one, two = partial("x"), partial("x")
    assert _layout(one) == _layout(AIMessage.model_construct(content="x"))
    assert one.additional_kwargs is not two.additional_kwargs


@pytest.mark.parametrize("message", _OTHER_ANSWERS, ids=range(len(_OTHER_ANSWERS)))
def test_any_other_message_is_validated(message: AIMessage) -> None:
    data = json.loads(json.dumps(encode_message(message)))
    assert _plain_answer(data) is None
    decoded = decode_message(data)
    assert decoded == _validated(data)


def test_a_plain_answer_with_a_wrong_field_type_is_validated_and_refused() -> None:
    data = json.loads(json.dumps(encode_message(_PLAIN_ANSWERS[2])))
    data["usage_metadata"]["input_tokens"] = True  # a bool is not a count
    assert _plain_answer(data) is None
    data["usage_metadata"]["input_tokens"] = 12
    data["response_metadata"] = ["not", "a", "mapping"]
    assert _plain_answer(data) is None
    with pytest.raises(EntryDecodeError):
        decode_message(data)


def test_a_plain_answer_takes_its_decoded_fields_in_field_order_only() -> None:
    """The decoded dict becomes the message's fields when its keys are in field order (what
    encode_message writes); in any other order the fields are built in field order."""
    message = AIMessage(content="Paris.", id="r-1", usage_metadata=complete_usage(None))
    data = json.loads(json.dumps(encode_message(message)))
    adopted = _plain_answer(data)
    assert adopted is not None and adopted.__dict__ is data
    reordered = dict(reversed(list(json.loads(json.dumps(encode_message(message))).items())))
    built = _plain_answer(reordered)
    assert built is not None and built.__dict__ is not reordered
    assert list(built.__dict__) == list(AIMessage.model_fields)
    expected = _validated(json.loads(json.dumps(encode_message(message))))
    assert built == expected and adopted == expected
    assert _layout(built) == _layout(adopted)


def test_usage_of_three_keys_is_plain_only_with_the_three_counts() -> None:
    assert _plain_usage({"input_tokens": 1, "output_tokens": 2, "total_tokens": 3})
    assert not _plain_usage({"input_tokens": 1, "output_tokens": 2, "made_up": 3})
    assert not _plain_usage({"input_tokens": 1, "output_tokens": 2, "total_tokens": True})
    assert not _plain_usage({"input_tokens": 1, "output_tokens": 2.0, "total_tokens": 3})
    details = {"input_token_details": {"cache_read": 1}}
    assert _plain_usage({"input_tokens": 1, "output_tokens": 2, "total_tokens": 3, **details})
    assert not _plain_usage({"input_tokens": 1, "output_tokens": 2, **details})


def test_an_entry_of_another_shape_than_one_plain_answer_is_decoded_as_before() -> None:
    """Entries of other shapes than one plain chat answer (two generations, generation info,
    an extra key) decode as they always did; an unknown kind is refused."""
    plain = AIMessage(content="Paris.", usage_metadata=complete_usage(None))
    for generations in (
        [ChatGeneration(message=plain), ChatGeneration(message=plain)],
        [ChatGeneration(message=plain, generation_info={"finish_reason": "stop"})],
    ):
        data = json.loads(json.dumps(encode_generations(generations)))
        decoded = decode_generations(data)
        assert decoded == generations
        assert [g.generation_info for g in decoded] == [g.generation_info for g in generations]
    data = json.loads(json.dumps(encode_generations([ChatGeneration(message=plain)])))
    data["generations"][0]["surprise"] = 1  # an extra key: the item still decodes
    assert decode_generations(data) == [ChatGeneration(message=plain)]
    data["generations"][0]["kind"] = "image"
    with pytest.raises(EntryDecodeError):
        decode_generations(data)


def test_warm_hits_read_the_change_token_through_the_map(db: str) -> None:
    """After the first hits, a SQLite store's change token is read through the -shm map (no
    system call per hit), and a commit by another connection still makes the next hit re-read
    the store."""
    if is_postgres(db):
        pytest.skip("SQLite only: the -shm file")
    cache = MusubiCache(db)
    model = FakeListChatModel(responses=["one", "two"], cache=cache)
    for _ in range(3):
        assert model.invoke("q").content == "one"
    memo = cache._hits
    assert memo is not None and memo._map is not None
    execute(db, "UPDATE musubi_nodes SET status = 'stale', stale_cause = 'invalidated'")
    assert model.invoke("q").content == "two"  # the stale entry is not served from the memo
