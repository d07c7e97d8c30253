"""Section 5: FrameDecoder, close payloads and server frame headers."""

import struct
from typing import Iterable, List, Sequence, Tuple, Union

import pytest
from conftest import client_frame
from hypothesis import given, settings
from hypothesis import strategies as st

from websockify_min import (
    DEFAULT_MAX_MESSAGE,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Frame,
    FrameDecoder,
    ProtocolError,
    close_payload,
    encode_frame,
    frame_header,
    parse_close,
)

PROTOCOL_ERROR, INVALID_DATA, MESSAGE_TOO_BIG = 1002, 1007, 1009
Event = Tuple[int, bytes, bool]
DATA = (OP_TEXT, OP_BINARY)


def merge(frames: Iterable[Frame]) -> List[Event]:
    """Join consecutive chunks of one data message, so events compare whatever the chunking.

    Control frames (which may come between the frames of a message) split a message's
    chunks into separate runs; an event list compares equal to another when they carry the
    same runs, the same control frames and the same message ends.
    """
    merged: List[Event] = []
    open_run = False  # the last entry is a data run whose message has not ended
    for frame in frames:
        assert isinstance(frame, Frame) and isinstance(frame.fin, bool)
        assert isinstance(frame.payload, (bytes, bytearray))
        opcode, payload = frame.opcode, bytes(frame.payload)
        if opcode in DATA and open_run and merged[-1][0] == opcode:
            merged[-1] = (opcode, merged[-1][1] + payload, frame.fin)
        else:
            merged.append((opcode, payload, frame.fin))
        open_run = opcode in DATA and not frame.fin
        if opcode not in DATA:
            assert frame.fin
    return merged


def cut(wire: bytes, sizes: Sequence[int]) -> List[bytes]:
    """*wire* cut into pieces of the given sizes (cycled), the last piece holding the rest."""
    pieces, pos, index = [], 0, 0
    while pos < len(wire):
        size = sizes[index % len(sizes)] if sizes else len(wire)
        pieces.append(wire[pos : pos + size])
        pos, index = pos + size, index + 1
    return pieces


def feed_all(pieces: Iterable[Union[bytes, bytearray]], **kwargs: int) -> List[Frame]:
    decoder = FrameDecoder(**kwargs)
    events: List[Frame] = []
    for piece in pieces:
        events += decoder.feed(piece)
    decoder.check()
    return events


def close_code(pieces: Iterable[bytes], **kwargs: int) -> int:
    """The close code of the violation in *pieces*, from feed() or the final check()."""
    decoder = FrameDecoder(**kwargs)
    try:
        for piece in pieces:
            decoder.feed(piece)
        decoder.check()
    except ProtocolError as exc:
        assert isinstance(exc.reason, str) and exc.reason
        assert exc.args == (exc.close_code, exc.reason)
        return exc.close_code
    raise AssertionError("no ProtocolError")


def every_chunking(wire: bytes) -> List[List[bytes]]:
    """Whole, byte by byte, and split in two at every offset."""
    ways = [[wire], [wire[i : i + 1] for i in range(len(wire))]]
    ways += [[wire[:i], wire[i:]] for i in range(1, len(wire))]
    return ways


def assert_violation(wire: bytes, code: int, **kwargs: int) -> None:
    for pieces in every_chunking(wire) if len(wire) < 400 else [[wire], cut(wire, [7])]:
        assert close_code(pieces, **kwargs) == code, pieces


