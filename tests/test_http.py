"""Section 4: the sans-IO request parser, the upgrade checks and the responses."""

import base64
import http.client
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from websockify_min import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    HandshakeError,
    Request,
    _header_tokens,
    _is_upgrade,
    accept_key,
    accept_response,
    check_upgrade,
    error_response,
    find_head_end,
    parse_request,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
VERSION_13 = {"Sec-WebSocket-Version": "13"}
UPGRADE_FIELDS = (
    "Host: example.com",
    "Upgrade: websocket",
    "Connection: Upgrade",
    f"Sec-WebSocket-Key: {KEY}",
    "Sec-WebSocket-Version: 13",
)


def head(*fields: str, line: str = "GET /websockify HTTP/1.1") -> bytes:
    return ("\r\n".join((line, *fields)) + "\r\n\r\n").encode("latin-1")


def upgrade(
    *extra: str, line: str = "GET /websockify HTTP/1.1", drop: Sequence[str] = ()
) -> Request:
    """A parsed upgrade request, with *extra* fields added and fields named in *drop* left out."""
    fields = [f for f in UPGRADE_FIELDS if f.split(":")[0] not in drop]
    return parse_request(head(*fields, *extra, line=line))


def handshake_error(request: Request) -> HandshakeError:
    with pytest.raises(HandshakeError) as caught:
        check_upgrade(request)
    return caught.value


def parse_error(data: bytes) -> HandshakeError:
    with pytest.raises(HandshakeError) as caught:
        parse_request(data)
    return caught.value


# -- find_head_end ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"G", b"GET / HTTP/1.1", b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: x\r\n\r"],
)
def test_find_head_end_waits_for_the_blank_line(data: bytes) -> None:
    assert find_head_end(data) == -1
    assert find_head_end(bytearray(data)) == -1


def test_find_head_end_points_just_past_the_first_blank_line() -> None:
    request = head("Host: x")
    assert find_head_end(request) == len(request)
    assert find_head_end(bytearray(request + b"\x81\x80early frame bytes")) == len(request)
    assert find_head_end(request + head("Host: y")) == len(request)


def test_find_head_end_limit_is_16_KiB() -> None:
    assert MAX_HEAD_BYTES == 16 * 1024
    filler = b"GET / HTTP/1.1\r\nX: "
    exact = filler + b"a" * (MAX_HEAD_BYTES - len(filler) - 4) + b"\r\n\r\n"
    assert len(exact) == MAX_HEAD_BYTES
    assert find_head_end(exact) == MAX_HEAD_BYTES
    assert find_head_end(exact[:-1]) == -1  # one byte short of the limit: keep reading
    for too_long in (exact[:-4] + b"b\r\n\r\n", exact[:-1] + b"b", b"x" * 100_000):
        with pytest.raises(HandshakeError) as caught:
            find_head_end(too_long)
        assert (caught.value.status, caught.value.headers) == (431, {})


def test_find_head_end_honours_a_smaller_limit() -> None:
    assert find_head_end(b"abc\r\n\r\n", limit=7) == 7
    assert find_head_end(b"abcdef", limit=7) == -1
    with pytest.raises(HandshakeError) as caught:
        find_head_end(b"abcd\r\n\r\n", limit=7)
    assert caught.value.status == 431


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(4, 400))
def test_find_head_end_on_any_bytes(data: bytes, limit: int) -> None:
    try:
        end = find_head_end(data, limit)
    except HandshakeError as exc:
        assert exc.status == 431
        assert len(data) >= limit and b"\r\n\r\n" not in data[:limit]
        return
    if end < 0:
        assert end == -1 and len(data) < limit and b"\r\n\r\n" not in data
    else:
        assert 4 <= end <= limit
        assert data.index(b"\r\n\r\n") == end - 4


# -- parse_request: valid heads --------------------------------------------------------------


def test_parse_request_fields() -> None:
    request = parse_request(head(*UPGRADE_FIELDS, line="GET /websockify?token=abc&x=1 HTTP/1.1"))
    assert request.method == "GET"
    assert request.target == "/websockify?token=abc&x=1"
    assert request.path == "/websockify"
    assert request.query == "token=abc&x=1"
    assert request.version == "HTTP/1.1"
    assert isinstance(request.headers, http.client.HTTPMessage)
    assert request.headers["Host"] == "example.com"


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/", "/", ""),
        ("/a%20b/c", "/a%20b/c", ""),
        ("/?", "/", ""),
        ("/p?q?r=1", "/p", "q?r=1"),
        ("*", "*", ""),
        ("http://h:1/p?x", "http://h:1/p", "x"),
    ],
)
def test_parse_request_splits_path_and_query(target: str, path: str, query: str) -> None:
    request = parse_request(head(line=f"GET {target} HTTP/1.1"))
    assert (request.target, request.path, request.query) == (target, path, query)
    assert len(request.headers) == 0


