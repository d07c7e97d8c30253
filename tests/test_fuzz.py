"""Property tests of what parses untrusted input: each succeeds or raises its one error type.

Complements the properties next to each layer: test_http.py (parse_request on any bytes,
near-valid heads through check_upgrade), test_frames.py (FrameDecoder on any bytes in any
chunking), test_plugins.py (token-file lines, JSON token files, Basic headers, plugin
answers, Redis source fields) and test_static.py (resolve_web_path on any string). Here:
what those leave out — the head read as the loop reads it, in arbitrary pieces; the
upgrade checks on arbitrary header values; the decoder's bounded state; the token taken
from a query or Host header; stripping of SSL_* headers; JWTs with any text, and signed
JWTs with any claims.
"""

import base64
import hashlib
import hmac
import http.client
import json
import urllib.parse
from pathlib import Path
from typing import List, Optional, Tuple, Union

import pytest
from conftest import client_frame
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import websockify_min as wm
from websockify_min import (
    MAX_HEAD_BYTES,
    FrameDecoder,
    HandshakeError,
    ProtocolError,
    Request,
    check_upgrade,
    find_head_end,
    parse_request,
    token_from_request,
)

# -- the request head, read in pieces as the loop reads it ------------------------------------

UPGRADE_LINES = [
    b"GET /websockify?token=a HTTP/1.1",
    b"Host: x",
    b"Upgrade: websocket",
    b"Connection: Upgrade",
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    b"Sec-WebSocket-Version: 13",
]
HEAD_BYTES = st.one_of(
    st.binary(max_size=600),
    st.lists(st.sampled_from([*UPGRADE_LINES, b"\r\n", b"\r\n\r\n", b":", b" "]), max_size=20).map(
        b"".join
    ),
)


def read_head(pieces: List[bytes], limit: int) -> Union[Request, int, None]:
    """What the session makes of these pieces: a Request, an error status, or None (waiting)."""
    buffer = bytearray()
    try:
        for piece in pieces:
            buffer += piece
            end = find_head_end(buffer, limit)
            if end >= 0:
                return parse_request(bytes(buffer[:end]))
    except HandshakeError as exc:
        return exc.status
    return None


def as_comparable(result: Union[Request, int, None]) -> object:
    if isinstance(result, Request):
        return (*result[:5], result.headers.items())
    return result


@settings(max_examples=150, deadline=None)
@given(HEAD_BYTES, st.lists(st.integers(1, 50), max_size=30), st.sampled_from([64, MAX_HEAD_BYTES]))
def test_a_head_read_in_any_pieces_parses_as_when_read_whole(
    data: bytes, sizes: List[int], limit: int
) -> None:
    pieces, pos = [], 0
    for size in sizes:
        pieces.append(data[pos : pos + size])
        pos += size
    pieces.append(data[pos:])
    whole = read_head([data], limit)
    assert as_comparable(read_head(pieces, limit)) == as_comparable(whole)
    assert whole is None or isinstance(whole, Request) or whole in (400, 431, 505)


# -- the upgrade checks on any header values ---------------------------------------------------

UPGRADE_NAMES = [
    "Upgrade",
    "Connection",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Sec-WebSocket-Protocol",
    "Host",
    "Origin",
]
# What parse_request can hand over as a value: Latin-1 without controls other than tab.
FIELD_VALUES = st.text(
    st.characters(min_codepoint=0x09, max_codepoint=0xFF, blacklist_characters="\n\r\x7f").filter(
        lambda c: c == "\t" or ord(c) >= 0x20
    ),
    max_size=40,
) | st.sampled_from(["websocket", "Upgrade", "13", "binary", "dGhlIHNhbXBsZSBub25jZQ=="])


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["GET", "POST", "HEAD"]),
    st.sampled_from(["HTTP/1.1", "HTTP/1.0"]),
    st.lists(st.tuples(st.sampled_from(UPGRADE_NAMES), FIELD_VALUES), max_size=10),
)
def test_check_upgrade_on_any_header_values(
    method: str, version: str, fields: List[Tuple[str, str]]
) -> None:
    headers = http.client.HTTPMessage()
    for name, value in fields:
        headers[name] = value.strip(" \t")
    request = Request(method, "/", "/", "", version, headers)
    try:
        key, protocol = check_upgrade(request)
    except HandshakeError as exc:
        assert exc.status in (400, 405, 426)
        return
    assert len(base64.b64decode(key, validate=True)) == 16
    assert protocol in (None, "binary")