def pattern(size: int) -> bytes:
    """Deterministic, non-repeating-looking bytes, fast to build in any size."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


# -- valid streams -----------------------------------------------------------------------------


def test_single_frames_of_each_kind() -> None:
    wire = (
        client_frame(OP_TEXT, "h\u00e9llo".encode())
        + client_frame(OP_BINARY, b"\x00\xff")
        + client_frame(OP_PING, b"p")
        + client_frame(OP_PONG)
        + client_frame(OP_BINARY)
        + client_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye")
    )
    assert merge(FrameDecoder().feed(wire)) == [
        (OP_TEXT, "h\u00e9llo".encode(), True),
        (OP_BINARY, b"\x00\xff", True),
        (OP_PING, b"p", True),
        (OP_PONG, b"", True),
        (OP_BINARY, b"", True),
        (OP_CLOSE, b"\x03\xe8bye", True),
    ]


def test_fragmented_message_with_control_frames_between() -> None:
    wire = (
        client_frame(OP_BINARY, b"ab", fin=False)
        + client_frame(OP_PING, b"1")
        + client_frame(OP_CONT, b"", fin=False)
        + client_frame(OP_CONT, b"cd", fin=False)
        + client_frame(OP_PONG, b"2")
        + client_frame(OP_CONT, b"e")
    )
    events = [tuple(frame) for frame in FrameDecoder().feed(wire)]
    assert events == [
        (OP_BINARY, b"ab", False),
        (OP_PING, b"1", True),
        (OP_BINARY, b"", False),  # continuation chunks carry the message's opcode
        (OP_BINARY, b"cd", False),
        (OP_PONG, b"2", True),
        (OP_BINARY, b"e", True),
    ]


def test_data_streams_out_as_it_arrives_and_control_frames_wait_until_whole() -> None:
    decoder = FrameDecoder()
    data, ping = client_frame(OP_BINARY, b"0123456789"), client_frame(OP_PING, b"abcdef")
    assert decoder.feed(data[:1]) == []
    assert decoder.feed(data[1:6]) == []  # header and mask, no payload yet
    assert [tuple(f) for f in decoder.feed(data[6:9])] == [(OP_BINARY, b"012", False)]
    assert [tuple(f) for f in decoder.feed(data[9:] + ping[:10])] == [(OP_BINARY, b"3456789", True)]
    assert decoder.feed(ping[10:11]) == []
    assert [tuple(f) for f in decoder.feed(ping[11:])] == [(OP_PING, b"abcdef", True)]
    assert decoder.feed(b"") == []


@pytest.mark.parametrize("size", [0, 1, 125, 126, 1023, 1024, 65535, 65536, 70_000])
def test_payload_lengths_in_each_encoding(size: int) -> None:
    payload = pattern(size)
    wire = client_frame(OP_BINARY, payload, mask=b"\x9c\x01\xfe\x42")
    assert merge(FrameDecoder().feed(wire)) == [(OP_BINARY, payload, True)]
    assert merge(feed_all(cut(wire, [1, 2, 3, 1000, 4096]))) == [(OP_BINARY, payload, True)]


def test_control_frame_of_125_bytes() -> None:
    payload = pattern(125)
    for opcode in (OP_PING, OP_PONG):
        assert merge(FrameDecoder().feed(client_frame(opcode, payload))) == [
            (opcode, payload, True)
        ]


def test_16_bit_length_encoding_of_a_small_control_frame_is_accepted() -> None:
    wire = struct.pack("!BBH", 0x80 | OP_PING, 0x80 | 126, 3) + b"\0\0\0\0abc"
    assert merge(FrameDecoder().feed(wire)) == [(OP_PING, b"abc", True)]


def test_events_do_not_alias_the_fed_buffer() -> None:
    """The relay reuses its receive buffer once feed() returns."""
    for payload in (b"small", pattern(5000)):
        buffer = bytearray(client_frame(OP_BINARY, payload) + client_frame(OP_PING, b"ping"))
        events = FrameDecoder().feed(memoryview(buffer))
        buffer[:] = bytes(len(buffer))
        assert [(f.opcode, bytes(f.payload)) for f in events] == [
            (OP_BINARY, payload),
            (OP_PING, b"ping"),
        ]


def test_max_message_is_inclusive_and_per_message() -> None:
    assert DEFAULT_MAX_MESSAGE == 64 * 1024 * 1024
    wire = client_frame(OP_BINARY, pattern(60), fin=False) + client_frame(OP_CONT, pattern(40))
    wire += client_frame(OP_TEXT, b"x" * 100)
    assert len(merge(feed_all([wire], max_message=100))) == 2


def test_max_message_zero_means_no_limit() -> None:
    decoder = FrameDecoder(max_message=0)
    header = struct.pack("!BBQ", 0x80 | OP_BINARY, 0x80 | 127, 1 << 40) + b"\1\2\3\4"
    assert decoder.feed(header) == []
    assert [f.payload for f in decoder.feed(b"\1\2\3\4")] == [b"\0\0\0\0"]


# -- hypothesis: any valid stream, any chunking -----------------------------------------------

MASKS = st.binary(min_size=4, max_size=4)
PAYLOADS = st.one_of(
    st.binary(max_size=300),
    st.integers(0, 3000).map(pattern),
    st.integers(65_000, 70_000).map(pattern),  # 64-bit lengths now and then
)
CONTROL = st.tuples(st.sampled_from([OP_PING, OP_PONG]), st.binary(max_size=125), MASKS)
VALID_CODES = st.sampled_from([1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011])
VALID_CODES |= st.sampled_from([1012, 1013, 1014, 3000, 4999]) | st.integers(3000, 4999)


@st.composite
def messages(draw: st.DrawFn) -> Tuple[bytes, List[Frame]]:
    """One data message (maybe fragmented, maybe with control frames between its frames)."""
    opcode = draw(st.sampled_from(DATA))
    if opcode == OP_TEXT:
        data = draw(st.text(max_size=200)).encode("utf-8")
        if draw(st.booleans()):
            data *= draw(st.integers(1, 400))
    else:
        data = draw(PAYLOADS)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=4)))
    bounds = [0, *cuts, len(data)]
    fragments = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    wire, expected = b"", []
    for index, fragment in enumerate(fragments):
        last = index == len(fragments) - 1
        wire += client_frame(OP_CONT if index else opcode, fragment, fin=last, mask=draw(MASKS))
        expected.append(Frame(opcode, fragment, last))
        if not last and draw(st.integers(0, 3)) == 0:
            control, payload, mask = draw(CONTROL)
            wire += client_frame(control, payload, mask=mask)
            expected.append(Frame(control, payload, True))
    return wire, expected


@st.composite
def streams(draw: st.DrawFn) -> Tuple[bytes, List[Frame]]:
    """Messages and control frames, maybe ending with a valid close frame."""
    wire, expected = b"", []
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 3)):
            part, frames = draw(messages())
        else:
            control, payload, mask = draw(CONTROL)
            part, frames = (
                client_frame(control, payload, mask=mask),
                [Frame(control, payload, True)],
            )
        wire += part
        expected += frames
    if draw(st.booleans()):
        code, reason = draw(VALID_CODES), draw(st.text(max_size=40))
        payload = close_payload(code, reason) if draw(st.booleans()) else b""
        wire += client_frame(OP_CLOSE, payload, mask=draw(MASKS))
        expected.append(Frame(OP_CLOSE, payload, True))
    return wire, expected


@settings(max_examples=150, deadline=None)
@given(streams(), st.lists(st.integers(1, 2000), max_size=40))
def test_events_do_not_depend_on_chunking(
    stream: Tuple[bytes, List[Frame]], sizes: List[int]
) -> None:
    wire, expected = stream
    whole = FrameDecoder().feed(wire)
    assert merge(whole) == merge(expected)
    assert merge(feed_all(cut(wire, sizes))) == merge(expected)
    assert merge(feed_all([bytearray(p) for p in cut(wire, [1, 13, 2, 127, 3])])) == merge(expected)


@settings(max_examples=60, deadline=None)
@given(streams().filter(lambda stream: len(stream[0]) < 3000))
def test_events_byte_by_byte(stream: Tuple[bytes, List[Frame]]) -> None:
    """h11's discipline: the stream fed one byte at a time."""
    wire, expected = stream
    assert merge(feed_all(wire[i : i + 1] for i in range(len(wire)))) == merge(expected)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_close_payload_round_trips(data: st.DataObject) -> None:
    code = data.draw(VALID_CODES)
    reason = data.draw(st.text(max_size=200))
    payload = close_payload(code, reason)
    assert len(payload) <= 125
    got_code, got_reason = parse_close(payload)
    assert got_code == code
    assert reason.startswith(got_reason)
    dropped = len(reason.encode("utf-8")) - len(got_reason.encode("utf-8"))
    assert dropped == 0 or len(payload) > 125 - 4  # cut only as far as needed, within a char
    wire = client_frame(OP_CLOSE, payload)
    assert merge(FrameDecoder().feed(wire)) == [(OP_CLOSE, payload, True)]