def test_header_names_are_case_insensitive() -> None:
    request = parse_request(head("sEc-WeBsOcKeT-kEy: abc", "UPGRADE: websocket"))
    for name in ("Sec-WebSocket-Key", "sec-websocket-key", "SEC-WEBSOCKET-KEY"):
        assert request.headers[name] == "abc"
        assert request.headers.get_all(name) == ["abc"]
    assert "upgrade" in request.headers
    assert request.headers.get("Missing") is None


def test_repeated_headers_are_all_kept_in_order() -> None:
    request = parse_request(head("X-A: 1", "x-a: 2", "Other: z", "X-A: 3"))
    assert request.headers.get_all("X-A") == ["1", "2", "3"]
    assert request.headers.items() == [("X-A", "1"), ("x-a", "2"), ("Other", "z"), ("X-A", "3")]


def test_header_values_lose_surrounding_whitespace_only() -> None:
    request = parse_request(head("A:  \t spaced  out \t ", "B:", "C:x", "D: tab\there"))
    assert request.headers["A"] == "spaced  out"
    assert request.headers["B"] == ""
    assert request.headers["C"] == "x"
    assert request.headers["D"] == "tab\there"


def test_obs_text_in_values_is_latin_1() -> None:
    request = parse_request(b"GET / HTTP/1.1\r\nX: caf\xe9 \xff\r\n\r\n")
    assert request.headers["X"] == "caf\xe9 \xff"


def test_http_1_0_and_other_methods_parse() -> None:
    request = parse_request(head(line="POST /x HTTP/1.0"))
    assert (request.method, request.version) == ("POST", "HTTP/1.0")
    assert parse_request(head(line="M-SEARCH * HTTP/1.9")).method == "M-SEARCH"


def test_exactly_max_headers_parse_and_one_more_gets_431() -> None:
    assert MAX_HEADERS == 100
    fields = [f"X-{i}: {i}" for i in range(MAX_HEADERS + 1)]
    assert len(parse_request(head(*fields[:MAX_HEADERS])).headers) == MAX_HEADERS
    error = parse_error(head(*fields))
    assert (error.status, error.headers) == (431, {})


# -- parse_request: malformed heads ----------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n\r\n",
        b"GET / HTTP/1.1",
        b"GET / HTTP/1.1\r\n",
        b"GET / HTTP/1.1\r\n\r\nX",
        b"GET / HTTP/1.1\r\nHost: x\r\n",  # no blank line
        b"GET / HTTP/1.1\n\n",  # bare LF endings
        b"GET / HTTP/1.1\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\nHost: x\r\n\r\n",  # blank line inside the head
    ],
)
def test_malformed_heads_get_400(data: bytes) -> None:
    error = parse_error(data)
    assert (error.status, error.headers) == (400, {})


@pytest.mark.parametrize(
    "line",
    [
        "GET /",
        "GET",
        "GET / HTTP/1.1 extra",
        "GET  / HTTP/1.1",
        " GET / HTTP/1.1",
        "GET / HTTP/1.1 ",
        "GET\t/ HTTP/1.1",
        "G(T / HTTP/1.1",
        "GET /a\x7fb HTTP/1.1",
        "GET /\xe9 HTTP/1.1",
        "GET /\x00 HTTP/1.1",
        "GET / HTTP/1.1\r",
        "GET / http/1.1",
        "GET / HTTP/1",
        "GET / HTTP/11",
        "GET / HTTP/1.10",
        "GET / HTTP/1.1x",
        "GET / HTTP/a.b",
        "GET / HTTP/\u0661.1",  # a digit, but not an ASCII one
        "GET / FTP/1.1",
    ],
)
def test_malformed_request_lines_get_400(line: str) -> None:
    data = line.encode("utf-8") + b"\r\nHost: x\r\n\r\n"
    error = parse_error(data)
    assert (error.status, error.headers) == (400, {})


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/0.9", "HTTP/3.0", "HTTP/9.9"])
def test_other_major_versions_get_505(version: str) -> None:
    error = parse_error(head("Host: x", line=f"GET / {version}"))
    assert (error.status, error.headers) == (505, {})