# -- the frame decoder holds a bounded state ---------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.binary(max_size=300)
        | st.builds(client_frame, st.sampled_from([0, 1, 2, 8, 9, 10]), st.binary(max_size=200)),
        max_size=8,
    ),
    st.lists(st.integers(1, 40), max_size=20),
)
def test_the_decoder_buffers_at_most_a_header_and_a_control_frame(
    parts: List[bytes], sizes: List[int]
) -> None:
    """Whatever it is fed, the decoder holds back at most 14 header bytes and a 125-byte
    control payload, hands out no more payload than came in, and stays failed."""
    data, decoder, pos, fed, out = b"".join(parts), FrameDecoder(), 0, 0, 0
    error: Optional[ProtocolError] = None
    for size in [*sizes, len(data)]:
        piece, pos = data[pos : pos + size], pos + size
        fed += len(piece)
        try:
            out += sum(len(frame.payload) for frame in decoder.feed(piece))
        except ProtocolError as exc:
            assert error is None or exc is error  # the same violation every time
            error = exc
        assert len(decoder._head) < 14 and len(decoder._control) <= 125
        assert out <= fed


# -- the token, from a query or a Host header --------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.text(), st.none() | st.text(), st.booleans())
@example("token=%ff%fe", None, False)
@example("token=a&token=b", None, False)
@example("", "[::1", True)
def test_token_from_any_query_or_host(query: str, host: Optional[str], host_token: bool) -> None:
    token = token_from_request(query, host, host_token)
    assert token is None or (isinstance(token, str) and token)


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1).filter(lambda t: t.rstrip("\n")))
def test_any_token_survives_url_encoding(token: str) -> None:
    query = urllib.parse.urlencode({"token": token})
    assert token_from_request(query, None, False) == token.rstrip("\n")


# -- SSL_* headers never reach the auth plugins ------------------------------------------------

HEADER_NAMES = st.sampled_from(
    ["SSL_CLIENT_S_DN_CN", "ssl_client_s_dn_cn", "Ssl-Client-Verify", "SSL_", "SSLX", "X-SSL"]
) | st.from_regex(r"[A-Za-z_\-]{1,12}", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(HEADER_NAMES, st.from_regex(r"[ -~]{0,10}", fullmatch=True))))
def test_no_ssl_header_survives_stripping(fields: List[Tuple[str, str]]) -> None:
    raw = "".join(f"{name}: {value}\r\n" for name, value in fields) + "\r\n"
    request = parse_request(b"GET / HTTP/1.1\r\n" + raw.encode("latin-1"))
    wm._strip_spoofed_headers(request.headers)
    kept = request.headers.keys()
    assert not [name for name in kept if name.upper().startswith(("SSL_", "SSL-"))]
    expected = [n for n, _ in fields if not n.upper().startswith(("SSL_", "SSL-"))]
    assert kept == expected


# -- JWTs: any text, and correctly signed tokens with any claims ------------------------------

SECRET = b"a secret for the fuzz tests only"


@pytest.fixture(scope="module")
def jwt_plugin(tmp_path_factory: pytest.TempPathFactory) -> wm.JWTTokenApi:
    key_file: Path = tmp_path_factory.mktemp("jwt") / "key"
    key_file.write_text(base64.urlsafe_b64encode(SECRET).decode().rstrip("="))
    return wm.JWTTokenApi(str(key_file))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def signed(header: object, claims_json: str) -> str:
    head = b64url(json.dumps(header).encode())
    body = b64url(claims_json.encode("utf-8", "surrogatepass"))
    signature = hmac.new(SECRET, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


def lookup_answer(plugin: wm.JWTTokenApi, token: str) -> object:
    try:
        return plugin.lookup(token)
    except HandshakeError as exc:
        assert exc.status in (400, 403), exc
        return exc.status


JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([10**400, -(10**400), 2**63, 1e308])
    | st.floats()
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children),
    max_leaves=6,
)
CLAIMS = st.dictionaries(
    st.sampled_from(["host", "port", "nbf", "exp", "iat", "sub"]) | st.text(max_size=5),
    JSON_VALUES,
    max_size=6,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.text(max_size=200) | st.lists(st.text(max_size=30), max_size=6).map(".".join))
def test_jwt_of_any_text_is_refused_cleanly(jwt_plugin: wm.JWTTokenApi, token: str) -> None:
    assert lookup_answer(jwt_plugin, token) in (400, 403)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(CLAIMS | JSON_VALUES)
@example({"host": "h", "port": 5900, "nbf": 10**400})
@example({"host": "h", "port": 5900, "exp": -(10**400)})
def test_signed_jwt_with_any_claims_gives_a_target_or_a_refusal(
    jwt_plugin: wm.JWTTokenApi, claims: object
) -> None:
    try:
        claims_json = json.dumps(claims)
    except (ValueError, OverflowError):
        return
    answer = lookup_answer(jwt_plugin, signed({"alg": "HS256", "typ": "JWT"}, claims_json))
    if isinstance(answer, tuple):
        assert isinstance(claims, dict)
        host, port = answer
        assert isinstance(host, str) and claims.get("host") in (host, f"[{host}]")
        assert host == "unix_socket" or 0 < int(port) < 65536


# -- base64url, as the JWT parts are decoded --------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_b64url_decodes_or_raises_value_error(text: str) -> None:
    try:
        wm._b64url_decode(text)
    except ValueError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=30))
def test_b64url_round_trip(data: bytes) -> None:
    assert wm._b64url_decode(b64url(data)) == data