# -- hypothesis: any bytes ---------------------------------------------------------------------


def feed_anything(pieces: Iterable[bytes], **kwargs: int) -> None:
    decoder = FrameDecoder(**kwargs)
    try:
        for piece in pieces:
            for frame in decoder.feed(piece):
                assert isinstance(frame, Frame)
                assert frame.opcode in (OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG)
                if frame.opcode not in DATA:
                    assert frame.fin and len(frame.payload) <= 125
        decoder.check()
    except ProtocolError as exc:
        assert exc.close_code in (PROTOCOL_ERROR, INVALID_DATA, MESSAGE_TOO_BIG)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=500), st.lists(st.integers(1, 64), max_size=20))
def test_any_bytes_give_events_or_protocol_error(data: bytes, sizes: List[int]) -> None:
    feed_anything(cut(data, sizes))


@st.composite
def plausible_frames(draw: st.DrawFn) -> bytes:
    """Frames with random header fields, so that garbage gets past the first checks."""
    opcode = draw(st.sampled_from([0, 1, 2, 8, 9, 10]) | st.integers(0, 15))
    payload = draw(st.binary(max_size=140))
    length = draw(st.none() | st.integers(0, 200) | st.sampled_from([1 << 16, 1 << 63]))
    wire = client_frame(
        opcode,
        payload,
        fin=draw(st.booleans()),
        mask=draw(st.none() | MASKS) if draw(st.integers(0, 9)) == 0 else draw(MASKS),
        rsv=draw(st.integers(0, 7)) if draw(st.integers(0, 9)) == 0 else 0,
        length=length if draw(st.integers(0, 4)) == 0 else None,
    )
    if opcode == OP_CLOSE and draw(st.booleans()):
        code = draw(st.integers(0, 5000))
        reason = draw(st.binary(max_size=10) | st.text(max_size=5).map(str.encode))
        wire = client_frame(OP_CLOSE, struct.pack("!H", code) + reason, mask=draw(MASKS))
    return wire