@pytest.mark.parametrize(
    "field",
    [
        b"No colon here",
        b": empty name",
        b"Space before : colon",
        b"Tab\t: before colon",
        b" Leading: space",
        b"\tobs-fold",  # a continuation line (obsolete line folding)
        b" obs-fold: with a colon",
        b"Bad(name): x",
        b"N\xe9me: x",
        b"Ctl: a\x00b",
        b"Ctl: a\x01b",
        b"Ctl: a\x1fb",
        b"Ctl: a\x7fb",
        b"Ctl: bare\rcarriage return",
        b"Ctl: bare\nline feed",
        b"Ctl\x00: x",
    ],
)
def test_malformed_header_fields_get_400(field: bytes) -> None:
    error = parse_error(b"GET / HTTP/1.1\r\nHost: x\r\n" + field + b"\r\n\r\n")
    assert (error.status, error.headers) == (400, {})


def test_obs_fold_after_a_field_gets_400() -> None:
    error = parse_error(b"GET / HTTP/1.1\r\nX-Long: first\r\n  second part\r\n\r\n")
    assert error.status == 400


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_parse_or_raise_handshake_error(data: bytes) -> None:
    try:
        request = parse_request(data)
    except HandshakeError as exc:
        assert exc.status in (400, 431, 505)
        return
    assert isinstance(request, Request)


HEAD_PIECES = st.sampled_from(
    [b"GET", b" ", b"/", b"?", b"HTTP/1.1", b"HTTP/2.0", b"\r\n", b"\r", b"\n", b":", b"\t"]
) | st.binary(max_size=8)
VALID_LINES = (
    st.sampled_from([field.encode() for field in UPGRADE_FIELDS])
    | st.sampled_from([b"Connection: keep-alive", b"Sec-WebSocket-Version: 8", b"Upgrade: h2c"])
    | st.sampled_from([b"Sec-WebSocket-Protocol: base64, binary", b"Sec-WebSocket-Key: AAAA"])
)
GARBAGE_LINES = st.lists(HEAD_PIECES, max_size=6).map(b"".join)


@st.composite
def near_valid_fields(draw: st.DrawFn) -> List[bytes]:
    """Upgrade fields, some left out, some repeated or wrong, maybe with one garbage line."""
    fields = [f.encode() for f in UPGRADE_FIELDS if draw(st.integers(0, 5))]
    fields += draw(st.lists(VALID_LINES, max_size=3))
    fields = draw(st.permutations(fields))
    if draw(st.booleans()):
        fields.insert(draw(st.integers(0, len(fields))), draw(GARBAGE_LINES))
    return fields


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([b"GET /websockify HTTP/1.1", b"POST / HTTP/1.1", b"GET / HTTP/1.0"])
    | st.lists(HEAD_PIECES, max_size=8).map(b"".join),
    near_valid_fields(),
)
def test_near_valid_heads_parse_or_raise_handshake_error(line: bytes, fields: List[bytes]) -> None:
    """Request-like lines, some valid, some garbage, reach every check; only HandshakeError."""
    data = b"\r\n".join([line, *fields]) + b"\r\n\r\n"
    try:
        end = find_head_end(data)
        request = parse_request(data[:end] if end > 0 else data)
    except HandshakeError as exc:
        assert exc.status in (400, 431, 505)
        event(f"parse_request: {exc.status}")
        return
    _is_upgrade(request)
    try:
        key, protocol = check_upgrade(request)
    except HandshakeError as exc:
        assert exc.status in (400, 405, 426)
        event(f"check_upgrade: {exc.status} {exc.reason}")
        return
    event(f"upgrade with {protocol}")
    assert len(base64.b64decode(key)) == 16
    assert protocol in (None, "binary")
    assert accept_response(key, protocol).startswith(b"HTTP/1.1 101 ")


TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
FIELD_NAMES = st.text(TOKEN_CHARS, min_size=1, max_size=20)
# Field values: visible ASCII, obs-text, inner spaces and tabs; no surrounding whitespace.
FIELD_VALUES = st.text(
    st.sampled_from([chr(c) for c in range(0x21, 0x7F)] + [chr(c) for c in range(0x80, 0x100)]),
    max_size=30,
).flatmap(
    lambda word: st.lists(st.sampled_from([" ", "\t", "  "]), min_size=0, max_size=3).map(
        lambda gaps: (
            word[: len(word) // 2] + "".join(gaps) + word[len(word) // 2 :] if word else word
        )
    )
)
TARGETS = st.text(st.sampled_from([chr(c) for c in range(0x21, 0x7F)]), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    st.text(TOKEN_CHARS, min_size=1, max_size=10),
    TARGETS,
    st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/1.9"]),
    st.lists(st.tuples(FIELD_NAMES, FIELD_VALUES), max_size=MAX_HEADERS),
    st.sampled_from(["", " ", "\t", " \t "]),
)
def test_generated_valid_requests_round_trip(
    method: str, target: str, version: str, fields: List[Tuple[str, str]], pad: str
) -> None:
    data = head(
        *(f"{name}:{pad}{value}{pad}" for name, value in fields),
        line=f"{method} {target} {version}",
    )
    request = parse_request(data)
    assert (request.method, request.target, request.version) == (method, target, version)
    assert request.path + ("?" + request.query if "?" in target else "") == target
    assert request.headers.items() == [(name, value.strip(" \t")) for name, value in fields]
    for name, _ in fields:
        expected = [v.strip(" \t") for n, v in fields if n.lower() == name.lower()]
        assert request.headers.get_all(name.swapcase()) == expected


# -- upgrade checks ---------------------------------------------------------------------------


def test_header_tokens_split_strip_and_lower() -> None:
    request = parse_request(head("Connection: keep-alive, Upgrade", "connection: ,, CLOSE ,"))
    assert _header_tokens(request.headers, "Connection") == ["keep-alive", "upgrade", "close"]
    assert _header_tokens(request.headers, "Missing") == []


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (("Upgrade: websocket",), True),
        (("Upgrade: WebSocket",), True),
        (("Upgrade: h2c, websocket",), True),
        (("Upgrade: h2c", "Upgrade: websocket"), True),
        (("Upgrade: websocketx",), False),
        (("Upgrade: h2c",), False),
        (("Connection: Upgrade",), False),
        ((), False),
    ],
)
def test_is_upgrade(fields: Tuple[str, ...], expected: bool) -> None:
    assert _is_upgrade(parse_request(head(*fields))) is expected


def test_rfc_6455_sample_key() -> None:
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_valid_upgrade_without_a_subprotocol() -> None:
    assert check_upgrade(upgrade()) == (KEY, None)


@pytest.mark.parametrize(
    "fields",
    [
        ("Sec-WebSocket-Protocol: binary",),
        ("Sec-WebSocket-Protocol: base64, binary",),
        ("Sec-WebSocket-Protocol: chat,binary , base64",),
        ("Sec-WebSocket-Protocol:   chat ,   binary   ",),
        ("Sec-WebSocket-Protocol: chat", "Sec-WebSocket-Protocol: binary"),
    ],
)
def test_binary_is_selected_when_offered(fields: Tuple[str, ...]) -> None:
    assert check_upgrade(upgrade(*fields)) == (KEY, "binary")


@pytest.mark.parametrize(
    "fields",
    [
        (),
        ("Sec-WebSocket-Protocol: base64",),
        ("Sec-WebSocket-Protocol: chat, superchat",),
        ("Sec-WebSocket-Protocol: binaryx, xbinary",),
        ("Sec-WebSocket-Protocol: binary.v2",),
        ("Sec-WebSocket-Protocol: Binary",),  # names are case-sensitive; echoing "binary"
        ("Sec-WebSocket-Protocol: BINARY",),  # would make the client fail the connection
    ],
)
def test_no_subprotocol_unless_binary_is_offered(fields: Tuple[str, ...]) -> None:
    assert check_upgrade(upgrade(*fields)) == (KEY, None)


def test_connection_header_may_list_other_tokens() -> None:
    request = upgrade("Connection: keep-alive, Upgrade", drop=["Connection"])
    assert check_upgrade(request) == (KEY, None)
    request = upgrade("Connection: keep-alive", "Connection: upgrade", drop=["Connection"])
    assert check_upgrade(request)[0] == KEY


def test_key_and_version_tolerate_surrounding_whitespace() -> None:
    request = upgrade(f"Sec-WebSocket-Key:   {KEY}  ", drop=["Sec-WebSocket-Key"])
    assert check_upgrade(request) == (KEY, None)


@pytest.mark.parametrize("method", ["POST", "HEAD", "PUT", "OPTIONS", "get"])
def test_non_get_gets_405_with_allow(method: str) -> None:
    error = handshake_error(upgrade(line=f"{method} /websockify HTTP/1.1"))
    assert (error.status, error.headers) == (405, {"Allow": "GET"})


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.2"])
def test_other_minor_versions_get_400(version: str) -> None:
    error = handshake_error(upgrade(line=f"GET /websockify {version}"))
    assert (error.status, error.headers) == (400, VERSION_13)


@pytest.mark.parametrize(
    "fields", [(), ("Connection: keep-alive",), ("Connection: upgrades",), ("Connection:",)]
)
def test_missing_connection_upgrade_gets_400(fields: Tuple[str, ...]) -> None:
    error = handshake_error(upgrade(*fields, drop=["Connection"]))
    assert (error.status, error.headers) == (400, VERSION_13)


