"""Hostile requests for any gRPC method, generated from its request message's descriptor.

`Fuzzer(vocabulary).requests(method, seeds)` is a Hypothesis strategy of
`FuzzRequest`s of four kinds:

- "random": random bytes, not a serialised message at all;
- "truncated": a valid serialisation cut short;
- "bitflip": a valid serialisation with 1 to 8 bits flipped;
- "hostile": a valid message whose fields hold hostile values: NaN, inf,
  -0.0 and huge floats, integer extremes (int64's, 2^31, 2^40), negative
  sizes, hostile JSON in strings that hold JSON (wrong types, NaN, deep
  nesting, huge lists), huge repeated fields and strings (within the
  servers' message limits), unicode (emoji, right-to-left, NUL), ids such
  as "abc:optimizer", "../x" or "*", and strings that are not UTF-8 at all
  (see INVALID_UTF8).

Nothing here knows a Tandem message: every field gets a strategy by its
type, message fields recursively, so a new RPC or field is fuzzed without
an edit. Two things given by the caller steer it deeper than random values
reach: `seeds`, valid requests, of which "hostile" sets one to three
(possibly nested) fields to hostile values and which "truncated" and
"bitflip" damage; and the vocabulary, words that fields accept (model
names, dtypes, ...) by field name, of which hostile strings are also made.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from google.protobuf import message_factory, text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import strategies as st

KINDS = ("random", "truncated", "bitflip", "hostile")
MAX_DEPTH = 4  # message levels generated below a request, at most
HUGE_BYTES = 2**20  # a "huge" repeated field or string: about this much on the wire
DEEP_JSON = 100_000  # nesting depth of the deepest JSON sent
MAX_STREAM = 3  # messages in a generated client stream, at most

# Strings that protobuf refuses to hold: Python's protobuf only sets valid
# UTF-8, so a string is generated with a private-use marker character, whose
# UTF-8 bytes are swapped after serialisation for a sequence of the same
# length that is not UTF-8 (a lone surrogate, as WTF-8 writes it). String and
# bytes fields look alike on the wire, so the length prefix stays right. The
# same bytes inside a bytes field or a varint are swapped too: hostile input
# all the same.
INVALID_UTF8 = {
    "\ue000": b"\xed\xa0\x80",  # U+D800, a lone high surrogate
    "\ue001": b"\xed\xbf\xbf",
}  # U+DFFF, a lone low surrogate

FLOATS = [
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
    -0.0,
    0.0,
    1.0,
    -1.0,
    0.5,
    1e-3,
    1e-45,
    5e-324,
    3.4028235e38,
    -3e38,
    1e39,
    1e308,
    -1e308,
]
INTS = {  # hostile values by the field's C++ type, each within the type's range
    FieldDescriptor.CPPTYPE_INT32: [
        0,
        1,
        -1,
        2,
        3,
        8,
        10,
        64,
        255,
        256,
        1000,
        2**16,
        10**6,
        2**31 - 1,
        -(2**31),
    ],
    FieldDescriptor.CPPTYPE_INT64: [
        0,
        1,
        -1,
        2,
        8,
        10,
        64,
        1000,
        10**6,
        2**31 - 1,
        2**31,
        2**32,
        2**40,
        2**53 + 1,
        10**11,
        2**63 - 1,
        -(2**63),
        -(2**31),
    ],
    FieldDescriptor.CPPTYPE_UINT32: [0, 1, 2, 10, 2**31, 2**32 - 1],
    FieldDescriptor.CPPTYPE_UINT64: [0, 1, 2, 10, 2**32, 2**40, 2**63, 2**64 - 1],
}
INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
STRINGS = [
    "",
    " ",
    "*",
    "?",
    "%",
    ".",
    "..",
    "../x",
    "../../etc/passwd",
    "a/b",
    "x:optimizer",
    "abc:optimizer",
    ":",
    "a:b:c",
    "\x00",
    "a\x00b",
    "\n",
    "\t",
    "\r\n",
    "💥",
    "👨‍👩‍👧‍👦",
    "\u202eevil\u202c",
    "שלום",
    "مرحبا",
    "١",
    "١٢",
    "+1",
    "-1",
    "0",
    "00",
    "1",
    " 1",
    "1 ",
    "1.0",
    "1e3",
    "0x10",
    "9" * 20,
    "NaN",
    "inf",
    "null",
    "true",
    "[]",
    "{}",
    '{"a":',
    "%s%s%n",
    "'; DROP TABLE x; --",
    "A" * 65,
    "A" * 256,
    "A" * 70_000,
]
NOT_UTF8 = ["\ue000", "a\ue001b", "x" * 63 + "\ue000"]  # see INVALID_UTF8
HUGE_STRINGS = ["A" * HUGE_BYTES, "💥" * (HUGE_BYTES // 4)]
# Hostile strings made of a vocabulary word ("digits" -> "digits:optimizer", ...).
WORD_VARIANTS = [
    lambda w: w + ":optimizer",
    lambda w: w + ":latest",
    lambda w: w + "*",
    lambda w: "../" + w,
    lambda w: w + "\x00",
    lambda w: " " + w,
    lambda w: w.upper(),
    lambda w: w * 100,
    lambda w: w + "," + w,
    lambda w: w + ",,",
]
JSON_VALUES: list[object] = [
    None,
    [],
    {},
    "",
    "x",
    True,
    False,
    0,
    -1,
    1,
    2,
    2**31 - 1,
    2**31,
    2**40,
    2**63,
    -(2**63),
    10**6,
    10**11,
    1e308,
    -0.0,
    math.nan,
    math.inf,
    -math.inf,
    "NaN",
    "\ud800",
    [[]],
    {"": None},
]
JSON_TEXTS = [
    "[" * DEEP_JSON + "]" * DEEP_JSON,
    '{"a":' * DEEP_JSON + "1" + "}" * DEEP_JSON,
    "[" * DEEP_JSON,
    "1e999",
    "-1e999",
    "1" * 5000,
    '"\\ud800"',
    '{"a": 1, "a": 2}',
    "",
    "{",
    "nul",
    "[1,]",
    "\ufeff{}",
    "{}" * 1000,
]
DEEP = "\u0001deep\u0001"  # stands in a document for a node nested DEEP_JSON deep (see mutated_json)


@dataclass(frozen=True)
class FuzzRequest:
    kind: str
    messages: tuple[bytes, ...]  # one for a unary request; one or more for a client stream

    def describe(self, request_class: type[Message], limit: int = 400) -> str:
        """Each message decoded (when it parses) and as a hex prefix, for a failure's report."""
        parts = []
        for index, payload in enumerate(self.messages):
            try:
                text = text_format.MessageToString(request_class.FromString(payload), as_one_line=True)
            except DecodeError:
                text = "(does not parse)"
            text = text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} chars)"
            parts.append(f"#{index} {len(payload):,} bytes hex={payload[:48].hex()} {text}")
        return f"[{self.kind}] " + " | ".join(parts)


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of `choices`, each (weight, strategy), drawn in proportion to its weight."""
    bounds = list(itertools.accumulate(weight for weight, _ in choices))
    return st.integers(0, bounds[-1] - 1).flatmap(
        lambda index: choices[bisect.bisect_right(bounds, index)][1]
    )


def message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


def is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def is_repeated(field: FieldDescriptor) -> bool:
    return field.is_repeated


class Fuzzer:
    """Strategies for messages and requests, with `vocabulary`: words by "Message.field" or field name."""

    def __init__(self, vocabulary: Mapping[str, Sequence[str]]):
        self.vocabulary = {key: tuple(words) for key, words in vocabulary.items()}
        self._values: dict[tuple[FieldDescriptor, int], st.SearchStrategy] = {}

    def requests(
        self, method: MethodDescriptor, seeds: Sequence[Sequence[Message]]
    ) -> st.SearchStrategy[FuzzRequest]:
        """FuzzRequests for `method`; `seeds` are valid requests, each the list of its messages."""
        most = MAX_STREAM if method.client_streaming else 1
        generated = st.lists(self.messages(method.input_type, 0), min_size=1, max_size=most)
        valid = weighted((2, st.sampled_from(seeds).map(list)), (1, generated)) if seeds else generated

        @st.composite
        def hostile(draw) -> tuple[bytes, ...]:
            sent = draw(valid)
            index = draw(st.integers(0, len(sent) - 1))
            sent[index] = draw(self.mutated(sent[index]))
            if len(sent) > 1 and draw(st.integers(0, 3)) == 0:  # a stream out of order
                sent.insert(draw(st.integers(0, len(sent) - 1)), sent.pop(index))
            return tuple(serialise(message) for message in sent)

        def damaged(damage):
            @st.composite
            def build(draw) -> tuple[bytes, ...]:
                sent = [serialise(message) for message in draw(valid)]
                index = draw(st.integers(0, len(sent) - 1))
                sent[index] = draw(damage(sent[index]))
                return tuple(sent)

            return build()

        random_bytes = st.lists(st.binary(max_size=200), min_size=1, max_size=most).map(tuple)
        return weighted(
            (2, random_bytes.map(lambda sent: FuzzRequest("random", sent))),
            (2, damaged(cut).map(lambda sent: FuzzRequest("truncated", sent))),
            (2, damaged(flipped).map(lambda sent: FuzzRequest("bitflip", sent))),
            (5, hostile().map(lambda sent: FuzzRequest("hostile", sent))),
        )

    # ------------------------------------------------------------ messages

    def messages(self, descriptor: Descriptor, depth: int) -> st.SearchStrategy[Message]:
        """Messages with each field set (to a hostile value) or not; empty from MAX_DEPTH down."""
        cls = message_class(descriptor)
        if depth >= MAX_DEPTH:
            return st.just(cls())

        @st.composite
        def build(draw):
            message = cls()
            for field in descriptor.fields:  # of a oneof, the last field set wins, as on the wire
                if draw(st.booleans()):
                    assign(message, field, draw(self.values(field, depth)))
            return message

        return build()

    def mutated(self, seed: Message) -> st.SearchStrategy[Message]:
        """A copy of `seed` with one to three fields, possibly nested, set to hostile values."""

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            message = type(seed)()
            message.CopyFrom(seed)
            for _ in range(draw(st.integers(1, 3))):
                target, depth = message, 0
                while fields := list(target.DESCRIPTOR.fields):  # a message without fields stays as it is
                    field = draw(st.sampled_from(fields))
                    if (
                        field.message_type
                        and not is_map(field)
                        and depth + 1 < MAX_DEPTH
                        and draw(st.booleans())
                    ):
                        items = getattr(target, field.name)
                        if not is_repeated(field):
                            target, depth = items, depth + 1
                            continue
                        if items:
                            target, depth = items[draw(st.integers(0, len(items) - 1))], depth + 1
                            continue
                    current = getattr(target, field.name)
                    if (
                        field.type == FieldDescriptor.TYPE_STRING
                        and not is_repeated(field)
                        and is_json_container(current)
                        and draw(st.booleans())
                    ):
                        setattr(target, field.name, draw(mutated_json(current)))
                    else:
                        assign(target, field, draw(self.values(field, depth)))
                    break
            return message

        return build()

    # ------------------------------------------------------------ values by field type

    def values(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy:
        """A value for `field`: a scalar or message, or a list of them for a repeated field."""
        key = (field, depth)
        if key not in self._values:
            self._values[key] = self._new_values(field, depth)
        return self._values[key]

    def _new_values(self, field: FieldDescriptor, depth: int) -> st.SearchStrategy:
        if is_map(field):
            entry = field.message_type
            return st.lists(
                st.tuples(
                    self.values(entry.fields_by_name["key"], depth + 1),
                    self.values(entry.fields_by_name["value"], depth + 1),
                ),
                max_size=3,
            )
        if field.message_type is not None:
            one = self.messages(field.message_type, depth + 1)
        else:
            one = self.scalars(field)
        if not is_repeated(field):
            return one
        return weighted((30, st.lists(one, max_size=4)), (1, one.map(huge_list)))

    def scalars(self, field: FieldDescriptor) -> st.SearchStrategy:
        cpp = field.cpp_type
        if cpp == FieldDescriptor.CPPTYPE_BOOL:
            return st.booleans()
        if cpp in (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT):
            width: Literal[32, 64] = 64 if cpp == FieldDescriptor.CPPTYPE_DOUBLE else 32
            return weighted((2, st.sampled_from(FLOATS)), (1, st.floats(width=width)))
        if cpp == FieldDescriptor.CPPTYPE_ENUM:  # proto3 enums are open: any int32 goes on the wire
            known = [value.number for value in field.enum_type.values]
            return weighted((3, st.sampled_from(known)), (1, st.sampled_from([-1, 99, 2**31 - 1, -(2**31)])))
        if field.type == FieldDescriptor.TYPE_BYTES:
            return weighted(
                (30, st.binary(max_size=64)),
                (10, st.just(b"\x00" * 4096)),
                (1, st.just(b"\xff" * HUGE_BYTES)),
            )
        if cpp == FieldDescriptor.CPPTYPE_STRING:
            if field.name.endswith("json"):
                return weighted((3, json_documents()), (1, self.strings(field)))
            return self.strings(field)
        low, high = INT_RANGES[cpp]
        return weighted((3, st.sampled_from(INTS[cpp])), (2, st.integers(0, 16)), (1, st.integers(low, high)))

    def strings(self, field: FieldDescriptor) -> st.SearchStrategy[str]:
        words = self.vocabulary.get(
            f"{field.containing_type.full_name}.{field.name}", self.vocabulary.get(field.name, ())
        )
        text = st.text(
            alphabet=st.characters(codec="utf-8", exclude_characters="".join(INVALID_UTF8)), max_size=30
        )
        # Rare: strings that are not UTF-8 never get past grpcio's parsing, so they test little else.
        common = [
            (20, st.sampled_from(STRINGS)),
            (10, text),
            (1, st.sampled_from(HUGE_STRINGS)),
            (1, st.sampled_from(NOT_UTF8)),
        ]
        if not words:
            return weighted(*common)
        variants = st.builds(
            lambda word, variant: variant(word), st.sampled_from(words), st.sampled_from(WORD_VARIANTS)
        )
        return weighted((40, st.sampled_from(words)), (30, variants), *common)


def assign(message: Message, field: FieldDescriptor, value) -> None:
    """Set `field` of `message` to `value` (a list for a repeated field), replacing what it held."""
    message.ClearField(field.name)
    target = getattr(message, field.name)
    if is_map(field):
        for key, item in value:
            if isinstance(item, Message):
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif is_repeated(field):
        if field.message_type is not None:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.message_type is not None:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def huge_list(value) -> list:
    """`value` repeated until the list takes about HUGE_BYTES on the wire (at most 100,000 items)."""
    if isinstance(value, Message):
        size = value.ByteSize() + 2
    else:
        size = len(value) + 2 if isinstance(value, (str, bytes)) else 8
    return [value] * max(1, min(100_000, HUGE_BYTES // size))


# ---------------------------------------------------------------- JSON in strings


def json_documents() -> st.SearchStrategy[str]:
    """Hostile JSON text: random documents of extreme values, deep nesting, and text that is not JSON."""
    leaves = st.one_of(st.sampled_from(JSON_VALUES), st.integers(), st.floats(), st.text(max_size=10))
    documents = st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )
    return weighted((3, documents.map(dump)), (1, st.sampled_from(JSON_TEXTS)))


def dump(document) -> str:
    """JSON text; NaN and Infinity as the literals Python's json reads, DEEP as deep nesting."""
    text = json.dumps(document, allow_nan=True)
    return text.replace(json.dumps(DEEP), "[" * DEEP_JSON + "0" + "]" * DEEP_JSON)