@settings(max_examples=400, deadline=None)
@given(
    st.lists(plausible_frames(), max_size=6),
    st.lists(st.integers(1, 64), max_size=20),
    st.sampled_from([0, 50, 200, DEFAULT_MAX_MESSAGE]),
)
def test_plausible_garbage_gives_events_or_protocol_error(
    frames: List[bytes], sizes: List[int], max_message: int
) -> None:
    feed_anything(cut(b"".join(frames), sizes), max_message=max_message)


# -- violations: each with its exact close code ------------------------------------------------


@pytest.mark.parametrize("rsv", range(1, 8))
@pytest.mark.parametrize("opcode", [OP_BINARY, OP_TEXT, OP_CONT, OP_PING, OP_CLOSE])
def test_reserved_bits_get_1002(rsv: int, opcode: int) -> None:
    assert_violation(client_frame(opcode, b"abc", rsv=rsv), PROTOCOL_ERROR)


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes_get_1002(opcode: int) -> None:
    assert_violation(client_frame(opcode, b"abc"), PROTOCOL_ERROR)
    assert_violation(client_frame(opcode, b"", fin=False), PROTOCOL_ERROR)


@pytest.mark.parametrize("opcode", [OP_BINARY, OP_TEXT, OP_PING, OP_PONG, OP_CLOSE])
def test_unmasked_frames_get_1002(opcode: int) -> None:
    assert_violation(client_frame(opcode, b"abc", mask=None), PROTOCOL_ERROR)
    assert_violation(client_frame(opcode, mask=None), PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "wire",
    [
        client_frame(0x3, b"abcdefgh"),
        client_frame(OP_BINARY, b"abcdefgh", rsv=4),
        client_frame(OP_BINARY, b"abcdefgh", mask=None),
    ],
)
def test_first_two_bytes_are_enough_to_refuse(wire: bytes) -> None:
    """A peer breaking these rules may never send the rest of the header."""
    with pytest.raises(ProtocolError) as caught:
        FrameDecoder().feed(wire[:2])
    assert caught.value.close_code == PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
@pytest.mark.parametrize("size", [126, 127, 65535, 65536])
def test_control_frame_over_125_bytes_gets_1002(opcode: int, size: int) -> None:
    payload = struct.pack("!H", 1000) + b"x" * (size - 2)
    assert_violation(client_frame(opcode, payload), PROTOCOL_ERROR)
    header_only = client_frame(opcode, length=size)  # refused before any payload arrives
    assert close_code([header_only]) == PROTOCOL_ERROR


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmented_control_frame_gets_1002(opcode: int) -> None:
    assert_violation(client_frame(opcode, b"", fin=False), PROTOCOL_ERROR)
    inside = client_frame(OP_BINARY, b"a", fin=False) + client_frame(opcode, b"", fin=False)
    assert_violation(inside, PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "wire",
    [
        client_frame(OP_CONT, b"x"),
        client_frame(OP_CONT, b"", fin=False),
        client_frame(OP_TEXT, b"done") + client_frame(OP_CONT, b"more"),
        client_frame(OP_BINARY, b"a", fin=False)
        + client_frame(OP_CONT, b"b")
        + client_frame(OP_CONT, b"c"),
    ],
)
def test_continuation_outside_a_message_gets_1002(wire: bytes) -> None:
    assert_violation(wire, PROTOCOL_ERROR)