@pytest.mark.parametrize(
    "fields",
    [
        (),
        ("Sec-WebSocket-Version: 8",),
        ("Sec-WebSocket-Version: 14",),
        ("Sec-WebSocket-Version: 13, 8",),
        ("Sec-WebSocket-Version: 013",),
        ("Sec-WebSocket-Version:",),
        ("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 13"),
        ("Sec-WebSocket-Version: 8", "Sec-WebSocket-Version: 13"),
    ],
)
def test_wrong_missing_or_repeated_version_gets_426(fields: Tuple[str, ...]) -> None:
    error = handshake_error(upgrade(*fields, drop=["Sec-WebSocket-Version"]))
    assert (error.status, error.headers) == (426, VERSION_13)


@pytest.mark.parametrize(
    "fields",
    [
        (),
        ("Sec-WebSocket-Key:",),
        ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ",),  # padding missing
        ("Sec-WebSocket-Key: " + base64.b64encode(bytes(15)).decode(),),  # 15 bytes
        ("Sec-WebSocket-Key: " + base64.b64encode(bytes(17)).decode(),),  # 17 bytes
        ("Sec-WebSocket-Key: " + base64.b64encode(bytes(12)).decode(),),  # short
        ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==x",),
        ("Sec-WebSocket-Key: dGhlIHNhbXBs ZSBub25jZQ==",),
        ("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZ!==",),
        ("Sec-WebSocket-Key: \xe9GhlIHNhbXBsZSBub25jZQ==",),  # not ASCII
        (f"Sec-WebSocket-Key: {KEY}", f"Sec-WebSocket-Key: {KEY}"),  # duplicated
        (f"Sec-WebSocket-Key: {KEY}, {KEY}",),
    ],
)
def test_bad_missing_or_short_key_gets_400(fields: Tuple[str, ...]) -> None:
    error = handshake_error(upgrade(*fields, drop=["Sec-WebSocket-Key"]))
    assert (error.status, error.headers) == (400, VERSION_13)


def test_the_first_failure_decides() -> None:
    bare = parse_request(head(line="POST / HTTP/1.0"))
    assert handshake_error(bare).status == 405
    assert handshake_error(parse_request(head(line="GET / HTTP/1.0"))).status == 400
    no_key = upgrade(
        "Sec-WebSocket-Version: 7", drop=["Sec-WebSocket-Version", "Sec-WebSocket-Key"]
    )
    assert handshake_error(no_key).status == 426


# -- responses --------------------------------------------------------------------------------


def parse_response(data: bytes) -> Tuple[str, Dict[str, str], bytes]:
    head_bytes, blank, body = data.partition(b"\r\n\r\n")
    assert blank
    status_line, *fields = head_bytes.decode("latin-1").split("\r\n")
    headers: Dict[str, str] = {}
    for field in fields:
        name, sep, value = field.partition(": ")
        assert sep and name not in headers
        headers[name] = value
    return status_line, headers, body


@pytest.mark.parametrize("protocol", [None, "binary"])
def test_accept_response(protocol: Optional[str]) -> None:
    status, headers, body = parse_response(accept_response(KEY, protocol))
    assert status == "HTTP/1.1 101 Switching Protocols"
    expected = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Accept": "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
    }
    if protocol:
        expected["Sec-WebSocket-Protocol"] = protocol
    assert (headers, body) == (expected, b"")


@pytest.mark.parametrize(
    ("status", "phrase", "extra"),
    [
        (400, "Bad Request", {}),
        (405, "Method Not Allowed", {"Allow": "GET"}),
        (426, "Upgrade Required", VERSION_13),
        (431, "Request Header Fields Too Large", {}),
        (505, "HTTP Version Not Supported", {}),
        (599, "Error", {}),
    ],
)
def test_error_response(status: int, phrase: str, extra: Dict[str, str]) -> None:
    status_line, headers, body = parse_response(error_response(status, "the reason \u2713", extra))
    assert status_line == f"HTTP/1.1 {status} {phrase}"
    assert headers == {
        "Content-Type": "text/plain; charset=utf-8",
        "Content-Length": str(len(body)),
        "Connection": "close",
        **extra,
    }
    assert body.decode("utf-8") == f"{status} {phrase}: the reason \u2713\n"


def test_each_handshake_error_becomes_its_response() -> None:
    error = handshake_error(upgrade(line="POST /websockify HTTP/1.1"))
    status_line, headers, _ = parse_response(
        error_response(error.status, error.reason, error.headers)
    )
    assert status_line == "HTTP/1.1 405 Method Not Allowed"
    assert headers["Allow"] == "GET"