def json_paths(document, path=()) -> list[tuple]:
    """Every node of a parsed JSON document, as the keys and indices that lead to it."""
    paths = [path]
    if isinstance(document, dict):
        for key, value in document.items():
            paths += json_paths(value, (*path, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            paths += json_paths(value, (*path, index))
    return paths


def is_json_container(text: str) -> bool:
    try:
        return isinstance(json.loads(text), (dict, list))
    except (ValueError, RecursionError):  # not JSON, or nested deeper than json.loads goes
        return False


@st.composite
def mutated_json(draw, text: str) -> str:
    """`text`, a JSON document, with one node replaced, repeated, nested deep, dropped or added to."""
    document = json.loads(text)
    path = draw(st.sampled_from(json_paths(document)))
    parent, node = None, document
    for step in path:
        parent, node = node, node[step]
    operation = draw(st.sampled_from(["replace", "replace", "replace", "repeat", "deepen", "drop", "add"]))
    if operation == "drop" and parent is not None:
        del parent[path[-1]]
        return dump(document)
    if operation == "add" and isinstance(node, dict):
        node[draw(st.sampled_from(["extra", "type", "", "__proto__"]))] = draw(st.sampled_from(JSON_VALUES))
        return dump(document)
    new: object
    if operation == "repeat" and isinstance(node, list) and node:
        new = (node * (200_000 // len(node) + 1))[:200_000]
    elif operation == "deepen":
        new = DEEP
    else:
        new = draw(st.sampled_from(JSON_VALUES))
    if parent is None:
        return dump(new)
    parent[path[-1]] = new
    return dump(document)


# ---------------------------------------------------------------- damage to serialised messages


def serialise(message: Message) -> bytes:
    payload = message.SerializeToString()
    for marker, invalid in INVALID_UTF8.items():
        payload = payload.replace(marker.encode(), invalid)
    return payload


@st.composite
def cut(draw, payload: bytes) -> bytes:
    return payload[: draw(st.integers(0, max(0, len(payload) - 1)))]


@st.composite
def flipped(draw, payload: bytes) -> bytes:
    if not payload:
        return payload
    data = bytearray(payload)
    for _ in range(draw(st.integers(1, 8))):
        bit = draw(st.integers(0, len(data) * 8 - 1))
        data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def field_count(descriptor: Descriptor, depth: int = 0) -> int:
    """How many fields a request type has, nested ones included (down to MAX_DEPTH)."""
    if depth >= MAX_DEPTH:
        return 0
    return sum(
        1 + (field_count(field.message_type, depth + 1) if field.message_type else 0)
        for field in descriptor.fields
    )