@pytest.mark.parametrize("first", DATA)
@pytest.mark.parametrize("second", DATA)
def test_new_data_frame_inside_a_fragmented_message_gets_1002(first: int, second: int) -> None:
    wire = client_frame(first, b"a", fin=False) + client_frame(second, b"b")
    assert_violation(wire, PROTOCOL_ERROR)
    wire = client_frame(first, b"a", fin=False) + client_frame(OP_PING) + client_frame(second)
    assert_violation(wire, PROTOCOL_ERROR)


@pytest.mark.parametrize("length", [1 << 63, (1 << 64) - 1, (1 << 63) + 5])
def test_64_bit_length_with_the_top_bit_set_gets_1002(length: int) -> None:
    for max_message in (0, DEFAULT_MAX_MESSAGE):
        wire = client_frame(OP_BINARY, length=length)
        assert_violation(wire, PROTOCOL_ERROR, max_message=max_message)


def test_message_over_max_message_gets_1009() -> None:
    assert_violation(client_frame(OP_BINARY, pattern(101)), MESSAGE_TOO_BIG, max_message=100)
    assert_violation(client_frame(OP_TEXT, b"x" * 101), MESSAGE_TOO_BIG, max_message=100)
    across = client_frame(OP_BINARY, pattern(60), fin=False) + client_frame(OP_CONT, pattern(41))
    assert_violation(across, MESSAGE_TOO_BIG, max_message=100)
    many = b"".join(
        client_frame(OP_CONT if i else OP_TEXT, b"x" * 10, fin=False) for i in range(11)
    )
    assert_violation(many, MESSAGE_TOO_BIG, max_message=100)


def test_message_over_max_message_is_refused_on_its_header() -> None:
    header = client_frame(OP_BINARY, length=DEFAULT_MAX_MESSAGE + 1)
    assert close_code([header]) == MESSAGE_TOO_BIG
    assert close_code([client_frame(OP_BINARY, length=1 << 62)]) == MESSAGE_TOO_BIG


def test_close_with_a_1_byte_payload_gets_1002() -> None:
    assert_violation(client_frame(OP_CLOSE, b"\x03"), PROTOCOL_ERROR)
    with pytest.raises(ProtocolError) as caught:
        parse_close(b"\x03")
    assert caught.value.close_code == PROTOCOL_ERROR


@pytest.mark.parametrize("code", [0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999])
@pytest.mark.parametrize("more", [5000, 65535])
def test_invalid_close_codes_get_1002(code: int, more: int) -> None:
    for bad in (code, more):
        assert_violation(client_frame(OP_CLOSE, struct.pack("!H", bad)), PROTOCOL_ERROR)
        assert_violation(client_frame(OP_CLOSE, struct.pack("!H", bad) + b"why"), PROTOCOL_ERROR)


@pytest.mark.parametrize("code", [*range(1000, 1004), *range(1007, 1015), 3000, 3999, 4000, 4999])
def test_valid_close_codes_pass(code: int) -> None:
    payload = struct.pack("!H", code) + "r\u00e9ason".encode()
    assert merge(FrameDecoder().feed(client_frame(OP_CLOSE, payload))) == [
        (OP_CLOSE, payload, True)
    ]
    assert parse_close(payload) == (code, "r\u00e9ason")


def test_close_without_a_code() -> None:
    assert merge(FrameDecoder().feed(client_frame(OP_CLOSE))) == [(OP_CLOSE, b"", True)]
    assert parse_close(b"") == (1005, "")


