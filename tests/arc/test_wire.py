"""Tests for arc/wire.py: frames on a byte stream."""

from __future__ import annotations

import struct
import time
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arc.errors import BadInput, NotFound
from arc.messages import MAX_MESSAGE_BYTES, Message
from arc.wire import (
    FrameDecoder,
    answer_decoder,
    error_frame,
    frame,
    ok_frame,
    request_decoder,
    request_frame,
)

payloads = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
    | st.binary(max_size=100),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
verbs = st.text(min_size=1, max_size=40)
replies = st.none() | st.integers(min_value=0, max_value=2**32)
requests = st.builds(Message, verb=verbs, payload=payloads, reply=replies)


def encode(message: Message) -> bytes:
    return request_frame(message.verb, message.payload, message.reply)


def feed_in_pieces(
    decoder: FrameDecoder[Any], data: bytes, cuts: list[int]
) -> list[Any]:
    out: list[Any] = []
    start = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        out += decoder.feed_all(data[start:cut])
        start = cut
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(requests, max_size=8), st.lists(st.integers(min_value=0), max_size=10))
def test_requests_survive_a_round_trip_whatever_the_split_points(
    messages: list[Message], cuts: list[int]
) -> None:
    data = b"".join(encode(m) for m in messages)
    decoder = request_decoder()

    decoded = feed_in_pieces(decoder, data, cuts)

    assert decoded == messages
    assert decoder.at_boundary


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=6))
def test_random_bytes_never_raise_anything_but_bad_input(
    data: bytes, cuts: list[int]
) -> None:
    decoder = request_decoder()

    try:
        messages = feed_in_pieces(decoder, data, cuts)
    except BadInput:
        return

    assert all(isinstance(m, Message) for m in messages)


@settings(max_examples=200, deadline=None)
@given(st.lists(payloads, max_size=5), st.binary(max_size=40))
def test_framed_values_of_any_shape_never_raise_anything_but_bad_input(
    values: list[Any], tail: bytes
) -> None:
    data = b"".join(frame(msgpack.packb(v, use_bin_type=True)) for v in values) + tail
    decoder = request_decoder()

    try:
        decoder.feed_all(data)
    except BadInput as exc:
        assert exc.message.startswith(("request:", "message:"))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(replies, payloads), max_size=5), st.integers(min_value=0))
def test_answers_survive_a_round_trip(
    answers: list[tuple[int | None, Any]], cut: int
) -> None:
    data = b"".join(ok_frame(r, p) for r, p in answers)
    decoder = answer_decoder()

    decoded = feed_in_pieces(decoder, data, [cut])

    assert [(a.reply, a.ok, a.error) for a in decoded] == [
        (r, p, None) for r, p in answers
    ]


def test_an_error_answer_carries_its_kind_and_message() -> None:
    decoder = answer_decoder()

    (answer,) = decoder.feed_all(
        error_frame(4, NotFound("domain: a.example not found"))
    )

    assert answer.reply == 4
    assert isinstance(answer.error, NotFound)
    with pytest.raises(NotFound, match=r"a\.example"):
        answer.result()


def test_an_oversized_length_is_refused_as_soon_as_its_four_bytes_arrive() -> None:
    decoder = request_decoder()
    header = struct.pack(">I", MAX_MESSAGE_BYTES + 1)

    assert decoder.feed_all(header[:3]) == []
    with pytest.raises(BadInput, match=r"frame of 2097153 bytes is over the limit"):
        decoder.feed_all(header[3:])

    assert decoder.buffered == 0


def test_a_frame_of_exactly_the_limit_is_accepted() -> None:
    overhead = len(msgpack.packb({"verb": "A.b", "payload": b"x" * 70000}))
    payload = b"x" * (MAX_MESSAGE_BYTES - overhead + 70000)
    body = msgpack.packb({"verb": "A.b", "payload": payload})
    assert len(body) == MAX_MESSAGE_BYTES
    decoder = request_decoder()

    (message,) = decoder.feed_all(frame(body))

    assert message.payload == payload


def test_an_empty_frame_is_refused() -> None:
    with pytest.raises(BadInput, match="empty frame"):
        request_decoder().feed_all(b"\x00\x00\x00\x00")


def test_malformed_msgpack_is_refused_naming_it() -> None:
    with pytest.raises(BadInput, match="not valid msgpack"):
        request_decoder().feed_all(frame(b"\xc1"))


def test_trailing_bytes_inside_a_frame_are_refused() -> None:
    body = msgpack.packb({"verb": "A.b", "payload": None}) + b"\x01"

    with pytest.raises(BadInput, match="not valid msgpack"):
        request_decoder().feed_all(frame(body))


def test_a_frame_of_the_wrong_shape_is_refused_naming_the_field() -> None:
    body = msgpack.packb({"verb": "A.b", "payload": None, "extra": 1})

    with pytest.raises(BadInput, match="unexpected field"):
        request_decoder().feed_all(frame(body))


def test_a_list_instead_of_a_map_is_refused() -> None:
    with pytest.raises(BadInput, match="expected a map, got list"):
        request_decoder().feed_all(frame(msgpack.packb([1, 2])))


def test_a_decoder_refuses_everything_after_a_failure() -> None:
    decoder = request_decoder()
    with pytest.raises(BadInput):
        decoder.feed_all(frame(b"\xc1"))

    with pytest.raises(BadInput, match="already refused"):
        decoder.feed_all(request_frame("A.b", None, 1))


def test_messages_before_a_bad_frame_in_the_same_read_come_out_first() -> None:
    decoder = request_decoder()
    data = request_frame("A.b", None, 1) + frame(b"\xc1") + request_frame("A.c")
    stream = decoder.feed(data)

    first = next(stream)
    with pytest.raises(BadInput, match="not valid msgpack"):
        next(stream)

    assert first == Message(verb="A.b", payload=None, reply=1)
    assert decoder.buffered == 0


def test_many_small_frames_in_one_read_are_decoded_in_linear_time() -> None:
    data = request_frame("A.b", None, 1) * 100_000
    decoder = request_decoder()

    started = time.perf_counter()
    messages = decoder.feed_all(data)
    elapsed = time.perf_counter() - started

    assert len(messages) == 100_000
    assert elapsed < 5.0


def test_an_answer_with_neither_ok_nor_error_is_refused() -> None:
    with pytest.raises(BadInput, match="neither"):
        answer_decoder().feed_all(frame(msgpack.packb({"reply": 1})))


def test_deeply_nested_input_is_refused_not_crashing() -> None:
    body = b"\x91" * 5000 + b"\xc0"

    with pytest.raises(BadInput):
        request_decoder().feed_all(frame(body))