@pytest.mark.parametrize(
    "reason", [b"\xff", b"ok\xc3", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80b"]
)
def test_close_reason_not_utf8_gets_1007(reason: bytes) -> None:
    assert_violation(client_frame(OP_CLOSE, struct.pack("!H", 1000) + reason), INVALID_DATA)


BAD_UTF8 = [
    b"\xff",
    b"\x80",
    b"abc\xfe",
    b"\xc0\xaf",  # overlong "/"
    b"\xe0\x80\xaf",  # overlong, 3 bytes
    b"\xed\xa0\x80",  # a UTF-16 surrogate
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\xe2\x82",  # cut short at the end of the message
    b"\xe2\x82(",  # bad continuation byte
    "\u20ac".encode()[:-1] + b"abc",
]


@pytest.mark.parametrize("text", BAD_UTF8)
def test_invalid_utf8_in_a_text_message_gets_1007(text: bytes) -> None:
    assert_violation(client_frame(OP_TEXT, text), INVALID_DATA)
    assert merge(feed_all([client_frame(OP_BINARY, text)])) == [(OP_BINARY, text, True)]


@pytest.mark.parametrize("text", BAD_UTF8)
def test_invalid_utf8_split_across_frames_gets_1007(text: bytes) -> None:
    for split in range(len(text) + 1):
        wire = client_frame(OP_TEXT, text[:split], fin=False)
        wire += client_frame(OP_PING, b"between")
        wire += client_frame(OP_CONT, text[split:], fin=False) + client_frame(OP_CONT)
        assert_violation(wire, INVALID_DATA)


def test_truncated_utf8_before_an_empty_final_frame_gets_1007() -> None:
    wire = client_frame(OP_TEXT, "\u20ac".encode()[:2], fin=False) + client_frame(OP_CONT)
    assert_violation(wire, INVALID_DATA)


VALID_TEXT = "a\u00e9\u20ac\U0001d11e z\u0800\uffff\U0010ffff".encode()


def test_valid_multibyte_utf8_split_at_any_byte_passes() -> None:
    for split in range(len(VALID_TEXT) + 1):
        wire = client_frame(OP_TEXT, VALID_TEXT[:split], fin=False)
        wire += client_frame(OP_CONT, VALID_TEXT[split:])
        for pieces in every_chunking(wire):
            assert merge(feed_all(pieces)) == [(OP_TEXT, VALID_TEXT, True)]


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=50), st.lists(st.integers(0, 200), max_size=5), st.data())
def test_any_valid_text_split_anywhere_passes(
    text: str, cuts: List[int], data: st.DataObject
) -> None:
    encoded = text.encode("utf-8")
    bounds = sorted({0, len(encoded), *(min(c, len(encoded)) for c in cuts)})
    fragments = [encoded[a:b] for a, b in zip(bounds, bounds[1:])]
    wire = b"".join(
        client_frame(OP_CONT if i else OP_TEXT, frag, fin=i == len(fragments) - 1)
        for i, frag in enumerate(fragments)
    )
    sizes = data.draw(st.lists(st.integers(1, 9), min_size=1, max_size=5))
    assert merge(feed_all(cut(wire, sizes))) == [(OP_TEXT, encoded, True)]


# -- events before a violation are kept ------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (client_frame(OP_BINARY, b"x", rsv=1), PROTOCOL_ERROR),
        (client_frame(OP_PING, b"x" * 126), PROTOCOL_ERROR),
        (client_frame(OP_CLOSE, struct.pack("!H", 1005)), PROTOCOL_ERROR),
        (client_frame(OP_CLOSE, b"\x03\xe8\xff"), INVALID_DATA),
        (client_frame(OP_TEXT, b"\xff"), INVALID_DATA),
        (client_frame(OP_BINARY, b"x" * 200), MESSAGE_TOO_BIG),
    ],
)
def test_events_before_a_violation_are_returned_then_the_error(bad: bytes, code: int) -> None:
    good = client_frame(OP_BINARY, b"first") + client_frame(OP_PING, b"second")
    decoder = FrameDecoder(max_message=100)
    events = decoder.feed(good + bad + client_frame(OP_BINARY, b"never"))
    assert merge(events) == [(OP_BINARY, b"first", True), (OP_PING, b"second", True)]
    assert decoder.error is not None and decoder.error.close_code == code
    for _ in range(2):  # the error stays: check() and every later feed() raise it
        with pytest.raises(ProtocolError) as caught:
            decoder.check()
        assert caught.value.close_code == code
        with pytest.raises(ProtocolError) as caught:
            decoder.feed(client_frame(OP_BINARY, b"later"))
        assert caught.value.close_code == code


def test_a_chunk_before_invalid_utf8_in_the_same_feed_is_returned() -> None:
    decoder = FrameDecoder()
    wire = client_frame(OP_TEXT, b"ok", fin=False) + client_frame(OP_CONT, b"\xff")
    assert merge(decoder.feed(wire)) == [(OP_TEXT, b"ok", False)]
    with pytest.raises(ProtocolError) as caught:
        decoder.check()
    assert caught.value.close_code == INVALID_DATA


def test_a_violation_with_nothing_before_it_raises_from_feed() -> None:
    decoder = FrameDecoder()
    decoder.feed(client_frame(OP_BINARY, b"earlier feed"))
    with pytest.raises(ProtocolError) as caught:
        decoder.feed(client_frame(OP_BINARY, b"x", rsv=2))
    assert caught.value.close_code == PROTOCOL_ERROR


# -- server frames -----------------------------------------------------------------------------


def parse_server_header(header: bytes) -> Tuple[int, bool, int, int]:
    """(opcode, fin, payload length, header size) of an unmasked server frame header."""
    first, second = header[0], header[1]
    assert not first & 0x70 and not second & 0x80
    length, size = second & 0x7F, 2
    if length == 126:
        length, size = struct.unpack("!H", header[2:4])[0], 4
    elif length == 127:
        length, size = struct.unpack("!Q", header[2:10])[0], 10
    return first & 0x0F, bool(first & 0x80), length, size


@pytest.mark.parametrize(
    ("length", "size"),
    [(0, 2), (1, 2), (125, 2), (126, 4), (127, 4), (65535, 4), (65536, 10), (2**32, 10)],
)
@pytest.mark.parametrize("fin", [True, False])
@pytest.mark.parametrize("opcode", [OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG])
def test_frame_header_lengths(length: int, size: int, fin: bool, opcode: int) -> None:
    header = frame_header(opcode, length, fin)
    assert len(header) == size
    assert parse_server_header(header) == (opcode, fin, length, size)
    if size == 4:  # the shortest encoding is always used
        assert length >= 126
    elif size == 10:
        assert length >= 65536


def test_frame_header_of_the_largest_length() -> None:
    header = frame_header(OP_BINARY, 2**63 - 1)
    assert parse_server_header(header) == (OP_BINARY, True, 2**63 - 1, 10)


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536])
def test_frame_header_decodes_once_masked(length: int) -> None:
    """The same header with the mask bit and a mask added is what a client would send."""
    payload = pattern(length)
    header = bytearray(frame_header(OP_BINARY, length))
    header[1] |= 0x80
    mask = b"\x11\x22\x33\x44"
    wire = bytes(header) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert wire == client_frame(OP_BINARY, payload, mask=mask)
    assert merge(FrameDecoder().feed(wire)) == [(OP_BINARY, payload, True)]


def test_encode_frame() -> None:
    assert encode_frame(OP_PONG, b"abc") == b"\x8a\x03abc"
    assert encode_frame(OP_PING) == b"\x89\x00"
    assert encode_frame(OP_CLOSE, close_payload(1000)) == b"\x88\x02\x03\xe8"
    big = pattern(300)
    assert encode_frame(OP_BINARY, big) == b"\x82\x7e\x01\x2c" + big


@pytest.mark.parametrize(
    ("reason", "kept"),
    [
        ("", ""),
        ("short", "short"),
        ("a" * 123, "a" * 123),
        ("a" * 124, "a" * 123),
        ("a" * 500, "a" * 123),
        ("\u00e9" * 62, "\u00e9" * 61),  # 124 bytes: the 62nd character does not fit whole
        ("a" + "\u20ac" * 41, "a" + "\u20ac" * 40),  # 1 + 123 bytes: the last one is cut
        ("ab" + "\U0001d11e" * 31, "ab" + "\U0001d11e" * 30),
        ("\U0001d11e" * 30 + "abc", "\U0001d11e" * 30 + "abc"),  # exactly 123 bytes
    ],
)
def test_close_payload_truncates_reasons_without_splitting_a_character(
    reason: str, kept: str
) -> None:
    payload = close_payload(1001, reason)
    assert len(payload) <= 125
    assert payload == b"\x03\xe9" + kept.encode("utf-8")
    assert parse_close(payload) == (1001, kept)


def test_close_payload_of_a_code_alone() -> None:
    assert close_payload(1000) == b"\x03\xe8"
    assert close_payload(4999, "") == b"\x13\x87"
