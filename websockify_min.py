"""WebSocket-to-TCP proxy, websockify-compatible, in one stdlib-only file.

Usage:
    python3 websockify_min.py [options] [source_addr:]source_port target_addr:target_port
    python3 websockify_min.py [options] --token-plugin CLASS [source_addr:]source_port
    python3 websockify_min.py [options] --unix-target FILE [source_addr:]source_port
    python3 websockify_min.py [options] [source_addr:]source_port -- WRAP_COMMAND_LINE

One thread runs a ``selectors`` loop that owns every socket; anything that may
block (name resolution, plugin calls) runs in a small worker pool.

Sections: 1 Header 2 Errors 3 Masking 4 HTTP 5 Frames 6 Plugins 7 Static
8 Loop 9 Stream 10 Session 11 Server 12 CLI 13 main
"""

# === 1. Header ===

import argparse
import base64
import codecs
import collections
import contextlib
import datetime
import email.utils
import enum
import errno
import fcntl
import functools
import grp
import hashlib
import heapq
import hmac
import html
import http
import http.client
import importlib
import importlib.util
import ipaddress
import itertools
import json
import logging
import math
import mimetypes
import os
import pwd
import queue
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from typing import (
    TYPE_CHECKING,
    Any,
    BinaryIO,
    Callable,
    Deque,
    Dict,
    FrozenSet,
    List,
    Mapping,
    NamedTuple,
    NoReturn,
    Optional,
    Sequence,
    Set,
    TextIO,
    Tuple,
    Union,
    cast,
    overload,
)

__version__ = "0.1.0"

__all__ = (
    "AuthPlugin",
    "AuthenticationError",
    "BaseAuthPlugin",
    "BaseTokenAPI",
    "BaseTokenPlugin",
    "BasicHTTPAuth",
    "ClientCertCNAuth",
    "CloseCode",
    "ConfigError",
    "ExpectOrigin",
    "Frame",
    "FrameDecoder",
    "HandshakeError",
    "JSONTokenApi",
    "JWTTokenApi",
    "Options",
    "ProtocolError",
    "ReadOnlyTokenFile",
    "Request",
    "Server",
    "Target",
    "TokenFile",
    "TokenFileName",
    "TokenJSONFile",
    "TokenPlugin",
    "TokenRedis",
    "UnixDomainSocketDirectory",
    "WebPathError",
    "accept_key",
    "accept_response",
    "check_auth",
    "check_upgrade",
    "close_payload",
    "encode_frame",
    "error_response",
    "find_head_end",
    "frame_header",
    "load_plugin",
    "lookup_target",
    "main",
    "parse_args",
    "parse_close",
    "parse_request",
    "resolve_web_path",
    "token_from_request",
    "unmask",
)

_Buffer = Union[bytes, bytearray, memoryview]

_log = logging.getLogger("websockify_min")

WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
MAX_HEAD_BYTES = 16 * 1024  # a request head larger than this gets 431 (h11's default)
MAX_HEADERS = 100  # header lines per request, as http.client allows
HANDSHAKE_TIMEOUT = 10.0  # seconds from accept to a complete WebSocket upgrade request
CONNECT_TIMEOUT = 10.0  # seconds to resolve and reach the target, all addresses together
WEB_TIMEOUT = 60.0  # seconds a --web client may take nothing of a response before it is dropped
LOOKUP_TIMEOUT = 10.0  # seconds for token and auth plugins and DNS; then the client gets 504
CLOSE_TIMEOUT = 5.0  # seconds to wait for the peer's half of a closing handshake
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024  # bytes in one WebSocket message; more gets 1009
RECV_SIZE = 256 * 1024  # one read from a socket; from the target it becomes one frame
HIGH_WATER = 256 * 1024  # queued bytes above which the other side stops being read
LOW_WATER = 64 * 1024  # queued bytes below which it is read again
# The target's data queues at most this much for a client (it is paused past HIGH_WATER, one
# read late); more is pongs the client does not read, and only then is the client not read.
CLIENT_QUEUE_LIMIT = HIGH_WATER + RECV_SIZE + 10
MISSED_PONGS = 3  # with --heartbeat, a client silent for this many pings is dropped
WORKER_THREADS = 8  # blocking calls (DNS, plugins) run in this many threads at most
MAX_WORKERS = 256  # --workers: processes at most
RECORD_BUFFER = 64 * 1024  # --record: payload bytes gathered before a write leaves the loop
RECORD_HIGH_WATER = 4 * 1024 * 1024  # --record: bytes not yet on disk above which a relay pauses
RECORD_CLOSE_TIMEOUT = 30.0  # seconds an exiting proxy waits for record files to be written

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA_OPCODES = frozenset((OP_CONT, OP_TEXT, OP_BINARY))
_CONTROL_OPCODES = frozenset((OP_CLOSE, OP_PING, OP_PONG))


class CloseCode(enum.IntEnum):
    """RFC 6455 section 7.4.1 status codes that the proxy sends."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never sent: stands for a close frame without a code
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011


# === 2. Errors ===


class HandshakeError(Exception):
    """The HTTP request cannot be served; answer with *status* and close."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str] = {}) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers)


class ProtocolError(Exception):
    """The peer broke RFC 6455; send a close frame with *close_code*."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(close_code, reason)
        self.close_code = close_code
        self.reason = reason


class AuthenticationError(Exception):
    """Raised by auth plugins to refuse a client (upstream's signature)."""

    def __init__(
        self,
        log_msg: Optional[str] = None,
        response_code: int = 403,
        response_headers: Optional[Mapping[str, str]] = None,
        response_msg: Optional[str] = None,
    ) -> None:
        self.code = response_code
        self.headers = dict(response_headers or {})
        self.msg = response_msg
        if log_msg is None:
            log_msg = response_msg
        super().__init__(f"{self.code} {log_msg}")


class ConfigError(Exception):
    """A startup mistake: reported as one line on stderr, exit status 2."""


# === 3. Masking ===

# _XOR_TABLES[k] maps every byte b to b ^ k, for bytes.translate.
_IDENTITY = int.from_bytes(bytes(range(256)), "big")
_XOR_TABLES = [
    (_IDENTITY ^ int.from_bytes(bytes((k,)) * 256, "big")).to_bytes(256, "big") for k in range(256)
]
# Below this many bytes one big-int XOR is fastest; above it four strided translates win
# (measured on 3.6 and 3.13: equal near 1 KiB, translate 3.5x faster at 64 KiB).
_TRANSLATE_FROM = 1024


def unmask(data: _Buffer, mask: bytes, offset: int = 0) -> _Buffer:
    """XOR *data* with the 4-byte *mask*; *offset* = payload bytes of this frame already seen.

    The offset lets a frame's payload be unmasked piecewise as it streams in.
    """
    shift = offset & 3
    if shift:
        mask = mask[shift:] + mask[:shift]
    size = len(data)
    if size < _TRANSLATE_FROM:
        key = (mask * ((size >> 2) + 1))[:size]
        value = int.from_bytes(data, "little") ^ int.from_bytes(key, "little")
        return value.to_bytes(size, "little")
    out = bytearray(data)
    for lane in range(4):
        out[lane::4] = out[lane::4].translate(_XOR_TABLES[mask[lane]])
    return out


# === 4. HTTP (sans-IO) ===

_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 token
_VERSION_RE = re.compile(rb"HTTP/(\d)\.(\d)\Z")
_TARGET_RE = re.compile(rb"[\x21-\x7e]+\Z")  # printable ASCII, no spaces
_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls other than tab


class Request(NamedTuple):
    """A parsed request head."""

    method: str
    target: str  # the request-target as sent, path and query
    path: str  # the path, still percent-encoded
    query: str  # the query string without "?", or ""
    version: str  # "HTTP/1.1"
    headers: http.client.HTTPMessage  # the type upstream hands to auth plugins


def find_head_end(buf: Union[bytes, bytearray], limit: int = MAX_HEAD_BYTES) -> int:
    """Offset just past the blank line ending the head in *buf*, or -1 if it is incomplete."""
    end = buf.find(b"\r\n\r\n", 0, limit)
    if end >= 0:
        return end + 4
    if len(buf) >= limit:
        raise HandshakeError(431, "Request Header Fields Too Large")
    return -1


def parse_request(head: bytes) -> Request:
    """Parse a complete request head (up to and including the blank line).

    Raises only HandshakeError, whatever the bytes.
    """
    lines = head.split(b"\r\n")
    if len(lines) < 3 or lines[-1] or lines[-2]:
        raise HandshakeError(400, "Malformed request head")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HandshakeError(400, "Malformed request line")
    method, target, version = parts
    if not _TOKEN_RE.match(method) or not _TARGET_RE.match(target):
        raise HandshakeError(400, "Malformed request line")
    matched = _VERSION_RE.match(version)
    if not matched:
        raise HandshakeError(400, "Malformed HTTP version")
    if matched.group(1) != b"1":
        raise HandshakeError(505, "HTTP Version Not Supported")
    field_lines = lines[1:-2]
    if len(field_lines) > MAX_HEADERS:
        raise HandshakeError(431, "Too many header fields")
    headers = http.client.HTTPMessage()
    for line in field_lines:
        name, colon, value = line.partition(b":")
        # Obsolete line folding and spaces before the colon are refused (RFC 9112 5.1, 5.2).
        if not colon or not _TOKEN_RE.match(name) or _FIELD_VALUE_BAD.search(value):
            raise HandshakeError(400, "Malformed header field")
        headers[name.decode("ascii")] = value.strip(b" \t").decode("latin-1")
    target_text = target.decode("ascii")
    path, _, query = target_text.partition("?")
    return Request(
        method.decode("ascii"), target_text, path, query, version.decode("ascii"), headers
    )


def _header_tokens(headers: http.client.HTTPMessage, name: str) -> List[str]:
    """The comma-separated values of every *name* header, stripped and lower-cased."""
    values = headers.get_all(name) or []
    return [
        token.strip().lower() for value in values for token in value.split(",") if token.strip()
    ]


def _is_upgrade(request: Request) -> bool:
    """True when the client asks for a WebSocket, whether or not the request is valid."""
    return "websocket" in _header_tokens(request.headers, "Upgrade")


def check_upgrade(request: Request) -> Tuple[str, Optional[str]]:
    """Validate a WebSocket opening handshake (RFC 6455 section 4.2.1).

    Returns the client's key and the subprotocol to select ("binary" when offered, else
    None); raises HandshakeError with the status and reason to answer.
    """
    version_header = {"Sec-WebSocket-Version": "13"}
    if request.method != "GET":
        raise HandshakeError(405, "WebSocket upgrade needs GET", {"Allow": "GET"})
    if request.version != "HTTP/1.1":
        raise HandshakeError(400, "WebSocket upgrade needs HTTP/1.1", version_header)
    if not _is_upgrade(request):
        upgrade_headers = {"Upgrade": "websocket", **version_header}
        raise HandshakeError(426, "Not a WebSocket upgrade", upgrade_headers)
    if "upgrade" not in _header_tokens(request.headers, "Connection"):
        raise HandshakeError(400, "Missing 'Connection: Upgrade'", version_header)
    versions = request.headers.get_all("Sec-WebSocket-Version") or []
    if [v.strip() for v in versions] != ["13"]:
        raise HandshakeError(426, "Unsupported WebSocket version (13 only)", version_header)
    keys = request.headers.get_all("Sec-WebSocket-Key") or []
    key = keys[0].strip() if len(keys) == 1 else ""
    try:
        valid_key = len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (ValueError, UnicodeEncodeError):
        valid_key = False
    if not valid_key:
        raise HandshakeError(400, "Missing or invalid Sec-WebSocket-Key", version_header)
    # Subprotocol names are compared as sent: a client offering "Binary" must not get
    # "binary" back, or it fails the connection (RFC 6455 section 4.1, step 6).
    offered = request.headers.get_all("Sec-WebSocket-Protocol") or []
    binary = any(token.strip() == "binary" for value in offered for token in value.split(","))
    return key, ("binary" if binary else None)


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept value answering *key*."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WEBSOCKET_GUID).digest()).decode()


def accept_response(key: str, subprotocol: Optional[str]) -> bytes:
    """The 101 response completing the opening handshake."""
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(key)}",
    ]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _status_phrase(status: int) -> str:
    try:
        return str(http.HTTPStatus(status).phrase)
    except ValueError:
        return "Error"


def _response_head(status: int, headers: Sequence[Tuple[str, str]]) -> bytes:
    """A response status line and header fields, ending with the blank line."""
    lines = [f"HTTP/1.1 {status} {_status_phrase(status)}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


def error_response(status: int, reason: str, headers: Mapping[str, str] = {}) -> bytes:
    """A complete error response with a short plain-text body; the connection then closes."""
    body = f"{status} {_status_phrase(status)}: {reason}\n".encode("utf-8", "replace")
    fields = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    fields += [(name, value) for name, value in headers.items()]
    return _response_head(status, fields) + body


# --- the client behind proxies ---

_IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

# RFC 7239: elements separated by commas, pairs by semicolons; quoted strings may hold both.
_FORWARDED_ELEMENT = re.compile(r'(?:[^,"]|"(?:[^"\\]|\\.)*")+')
_FORWARDED_PAIR = re.compile(r'([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def _forwarded_for(headers: http.client.HTTPMessage) -> List[str]:
    """The client addresses that proxies recorded, the first client first.

    The ``for=`` of every RFC 7239 Forwarded element ("unknown" for an element without
    one); without a Forwarded header, the X-Forwarded-For list. Untrusted text: see
    real_client."""
    nodes: List[str] = []
    for value in headers.get_all("Forwarded") or []:
        for element in _FORWARDED_ELEMENT.findall(value):
            if not element.strip():
                continue
            node = "unknown"
            for name, pair_value in _FORWARDED_PAIR.findall(element):
                if name.lower() == "for":
                    node = pair_value.strip()
                    if len(node) >= 2 and node[0] == node[-1] == '"':
                        node = re.sub(r"\\(.)", r"\1", node[1:-1])
            nodes.append(node)
    if nodes:
        return nodes
    for value in headers.get_all("X-Forwarded-For") or []:
        nodes += [node.strip() for node in value.split(",") if node.strip()]
    return nodes


def _node_address(node: str) -> Optional[_IPAddress]:
    """The IP address in a Forwarded node or X-Forwarded-For entry (a port is dropped)."""
    text = node.strip()
    if text.startswith("["):  # [v6]:port
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _real_client(peer: str, nodes: Sequence[str], trusted: Sequence[_IPNetwork]) -> Optional[str]:
    """The address of the client behind trusted proxies, for the log.

    None when *peer* (the address that connected) is not in *trusted*, or when no proxy
    named a client: then the peer is the client. Otherwise *nodes* (forwarded_for) are
    walked from the right, the hops the trusted proxies added themselves, past every
    trusted address: the first other one is the client, since anything left of it may be
    made up by the client. "unknown" when that entry is not an IP address."""
    peer_address = _node_address(peer)
    if peer_address is None or not any(peer_address in network for network in trusted):
        return None
    address: Optional[_IPAddress] = None
    for node in reversed(nodes):
        address = _node_address(node)
        if address is None:
            return "unknown"
        if not any(address in network for network in trusted):
            return str(address)
    return None if address is None else str(address)  # all trusted: the first one


# === 5. WebSocket frames (sans-IO) ===


class Frame(NamedTuple):
    """One event from FrameDecoder."""

    opcode: int  # the message's opcode (TEXT/BINARY) for data chunks, else the control opcode
    payload: _Buffer  # this chunk, unmasked
    fin: bool  # last chunk of the message; always True for control frames


def _valid_close_code(code: int) -> bool:
    # RFC 6455 7.4 plus the IANA registry; 1004-1006 and 1015 must never be on the wire.
    return (1000 <= code <= 1014 and code not in (1004, 1005, 1006)) or 3000 <= code <= 4999


def parse_close(payload: _Buffer) -> Tuple[int, str]:
    """The status code and reason of a close frame (1005 when it has no code)."""
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, "close frame with a 1-byte payload")
    code = (payload[0] << 8) | payload[1]
    if not _valid_close_code(code):
        raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(CloseCode.INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


def close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame; the reason is cut to fit in 125 bytes."""
    encoded = reason.encode("utf-8")[:123]
    return struct.pack("!H", code) + encoded.decode("utf-8", "ignore").encode("utf-8")


def frame_header(opcode: int, length: int, fin: bool = True) -> bytes:
    """The header of an unmasked (server-to-client) frame carrying *length* payload bytes."""
    first = opcode | 0x80 if fin else opcode
    if length < 126:
        return bytes((first, length))
    if length < 0x10000:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def encode_frame(opcode: int, payload: bytes = b"") -> bytes:
    """A complete server frame; for control frames and other small payloads."""
    return frame_header(opcode, len(payload)) + payload


class FrameDecoder:
    """Client bytes in, Frame events out; never touches a socket.

    Data frames stream out as chunks as soon as their bytes arrive, unmasked, so a message
    is never held whole; control frames are delivered once complete. The events are the
    same however the input is cut into chunks. Violations raise ProtocolError with the
    close code to send.
    """

    __slots__ = (
        "_control",
        "_fin",
        "_head",
        "_left",
        "_mask",
        "_max_message",
        "_message",
        "_message_size",
        "_opcode",
        "_seen",
        "_utf8",
        "error",
    )

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self._max_message = max_message or (1 << 63)  # 0: no limit
        self._head = b""  # the start of a frame header split across feeds
        self._left = -1  # payload bytes still to come in this frame; -1 while in a header
        self._opcode = 0  # this frame's opcode
        self._fin = True
        self._mask = b""
        self._seen = 0  # payload bytes of this frame already unmasked
        self._message = 0  # opcode of the data message in progress, 0 between messages
        self._message_size = 0
        self._control = bytearray()  # a control frame's payload, gathered until complete
        self._utf8: Any = None  # incremental UTF-8 check of a text message
        self.error: Optional[ProtocolError] = None  # a violation behind the events last returned

    def feed(self, data: _Buffer) -> List[Frame]:
        """Decode the next bytes from the client; *data* may be reused once this returns.

        A violation raises ProtocolError, unless events came before it in *data*: then
        those are returned and the error waits in ``error`` for check(), so nothing the
        client sent before the violation is lost.
        """
        self.check()
        events: List[Frame] = []
        try:
            self._decode(memoryview(data), events)
        except ProtocolError as exc:
            self.error = exc  # the stream is broken: every later feed raises it again
            if not events:
                raise
        return events

    @property
    def partial(self) -> bool:
        """Whether the bytes fed so far end inside a frame."""
        return bool(self._head) or self._left > 0

    def check(self) -> None:
        """Raise the violation found behind the events feed() last returned, if any."""
        if self.error is not None:
            raise self.error

    def _decode(self, view: memoryview, events: List[Frame]) -> None:
        pos, end = 0, len(view)
        if self._head:  # finish a header that was split across feeds
            joined = self._head + bytes(view[: 14 - len(self._head)])
            used = self._parse_header(joined)
            if not used:
                self._head = joined
                return
            pos = used - len(self._head)
            self._head = b""
            pos += self._take_payload(view, pos, events)
        while pos < end:
            if self._left < 0:
                used = self._parse_header(view[pos : pos + 14])
                if not used:
                    self._head = bytes(view[pos:])
                    return
                pos += used
            pos += self._take_payload(view, pos, events)

    def _parse_header(self, buf: _Buffer) -> int:
        """Parse and check one frame header at the start of *buf*; 0 if it is incomplete."""
        size = len(buf)
        if size < 2:
            return 0
        first, second = buf[0], buf[1]
        opcode, fin, length = first & 0x0F, bool(first & 0x80), second & 0x7F
        # Checked on the first two bytes: a peer that breaks these rules may never send more.
        if first & 0x70:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "reserved bits set")
        if opcode not in _DATA_OPCODES and opcode not in _CONTROL_OPCODES:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode:#x}")
        if not second & 0x80:
            raise ProtocolError(CloseCode.PROTOCOL_ERROR, "client frames must be masked")
        used = 14 if length == 127 else 8 if length == 126 else 6  # with the 4-byte mask
        if size < used:
            return 0
        if length == 126:
            length = (buf[2] << 8) | buf[3]
        elif length == 127:
            length = int.from_bytes(buf[2:10], "big")
            if length >> 63:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "frame length over 2**63")
        if opcode in _CONTROL_OPCODES:
            if not fin:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
            if length > 125:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "control frame over 125 bytes")
        else:
            if opcode == OP_CONT:
                if not self._message:
                    raise ProtocolError(CloseCode.PROTOCOL_ERROR, "continuation outside a message")
            elif self._message:
                raise ProtocolError(CloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
            else:
                self._message, self._message_size = opcode, 0
                self._utf8 = codecs.getincrementaldecoder("utf-8")() if opcode == OP_TEXT else None
            self._message_size += length
            if self._message_size > self._max_message:
                raise ProtocolError(
                    CloseCode.MESSAGE_TOO_BIG, f"message over {self._max_message} bytes"
                )
        self._opcode, self._fin, self._left, self._seen = opcode, fin, length, 0
        self._mask = bytes(buf[used - 4 : used])
        return used

    def _take_payload(self, view: memoryview, pos: int, events: List[Frame]) -> int:
        """Consume this frame's payload bytes present at *pos*; return how many."""
        take = min(self._left, len(view) - pos)
        self._left -= take
        if self._opcode in _CONTROL_OPCODES:
            self._control += view[pos : pos + take]
            if not self._left:
                payload = unmask(self._control, self._mask) if self._control else b""
                self._control = bytearray()
                self._left = -1
                if self._opcode == OP_CLOSE:
                    parse_close(payload)  # raises on an invalid code or reason
                events.append(Frame(self._opcode, payload, True))
            return take
        if take or not self._left:  # a chunk, or the end of a frame that may be empty
            payload = unmask(view[pos : pos + take], self._mask, self._seen) if take else b""
            self._seen += take
            last = self._fin and not self._left
            if self._utf8 is not None:
                try:
                    self._utf8.decode(payload, last)
                except UnicodeDecodeError:
                    raise ProtocolError(CloseCode.INVALID_DATA, "text is not UTF-8") from None
            events.append(Frame(self._message, payload, last))
            if not self._left:
                self._left = -1
                if self._fin:
                    self._message, self._utf8 = 0, None
        return take


# === 6. Plugins ===
#
# Token plugins turn the client's token into a target; auth plugins allow or
# refuse a client. Both keep upstream's duck-typed interfaces, so plugins
# written for websockify load unchanged. Every plugin method runs in a worker
# thread, never on the loop: it may block (always with a timeout) and must be
# thread-safe.


# Upstream's HTTP token plugins wait 5 s for their service; Redis gets the same.
_TOKEN_SERVICE_TIMEOUT = 5.0
# A target is a few dozen bytes; a bigger answer from a service or a
# TokenFileName file is a mistake, and reading it whole would cost memory.
_MAX_TARGET_BYTES = 64 * 1024
# The host upstream's plugins return when the "port" is a unix socket path.
_UNIX_SOCKET_HOST = "unix_socket"

if TYPE_CHECKING:
    from typing import Literal, Protocol

    class TokenPlugin(Protocol):
        """What ``--token-plugin`` loads: ``lookup`` returns (host, port) or None."""

        def lookup(self, token: str) -> Optional[Sequence[object]]: ...

    class AuthPlugin(Protocol):
        """What ``--auth-plugin`` loads: ``authenticate`` returns or raises."""

        def authenticate(
            self,
            headers: http.client.HTTPMessage,
            target_host: Optional[str],
            target_port: Union[int, str, None],
        ) -> None: ...

else:
    TokenPlugin = AuthPlugin = object


class Target(NamedTuple):
    """Where a client is proxied to: a TCP host and port, or a unix socket."""

    host: str  # "unix_socket" (upstream's marker) when unix_socket is set
    port: int  # 0 when unix_socket is set
    unix_socket: Optional[str] = None

    def __str__(self) -> str:
        if self.unix_socket is not None:
            return f"unix socket {self.unix_socket}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


class _TokenRefused(HandshakeError):
    """A built-in token plugin refuses: *reason* goes to the client, *detail* to the log."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(status, reason)
        self.detail = detail


def _brief(value: object, limit: int = 60) -> str:
    """repr() of untrusted *value*, cut short: log lines stay one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _strerror(exc: BaseException) -> str:
    """A socket or file error as people read it ("Connection refused"); else _describe."""
    if isinstance(exc, OSError) and exc.strerror:
        return " ".join(str(exc.strerror).split())[:300]
    return _describe(exc)


def _describe(exc: BaseException) -> str:
    """An exception as one bounded line, without a traceback."""
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    return f"{name}: {text}"[:300] if text else name


def _loads_json(text: str) -> Any:
    """json.loads that fails only with ValueError (deep nesting raises RecursionError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


# --- targets ---

_PORT_DIGITS = re.compile(r"[0-9]{1,5}")
# Whitespace, controls, brackets and slashes never occur in a host name or an
# address, and a host containing them would be a parsing accident.
_BAD_HOST_CHARS = re.compile(r"[\s\x00-\x1f\x7f\[\]/]")


def _make_target(host: str, port: object) -> Target:
    """A TCP target from *host* and *port* (int, or decimal digits in str or bytes).

    Raises ValueError. ``[v6addr]`` loses its brackets."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or len(host) > 255 or _BAD_HOST_CHARS.search(host):
        raise ValueError(f"invalid host {_brief(host)}")
    if isinstance(port, bytes):  # upstream's BaseTokenAPI returns the port as bytes
        port = port.decode("ascii", "replace")
    if isinstance(port, str) and _PORT_DIGITS.fullmatch(port):
        port = int(port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"invalid port {_brief(port)}")
    return Target(host, port)


def _make_unix_target(path: object) -> Target:
    """A unix socket target; raises ValueError unless *path* is a usable path."""
    if isinstance(path, os.PathLike):  # upstream's UnixDomainSocketDirectory returns a Path
        path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ValueError(f"invalid unix socket path {_brief(path)}")
    return Target(_UNIX_SOCKET_HOST, 0, path)


def _parse_target(text: str) -> Target:
    """``host:port``, ``[v6addr]:port`` or ``unix_socket:/path``; raises ValueError."""
    if text.startswith(_UNIX_SOCKET_HOST + ":"):
        return _make_unix_target(text[len(_UNIX_SOCKET_HOST) + 1 :])
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError(f"expected host:port, got {_brief(text)}")
    return _make_target(host, port)


def _target_from_result(result: object) -> Target:
    """Normalise what a token plugin's ``lookup()`` returned; raises ValueError."""
    if isinstance(result, Target):
        if result.unix_socket is not None:
            return _make_unix_target(result.unix_socket)
        return _make_target(result.host, result.port)
    if not isinstance(result, (list, tuple)) or len(result) != 2:
        raise ValueError(f"expected (host, port), got {_brief(result)}")
    host, port = result
    if isinstance(host, bytes):
        host = host.decode("utf-8")
    if not isinstance(host, str):
        raise ValueError(f"invalid host {_brief(host)}")
    if host == _UNIX_SOCKET_HOST:
        return _make_unix_target(port)
    return _make_target(host, port)


def _target_from_json(value: object) -> Target:
    """``"host:port"``, ``{"host": h, "port": p}`` or ``{"host": "h:p"}``; raises ValueError."""
    if isinstance(value, str):
        return _parse_target(value)
    if isinstance(value, dict) and "host" in value:
        host = value["host"]
        if "port" in value:
            return _target_from_result((host, value["port"]))
        if isinstance(host, str):
            return _parse_target(host)
    raise ValueError('expected "host:port" or {"host": ..., "port": ...}')


def _as_pair(target: Target, port_as_text: bool = False) -> Tuple[str, Union[int, str]]:
    """A target in upstream's ``lookup()`` shape, which plugin subclasses and auth plugins
    expect. Upstream's plugins that read ``host:port`` text return the port as a string:
    *port_as_text* does the same."""
    if target.unix_socket is not None:
        return (_UNIX_SOCKET_HOST, target.unix_socket)
    return (target.host, str(target.port) if port_as_text else target.port)


# --- parsers of untrusted text (each raises ValueError and nothing else) ---

_TOKEN_SEPARATOR = re.compile(r":\s")


def _parse_token_line(line: str) -> Optional[Tuple[str, Target]]:
    """One line of a token file: ``token: host:port``.

    None for a blank line or a ``#`` comment; ValueError for anything else
    that is not an entry. The token ends at the first colon followed by
    whitespace (as upstream splits), so a token may itself contain colons."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    separator = _TOKEN_SEPARATOR.search(line)
    if separator is None or separator.start() == 0:
        raise ValueError("expected 'token: host:port'")
    target = line[separator.end() :].strip()
    if not target or any(char.isspace() for char in target):
        raise ValueError("expected 'token: host:port'")
    return line[: separator.start()], _parse_target(target)


def _parse_json_tokens(text: str) -> Tuple[Dict[str, Target], List[str]]:
    """A JSON token file: an object mapping tokens to targets.

    Returns the targets and one message per entry that was skipped as
    invalid. Raises ValueError when *text* is not a JSON object at all."""
    data = _loads_json(text)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object mapping tokens to targets")
    targets: Dict[str, Target] = {}
    skipped: List[str] = []
    for number, (token, value) in enumerate(data.items(), 1):
        try:
            targets[token] = _target_from_json(value)
        except ValueError as exc:
            # The position, not the token: tokens are secrets and logs are not.
            skipped.append(f"entry {number}: {exc}")
    return targets, skipped


def _parse_basic_credentials(header: str) -> Tuple[bytes, bytes]:
    """``Basic base64(user:password)`` from an Authorization header, as bytes.

    Raises ValueError for another scheme, invalid base64 or a missing colon.
    The scheme is case-insensitive (RFC 7235 section 2.1)."""
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise ValueError("not Basic authentication")
    decoded = base64.b64decode(credentials.strip(), validate=True)  # binascii.Error is a ValueError
    user, colon, password = decoded.partition(b":")
    if not colon:
        raise ValueError("no colon between user and password")
    return user, password


def _split_source_fields(source: str) -> List[str]:
    """Split at ':' like upstream's TokenRedis; a field in double quotes may hold ':'.

    Raises ValueError for an unterminated quote or text after a closing quote."""
    fields: List[str] = []
    pos = 0
    while True:
        if source.startswith('"', pos):
            end = source.find('"', pos + 1)
            if end < 0:
                raise ValueError("unterminated quote")
            fields.append(source[pos + 1 : end])
            pos = end + 1
            if pos < len(source) and source[pos] != ":":
                raise ValueError("a closing quote must end its field")
        else:
            end = source.find(":", pos)
            end = len(source) if end < 0 else end
            fields.append(source[pos:end])
            pos = end
        if pos >= len(source):
            return fields
        pos += 1  # the ':' between fields


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _b64url_decode(text: str) -> bytes:
    """Unpadded base64url (RFC 7515 section 2), strictly; raises ValueError."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- shared pieces of the built-ins ---


def _source_text(src: Optional[str], flag: str, what: str) -> str:
    if not src:
        raise ConfigError(f"needs {flag} ({what})")
    return src


def _source_directory(src: Optional[str], what: str) -> str:
    """The absolute path of the directory named by --token-source.

    It may not exist yet (see _SourceState); ConfigError if it is something else."""
    # Absolute, so that daemonizing (which changes directory) changes nothing.
    path = os.path.abspath(_source_text(src, "--token-source", what))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--token-source {src!r} is not a directory")
    return path


def _file_version(path: str) -> Tuple[int, int, int, int]:
    """What changes when the file at *path* is rewritten or replaced; raises OSError."""
    info = os.stat(path)
    return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class _SourceState:
    """Whether a token source can be used, logged once per change, not once per lookup.

    Upstream reads its sources at lookup time, so a proxy may start before its
    token file, directory or key exists (at boot, before whatever writes them).
    Lookups find no token meanwhile, and find them once the source is there."""

    def __init__(self, plugin: str, path: str) -> None:
        self._plugin, self._path = plugin, path
        self._lock = threading.Lock()
        self._problem: Optional[str] = None
        self._was_usable = False

    def usable(self) -> None:
        if self._problem is None and self._was_usable:  # every lookup: no lock needed
            return
        with self._lock:
            if self._problem is not None:
                _log.info("%s: %s is usable now", self._plugin, self._path)
            self._problem, self._was_usable = None, True

    def missing(self) -> None:
        if self._was_usable:
            self._change("missing", "no longer exists; lookups find no token until it is back")
        else:
            self._change("missing", "does not exist yet; lookups find no token until it does")

    def unusable(self, why: str) -> None:
        """*why*: one line, different for each different problem (each is logged once)."""
        self._change(why, f"is unusable, lookups find no token until it is fixed: {why}")

    def _change(self, problem: str, message: str) -> None:
        with self._lock:
            if problem != self._problem:
                self._problem = problem
                _log.warning("%s: %s %s", self._plugin, self._path, message)


def _current_directory(path: str, state: _SourceState) -> Optional[str]:
    """The real path of the source directory *path* now, or None while it is not one.

    Resolved at each lookup, not once at startup: the directory may appear,
    or its path be pointed elsewhere, while the proxy runs."""
    real = os.path.realpath(path)
    if os.path.isdir(real):
        state.usable()
        return real
    if os.path.exists(real):
        state.unusable("not a directory")
    else:
        state.missing()
    return None


def _is_plain_file_name(name: str) -> bool:
    """True for a name that can only mean a file directly inside a directory."""
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        return False
    if os.altsep is not None and os.altsep in name:
        return False
    try:
        return len(os.fsencode(name)) <= 255  # NAME_MAX; longer names only make OSErrors
    except UnicodeEncodeError:
        return False


def _path_in_directory(directory: str, token: str, plugin: str) -> str:
    """The real path the *token* names inside *directory* (a real path).

    Raises _TokenRefused when the token is not a plain file name, or names a
    symlink that leads out of the directory."""
    if not _is_plain_file_name(token):
        raise _TokenRefused(400, "Invalid token", f"{plugin}: token is not a plain file name")
    path = os.path.realpath(os.path.join(directory, token))
    if os.path.commonpath([directory, path]) != directory:
        raise _TokenRefused(400, "Invalid token", f"{plugin}: token leads out of {directory}")
    return path


def _invalid_target(plugin: str, detail: object) -> _TokenRefused:
    return _TokenRefused(400, "Invalid target for token", f"{plugin}: invalid target: {detail}")


# --- token plugins ---


class BaseTokenPlugin:
    """Base of token plugins (upstream's ``websockify.token_plugins.BasePlugin``)."""

    def __init__(self, src: Optional[str] = None) -> None:
        self.source = src

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        """(host, port) for *token*, or None when the token is unknown."""
        return None


class ReadOnlyTokenFile(BaseTokenPlugin):
    """Lines ``token: host:port`` in a file, or in every file of a directory; read once.

    In a directory, hidden files and editor backups (``name~``) are skipped
    and files are read in name order, so a later file wins a duplicate token.
    Malformed lines are logged and skipped. A source that does not exist yet
    is read at the first lookup that finds it."""

    def __init__(self, src: Optional[str]) -> None:
        super().__init__(src)
        what = "a token file or a directory of token files"
        # Absolute, so that daemonizing (which changes directory) changes nothing.
        self._path = os.path.abspath(_source_text(src, "--token-source", what))
        self._state = _SourceState(type(self).__name__, self._path)
        self._reported: Set[str] = set()
        self._report_lock = threading.Lock()
        self._first_read_lock = threading.Lock()
        self._targets = self._read_targets()

    def _token_files(self) -> List[str]:
        if not os.path.isdir(self._path):
            return [self._path]
        names = sorted(os.listdir(self._path))
        paths = [os.path.join(self._path, n) for n in names if n[0] != "." and n[-1] != "~"]
        return [path for path in paths if os.path.isfile(path)]

    def _read_targets(self) -> Optional[Dict[str, Target]]:
        """The tokens in the source now; None while it does not exist."""
        try:
            targets = self._read_token_files()
        except (FileNotFoundError, NotADirectoryError):
            self._state.missing()
            return None
        self._state.usable()
        return targets

    def _read_token_files(self) -> Dict[str, Target]:
        targets: Dict[str, Target] = {}
        for path in self._token_files():
            skipped = []
            try:
                with open(path, encoding="utf-8", errors="replace") as lines:
                    for number, line in enumerate(lines, 1):
                        try:
                            entry = _parse_token_line(line)
                        except ValueError as exc:
                            skipped.append(f"{path} line {number}: {exc}")
                            continue
                        if entry is not None:
                            targets[entry[0]] = entry[1]
            except FileNotFoundError:
                if path == self._path:
                    raise
                continue  # removed from the directory since it was listed
            self._report(skipped)
        return targets

    def _report(self, skipped: List[str]) -> None:
        """Log each skipped line once, however often the file is re-read."""
        with self._report_lock:
            new = [message for message in skipped if message not in self._reported]
            self._reported.update(new)
        for message in new:
            _log.warning("%s: skipped %s", type(self).__name__, message)

    def _current_targets(self) -> Dict[str, Target]:
        if self._targets is None:  # not there at startup: read it once it is
            with self._first_read_lock:
                if self._targets is None:
                    self._targets = self._read_targets()
        return self._targets or {}

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        target = self._current_targets().get(token)
        return None if target is None else _as_pair(target, port_as_text=True)


class TokenFile(ReadOnlyTokenFile):
    """Like ReadOnlyTokenFile, but re-read on every lookup, so edits apply at once."""

    def _current_targets(self) -> Dict[str, Target]:
        return self._read_targets() or {}


class TokenFileName(BaseTokenPlugin):
    """A directory where the file named after the token holds ``host:port``."""

    def __init__(self, src: Optional[str]) -> None:
        super().__init__(src)
        self._path = _source_directory(src, "a directory of token files")
        self._state = _SourceState(type(self).__name__, self._path)
        _current_directory(self._path, self._state)  # says at startup if it is missing

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        directory = _current_directory(self._path, self._state)
        if directory is None:
            return None
        path = _path_in_directory(directory, token, "TokenFileName")
        try:
            # O_NONBLOCK: opening a FIFO someone left there must not hang the worker.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory, FIFO, device...
                return None
            data = os.read(fd, _MAX_TARGET_BYTES + 1)  # a regular file: all of it, up to n
        finally:
            os.close(fd)
        if len(data) > _MAX_TARGET_BYTES:
            raise _invalid_target("TokenFileName", f"{path} is too large")
        try:
            return _as_pair(_parse_target(data.decode("utf-8").strip()), port_as_text=True)
        except ValueError as exc:
            raise _invalid_target("TokenFileName", f"{path}: {exc}") from None


class UnixDomainSocketDirectory(BaseTokenPlugin):
    """A directory where the token names a unix socket to connect to."""

    def __init__(self, src: Optional[str]) -> None:
        super().__init__(src)
        self._path = _source_directory(src, "a directory of unix sockets")
        self._state = _SourceState(type(self).__name__, self._path)
        _current_directory(self._path, self._state)  # says at startup if it is missing

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        directory = _current_directory(self._path, self._state)
        if directory is None:
            return None
        path = _path_in_directory(directory, token, "UnixDomainSocketDirectory")
        try:
            mode = os.stat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISSOCK(mode):
            raise _invalid_target("UnixDomainSocketDirectory", f"{path} is not a socket")
        return (_UNIX_SOCKET_HOST, path)


class TokenJSONFile(BaseTokenPlugin):
    """A JSON object mapping tokens to ``"host:port"`` or ``{"host": h, "port": p}``.

    Re-read when the file changes (inode, size, mtime or ctime). A version
    that cannot be read or parsed is logged once and ignored: the last good
    one stays in force, so a typo while editing does not lock everyone out.
    Until a first good version exists, no token is found."""

    def __init__(self, src: Optional[str]) -> None:
        super().__init__(src)
        self._path = os.path.abspath(_source_text(src, "--token-source", "a JSON token file"))
        self._state = _SourceState(type(self).__name__, self._path)
        self._lock = threading.Lock()  # one reload at a time
        self._version: Optional[Tuple[int, int, int, int]] = None
        self._targets: Dict[str, Target] = {}
        self._loaded = False  # a good version was read
        try:
            self._version = _file_version(self._path)
        except (FileNotFoundError, NotADirectoryError):
            self._state.missing()
            return
        except OSError as exc:
            raise ConfigError(f"--token-source {src!r}: {_describe(exc)}") from None
        try:
            self._targets = self._read_targets()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--token-source {src!r}: {_describe(exc)}") from None
        self._loaded = True

    def _read_targets(self) -> Dict[str, Target]:
        with open(self._path, encoding="utf-8-sig") as file:  # -sig: tolerate a BOM
            targets, skipped = _parse_json_tokens(file.read())
        for message in skipped:
            _log.warning("TokenJSONFile: %s: skipped %s", self._path, message)
        return targets

    def _reload_if_changed(self) -> None:
        try:
            version: Optional[Tuple[int, int, int, int]] = _file_version(self._path)
        except OSError:
            version = None
        if version == self._version:
            return
        with self._lock:
            if version == self._version:  # another worker reloaded meanwhile
                return
            self._version = version  # even if it fails: log once per version, not per lookup
            try:
                self._targets = self._read_targets()  # one assignment: readers need no lock
                self._loaded = True
                self._state.usable()
            except (OSError, ValueError) as exc:
                if not self._loaded:  # no previous tokens to keep
                    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
                        self._state.missing()
                    else:
                        self._state.unusable(_describe(exc))
                    return
                _log.warning(
                    "TokenJSONFile: %s unusable, keeping the previous tokens: %s",
                    self._path,
                    _describe(exc),
                )

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        self._reload_if_changed()
        target = self._targets.get(token)
        return None if target is None else _as_pair(target)


class _TokenAPIResponse:
    """What upstream's ``process_result(resp)`` overrides use of a ``requests`` response."""

    def __init__(self, status_code: int, content: bytes, headers: Mapping[str, str]) -> None:
        self.status_code = status_code
        self.ok = status_code < 400
        self.content = content
        self.headers = headers

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return _loads_json(self.content.decode("utf-8"))


class BaseTokenAPI(BaseTokenPlugin):
    """GET the source URL with ``%s`` replaced by the token; the body is ``host:port``.

    2xx: the target. 4xx: unknown token. Anything else, or no answer within
    the timeout: the lookup fails (500)."""

    def __init__(self, src: Optional[str]) -> None:
        super().__init__(src)
        url = _source_text(src, "--token-source", "a URL with %s where the token goes")
        if "%s" not in url:
            raise ConfigError(f"--token-source {url!r} has no %s for the token")
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ConfigError(f"--token-source {url!r} is not an http:// or https:// URL")
        self._url = url

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        plugin = type(self).__name__
        url = self._url.replace("%s", urllib.parse.quote(token, safe=""), 1)
        request = urllib.request.Request(
            url, headers={"User-Agent": f"websockify_min/{__version__}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=_TOKEN_SERVICE_TIMEOUT) as answer:
                response = _TokenAPIResponse(
                    answer.getcode(), answer.read(_MAX_TARGET_BYTES + 1), answer.headers
                )
        except urllib.error.HTTPError as exc:
            exc.close()
            if 400 <= exc.code < 500:  # the service refuses this token
                if exc.code != 404:
                    _log.warning("%s: the token service answered %d", plugin, exc.code)
                return None
            raise
        if len(response.content) > _MAX_TARGET_BYTES:
            raise _invalid_target(plugin, "the answer is too large")
        try:
            return self.process_result(response)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise _invalid_target(plugin, _describe(exc)) from None

    def process_result(self, resp: _TokenAPIResponse) -> Tuple[str, Union[int, str]]:
        """The target in a successful answer; override for other formats."""
        return _as_pair(_parse_target(resp.text.strip()), port_as_text=True)


class JSONTokenApi(BaseTokenAPI):
    """Like BaseTokenAPI, but the body is JSON: ``{"host": h, "port": p}``."""

    def process_result(self, resp: _TokenAPIResponse) -> Tuple[str, Union[int, str]]:
        return _as_pair(_target_from_json(resp.json()))


class _RedisError(Exception):
    """Redis answered with an error, or not in RESP."""


def _resp_command(*args: str) -> bytes:
    """One command in RESP, the Redis protocol: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode("utf-8", "surrogatepass")
        parts += [b"$%d\r\n" % len(data), data, b"\r\n"]
    return b"".join(parts)


_RESP_LENGTH = re.compile(rb"-1|[0-9]{1,9}")


def _read_resp_reply(replies: BinaryIO) -> Optional[bytes]:
    """One reply to AUTH, SELECT or GET: bytes, or None for a missing key."""
    line = replies.readline(_MAX_TARGET_BYTES)
    if not line.endswith(b"\r\n"):
        raise _RedisError("connection closed, or a reply line too long")
    kind, body = line[:1], line[1:-2]
    if kind == b"-":
        raise _RedisError(body.decode("utf-8", "replace"))
    if kind in (b"+", b":"):
        return body
    if kind == b"$" and _RESP_LENGTH.fullmatch(body):
        length = int(body)
        if length < 0:
            return None
        if length > _MAX_TARGET_BYTES:
            raise _RedisError(f"value of {length} bytes is too large for a target")
        data = replies.read(length + 2)
        if len(data) != length + 2 or not data.endswith(b"\r\n"):
            raise _RedisError("truncated reply")
        return data[:-2]
    raise _RedisError(f"unexpected reply {_brief(line)}")


_DECIMAL = re.compile(r"[0-9]+")  # str.isdigit() also takes digits that int() refuses


class TokenRedis(BaseTokenPlugin):
    """Tokens as keys in Redis; source ``host[:port[:db[:password[:namespace]]]]``.

    Empty fields take their defaults (port 6379, db 0, no password, no
    namespace); a field in double quotes may contain ':'; a password
    ``@/path`` is read from that file. With a namespace the key is
    ``namespace:token``. The value is ``{"host": "h:p"}`` or plain ``h:p``.
    Each lookup opens its own connection, so workers share nothing."""

    def __init__(self, src: Optional[str]) -> None:
        super().__init__(src)
        text = _source_text(src, "--token-source", "host[:port[:db[:password[:namespace]]]]")
        try:
            fields = _split_source_fields(text)
        except ValueError as exc:
            raise ConfigError(f"--token-source: {exc}") from None
        if len(fields) > 5:
            raise ConfigError("--token-source is not host[:port[:db[:password[:namespace]]]]")
        host, port, db, password, namespace = fields + [""] * (5 - len(fields))
        if not host:
            raise ConfigError("--token-source: the Redis host is empty")
        if port and not (_PORT_DIGITS.fullmatch(port) and 0 < int(port) < 65536):
            raise ConfigError(f"--token-source: Redis port {port!r} is not a port number")
        if db and not _DECIMAL.fullmatch(db):
            raise ConfigError(f"--token-source: Redis db {db!r} is not a number")
        if password.startswith("@"):
            try:
                with open(os.path.expanduser(password[1:]), encoding="utf-8") as secret:
                    password = secret.read().rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(
                    f"--token-source: Redis password file: {_describe(exc)}"
                ) from None
        self._address = (host, int(port) if port else 6379)
        self._db = int(db) if db else 0
        self._password = password or None
        self._key_prefix = namespace + ":" if namespace else ""

    def _get(self, key: str) -> Optional[bytes]:
        commands = []
        if self._password is not None:
            commands.append(_resp_command("AUTH", self._password))
        if self._db:
            commands.append(_resp_command("SELECT", str(self._db)))
        commands.append(_resp_command("GET", key))
        # The timeout bounds the connect and every read and write.
        with socket.create_connection(self._address, timeout=_TOKEN_SERVICE_TIMEOUT) as sock:
            sock.sendall(b"".join(commands))  # pipelined: one round trip
            with sock.makefile("rb") as replies:
                for _ in commands:
                    value = _read_resp_reply(replies)  # raises on AUTH or SELECT errors
        return value

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        value = self._get(self._key_prefix + token)
        if value is None:
            return None
        try:
            text = value.decode("utf-8").strip()
            target = (
                _target_from_json(_loads_json(text))
                if text.startswith("{")
                else _parse_target(text)
            )
        except ValueError as exc:
            raise _invalid_target("TokenRedis", exc) from None
        return _as_pair(target, port_as_text=True)  # upstream splits "host:port" even in JSON


_JWT_HMAC_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
# Upstream's list; "none" and HMAC never apply to a PEM key (no algorithm confusion).
_JWS_PUBLIC_KEY_ALGS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
)  # fmt: skip
# jwcrypto's defaults less PBES2 (password-based, not key-based); never RSA1_5.
_JWE_ALGS = (
    "RSA-OAEP", "RSA-OAEP-256", "ECDH-ES", "ECDH-ES+A128KW", "ECDH-ES+A192KW", "ECDH-ES+A256KW",
    "A128KW", "A192KW", "A256KW", "A128GCMKW", "A192GCMKW", "A256GCMKW", "dir",
    "A128CBC-HS256", "A192CBC-HS384", "A256CBC-HS512", "A128GCM", "A192GCM", "A256GCM",
)  # fmt: skip


def _import_jwcrypto(module: str) -> Optional[types.ModuleType]:
    """jwcrypto's *module* if that optional package is installed, else None."""
    try:
        return importlib.import_module("jwcrypto." + module)
    except ImportError:
        return None


class _JWTKey(NamedTuple):
    """A JWTTokenApi key: an HMAC secret, or a PEM key that only jwcrypto can use."""

    hmac_key: Optional[bytes]
    jwk: Any  # jwcrypto's key, when jwcrypto is installed


def _parse_jwt_key(key_data: bytes) -> _JWTKey:
    """The key in a key file's bytes; raises ValueError saying what is wrong."""
    jwk = _import_jwcrypto("jwk")
    if key_data.lstrip().startswith(b"-----BEGIN"):
        if jwk is None:
            raise ValueError("a PEM key needs jwcrypto (pip install jwcrypto)")
        try:
            return _JWTKey(None, jwk.JWK.from_pem(key_data))
        except Exception as exc:  # jwcrypto and cryptography raise many types
            raise ValueError(f"unusable PEM key: {_describe(exc)}") from None
    try:
        secret = key_data.decode("ascii").strip().rstrip("=")
        hmac_key = _b64url_decode(secret)
    except ValueError:
        raise ValueError("an HMAC secret must be written in base64url") from None
    if not hmac_key:
        raise ValueError("the HMAC secret is empty")
    oct_key: Any = None
    if jwk is not None:  # only for encrypted tokens: HMAC signatures need no jwcrypto
        try:
            oct_key = jwk.JWK(kty="oct", k=secret)
        except Exception as exc:  # jwcrypto raises many types
            _log.warning("JWTTokenApi: jwcrypto refuses the key: %s", _describe(exc))
    return _JWTKey(hmac_key, oct_key)


class JWTTokenApi(BaseTokenPlugin):
    """The token is a JWT whose claims ``host`` and ``port`` name the target.

    Source: a key file. A PEM key (RSA or EC) needs the optional ``jwcrypto``
    package. Anything else is an HMAC secret written, as upstream reads it,
    in base64url (a JWK ``k`` value). HS256/384/512 tokens are checked with
    the standard library; encrypted (JWE) tokens, whose payload must be a
    signed token, need jwcrypto. ``nbf`` and ``exp`` are honoured. Invalid,
    expired or not yet valid tokens are refused with 403.

    The key file is read again when it changes, as upstream reads it at every
    lookup, so a new key applies without a restart. While it is missing or
    unusable no token is found (404), as upstream finds none."""

    def __init__(self, src: Optional[str]) -> None:
        super().__init__(src)
        text = _source_text(src, "--token-source", "a PEM key or a base64url HMAC secret")
        # Absolute, so that daemonizing (which changes directory) changes nothing.
        self._path = os.path.abspath(text)
        self._state = _SourceState(type(self).__name__, self._path)
        self._lock = threading.Lock()  # one reload at a time
        # (file version, key) in one attribute: a lookup reads both in one step.
        self._loaded: Tuple[Optional[Tuple[int, int, int, int]], Optional[_JWTKey]]
        try:
            version = _file_version(self._path)
            with open(self._path, "rb") as key_file:
                key_data = key_file.read()
        except (FileNotFoundError, NotADirectoryError):
            self._state.missing()
            self._loaded = (None, None)
            return
        except OSError as exc:
            raise ConfigError(f"--token-source: key file: {_describe(exc)}") from None
        try:
            self._loaded = (version, _parse_jwt_key(key_data))
        except ValueError as exc:
            raise ConfigError(f"{text}: {exc}") from None

    def _current_key(self) -> Optional[_JWTKey]:
        """The key the file holds now (read again if it changed); None if there is none."""
        try:
            version: Optional[Tuple[int, int, int, int]] = _file_version(self._path)
        except OSError:
            version = None
        loaded_version, key = self._loaded
        if version == loaded_version:
            return key
        with self._lock:
            if version != self._loaded[0]:  # another worker may have read it meanwhile
                self._loaded = (version, self._read_key(version))
            return self._loaded[1]

    def _read_key(self, version: Optional[Tuple[int, int, int, int]]) -> Optional[_JWTKey]:
        if version is None:
            self._state.missing()
            return None
        try:
            with open(self._path, "rb") as key_file:
                key = _parse_jwt_key(key_file.read())
        except (FileNotFoundError, NotADirectoryError):  # removed since the stat
            self._state.missing()
            return None
        except (OSError, ValueError) as exc:
            # Refused, as upstream refuses while its key is unreadable: the old key
            # may be the very one being withdrawn.
            self._state.unusable(str(exc) if isinstance(exc, ValueError) else _describe(exc))
            return None
        self._state.usable()
        return key

    def _decrypt(self, token: str, key: _JWTKey) -> str:
        jwe = _import_jwcrypto("jwe")
        if key.jwk is None or jwe is None:
            raise ValueError("encrypted (JWE) tokens need jwcrypto, which is not installed")
        envelope = jwe.JWE()
        envelope.allowed_algs = list(_JWE_ALGS)
        try:
            envelope.deserialize(token, key=key.jwk)
            return str(envelope.payload.decode("ascii"))
        except Exception as exc:  # jwcrypto raises many types for bad input
            raise ValueError(f"cannot decrypt: {_describe(exc)}") from None

    def _verified_payload(self, token: str, key: _JWTKey) -> bytes:
        """The payload of a compact JWS whose signature checks; raises ValueError."""
        parts = token.split(".")
        if len(parts) != 3:
            raise ValueError("not a compact JWS")
        header = _loads_json(_b64url_decode(parts[0]).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        if "crit" in header:  # RFC 7515 section 4.1.11: unknown extensions must fail
            raise ValueError("critical header extensions are not supported")
        alg = header.get("alg")
        if key.hmac_key is not None:
            hash_function = _JWT_HMAC_HASHES.get(str(alg))
            if hash_function is None:
                raise ValueError(f"algorithm {_brief(alg)} is not allowed with an HMAC key")
            signed = f"{parts[0]}.{parts[1]}".encode("ascii")
            expected = hmac.new(key.hmac_key, signed, hash_function).digest()
            if not hmac.compare_digest(_b64url_decode(parts[2]), expected):
                raise ValueError("bad signature")
            return _b64url_decode(parts[1])
        if alg not in _JWS_PUBLIC_KEY_ALGS:
            raise ValueError(f"algorithm {_brief(alg)} is not allowed with a PEM key")
        jws = _import_jwcrypto("jws")
        assert jws is not None  # a PEM key was only accepted with jwcrypto installed
        signature = jws.JWS()
        signature.allowed_algs = list(_JWS_PUBLIC_KEY_ALGS)
        try:
            signature.deserialize(token)
            signature.verify(key.jwk, alg=alg)
            return bytes(signature.payload)
        except Exception as exc:  # jwcrypto raises many types for bad input
            raise ValueError(f"bad signature: {_describe(exc)}") from None

    def _claims(self, token: str, key: _JWTKey) -> Dict[str, Any]:
        """The claims of a token that decrypts and verifies; raises ValueError."""
        if token.count(".") == 4:  # compact JWE: five parts
            token = self._decrypt(token, key)
        claims = _loads_json(self._verified_payload(token, key).decode("utf-8"))
        if not isinstance(claims, dict):
            raise ValueError("the claims are not a JSON object")
        for claim in ("nbf", "exp"):
            value = claims.get(claim, 0)
            # NaN passes every comparison, so only finite numbers count.
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"claim {claim!r} is not a number")
            # An int is always finite, and math.isfinite() overflows on a huge one.
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"claim {claim!r} is not finite")
        return claims

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        key = self._current_key()
        if key is None:
            return None
        try:
            claims = self._claims(token, key)
        except ValueError as exc:
            raise _TokenRefused(403, "Invalid token", f"JWTTokenApi: {exc}") from None
        now = time.time()
        if now < claims.get("nbf", now):
            raise _TokenRefused(403, "Token not yet valid", "JWTTokenApi: token not yet valid")
        if now >= claims.get("exp", math.inf):  # RFC 7519 section 4.1.4: "on or after"
            raise _TokenRefused(403, "Token expired", "JWTTokenApi: token expired")
        try:
            return _as_pair(_target_from_result((claims.get("host"), claims.get("port"))))
        except ValueError as exc:
            raise _invalid_target("JWTTokenApi", exc) from None


# --- auth plugins ---


class BaseAuthPlugin:
    """Base of auth plugins (upstream's ``websockify.auth_plugins.BasePlugin``)."""

    def __init__(self, src: Optional[str] = None) -> None:
        self.source = src

    def authenticate(
        self,
        headers: http.client.HTTPMessage,
        target_host: Optional[str],
        target_port: Union[int, str, None],
    ) -> None:
        """Return to let the client in; raise AuthenticationError to refuse it."""


class _InvalidOriginError(AuthenticationError):
    """Upstream's ``InvalidOriginError``, for plugins that catch or raise it."""

    def __init__(self, expected: Sequence[str], actual: Optional[str]) -> None:
        self.expected_origin = expected
        self.actual_origin = actual
        super().__init__(
            log_msg=f"origin {_brief(actual)} is not one of {' '.join(expected)}",
            response_msg="Invalid Origin",
        )


_BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="Websockify"'}


class BasicHTTPAuth(BaseAuthPlugin):
    """HTTP Basic authentication against one ``user:password`` (the source).

    No credentials or wrong ones: 401 with a Basic challenge. A malformed
    Authorization header (another scheme, bad base64, no colon): 403."""

    def __init__(self, src: Optional[str] = None) -> None:
        super().__init__(src)
        credentials = _source_text(src, "--auth-source", "user:password")
        if ":" not in credentials:
            raise ConfigError("--auth-source must be user:password")
        # Browsers send UTF-8 now, older clients Latin-1: accept either spelling.
        self._accepted = [credentials.encode("utf-8")]
        try:
            self._accepted.append(credentials.encode("latin-1"))
        except UnicodeEncodeError:
            pass

    def authenticate(
        self,
        headers: http.client.HTTPMessage,
        target_host: Optional[str],
        target_port: Union[int, str, None],
    ) -> None:
        header = headers.get("Authorization")
        if header is None:
            raise AuthenticationError(
                log_msg="no credentials", response_code=401, response_headers=_BASIC_CHALLENGE
            )
        try:
            user, password = _parse_basic_credentials(str(header))
        except ValueError as exc:
            raise AuthenticationError(log_msg=f"malformed Authorization header: {exc}") from None
        given = user + b":" + password
        matches = [hmac.compare_digest(given, accepted) for accepted in self._accepted]
        if not any(matches):  # every comparison made: the time says nothing about which
            raise AuthenticationError(
                log_msg=f"wrong credentials for user {_brief(user.decode('utf-8', 'replace'))}",
                response_code=401,
                response_headers=_BASIC_CHALLENGE,
            )


def _source_words(src: Optional[str], what: str) -> List[str]:
    words = _source_text(src, "--auth-source", what).split()
    if not words:
        raise ConfigError(f"--auth-source is empty: it needs {what}")
    return words


class ExpectOrigin(BaseAuthPlugin):
    """Allow only clients whose Origin header is one of the space-separated source.

    Compared without regard to case, as scheme and host are; otherwise 403."""

    def __init__(self, src: Optional[str] = None) -> None:
        super().__init__(src)
        self._allowed = _source_words(src, "space-separated allowed origins")
        self._allowed_lowercase = frozenset(origin.lower() for origin in self._allowed)

    def authenticate(
        self,
        headers: http.client.HTTPMessage,
        target_host: Optional[str],
        target_port: Union[int, str, None],
    ) -> None:
        origin = headers.get("Origin")
        if origin is None or origin.strip().lower() not in self._allowed_lowercase:
            raise _InvalidOriginError(self._allowed, origin)


class ClientCertCNAuth(BaseAuthPlugin):
    """Allow only TLS clients whose certificate CN is one of the space-separated source.

    The proxy passes the verified CN as the ``SSL_CLIENT_S_DN_CN`` header
    (after removing any ``SSL_*`` header the client sent); otherwise 403."""

    def __init__(self, src: Optional[str] = None) -> None:
        super().__init__(src)
        self._allowed = frozenset(_source_words(src, "space-separated allowed common names"))

    def authenticate(
        self,
        headers: http.client.HTTPMessage,
        target_host: Optional[str],
        target_port: Union[int, str, None],
    ) -> None:
        common_name = headers.get("SSL_CLIENT_S_DN_CN")
        if common_name not in self._allowed:
            raise AuthenticationError(
                log_msg=f"client certificate CN {_brief(common_name)} is not allowed"
            )


# --- what the session calls ---


def token_from_request(query: str, host_header: Optional[str], host_token: bool) -> Optional[str]:
    """The token of a request: ``token=`` in *query* (the part after '?'), or with
    *host_token* (``--host-token``) the Host header without its port. None if absent."""
    if host_token:
        host = (host_header or "").strip()
        if host.startswith("["):  # [v6addr]:port
            address, bracket, _ = host[1:].partition("]")
            return address if bracket and address else None
        return host.partition(":")[0] or None
    values = urllib.parse.parse_qs(query.lstrip("?")).get("token")
    if not values:
        return None
    # Upstream drops a trailing newline that some clients leave in the token.
    return values[0].rstrip("\n") or None


def lookup_target(plugin: "TokenPlugin", token: Optional[str]) -> Target:
    """Ask *plugin* where *token* leads. Call from a worker thread: it may block.

    Raises HandshakeError, and nothing else: 400 when *token* is None or
    empty, or the plugin's answer is not a usable target; 404 when the
    plugin does not know the token; 500 when the plugin raises (its
    service is down, or it has a bug); a HandshakeError the plugin raised
    itself (403 for a bad JWT, for one) passes through. Logs one line for
    each refusal."""
    return _look_up(plugin, token)[0]


def _look_up(plugin: "TokenPlugin", token: Optional[str]) -> Tuple[Target, Sequence[object]]:
    """lookup_target(), and the plugin's answer as it gave it, for the auth plugin."""
    name = type(plugin).__name__
    if not token:
        _log.warning("%s: no token in the request", name)
        raise HandshakeError(400, "Token missing")
    try:
        result = plugin.lookup(token)
    except HandshakeError as exc:
        detail = exc.detail if isinstance(exc, _TokenRefused) else f"{exc.status} {exc.reason}"
        _log.warning("token %s refused: %s", _brief(token), detail)
        raise
    except (Exception, SystemExit) as exc:  # upstream plugins call sys.exit() on errors
        _log.error(
            "token plugin %s failed for token %s: %s",
            name,
            _brief(token),
            _describe(exc),
            exc_info=_log.isEnabledFor(logging.DEBUG),
        )
        raise HandshakeError(500, "Token lookup failed") from None
    if result is None:
        _log.warning("token %s not found by %s", _brief(token), name)
        raise HandshakeError(404, "Token not found")
    try:
        return _target_from_result(result), result
    except ValueError as exc:
        _log.warning("token %s: %s returned an invalid target: %s", _brief(token), name, exc)
        raise HandshakeError(400, "Invalid target for token") from None


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # no CR, LF or other controls


def _is_authentication_error(exc: BaseException) -> bool:
    """True for our AuthenticationError and for upstream's, or another copy of
    this module's, which a plugin may import instead: same name, same fields."""
    return any(cls.__name__ == "AuthenticationError" for cls in type(exc).__mro__)


def _refusal_from(exc: BaseException) -> HandshakeError:
    """The HTTP answer an AuthenticationError asks for, made safe to send."""
    status = getattr(exc, "code", 403)
    if not isinstance(status, int) or not 300 <= status <= 599:
        status = 403
    reason = getattr(exc, "msg", None)
    if not isinstance(reason, str) or not reason or not _HEADER_VALUE.fullmatch(reason):
        reason = http.client.responses.get(status, "Forbidden")
    headers = getattr(exc, "headers", None)
    safe_headers = {
        name: value
        for name, value in (headers.items() if isinstance(headers, Mapping) else ())
        if isinstance(name, str)
        and isinstance(value, str)
        and _HEADER_NAME.fullmatch(name)
        and _HEADER_VALUE.fullmatch(value)
    }
    return HandshakeError(status, reason[:200], safe_headers)


def check_auth(
    plugin: "AuthPlugin",
    headers: http.client.HTTPMessage,
    target: Union[Target, Sequence[object], None],
) -> None:
    """Let *plugin* judge a request. Call from a worker thread: it may block.

    Returns to allow. Raises HandshakeError, and nothing else, to refuse: an
    AuthenticationError becomes its code (default 403), message and headers;
    a HandshakeError passes through; any other exception from the plugin
    becomes 500, so a broken plugin keeps clients out and shows in the log.
    The plugin sees the target as upstream's plugins do: (host, port),
    ("unix_socket", path), or (None, None) when there is none yet. *target*
    may also be a token plugin's (host, port) answer, which the plugin then
    sees as it is, as upstream passes it on (a port string from a token file)."""
    target_host: Optional[str] = None
    target_port: Union[int, str, None] = None
    if isinstance(target, Target):
        target_host, target_port = _as_pair(target)
    elif target is not None:  # a token plugin's answer: its types are that plugin's choice
        target_host, target_port = cast(Tuple[str, Union[int, str]], target)
    try:
        plugin.authenticate(headers=headers, target_host=target_host, target_port=target_port)
    except HandshakeError as exc:
        _log.warning("authentication refused: %d %s", exc.status, exc.reason)
        raise
    except (Exception, SystemExit) as exc:
        if _is_authentication_error(exc):
            refusal = _refusal_from(exc)
            _log.warning("authentication refused: %s", " ".join(str(exc).split()))
            raise refusal from None
        _log.error(
            "auth plugin %s failed: %s",
            type(plugin).__name__,
            _describe(exc),
            exc_info=_log.isEnabledFor(logging.DEBUG),
        )
        raise HandshakeError(500, "Authentication failed") from None


# --- loading ---

_TOKEN_PLUGINS: Dict[str, Callable[[Optional[str]], object]] = {
    "BasePlugin": BaseTokenPlugin,
    "BaseTokenAPI": BaseTokenAPI,
    "JSONTokenApi": JSONTokenApi,
    "JWTTokenApi": JWTTokenApi,
    "ReadOnlyTokenFile": ReadOnlyTokenFile,
    "TokenFile": TokenFile,
    "TokenFileName": TokenFileName,
    "TokenJSONFile": TokenJSONFile,
    "TokenRedis": TokenRedis,
    "UnixDomainSocketDirectory": UnixDomainSocketDirectory,
}
_AUTH_PLUGINS: Dict[str, Callable[[Optional[str]], object]] = {
    "BasePlugin": BaseAuthPlugin,
    "BasicHTTPAuth": BasicHTTPAuth,
    "ClientCertCNAuth": ClientCertCNAuth,
    "ExpectOrigin": ExpectOrigin,
}


class _PluginKind(NamedTuple):
    flag: str
    method: str
    builtins: Dict[str, Callable[[Optional[str]], object]]
    upstream_module: str


_PLUGIN_KINDS = {
    "token": _PluginKind("--token-plugin", "lookup", _TOKEN_PLUGINS, "websockify.token_plugins"),
    "auth": _PluginKind("--auth-plugin", "authenticate", _AUTH_PLUGINS, "websockify.auth_plugins"),
}
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _install_import_aliases() -> None:
    """Let a user's plugin import what plugins written for upstream import.

    When the real websockify package is not installed, ``websockify``,
    ``websockify.token_plugins`` and ``websockify.auth_plugins`` become
    aliases of our classes (BasePlugin, the built-ins, AuthenticationError),
    so ``from websockify.token_plugins import BasePlugin`` works. They stay
    registered: plugins may import them again later, lazily. And when this
    file runs as a script, ``import websockify_min`` gets this module rather
    than a second copy with classes of its own."""
    if __name__ != "websockify_min":
        sys.modules.setdefault("websockify_min", sys.modules[__name__])
    if "websockify" in sys.modules:
        return
    try:
        if importlib.util.find_spec("websockify") is not None:
            return
    except (ImportError, ValueError):
        pass
    package = types.ModuleType("websockify", "websockify_min's aliases for upstream's plugins")
    package.__path__ = []  # a package: submodules come from sys.modules only
    token_plugins = types.ModuleType("websockify.token_plugins")
    vars(token_plugins).update(_TOKEN_PLUGINS)
    auth_plugins = types.ModuleType("websockify.auth_plugins")
    vars(auth_plugins).update(_AUTH_PLUGINS)
    vars(auth_plugins).update(
        AuthenticationError=AuthenticationError, InvalidOriginError=_InvalidOriginError
    )
    vars(package).update(token_plugins=token_plugins, auth_plugins=auth_plugins)
    sys.modules.update(
        {
            "websockify": package,
            "websockify.token_plugins": token_plugins,
            "websockify.auth_plugins": auth_plugins,
        }
    )


def _plugin_factory(kind: _PluginKind, name: str) -> Callable[[Optional[str]], object]:
    """The class *name* means for *kind*; ConfigError naming the flag if none."""
    if not _DOTTED_NAME.fullmatch(name):
        raise ConfigError(f"{kind.flag}: {name!r} is not a class name or a dotted path to one")
    module_name, _, class_name = name.rpartition(".")
    if not module_name:
        factory = kind.builtins.get(name)
        if factory is not None:
            return factory
        for other in _PLUGIN_KINDS.values():
            if name in other.builtins:
                raise ConfigError(f"{kind.flag}: {name} is for {other.flag}")
        known = ", ".join(sorted(kind.builtins))
        raise ConfigError(f"{kind.flag}: unknown plugin {name!r} (built in: {known})")
    for upstream in _PLUGIN_KINDS.values():
        if module_name == upstream.upstream_module and class_name in upstream.builtins:
            return upstream.builtins[class_name]
    _install_import_aliases()
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # the module's own code may fail in any way
        raise ConfigError(
            f"{kind.flag} {name}: cannot import {module_name}: {_describe(exc)}"
        ) from None
    factory = getattr(module, class_name, None)
    if not callable(factory):
        raise ConfigError(f"{kind.flag} {name}: {module_name} has no class {class_name}")
    return cast(Callable[[Optional[str]], object], factory)


@overload
def load_plugin(kind: "Literal['token']", name: str, source: Optional[str]) -> "TokenPlugin": ...
@overload
def load_plugin(kind: "Literal['auth']", name: str, source: Optional[str]) -> "AuthPlugin": ...
@overload
def load_plugin(kind: str, name: str, source: Optional[str]) -> object: ...
def load_plugin(kind: str, name: str, source: Optional[str]) -> Any:
    """Load and construct the ``"token"`` or ``"auth"`` plugin *name* with *source*.

    *name* is a built-in's short name (``TokenFile``), upstream's dotted
    name for it (``websockify.token_plugins.TokenFile``), or any other
    ``package.module.Class``, imported (see _install_import_aliases). Any
    failure (unknown name, import error, constructor error, no ``lookup``
    or ``authenticate`` method) raises ConfigError with one line that names
    the flag. ValueError only for a *kind* that is neither."""
    try:
        plugin_kind = _PLUGIN_KINDS[kind]
    except KeyError:
        raise ValueError(f"plugin kind must be 'token' or 'auth', not {kind!r}") from None
    factory = _plugin_factory(plugin_kind, name)
    try:
        plugin = factory(source)
    except ConfigError as exc:
        raise ConfigError(f"{plugin_kind.flag} {name}: {exc}") from None
    except (Exception, SystemExit) as exc:  # upstream's TokenRedis calls sys.exit()
        raise ConfigError(f"{plugin_kind.flag} {name}: {_describe(exc)}") from None
    if not callable(getattr(plugin, plugin_kind.method, None)):
        raise ConfigError(f"{plugin_kind.flag} {name}: has no {plugin_kind.method}() method")
    return plugin


# === 7. Static files ===

WEB_CHUNK = 256 * 1024  # bytes read from a --web file each time the client's queue has room
WEB_BURST = 1024 * 1024  # bytes one download may send per loop turn, so others get theirs
_INDEX_FILES = ("index.html", "index.htm")
_WEB_ALLOW = {"Allow": "GET, HEAD"}
# No file name holds a "/" or "\": escaped, they only serve to smuggle separators past a
# check (Apache refuses them the same way).
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)
# Types browsers insist on (a module script needs a JavaScript type), which old Pythons or
# a host's mime.types may lack or spell otherwise.
_WEB_TYPES = {
    ".css": "text/css",
    ".htm": "text/html",
    ".html": "text/html",
    ".js": "text/javascript",
    ".json": "application/json",
    ".mjs": "text/javascript",
    ".svg": "image/svg+xml",
    ".wasm": "application/wasm",
}
# A compressed file is sent as it is, so its type is the compression's (mimetypes would
# name the type of the content inside, which the browser would then fail to read).
_COMPRESSED_TYPES = {
    "br": "application/x-brotli",
    "bzip2": "application/x-bzip2",
    "compress": "application/x-compress",
    "gzip": "application/gzip",
    "xz": "application/x-xz",
}


class WebPathError(HandshakeError):
    """A URL path refused by resolve_web_path: it is malformed or could lead out of the
    web root. The client gets *status* (404, or 400 for a target that is not a path);
    *detail* says why, for the log."""

    def __init__(self, detail: str, status: int = 404) -> None:
        super().__init__(status, "Not Found" if status == 404 else "Bad request target")
        self.detail = detail


class _WebResponse(NamedTuple):
    """The answer to a GET or HEAD under --web: *head*, then *body*, then *length* bytes
    of *file* (open, positioned at its start; the receiver closes it)."""

    status: int
    head: bytes
    body: bytes = b""
    file: Optional[BinaryIO] = None
    length: int = 0


def resolve_web_path(root: str, url_path: str) -> str:
    """The real path, inside *root*, that *url_path* names.

    *root* must be a real path (os.path.realpath); *url_path* is a request's path,
    still percent-encoded. Raises WebPathError, and nothing else, for a path that is
    not absolute, holds an escaped separator, a backslash, a NUL byte, a ".." segment
    or an over-long name, cannot be decoded, or leads out of *root* (through a symlink).
    Looks at the file system (symlinks) but does not check that the path exists."""
    if not url_path.startswith("/"):
        raise WebPathError("the request target is not a path", 400)
    if _ENCODED_SEPARATOR.search(url_path):
        raise WebPathError("an escaped / or \\")
    try:
        name = os.fsdecode(urllib.parse.unquote_to_bytes(url_path))
    except UnicodeError:
        raise WebPathError("the path cannot be decoded") from None
    if "\x00" in name or "\\" in name:
        raise WebPathError("a NUL byte or a backslash")
    parts = [part for part in name.split("/") if part and part != "."]
    for part in parts:
        if not _is_plain_file_name(part):
            raise WebPathError(f"{_brief(part)} is not a plain file name")
    try:
        path = os.path.realpath(os.path.join(root, *parts))
        inside = os.path.commonpath([root, path]) == root
    except (OSError, ValueError) as exc:
        raise WebPathError(_describe(exc)) from None
    if not inside:
        raise WebPathError("it leads out of the web root")
    return path


def _content_type(path: str) -> str:
    """The Content-Type for the file at *path*, from its name."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in _WEB_TYPES:
        return _WEB_TYPES[suffix]
    guessed, encoding = mimetypes.guess_type(path, strict=False)
    if encoding is not None:
        return _COMPRESSED_TYPES.get(encoding, "application/octet-stream")
    return guessed or "application/octet-stream"


def _http_date(timestamp: float) -> str:
    """*timestamp* (seconds since the epoch) as an HTTP date (RFC 9110 5.6.7)."""
    return email.utils.formatdate(timestamp, usegmt=True)


def _is_not_modified(headers: http.client.HTTPMessage, mtime: float, now: float) -> bool:
    """True when If-Modified-Since says the client's copy of a file changed at *mtime*
    is current. Ignored, as RFC 9110 13.1.3 asks, with If-None-Match, when the date is
    not valid, or when it is in the future."""
    value = headers.get("If-Modified-Since")
    if value is None or headers.get("If-None-Match") is not None:
        return False
    try:
        since = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    if since.tzinfo is None:
        since = since.replace(tzinfo=datetime.timezone.utc)
    try:
        seconds = since.timestamp()
    except (OverflowError, ValueError, OSError):
        return False
    return int(mtime) <= seconds <= now


def _wants_keep_alive(request: Request) -> bool:
    """Whether the connection stays open after the response (RFC 9112 9.3)."""
    tokens = _header_tokens(request.headers, "Connection")
    if request.version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def _check_web_request(request: Request) -> None:
    """Raise HandshakeError unless *request* is a GET or HEAD without a body."""
    if request.method not in ("GET", "HEAD"):
        raise HandshakeError(405, "Only GET and HEAD are served", _WEB_ALLOW)
    lengths = request.headers.get_all("Content-Length") or []
    if request.headers.get("Transfer-Encoding") is not None or any(
        value.strip() != "0" for value in lengths
    ):
        raise HandshakeError(400, "A GET or HEAD request has no body")


def _connection_field(keep_alive: bool) -> Tuple[str, str]:
    return ("Connection", "keep-alive" if keep_alive else "close")


def _web_message(
    status: int,
    text: str,
    keep_alive: bool,
    head_only: bool = False,
    headers: Sequence[Tuple[str, str]] = (),
    content_type: str = "text/plain; charset=utf-8",
) -> _WebResponse:
    """A response with a small body (*text*, or an HTML page), sent whole."""
    body = text.encode("utf-8", "replace")
    fields = [
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Date", _http_date(time.time())),
        _connection_field(keep_alive),
        *headers,
    ]
    return _WebResponse(status, _response_head(status, fields), b"" if head_only else body)


def _file_head(
    status: int, length: int, mtime: float, kind: str, keep_alive: bool, now: float
) -> bytes:
    """The head of a response that sends a file (200) or says the client has it (304)."""
    fields = [("Date", _http_date(now)), ("Last-Modified", _http_date(int(mtime)))]
    if status != 304:  # a 304 has no body, so it says nothing about one
        fields[:0] = [("Content-Type", kind), ("Content-Length", str(length))]
    fields.append(_connection_field(keep_alive))
    return _response_head(status, fields)


def _listing_page(url_path: str, entries: Sequence[Tuple[str, bool]]) -> str:
    """An HTML page listing *entries* ((name, is_directory) pairs) of the directory at
    *url_path* (still percent-encoded). Every name is escaped: a file named
    ``<script>`` shows as text and links to itself."""
    shown = html.escape(urllib.parse.unquote(url_path, errors="replace"), quote=False)
    items = []
    for name, is_dir in sorted(entries, key=lambda entry: entry[0].lower()):
        slash = "/" if is_dir else ""
        href = urllib.parse.quote(os.fsencode(name)) + slash
        label = html.escape(name.encode("utf-8", "replace").decode("utf-8"), quote=False)
        items.append(f'<li><a href="{html.escape(href)}">{label}{slash}</a></li>')
    return (
        "<!DOCTYPE html>\n<html>\n<head>\n"
        '<meta charset="utf-8">\n'
        f"<title>Directory listing for {shown}</title>\n</head>\n<body>\n"
        f"<h1>Directory listing for {shown}</h1>\n<hr>\n<ul>\n"
        + "".join(item + "\n" for item in items)
        + "</ul>\n<hr>\n</body>\n</html>\n"
    )


def _list_directory(path: str) -> List[Tuple[str, bool]]:
    entries = []
    with os.scandir(path) as scan:
        for entry in scan:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            entries.append((entry.name, is_dir))
    return entries


def _serve_static(root: str, request: Request, file_only: bool, keep_alive: bool) -> _WebResponse:
    """Answer a GET or HEAD for *request*'s path under *root* (a real path).

    Blocking (it stats, opens and lists files): call it from a worker thread. Raises
    WebPathError for a refused path; a missing or unreadable file, and a directory
    without an index file when *file_only*, get a 404 or 403 response."""
    head_only = request.method == "HEAD"
    url_path = request.path
    path = resolve_web_path(root, url_path)
    try:
        info = os.stat(path)
    except OSError:
        return _web_message(404, "404 Not Found\n", keep_alive, head_only)
    if stat.S_ISDIR(info.st_mode):
        if not url_path.endswith("/"):
            # One leading slash: "//host/dir/" would send a browser to another server.
            location = "/" + url_path.lstrip("/") + "/"
            if request.query:
                location += "?" + request.query
            moved = f"Moved to {location}\n"
            return _web_message(301, moved, keep_alive, head_only, [("Location", location)])
        for index in _INDEX_FILES:
            candidate = resolve_web_path(root, url_path + index)
            if os.path.isfile(candidate):
                path, info = candidate, os.stat(candidate)
                break
        else:
            if file_only:
                return _web_message(404, "404 Not Found\n", keep_alive, head_only)
            try:
                entries = _list_directory(path)
            except OSError:
                return _web_message(403, "403 Forbidden\n", keep_alive, head_only)
            page = _listing_page(url_path, entries)
            return _web_message(200, page, keep_alive, head_only, (), "text/html; charset=utf-8")
    elif url_path.endswith("/"):  # "file/" names no file
        return _web_message(404, "404 Not Found\n", keep_alive, head_only)
    if not stat.S_ISREG(info.st_mode):  # FIFOs, devices and sockets are not files to send
        return _web_message(404, "404 Not Found\n", keep_alive, head_only)
    now = time.time()
    if _is_not_modified(request.headers, info.st_mtime, now):
        return _WebResponse(304, _file_head(304, 0, info.st_mtime, "", keep_alive, now))
    kind = _content_type(path)
    if head_only or not info.st_size:
        return _WebResponse(
            200, _file_head(200, info.st_size, info.st_mtime, kind, keep_alive, now)
        )
    try:
        file = open(path, "rb", buffering=0)  # noqa: SIM115 - the session closes it
    except PermissionError:
        return _web_message(403, "403 Forbidden\n", keep_alive, head_only)
    except OSError:
        return _web_message(404, "404 Not Found\n", keep_alive, head_only)
    opened = os.fstat(file.fileno())
    if not stat.S_ISREG(opened.st_mode):  # replaced since the stat above
        file.close()
        return _web_message(404, "404 Not Found\n", keep_alive, head_only)
    head = _file_head(200, opened.st_size, opened.st_mtime, kind, keep_alive, now)
    return _WebResponse(200, head, b"", cast(BinaryIO, file), opened.st_size)


# === 8. Loop ===


class _Timer:
    """A callback due at a loop time; cancel() is cheap (the heap drops it lazily)."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.callback = _do_nothing  # let go of what the callback holds right away


def _do_nothing() -> None:
    pass


class _Watched:
    """What the loop polls: a socket, the events it waits for, and handlers for them."""

    __slots__ = ("mask", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.mask = 0  # the events registered with the selector; 0 when not registered

    def on_events(self, events: int) -> None:
        raise NotImplementedError

    def on_error(self, exc: Exception) -> None:
        """The error boundary for exceptions raised by on_events."""
        raise NotImplementedError


class _WorkerPool:
    """Daemon threads for blocking calls; results come back through Loop.call_soon_threadsafe.

    Daemon threads, unlike concurrent.futures', cannot hold up the exit of the process
    when a plugin call hangs.
    """

    def __init__(self, loop: "_Loop", size: int) -> None:
        self._loop = loop
        self._size = size
        self._jobs: queue.Queue[Optional[Tuple[Callable[[], Any], _WorkerDone]]] = queue.Queue()
        self._threads: List[threading.Thread] = []
        # Every job is claimed when it is submitted: by an idle thread, by a new thread, or,
        # with every thread busy, by the next thread to finish (the backlog). A thread
        # counts as idle only once it has no claimed job left, so a quick job never waits
        # behind a slow one while a thread is free or may still be started.
        self._idle = 0
        self._backlog = 0
        self._lock = threading.Lock()

    def submit(self, func: Callable[[], Any], done: "_WorkerDone") -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self._size:
                thread = threading.Thread(target=self._work, name="websockify-worker", daemon=True)
                self._threads.append(thread)
                thread.start()
            else:
                self._backlog += 1
        self._jobs.put((func, done))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            func, done = job
            try:
                result, error = func(), None
            except Exception as exc:
                result, error = None, exc
            self._loop.call_soon_threadsafe(_bind_done(done, result, error))
            with self._lock:
                if self._backlog:
                    self._backlog -= 1
                else:
                    self._idle += 1

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)


def _bind_done(done: "_WorkerDone", result: Any, error: Optional[Exception]) -> Callable[[], None]:
    return lambda: done(result, error)


_WorkerDone = Callable[[Any, Optional[Exception]], None]


class _Loop:
    """A selectors loop with timers, a worker pool and a thread-safe call_soon (asyncio's shape).

    One thread runs it. Each socket is registered once and modified only when the events
    it waits for change.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._timers: List[Tuple[float, int, _Timer]] = []  # tuples: compared in C
        self._timer_order = itertools.count()  # equal times keep their order
        self._ready: Deque[Callable[[], None]] = collections.deque()
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        self._selector.register(self._wake_recv, selectors.EVENT_READ, None)
        self._workers = _WorkerPool(self, WORKER_THREADS)
        self._running = False
        self._old_wakeup_fd: Optional[int] = None
        self._old_handlers: Dict[int, Any] = {}
        # One buffer for every read: the loop handles one read at a time, and whatever a
        # reader keeps it copies, so idle connections cost no buffer of their own.
        self.recv_buffer = bytearray(RECV_SIZE)
        self.recv_view = memoryview(self.recv_buffer)

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.when, next(self._timer_order), timer))
        return timer

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        """Run *callback* on the loop thread soon; safe from any thread or signal handler."""
        self._ready.append(callback)
        try:
            self._wake_send.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or already closed
            pass

    def run_in_worker(self, func: Callable[[], Any], done: _WorkerDone) -> None:
        """Run func() in a worker thread; done(result, error) then runs on the loop thread."""
        self._workers.submit(func, done)

    def set_interest(self, watched: _Watched, mask: int) -> None:
        if mask == watched.mask:
            return  # on 3.6 a modify() is an unregister plus a register: skip no-ops
        if not watched.mask:
            self._selector.register(watched.sock, mask, watched)
        elif mask:
            self._selector.modify(watched.sock, mask, watched)
        else:
            self._selector.unregister(watched.sock)
        watched.mask = mask

    def add_signal_handler(self, signum: int, callback: Callable[[], None]) -> None:
        """Run *callback* on the loop when *signum* arrives (main thread only)."""
        if self._old_wakeup_fd is None:
            self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_send.fileno())
        handler = self._signal_handler(callback)
        self._old_handlers.setdefault(signum, signal.signal(signum, handler))

    def _signal_handler(self, callback: Callable[[], None]) -> Callable[[int, Any], None]:
        return lambda signum, frame: self.call_soon_threadsafe(callback)

    def remove_signal_handlers(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._old_wakeup_fd = None

    def run(self) -> None:
        """Dispatch events until stop() is called."""
        self._running = True
        while self._running:
            self._run_once()

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        self.remove_signal_handlers()
        self._workers.close()
        self._selector.close()
        self._wake_recv.close()
        self._wake_send.close()

    def _run_once(self) -> None:
        timeout: Optional[float] = None
        if self._ready:
            timeout = 0
        elif self._timers:
            timeout = max(0.0, self._timers[0][0] - time.monotonic())
        for key, events in self._selector.select(timeout):
            watched = key.data
            if watched is None:
                self._drain_wake_socket()
            elif watched.mask:  # not closed by an earlier handler of this round
                try:
                    watched.on_events(events)
                except Exception as exc:
                    watched.on_error(exc)
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            if not timer.cancelled:
                self._call(timer.callback)
        for _ in range(len(self._ready)):
            self._call(self._ready.popleft())

    def _drain_wake_socket(self) -> None:
        try:
            while self._wake_recv.recv(4096):
                pass
        except OSError:
            pass

    @staticmethod
    def _call(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:  # a bug in a callback must not stop every other connection
            _log.exception("internal error in a loop callback")


# === 9. Stream ===

_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_CONNECT_PENDING = frozenset((errno.EINPROGRESS, errno.EALREADY, errno.EINTR))
_IOV_MAX = 64  # buffers handed to one sendmsg
# Bytes a socket's kernel send queue still holds (Linux: SIOCOUTQ); unknown elsewhere.
_OUTQ_REQUEST = getattr(termios, "TIOCOUTQ", None) if sys.platform.startswith("linux") else None


class _Stream(_Watched):
    """One non-blocking socket (TCP, unix or TLS) with a queue of outgoing bytes.

    Writes go to the kernel at once when they can and are queued otherwise (asyncio's
    write path). The owner gets on_data / on_eof / on_drain / on_closed calls and decides
    whether the stream reads; it watches ``queued`` against the water marks.
    """

    __slots__ = (
        "_close_when_flushed",
        "_handshake_mask",
        "_linger",
        "_out",
        "closed",
        "connecting",
        "handshaking",
        "loop",
        "owner",
        "peek",
        "queued",
        "reading",
        "tls",
    )

    def __init__(self, loop: _Loop, sock: socket.socket, owner: "_Session") -> None:
        super().__init__(sock)
        self.loop = loop
        self.owner = owner
        self._out: Deque[memoryview] = collections.deque()
        self.queued = 0  # bytes in _out
        self.reading = False  # whether the owner wants data now
        self.peek = False  # report the first byte with on_peek before reading anything
        self.connecting = False
        self.handshaking = False
        self._handshake_mask = selectors.EVENT_READ
        self.tls = isinstance(sock, ssl.SSLSocket)
        self._close_when_flushed = False
        self._linger = False  # after the last write: shut down, discard input until EOF
        self.closed = False

    # -- interest -----------------------------------------------------------------------

    def update(self) -> None:
        """Register what the stream waits for now with the loop."""
        if self.closed:
            return
        if self.connecting:
            mask = selectors.EVENT_WRITE
        elif self.handshaking:
            mask = self._handshake_mask
        else:
            mask = selectors.EVENT_READ if self.reading or self._linger else 0
            if self._out:
                mask |= selectors.EVENT_WRITE
        self.loop.set_interest(self, mask)

    def set_reading(self, reading: bool) -> None:
        if reading != self.reading:
            self.reading = reading
            self.update()

    # -- events -------------------------------------------------------------------------

    def on_events(self, events: int) -> None:
        if self.connecting:
            self._finish_connect()
        elif self.handshaking:
            self._handshake()
        else:
            if events & selectors.EVENT_WRITE:
                self._flush()
            if events & selectors.EVENT_READ and not self.closed:
                self._read()

    def on_error(self, exc: Exception) -> None:
        self.owner.on_error(self, exc)

    def _read(self) -> None:
        if self._linger:
            self._discard_input()
            return
        if not self.reading:
            return
        if self.peek:
            try:
                first = self.sock.recv(1, socket.MSG_PEEK)
            except _WOULD_BLOCK:  # read_now() before the first byte came
                return
            self.peek = False
            if first:
                self.owner.on_peek(self, first[0])
                return
        view = self.loop.recv_view
        while True:
            if self.tls:
                size, eof = self._read_records(view)
            else:
                try:
                    size = self.sock.recv_into(self.loop.recv_buffer)
                except _WOULD_BLOCK:
                    return
                eof = not size
            if size:
                self.owner.on_data(self, view[:size])
            if eof:
                if self.reading and not self.closed:  # else it is seen again when reading
                    self.reading = False
                    self.update()
                    self.owner.on_eof(self)
                return
            # TLS decrypts whole records: bytes already decrypted never wake the selector.
            sock = self.sock
            if not (size and self.reading and isinstance(sock, ssl.SSLSocket) and sock.pending()):
                return

    def _read_records(self, view: memoryview) -> Tuple[int, bool]:
        """Read every TLS record already here into *view*: (bytes read, end of stream seen).

        An SSL socket returns at most one record (16 KiB) per read; handing each to the
        session on its own made a wss:// upload slower than upstream's (unmask, send and
        Python overhead per record instead of per buffer).
        """
        size, end = 0, len(view)
        while size < end:
            try:
                got = self.sock.recv_into(view[size:])
            except _WOULD_BLOCK:
                break
            if not got:
                return size, True
            size += got
        return size, False

    def read_now(self) -> None:
        """Read what has already arrived, without waiting for the selector to say so."""
        try:
            self._read()
        except Exception as exc:
            self.on_error(exc)

    def _discard_input(self) -> None:
        try:
            while self.sock.recv_into(self.loop.recv_buffer):
                pass
        except _WOULD_BLOCK:
            return
        self.close()  # EOF: the peer has read everything and closed too

    # -- writing ------------------------------------------------------------------------

    def write(self, data: _Buffer) -> None:
        """Send *data*, queueing what the kernel does not take now.

        *data* may be a view of a reused buffer: what is queued is copied.
        """
        if self.closed or self._close_when_flushed:
            return
        if not self._out and not self.connecting and not self.handshaking:
            try:
                sent = self.sock.send(data)
            except _WOULD_BLOCK:
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        self._queue(data)
        self.update()

    def write_frame(self, opcode: int, payload: _Buffer) -> None:
        """Send one unmasked frame; header and payload leave in one system call."""
        header = frame_header(opcode, len(payload))
        if self.tls or self._out or self.closed or self._close_when_flushed:
            self.write(header + payload)  # SSL sockets have no sendmsg
            return
        try:
            sent = self.sock.sendmsg((header, payload))
        except _WOULD_BLOCK:
            sent = 0
        if sent < len(header):
            self._queue(header[sent:])
            sent = 0
        else:
            sent -= len(header)
        if sent < len(payload):
            self._queue(memoryview(payload)[sent:])
            self.update()

    def _queue(self, data: _Buffer) -> None:
        chunk = memoryview(bytes(data))
        self._out.append(chunk)
        self.queued += len(chunk)

    def _flush(self) -> None:
        out = self._out
        while out:
            try:
                if self.tls or len(out) == 1:
                    sent = self.sock.send(out[0])
                else:
                    sent = self.sock.sendmsg(list(itertools.islice(out, _IOV_MAX)))
            except _WOULD_BLOCK:
                break
            self.queued -= sent
            while sent and sent >= len(out[0]):
                sent -= len(out.popleft())
            if sent:
                out[0] = out[0][sent:]
                break
        if not out and (self._close_when_flushed or self._linger):
            self._after_flush()
            return
        self.update()
        if self.queued <= LOW_WATER:
            self.owner.on_drain(self)

    def unsent(self) -> int:
        """Bytes written to this stream that the peer has not received yet, as far as known."""
        if self.closed:
            return 0
        in_kernel = 0
        if _OUTQ_REQUEST is not None:
            try:
                answer = fcntl.ioctl(self.sock.fileno(), _OUTQ_REQUEST, b"\0\0\0\0")
                in_kernel = struct.unpack("i", answer)[0]
            except (OSError, ValueError):
                pass
        return self.queued + in_kernel

    def close_when_flushed(self) -> None:
        """Close once every queued byte is sent; read nothing more."""
        self.reading = False
        self._close_when_flushed = True
        if not self._out:
            self.close()
        else:
            self.update()

    def linger(self) -> None:
        """Send what is queued, shut down writing, then discard input until the peer closes.

        Closing with unread input would reset the connection and could destroy the last
        response before the client reads it. The owner bounds this with a timer.
        """
        if self._linger:
            return
        self.reading = False
        self._linger = True
        if not self._out:
            self._after_flush()
        else:
            self.update()

    def _after_flush(self) -> None:
        if self._close_when_flushed:
            self.close()
            return
        if not self.tls:  # a TLS peer gets no close_notify; it reads up to our last record
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self.close()
                return
        self.update()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.mask:
            self.loop.set_interest(self, 0)
        self.sock.close()
        self._out.clear()
        self.queued = 0
        self.owner.on_closed(self)

    # -- connecting and TLS ---------------------------------------------------------------

    def connect(self, address: Any) -> None:
        """Start a non-blocking connect; the owner hears on_connected or on_error."""
        err = self.sock.connect_ex(address)
        if err in _CONNECT_PENDING:
            if not _is_connected(self.sock):
                self.connecting = True
                self.update()
                return
            err = 0  # a local target: the handshake is already done, no need to wait for it
        if err:
            raise OSError(err, os.strerror(err))
        self.owner.on_connected(self)

    def _finish_connect(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
        self.connecting = False
        self.update()
        self.owner.on_connected(self)

    def start_tls(self, context: ssl.SSLContext, server_hostname: Optional[str] = None) -> None:
        """Wrap the socket in TLS and drive the handshake without blocking."""
        self.loop.set_interest(self, 0)  # the wrapped socket replaces this one
        self.sock = context.wrap_socket(
            self.sock,
            server_side=server_hostname is None,
            server_hostname=server_hostname,
            do_handshake_on_connect=False,
        )
        self.tls = True
        self.handshaking = True
        self._handshake()

    def _handshake(self) -> None:
        assert isinstance(self.sock, ssl.SSLSocket)
        try:
            self.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._handshake_mask = selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            self._handshake_mask = selectors.EVENT_WRITE
        else:
            self.handshaking = False
            self.update()
            self.owner.on_tls_done(self)
            # The peer's first records may have come with its last handshake message and sit
            # decrypted in the SSL object, where the selector cannot see them.
            if self.reading and not self.closed:
                self._read()
            return
        self.update()


def _is_connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


# === 10. Session ===


class _State(enum.Enum):
    TLS_HANDSHAKE = "tls-handshake"  # the client's first byte said TLS
    READ_REQUEST = "read-request"  # gathering the HTTP request head
    WEB = "web"  # serving a plain HTTP request
    RESOLVE = "resolve"  # plugins and name resolution, in a worker thread
    CONNECT = "connect"  # connecting to the target's addresses in turn
    RELAY = "relay"  # the WebSocket is open: bytes flow both ways
    CLOSING = "closing"  # close frames exchanged or sent, queues draining
    CLOSED = "closed"


_NEXT: Dict[_State, FrozenSet[_State]] = {
    _State.READ_REQUEST: frozenset(
        (_State.TLS_HANDSHAKE, _State.WEB, _State.RESOLVE, _State.CLOSING, _State.CLOSED)
    ),
    _State.TLS_HANDSHAKE: frozenset((_State.READ_REQUEST, _State.CLOSING, _State.CLOSED)),
    _State.WEB: frozenset((_State.READ_REQUEST, _State.CLOSING, _State.CLOSED)),
    _State.RESOLVE: frozenset((_State.CONNECT, _State.CLOSING, _State.CLOSED)),
    _State.CONNECT: frozenset((_State.RELAY, _State.CLOSING, _State.CLOSED)),
    _State.RELAY: frozenset((_State.CLOSING, _State.CLOSED)),
    _State.CLOSING: frozenset((_State.CLOSED,)),
    _State.CLOSED: frozenset(),
}

_TLS_FIRST_BYTES = frozenset((0x16, 0x80))  # a TLS handshake record; an SSLv2-style hello


class _TargetAddress(NamedTuple):
    """A target and the socket addresses to try, in order."""

    target: Target
    addresses: List[Tuple[int, Any]]  # (family, socket address) pairs


def _resolve_target(target: Target, prefer_ipv6: bool = False, flags: int = 0) -> _TargetAddress:
    """Every address of *target*; blocking unless *flags* has AI_NUMERICHOST (no lookup)."""
    if target.unix_socket is not None:
        return _TargetAddress(target, [(socket.AF_UNIX, target.unix_socket)])
    infos = socket.getaddrinfo(target.host, target.port, 0, socket.SOCK_STREAM, 0, flags)
    if prefer_ipv6:
        infos.sort(key=lambda info: info[0] != socket.AF_INET6)
    return _TargetAddress(target, [(info[0], info[4]) for info in infos])


def _client_cert_cn(sock: socket.socket) -> Optional[str]:
    """The subject common name of the client's verified certificate, if it sent one."""
    if not isinstance(sock, ssl.SSLSocket):
        return None
    subject: Any = (sock.getpeercert() or {}).get("subject", ())  # ((("commonName", cn),),)
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _strip_spoofed_headers(headers: http.client.HTTPMessage) -> None:
    """Drop SSL_* headers: only the proxy may say what the client's certificate was."""
    for name in set(headers.keys()):
        if name.upper().startswith(("SSL_", "SSL-")):
            del headers[name]


_RecordEntry = Tuple[str, int, bytes]  # direction mark, ms since the relay started, payload


def _record_line(mark: str, ms: int, payload: bytes) -> str:
    """One element of a record file: ``'{ms{payload',`` (to the client) or ``'}ms}...``.

    The payload is written as upstream writes it: its bytes as latin-1 text through
    Python's unicode_escape, with quotes escaped, so a JavaScript parser reads back one
    character per byte.
    """
    text = payload.decode("latin-1").encode("unicode_escape").decode("ascii")
    return "'" + mark + str(ms) + mark + text.replace("'", "\\'") + "',\n"


class _Recorder:
    """A session's --record file, a JavaScript array noVNC's playback reads.

    The loop only appends payload copies to a list; every RECORD_BUFFER bytes the list
    goes to the record writer thread, which escapes and writes it in order. If the disk
    falls RECORD_HIGH_WATER behind, ``congested`` tells the session to pause its relay.
    """

    def __init__(self, path: str, writer: "_RecordWriter", on_drain: Callable[[], None]) -> None:
        self.path = path
        self._writer = writer
        self._on_drain = on_drain
        self._start = time.monotonic()
        self._entries: List[_RecordEntry] = []
        self._size = 0  # payload bytes in _entries
        self.backlog = 0  # payload bytes handed to the writer and not yet written
        self.closed = False
        self._file: Optional[TextIO] = None  # used by the writer thread only
        self._failed = False

    @property
    def congested(self) -> bool:
        return self.backlog > RECORD_HIGH_WATER

    def add(self, mark: str, data: _Buffer) -> None:
        """Record *data*: mark "{" went to the client, "}" came from it (loop thread)."""
        ms = int((time.monotonic() - self._start) * 1000)
        self._entries.append((mark, ms, bytes(data)))
        self._size += len(data)
        if self._size >= RECORD_BUFFER:
            self._hand_over(False)

    def close(self) -> None:
        """End the array, so the file is valid JavaScript, and close it."""
        if not self.closed:
            self.closed = True
            self._hand_over(True)

    def _hand_over(self, last: bool) -> None:
        entries, self._entries = self._entries, []
        self.backlog += self._size
        self._size = 0
        self._writer.submit(self, entries, last)

    def written(self, size: int) -> None:
        """The writer has written *size* more bytes (loop thread)."""
        self.backlog -= size
        if self.backlog <= RECORD_HIGH_WATER // 2 and not self.closed:
            self._on_drain()

    def write(self, entries: List[_RecordEntry], last: bool) -> int:
        """Write *entries* (writer thread); return their payload size."""
        size = sum(len(entry[2]) for entry in entries)
        if self._failed:
            return size
        try:
            if self._file is None:
                self._file = open(self.path, "w", encoding="ascii")  # noqa: SIM115
                self._file.write("var VNC_frame_data = [\n")
            self._file.write("".join([_record_line(*entry) for entry in entries]))
            if last:
                self._file.write("'EOF'];\n")
                self._file.close()
        except OSError as exc:
            self._failed = True
            _log.warning("--record: cannot write %s: %s", self.path, _strerror(exc))
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
        return size


class _RecordWriter:
    """One thread writing every record file, in order, so the loop never waits for a disk."""

    def __init__(self, loop: _Loop) -> None:
        self._loop = loop
        self._jobs: queue.Queue[Optional[Tuple[_Recorder, List[_RecordEntry], bool]]]
        self._jobs = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def submit(self, recorder: _Recorder, entries: List[_RecordEntry], last: bool) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="websockify-record")
            self._thread.daemon = True
            self._thread.start()
        self._jobs.put((recorder, entries, last))

    def close(self, timeout: float) -> None:
        """Write what is queued (every file ends valid), then end the thread."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            recorder, entries, last = job
            size = recorder.write(entries, last)
            self._loop.call_soon_threadsafe(functools.partial(recorder.written, size))


class _Session:
    """One client connection: its streams, its state and everything that happens to it."""

    def __init__(self, server: "Server", number: int, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.loop = server.loop
        self.number = number
        self.peer = peer  # who the log lines name: the client, behind a trusted proxy too
        self._socket_peer = peer  # the address that connected
        self.state = _State.READ_REQUEST
        self.client = _Stream(self.loop, sock, self)
        self.target: Optional[_Stream] = None
        self.scheme = "ws"
        self.request: Optional[Request] = None
        self._head = bytearray()
        self._early = b""  # frames that came in right behind the request head
        self._accept = b""  # the 101 response, sent once the target is reached
        self._decoder: Optional[FrameDecoder] = None
        self._close_sent = False
        self._missed_pongs = 0
        self._target: Optional[_TargetAddress] = None
        self._next_address = 0
        self._last_connect_error: Optional[OSError] = None
        self._timer: Optional[_Timer] = None  # the deadline of the current phase
        self._heartbeat: Optional[_Timer] = None
        self._traffic = server.options.traffic
        self._recorder: Optional[_Recorder] = None
        self._web_requests = 0  # plain HTTP requests answered on this connection
        self._web_file: Optional[BinaryIO] = None  # being sent to the client
        self._web_left = 0  # bytes of _web_file still to send
        self._web_started = False  # the response head is out: no error answer possible
        self._keep_alive = False

    # -- state ----------------------------------------------------------------------------

    def _set_state(self, new: _State) -> None:
        if new not in _NEXT[self.state]:
            raise AssertionError(f"session {self.number}: {self.state} -> {new}")
        self.state = new

    def _set_deadline(self, seconds: float, on_expiry: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(seconds, lambda: self._guard(on_expiry))

    def _set_close_deadline(self) -> None:
        """Abort CLOSE_TIMEOUT seconds after closing stops making progress.

        A peer still taking the data queued for it is slow, not gone: cutting it off at a
        fixed time would lose what it was about to receive."""
        self._set_progress_deadline(CLOSE_TIMEOUT, self._unsent, self.abort)

    def _set_progress_deadline(
        self, seconds: float, left: Callable[[], int], on_stall: Callable[[], None]
    ) -> None:
        """Call *on_stall* once *left()* (bytes still to deliver) has not fallen for *seconds*."""
        before = left()

        def expire() -> None:
            if left() < before:
                self._set_progress_deadline(seconds, left, on_stall)
            else:
                on_stall()

        self._set_deadline(seconds, expire)

    def _unsent(self) -> int:
        target = self.target
        return self.client.unsent() + (target.unsent() if target is not None else 0)

    def _guard(self, func: Callable[[], None]) -> None:
        """The session's error boundary for timers and worker results."""
        try:
            func()
        except Exception as exc:
            self.on_error(None, exc)

    def start(self) -> None:
        self.client.peek = self.server.tls_context is not None or self.server.options.ssl_only
        self._set_deadline(self.server.options.handshake_timeout, self._on_handshake_timeout)
        # The request has often arrived with the connection: read it before any poll, and
        # register the socket only if the session still waits for it after that.
        self.client.reading = True
        self.client.read_now()
        self.client.update()

    def _on_handshake_timeout(self) -> None:
        if self._web_requests and not self._head:
            _log.debug("%s: idle keep-alive connection closed", self.peer)
        else:
            _log.info(
                "%s: no complete handshake within %gs, closing", self.peer, self._handshake_s()
            )
        self.abort()

    def _handshake_s(self) -> float:
        return self.server.options.handshake_timeout

    # -- stream callbacks -----------------------------------------------------------------

    def on_peek(self, stream: _Stream, first_byte: int) -> None:
        if first_byte in _TLS_FIRST_BYTES:
            context = self.server.tls_context
            if context is None:
                _log.info("%s: TLS connection but no certificate (see --cert), closing", self.peer)
                self.abort()
                return
            self._set_state(_State.TLS_HANDSHAKE)
            self.scheme = "wss"
            stream.start_tls(context)
        elif self.server.options.ssl_only:
            _log.info("%s: non-TLS connection refused (--ssl-only)", self.peer)
            self.abort()

    def on_tls_done(self, stream: _Stream) -> None:
        if stream is self.client:
            self._set_state(_State.READ_REQUEST)
        else:
            self._on_target_ready()

    def on_data(self, stream: _Stream, data: memoryview) -> None:
        if stream is self.target:
            self._from_target(data)
        elif self._decoder is not None:
            self._from_client(data)
        elif self.state is _State.READ_REQUEST:
            self._read_request(data)

    def on_eof(self, stream: _Stream) -> None:
        if stream is self.target:
            _log.info("%s: target %s closed the connection", self.peer, self._target_name())
            stream.close()
            self._close_client(CloseCode.NORMAL, "Target closed")
        elif self.state is _State.RELAY:
            _log.info("%s: client closed the connection without a close frame", self.peer)
            self._close_all_after_flush()
        else:
            stream.close()
            self._release_target()

    def on_drain(self, stream: _Stream) -> None:
        if self.state is _State.WEB and stream is self.client:
            self._send_web_file()
            return
        if self.state is not _State.RELAY:
            return
        if self._recorder is not None and self._recorder.congested:
            return  # resumed by _on_record_drain
        if stream is self.client:
            target = self.target
            if target is not None and not target.reading and not target.closed:
                target.set_reading(True)
        self._resume_client()  # the target took its queue, or the client its pongs

    def _resume_client(self) -> None:
        client, target = self.client, self.target
        if client.reading or client.closed or client.queued > CLIENT_QUEUE_LIMIT:
            return
        if target is None or target.queued <= HIGH_WATER:
            client.set_reading(True)

    def on_closed(self, stream: _Stream) -> None:
        if self.state is _State.CLOSED:
            return
        if stream is self.client:
            self._release_target()  # nothing more can reach the client
        if self.client.closed and (self.target is None or self.target.closed):
            self._finish()

    def on_connected(self, stream: _Stream) -> None:
        if self.server.target_tls_context is not None:
            assert self._target is not None
            stream.start_tls(self.server.target_tls_context, self._target.target.host)
        else:
            self._on_target_ready()

    def on_error(self, stream: Optional[_Stream], exc: Exception) -> None:
        """The session's error boundary: one bad connection never disturbs the others."""
        if self.state is _State.CLOSED:
            return
        if isinstance(exc, HandshakeError):
            self._refuse(exc)
        elif isinstance(exc, ProtocolError):
            _log.info(
                "%s: protocol error, closing with %d: %s", self.peer, exc.close_code, exc.reason
            )
            self._close_client(exc.close_code, exc.reason)
        elif isinstance(exc, OSError) and stream is not None and stream is self.target:
            if self.state is _State.CONNECT:
                self._last_connect_error = exc
                self._connect_next()
            else:
                _log.info("%s: target %s: %s", self.peer, self._target_name(), _strerror(exc))
                stream.close()
                self._close_client(CloseCode.INTERNAL_ERROR, "Target connection failed")
        elif isinstance(exc, OSError):
            if isinstance(exc, ssl.SSLError) and self.state is _State.TLS_HANDSHAKE:
                _log.info("%s: TLS handshake failed: %s", self.peer, _strerror(exc))
            else:
                _log.debug("%s: client connection: %s", self.peer, _strerror(exc))
            self.abort()
        else:
            _log.error("%s: internal error", self.peer, exc_info=exc)
            self.abort()

    # -- handshake ------------------------------------------------------------------------

    def _read_request(self, data: memoryview) -> None:
        self._head += data
        end = find_head_end(self._head)
        if end < 0:
            return
        request = parse_request(bytes(self._head[:end]))
        self._early = bytes(self._head[end:])
        self._head = bytearray()
        self.request = request
        self.client.set_reading(False)
        if self.server.trusted_proxies:  # a proxy may pass on other clients' requests
            real = _real_client(
                self._socket_peer, _forwarded_for(request.headers), self.server.trusted_proxies
            )
            self.peer = self._socket_peer if real is None else f"{real} via {self._socket_peer}"
        if not _is_upgrade(request):
            if self.server.web_root is not None:
                self._start_web(request)
                return
            raise HandshakeError(
                426 if request.method in ("GET", "HEAD") else 405,
                "This is a WebSocket endpoint",
                {"Upgrade": "websocket", "Sec-WebSocket-Version": "13"},
            )
        key, subprotocol = check_upgrade(request)
        if self.server.allowed_origins:
            self._check_origin(request)
        self._accept = accept_response(key, subprotocol)
        self._prepare_auth_headers(request)
        kind = "SSL/TLS (wss://)" if self.scheme == "wss" else "Plain non-SSL (ws://)"
        _log.info("%s: %s WebSocket connection", self.peer, kind)
        _log.info("%s: Path: '%s'", self.peer, request.target)
        self._set_state(_State.RESOLVE)
        fixed = self.server.fixed_target
        if fixed is not None:
            self._on_resolved(fixed, None)
            return
        self._set_deadline(LOOKUP_TIMEOUT, self._on_resolve_timeout)
        self.loop.run_in_worker(
            lambda: self.server.find_target(request),
            lambda result, error: self._guard(lambda: self._on_resolved(result, error)),
        )

    def _check_origin(self, request: Request) -> None:
        origins = request.headers.get_all("Origin") or []
        origin = origins[0].strip() if len(origins) == 1 else ""
        if origin.lower() not in self.server.allowed_origins:
            shown = _brief(origin) if origin else "(none)"
            _log.warning("%s: origin %s is not allowed (--allow-origin)", self.peer, shown)
            raise HandshakeError(403, "Origin not allowed")

    def _prepare_auth_headers(self, request: Request) -> None:
        _strip_spoofed_headers(request.headers)
        common_name = _client_cert_cn(self.client.sock)
        if common_name is not None:
            request.headers["SSL_CLIENT_S_DN_CN"] = common_name

    def _on_resolve_timeout(self) -> None:
        raise HandshakeError(504, "Looking up the target took too long")  # plugin or DNS

    def _on_resolved(self, result: Optional[_TargetAddress], error: Optional[Exception]) -> None:
        if self.state is not _State.RESOLVE:
            return  # timed out or closed meanwhile
        if error is not None:
            if isinstance(error, socket.gaierror):
                self._target_unreachable(f"cannot resolve the target: {error}")
                return
            raise error
        assert result is not None
        self._target = result
        _log.info("%s: connecting to: %s", self.peer, result.target)
        self._set_state(_State.CONNECT)
        self._connect_next()

    def _connect_next(self) -> None:
        target = self._target
        assert target is not None
        if self.target is not None:
            self.target.close()
            self.target = None
        addresses = target.addresses
        while self._next_address < len(addresses):
            family, address = addresses[self._next_address]
            self._next_address += 1
            try:
                sock = socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:  # out of descriptors: tell the client, as for a refusal
                self._last_connect_error = exc
                continue
            sock.setblocking(False)
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.target = _Stream(self.loop, sock, self)
            left = len(addresses) - self._next_address + 1
            # Share what remains of the deadline, so a silent address cannot eat it all.
            self._set_deadline(self.server.options.connect_timeout / left, self._connect_next)
            try:
                self.target.connect(address)
                return
            except OSError as exc:
                self._last_connect_error = exc
                self.target.close()
                self.target = None
        reason = _strerror(self._last_connect_error) if self._last_connect_error else "timed out"
        self._target_unreachable(f"Failed to connect to {target.target}: {reason}")

    def _target_unreachable(self, reason: str) -> None:
        _log.info("%s: %s", self.peer, reason)
        self.client.write(self._accept)
        self._set_state(_State.RELAY)
        self.server.on_relay_started(self)  # a WebSocket all the same, for --run-once
        self._close_client(CloseCode.INTERNAL_ERROR, reason)

    def _on_target_ready(self) -> None:
        assert self.target is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.client.write(self._accept)
        self._set_state(_State.RELAY)
        self._decoder = FrameDecoder(self.server.options.max_message_size)
        if self.server.options.record:
            self._recorder = self.server.new_recorder(self.number, self._on_record_drain)
        self.target.set_reading(True)
        self.client.set_reading(True)
        heartbeat = self.server.options.heartbeat
        if heartbeat:
            self._heartbeat = self.loop.call_later(heartbeat, lambda: self._guard(self._ping))
        self.server.on_relay_started(self)
        if self._early:
            early, self._early = self._early, b""
            self._from_client(memoryview(early))

    # -- plain HTTP (--web) -------------------------------------------------------------------

    def _start_web(self, request: Request) -> None:
        """Answer a plain request from the web root; the files are looked at in a worker."""
        _check_web_request(request)
        self._set_state(_State.WEB)
        self._web_requests += 1
        self._web_started = False
        self._keep_alive = _wants_keep_alive(request)
        if self.server.options.web_auth:
            self._prepare_auth_headers(request)
        number, keep_alive = self._web_requests, self._keep_alive
        self._set_deadline(LOOKUP_TIMEOUT, self._on_web_timeout)
        self.loop.run_in_worker(
            lambda: self.server.answer_web(request, keep_alive),
            lambda result, error: self._guard(lambda: self._on_web_answer(number, result, error)),
        )

    def _on_web_timeout(self) -> None:
        raise HandshakeError(504, "Answering took too long")  # an auth plugin or the disk

    def _on_web_answer(
        self, number: int, result: Optional[_WebResponse], error: Optional[Exception]
    ) -> None:
        if self.state is not _State.WEB or number != self._web_requests:
            if result is not None and result.file is not None:
                result.file.close()  # timed out or closed meanwhile
            return
        if error is not None:
            raise error
        assert result is not None and self.request is not None
        request = self.request
        size = result.length or len(result.body)
        _log.info(
            '%s: "%s %s" %d %d', self.peer, request.method, request.target, result.status, size
        )
        self._web_started = True
        self.client.write(result.head + result.body if result.body else result.head)
        self._web_file, self._web_left = result.file, result.length
        # Replaced by the next request's or the close's deadline when the response ends.
        self._set_progress_deadline(
            self.server.options.web_timeout,
            lambda: self._web_left + self.client.unsent(),
            self._on_web_stall,
        )
        self._send_web_file()

    def _on_web_stall(self) -> None:
        _log.info(
            "%s: took nothing of the response for %gs (--web-timeout), closing",
            self.peer,
            self.server.options.web_timeout,
        )
        self.abort()

    def _send_web_file(self) -> None:
        """Send the file in chunks while the client's queue has room; resumed by on_drain.

        A regular file reads fast, but a whole large one at once would hold up every
        other connection: each turn sends at most WEB_BURST bytes.
        """
        if self.state is not _State.WEB or not self._web_started:
            return  # a late call: the response ended, or the next one is not ready yet
        client, file = self.client, self._web_file
        budget = WEB_BURST
        while file is not None and self._web_left and client.queued <= HIGH_WATER and budget > 0:
            try:
                chunk = file.read(min(WEB_CHUNK, self._web_left))
            except OSError as exc:
                _log.warning("%s: reading %s: %s", self.peer, file.name, _strerror(exc))
                self.abort()
                return
            if not chunk:
                _log.warning("%s: %s shrank while it was sent", self.peer, file.name)
                self.abort()
                return
            self._web_left -= len(chunk)
            budget -= len(chunk)
            client.write(chunk)
        if client.closed:
            return
        if client.queued:
            return  # on_drain calls again
        if self._web_left:
            # The kernel took it all, so no drain will come: continue on the next turn.
            self.loop.call_later(0, lambda: self._guard(self._send_web_file))
            return
        self._end_web_response()

    def _end_web_response(self) -> None:
        """The response is sent: wait for the next request, or close."""
        self._close_web_file()
        self._web_started = False
        if not self._keep_alive:
            self._set_state(_State.CLOSING)
            self.client.linger()
            self._set_close_deadline()
            return
        self._set_state(_State.READ_REQUEST)
        self._set_deadline(self.server.options.handshake_timeout, self._on_handshake_timeout)
        self.client.set_reading(True)
        if self._early:  # a pipelined request
            early, self._early = self._early, b""
            self._read_request(memoryview(early))

    def _close_web_file(self) -> None:
        if self._web_file is not None:
            self._web_file.close()
            self._web_file = None
            self._web_left = 0

    def _refuse(self, exc: HandshakeError) -> None:
        """Answer a request that cannot become a WebSocket with an HTTP error, then close."""
        if self.state not in (_State.READ_REQUEST, _State.RESOLVE, _State.WEB) or self._web_started:
            self.abort()  # the 101 or a response head is sent: no HTTP answer is possible
            return
        request = self.request
        line = f"{request.method} {request.target}" if request else "-"
        if isinstance(exc, WebPathError):
            _log.warning(
                '%s: "%s" %d %s: path refused: %s',
                self.peer,
                line,
                exc.status,
                exc.reason,
                exc.detail,
            )
        else:
            _log.info('%s: "%s" %d %s', self.peer, line, exc.status, exc.reason)
        self.client.write(error_response(exc.status, exc.reason, exc.headers))
        if self.target is not None:
            self.target.close()
        self._set_state(_State.CLOSING)
        self.client.linger()
        self._set_close_deadline()

    # -- relay ----------------------------------------------------------------------------

    def _from_client(self, data: memoryview) -> None:
        decoder = self._decoder
        assert decoder is not None
        self._missed_pongs = 0
        frames = decoder.feed(data)
        if self._traffic:
            _traffic_mark("}." if decoder.partial else "}")
        for frame in frames:
            opcode = frame.opcode
            if opcode in (OP_BINARY, OP_TEXT):
                if self.state is _State.RELAY and self.target is not None and frame.payload:
                    self.target.write(frame.payload)
                    if self._recorder is not None:
                        self._recorder.add("}", frame.payload)
                    if self._traffic:
                        _traffic_mark(">." if self.target.queued else ">")
            elif opcode == OP_PING:
                if not self._close_sent:
                    self.client.write(encode_frame(OP_PONG, bytes(frame.payload)))
            elif opcode == OP_CLOSE:
                self._on_client_close(frame.payload)
                return
        decoder.check()
        target = self.target
        if (
            (target is not None and target.queued > HIGH_WATER)
            or self.client.queued > CLIENT_QUEUE_LIMIT  # pongs for a client that does not read
            or self._record_congested()
        ):
            self.client.set_reading(False)  # resumed by on_drain

    def _from_target(self, data: memoryview) -> None:
        if self.state is not _State.RELAY:
            return
        if self._traffic:
            _traffic_mark("{")
        self.client.write_frame(OP_BINARY, data)
        if self._traffic:
            _traffic_mark("<." if self.client.queued else "<")
        if self._recorder is not None:
            self._recorder.add("{", data)
        if self.client.queued > HIGH_WATER or self._record_congested():
            assert self.target is not None
            self.target.set_reading(False)  # resumed by on_drain(client)

    def _record_congested(self) -> bool:
        return self._recorder is not None and self._recorder.congested

    def _on_record_drain(self) -> None:
        """The record file caught up: resume the sides that only waited for it."""
        if self.state is not _State.RELAY:
            return
        for stream in (self.target, self.client):
            if stream is not None and not stream.closed and stream.queued <= LOW_WATER:
                self.on_drain(stream)

    def _ping(self) -> None:
        if self.state is not _State.RELAY:
            return
        if self._missed_pongs >= MISSED_PONGS:
            _log.info("%s: client sent nothing for %d pings, closing", self.peer, MISSED_PONGS)
            self.abort()
            return
        client = self.client
        if client.reading or client.queued > HIGH_WATER:
            self._missed_pongs += 1
        # else the client is held back for a slow target: its pongs are late, not missing
        client.write(encode_frame(OP_PING))
        heartbeat = self.server.options.heartbeat
        self._heartbeat = self.loop.call_later(heartbeat, lambda: self._guard(self._ping))

    # -- closing --------------------------------------------------------------------------

    def _on_client_close(self, payload: _Buffer) -> None:
        code, reason = parse_close(payload)
        _log.info("%s: client closed the WebSocket: %d %s", self.peer, code, reason)
        if not self._close_sent:  # echo the code (RFC 6455 5.5.1); the handshake is complete
            reply = close_payload(code) if code != CloseCode.NO_STATUS else b""
            self.client.write(encode_frame(OP_CLOSE, reply))
            self._close_sent = True
        self._close_all_after_flush()

    def _close_all_after_flush(self) -> None:
        if self.state is not _State.CLOSING:
            self._set_state(_State.CLOSING)
            self._set_close_deadline()
        self._release_target()
        self.client.close_when_flushed()

    def _close_client(self, code: int, reason: str) -> None:
        """Start the closing handshake from our side (after what is queued for the client)."""
        self._release_target()
        if self._close_sent or self.client.closed:
            return
        self.client.write(encode_frame(OP_CLOSE, close_payload(code, reason)))
        self._close_sent = True
        if self.state is not _State.CLOSING:
            self._set_state(_State.CLOSING)
        self._set_close_deadline()
        if self._decoder is None or code not in (CloseCode.NORMAL, CloseCode.GOING_AWAY):
            self.client.linger()  # no well-formed close frame will come back
        else:
            self.client.set_reading(True)  # wait for the client's close frame

    def _release_target(self) -> None:
        """Send the target what is queued for it, then close it without losing that data.

        Closing a TCP socket that has unread input sends a reset, which destroys whatever
        the kernel has not delivered yet: so write EOF and discard input until the target
        closes too (bounded by the session's close deadline). A TLS target gets no EOF
        without close_notify: it is closed once its queue is flushed."""
        target = self.target
        if target is None or target.closed:
            return
        if target.tls:
            target.close_when_flushed()
        else:
            target.linger()

    def shutdown(self) -> None:
        """The server is stopping: say goodbye (1001) to a WebSocket, drop anything else."""
        try:
            if self.state is _State.RELAY:
                self._close_client(CloseCode.GOING_AWAY, "Server shutting down")
            elif self.state is not _State.CLOSING:
                self.abort()
        except Exception as exc:  # a client already gone must not stop the others' goodbyes
            self.on_error(None, exc)

    def abort(self) -> None:
        """Close both sides now, dropping anything still queued."""
        if self.target is not None:
            self.target.close()
        self.client.close()

    def _finish(self) -> None:
        self._set_state(_State.CLOSED)
        for timer in (self._timer, self._heartbeat):
            if timer is not None:
                timer.cancel()
        self._timer = self._heartbeat = None
        self._decoder = None
        if self._recorder is not None:
            self._recorder.close()
        self._close_web_file()
        _log.debug("%s: session %d closed", self.peer, self.number)
        self.server.on_session_closed(self)

    def _target_name(self) -> str:
        return str(self._target.target) if self._target is not None else "?"


# Upstream's legend, logged at startup with --traffic; a dot: only part could be sent now.
_TRAFFIC_LEGEND = (
    "Traffic Legend:",
    "    } - Client receive",
    "    }. - Client receive partial",
    "    { - Target receive",
    "",
    "    > - Target send",
    "    >. - Target send partial",
    "    < - Client send",
    "    <. - Client send partial",
)


def _traffic_mark(mark: str) -> None:
    sys.stdout.write(mark)
    sys.stdout.flush()


# === 11. Server ===

_ACCEPT_BATCH = 64  # connections taken per readiness event, so one listener cannot starve I/O
_ACCEPT_RETRY = 0.5  # seconds to wait after running out of file descriptors
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
_SPARE_DESCRIPTORS = 16  # kept for listeners, the selector, the wake-up pair, log and plugin files


def _session_limit(per_session: int = 2) -> int:
    """Sessions that fit in RLIMIT_NOFILE at two descriptors each (client and target); 0: no limit.

    With --record a session holds a third, its record file.

    Accepting more only to fail creating their target sockets would refuse every newcomer
    once the descriptors run out; beyond this the excess waits in the listen backlog."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(1, (soft - _SPARE_DESCRIPTORS) // per_session)


class _Listener(_Watched):
    __slots__ = ("server",)

    def __init__(self, server: "Server", sock: socket.socket) -> None:
        super().__init__(sock)
        self.server = server

    def on_events(self, events: int) -> None:
        self.server._accept(self)

    def on_error(self, exc: Exception) -> None:
        _log.error("error accepting a connection", exc_info=exc)


# -- the wrapped program: PORT -- COMMAND ---------------------------------------------------

RESPAWN_LIMIT = 3  # --wrap-mode respawn starts the program at most this many times...
RESPAWN_WINDOW = 10.0  # ...within this many seconds, so a crashing program cannot spin
WRAP_STOP_DEADLINE = 5.0  # seconds the program has after SIGTERM before it gets SIGKILL
_BUILD_REBIND = "make rebind.so (or: cc -O2 -Wall -Wextra -fPIC -shared -o rebind.so rebind.c -ldl)"


def _find_rebind(explicit: Optional[str]) -> str:
    """The absolute path of rebind.so: --rebind, else beside this file (or the zipapp holding
    it), else beside the program that was run; ConfigError saying how to build it if none."""
    if explicit:
        path = os.path.abspath(explicit)
        if not os.path.isfile(path):
            raise ConfigError(
                f"--rebind: {explicit!r} is not a file; build it with {_BUILD_REBIND}"
            )
        return _preloadable(path)
    places: List[str] = []
    starts = [__file__]
    if os.path.isfile(sys.argv[0]):
        starts.append(sys.argv[0])
    for start in starts:
        directory = os.path.dirname(os.path.abspath(start))
        while not os.path.isdir(directory):  # __file__ inside a zipapp: use the archive's folder
            directory = os.path.dirname(directory)
        if directory not in places:
            places.append(directory)
    for directory in places:
        path = os.path.join(directory, "rebind.so")
        if os.path.isfile(path):
            return _preloadable(path)
    raise ConfigError(
        f"'-- COMMAND' needs rebind.so, which is not in {' or '.join(places)}: build it there "
        f"with {_BUILD_REBIND}, or give its path with --rebind PATH"
    )


def _preloadable(path: str) -> str:
    if " " in path or ":" in path:  # LD_PRELOAD separates its entries with either
        raise ConfigError(f"--rebind: LD_PRELOAD cannot take a path with a space or colon: {path}")
    return path


def _free_loopback_port() -> int:
    """A port free on 127.0.0.1 and (where there is IPv6) on ::1, for the wrapped program."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock6:
                sock6.bind(("::1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                continue
        return port
    raise ConfigError("'-- COMMAND': no free loopback port for the program")


def _exit_status(returncode: int) -> int:
    """A process's status as a shell reports it: a death by signal N is 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class _WrappedProgram:
    """The program after '--', run with rebind.so so that its bind() of the listen port
    lands on a loopback port that the proxy targets instead.

    The loop learns that it ended from SIGCHLD through the signal wake-up fd; outside the
    main thread (an embedded server) a thread blocked in wait() tells it. Either way it is
    reaped with a non-blocking waitpid, and *on_exit* gets its status."""

    def __init__(
        self, options: "Options", loop: _Loop, rebind: str, on_exit: Callable[[int], None]
    ) -> None:
        self.command = list(options.wrap_cmd)
        if shutil.which(self.command[0]) is None:
            raise ConfigError(f"'-- COMMAND': {self.command[0]!r} is not an executable program")
        self.loop = loop
        self.on_exit = on_exit
        self.port = _free_loopback_port()
        addresses: List[Tuple[int, Any]] = [(socket.AF_INET, ("127.0.0.1", self.port))]
        if socket.has_ipv6:  # rebind.so moves an IPv6 bind (even a dual-stack one) to ::1
            addresses.append((socket.AF_INET6, ("::1", self.port, 0, 0)))
            if options.prefer_ipv6:
                addresses.reverse()
        self.target = _TargetAddress(Target("127.0.0.1", self.port), addresses)
        self.env = dict(os.environ)
        preload = self.env.get("LD_PRELOAD")
        self.env["LD_PRELOAD"] = f"{rebind}:{preload}" if preload else rebind
        self.env["REBIND_OLD_PORT"] = str(options.listen_port)
        self.env["REBIND_NEW_PORT"] = str(self.port)
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self._starts: Deque[float] = collections.deque(maxlen=RESPAWN_LIMIT)
        self._respawn_timer: Optional[_Timer] = None
        self._waiter_thread = False
        self._stopped = False

    def start(self, waiter_thread: bool = False) -> None:
        self._waiter_thread = waiter_thread
        self._respawn_timer = None
        self._starts.append(time.monotonic())
        # rebind.so sends the program SIGTERM if this process dies without stopping it.
        self.env["REBIND_PARENT_PID"] = str(os.getpid())
        try:
            proc = subprocess.Popen(self.command, env=self.env)
        except OSError as exc:
            _log.error("cannot start %s: %s", self.command[0], _strerror(exc))
            self.loop.call_soon_threadsafe(lambda: self.on_exit(127))  # as a shell would say
            return
        self.proc = proc
        _log.info(
            "started the wrapped program (pid %d), its port moved to loopback port %d: %s",
            proc.pid,
            self.port,
            " ".join(shlex.quote(arg) for arg in self.command),
        )
        if waiter_thread:
            threading.Thread(
                target=self._wait, args=(proc,), name="websockify-wait", daemon=True
            ).start()

    def _wait(self, proc: "subprocess.Popen[bytes]") -> None:
        proc.wait()
        self.loop.call_soon_threadsafe(self.on_child_exit)

    def on_child_exit(self) -> None:
        """A child process ended (SIGCHLD): if it is the program, reap it and report."""
        proc = self.proc
        if proc is None or proc.poll() is None:  # poll(): waitpid(pid, WNOHANG)
            return
        self.proc = None
        _log_exit(proc)
        if not self._stopped:
            self.on_exit(_exit_status(proc.returncode))

    def respawn(self) -> None:
        """Start the program again, but not more than RESPAWN_LIMIT times in RESPAWN_WINDOW."""
        if self._stopped or self._respawn_timer is not None:
            return
        wait = 0.0
        if len(self._starts) == RESPAWN_LIMIT:
            wait = self._starts[0] + RESPAWN_WINDOW - time.monotonic()
        if wait > 0:
            _log.warning(
                "--wrap-mode respawn: started %d times within %gs; restarting it in %.1fs",
                RESPAWN_LIMIT,
                RESPAWN_WINDOW,
                wait,
            )
            self._respawn_timer = self.loop.call_later(
                wait, lambda: self.start(self._waiter_thread)
            )
            return
        _log.info("--wrap-mode respawn: restarting the wrapped program")
        self.start(self._waiter_thread)

    def stop(self) -> None:
        """Terminate the program (SIGTERM, SIGKILL after WRAP_STOP_DEADLINE) and reap it.

        Called once the loop has ended, so waiting here holds up nothing else."""
        self._stopped = True
        if self._respawn_timer is not None:
            self._respawn_timer.cancel()
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            _log.info("stopping the wrapped program (pid %d)", proc.pid)
            proc.terminate()
            try:
                proc.wait(WRAP_STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                _log.warning(
                    "the wrapped program (pid %d) is still running %gs after SIGTERM: killing it",
                    proc.pid,
                    WRAP_STOP_DEADLINE,
                )
                proc.kill()
                proc.wait()
        _log_exit(proc)


def _log_exit(proc: "subprocess.Popen[bytes]") -> None:
    if proc.returncode < 0:
        signum = -proc.returncode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        _log.info("the wrapped program (pid %d) was killed by %s", proc.pid, name)
    else:
        _log.info("the wrapped program (pid %d) exited with status %d", proc.pid, proc.returncode)


class Server:
    """The proxy: listeners, sessions and their loop.

    ``Server(options).serve_forever()`` runs it in the calling thread; ``start()`` runs it
    in a background thread and ``stop()`` ends it. ``address`` is the bound address.
    """

    def __init__(
        self, options: "Options", listeners: Optional[Sequence[socket.socket]] = None
    ) -> None:
        self.options = options
        self._given_listeners = list(listeners) if listeners is not None else None
        self.loop = _Loop()
        self.tls_context = _make_server_context(options)
        self.target_tls_context = _make_target_context(options) if options.ssl_target else None
        self.token_plugin: Optional[TokenPlugin] = None
        self.auth_plugin: Optional[AuthPlugin] = None
        if options.token_plugin:
            self.token_plugin = load_plugin("token", options.token_plugin, options.token_source)
        if options.auth_plugin:
            self.auth_plugin = load_plugin("auth", options.auth_plugin, options.auth_source)
        self._program: Optional[_WrappedProgram] = None
        if options.wrap_cmd:
            rebind = _find_rebind(options.rebind)
            self._program = _WrappedProgram(options, self.loop, rebind, self._on_program_exit)
        self.fixed_target = _fixed_target(options, self._program)
        self.web_root = _web_root(options.web) if options.web else None
        self.allowed_origins = frozenset(_parse_origins(options.allow_origin))
        self.trusted_proxies = _parse_networks(options.trusted_proxy)
        self.exit_status = 0
        self._listeners: List[_Listener] = []
        self._sessions: Dict[int, _Session] = {}
        self._count = 0
        self._accepting = False
        self._stopping = False
        self._idle_timer: Optional[_Timer] = None
        self._retry_timer: Optional[_Timer] = None
        self._max_sessions = _session_limit(3 if options.record else 2)
        self._full = False  # accepting paused at _max_sessions until a session ends
        self._thread: Optional[threading.Thread] = None
        self._started = threading.Event()
        self._unix_path: Optional[str] = None
        self._record_writer = _RecordWriter(self.loop)

    # -- public ---------------------------------------------------------------------------

    @property
    def addresses(self) -> List[Any]:
        """The bound address of every listener (host, port[, ...]) or unix socket path."""
        return [listener.sock.getsockname() for listener in self._listeners]

    @property
    def address(self) -> Any:
        """The first bound address; with port 0 in the options it tells the port chosen."""
        return self.addresses[0]

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    def bind(self) -> None:
        """Open the listening sockets (done by serve_forever and start if not yet)."""
        if self._listeners:
            return
        if self._given_listeners is not None:  # a worker's: the supervisor says where
            self._listeners = [_Listener(self, sock) for sock in self._given_listeners]
            return
        for sock in _open_listeners(self.options):
            self._listeners.append(_Listener(self, sock))
        if self.options.unix_listen:
            self._unix_path = self.options.unix_listen
        for address in self.addresses:
            _log.info("listening on %s", _format_address(address))

    def hand_over_listeners(self) -> List[socket.socket]:
        """Give up the bound sockets, and this server's loop, to serve them elsewhere.

        --workers: the supervisor keeps the sockets for the processes it forks."""
        self.bind()
        socks = [listener.sock for listener in self._listeners]
        self._listeners = []
        self.loop.close()
        return socks

    def serve_forever(self) -> int:
        """Serve until stopped (SIGTERM/SIGINT in the main thread); return the exit status."""
        self.bind()
        in_main_thread = threading.current_thread() is threading.main_thread()
        if in_main_thread:
            self.handle_signals()
        try:
            self._start_serving()
            if self._program is not None:
                self._program.start(waiter_thread=not in_main_thread)
            self._started.set()
            self.loop.run()
        finally:
            self._close()
        return self.exit_status

    def start(self) -> None:
        """Serve in a background thread; returns once the listeners are bound."""
        self.bind()
        self._thread = threading.Thread(target=self.serve_forever, name="websockify-min")
        self._thread.daemon = True
        self._thread.start()
        self._started.wait()

    def stop(self, timeout: float = CLOSE_TIMEOUT + 5) -> None:
        """Shut down gracefully from any thread and wait for the loop to end."""
        self.loop.call_soon_threadsafe(self.shutdown)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def shutdown(self) -> None:
        """Stop accepting, close every session (1001 for WebSockets), then stop the loop."""
        if self._stopping:
            _log.info("second stop request: closing every connection now")
            for session in list(self._sessions.values()):
                session.abort()
            self.loop.stop()
            return
        _log.info("shutting down")
        for session in list(self._sessions.values()):
            session.shutdown()
        self._wind_down()

    def handle_signals(self) -> None:
        """SIGTERM and SIGINT shut down gracefully, SIGHUP reopens the log files, SIGCHLD
        reaps the wrapped program.

        Main thread only. A signal that comes before serve_forever runs waits for it, so
        a process may be stopped as soon as it listens.
        """
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.shutdown)
        self.loop.add_signal_handler(signal.SIGHUP, self.reopen_log_files)
        if self._program is not None:  # the wrapped program ended
            self.loop.add_signal_handler(signal.SIGCHLD, self._program.on_child_exit)

    def close(self) -> None:
        """Release the listeners and the loop of a server that will not serve (startup error)."""
        self._close()

    def reopen_log_files(self) -> None:
        """SIGHUP: reopen --log-file by its name (after logrotate moved it); never stop."""
        _log.info("SIGHUP: reopening log files")
        self.loop.run_in_worker(_reopen_log_files, _after_reopen)

    # -- sessions -------------------------------------------------------------------------

    def find_target(self, request: Request) -> _TargetAddress:
        """Where *request* may go: token lookup, auth, DNS (blocking: runs in a worker)."""
        options = self.options
        wrapped: Optional[_TargetAddress] = None
        if self.token_plugin is not None:
            host = request.headers.get("Host")
            token = token_from_request(request.query, host, options.host_token)
            target, looked_up = _look_up(self.token_plugin, token)
        elif self._program is not None:
            wrapped = self._program.target
            target = looked_up = wrapped.target
        else:
            target = looked_up = _configured_target(options)
        if self.auth_plugin is not None:
            check_auth(self.auth_plugin, request.headers, looked_up)
        return wrapped or _resolve_target(target, options.prefer_ipv6)

    def answer_web(self, request: Request, keep_alive: bool) -> _WebResponse:
        """The response to a plain GET or HEAD: auth with --web-auth, then the file
        (blocking: runs in a worker)."""
        assert self.web_root is not None
        if self.options.web_auth and self.auth_plugin is not None:
            check_auth(self.auth_plugin, request.headers, _web_auth_target(self.options))
        return _serve_static(self.web_root, request, self.options.file_only, keep_alive)

    def on_relay_started(self, session: _Session) -> None:
        if self.options.run_once and self._accepting:
            _log.info("--run-once: serving this session, then exiting")
            self._wind_down()

    def new_recorder(self, number: int, on_drain: Callable[[], None]) -> _Recorder:
        """The --record file of session *number*: FILE.<number>, as upstream names it."""
        return _Recorder(f"{self.options.record}.{number}", self._record_writer, on_drain)

    def on_session_closed(self, session: _Session) -> None:
        self._sessions.pop(session.number, None)
        if self._retry_timer is not None:  # descriptors were short; one just came free
            self._retry_timer.cancel()
            self._resume_accepting()
        elif self._full:
            self._full = False
            self._resume_accepting()
        if not self._sessions:
            if self._stopping:
                self._stop_when_idle()
            elif self.options.idle_timeout:
                self._arm_idle_timer()

    # -- internals ------------------------------------------------------------------------

    def _start_serving(self) -> None:
        options = self.options
        if options.traffic:
            for line in _TRAFFIC_LEGEND:
                _log.info("%s", line)
        for listener in self._listeners:
            listener.sock.setblocking(False)
        self._resume_accepting()
        if options.timeout:
            self.loop.call_later(options.timeout, self._on_timeout)
        if options.idle_timeout:
            self._arm_idle_timer()

    def _on_timeout(self) -> None:
        _log.info("--timeout reached: no new connections; exiting once sessions end")
        self._wind_down()

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = self.loop.call_later(self.options.idle_timeout, self._on_idle)

    def _on_idle(self) -> None:
        if not self._sessions and not self._stopping:
            _log.info("--idle-timeout: no session for %gs, exiting", self.options.idle_timeout)
            self._wind_down()

    def _wind_down(self) -> None:
        """Accept no more connections (closing the listeners); stop once no session is left."""
        self._stopping = True
        self._stop_accepting()
        self._stop_when_idle()

    def _stop_when_idle(self) -> None:
        if not self._sessions:
            self.loop.stop()

    def _resume_accepting(self) -> None:
        self._retry_timer = None
        if self._stopping:
            return
        self._accepting = True
        for listener in self._listeners:
            self.loop.set_interest(listener, selectors.EVENT_READ)

    def _stop_accepting(self) -> None:
        """Stop accepting; for good (closing the listeners) when the server is stopping."""
        self._accepting = False
        for listener in self._listeners:
            self.loop.set_interest(listener, 0)
            if self._stopping:
                listener.sock.close()
        if self._stopping:
            self._listeners = []

    def _accept(self, listener: _Listener) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = listener.sock.accept()
            except _WOULD_BLOCK:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                # Waiting on the listener now would spin: it stays readable. Pause instead.
                _log.warning(
                    "cannot accept: %s; pausing %gs (%d sessions open)",
                    _strerror(exc),
                    _ACCEPT_RETRY,
                    len(self._sessions),
                )
                self._stop_accepting()
                self._retry_timer = self.loop.call_later(_ACCEPT_RETRY, self._resume_accepting)
                return
            self._start_session(sock, address)
            if self._max_sessions and len(self._sessions) >= self._max_sessions:
                _log.warning(
                    "%d sessions open, all the descriptor limit allows: new clients wait",
                    len(self._sessions),
                )
                self._stop_accepting()
                self._full = True
            if not self._accepting:
                return

    def _start_session(self, sock: socket.socket, address: Any) -> None:
        sock.setblocking(False)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._count += 1
        peer = _format_peer(address)
        session = _Session(self, self._count, sock, peer)
        self._sessions[session.number] = session
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        _log.debug("%s: session %d accepted (%d open)", peer, self._count, len(self._sessions))
        session.start()

    def _on_program_exit(self, status: int) -> None:
        if self._stopping:
            return
        mode = self.options.wrap_mode
        if mode == "exit":
            _log.info("--wrap-mode exit: exiting with the program's status %d", status)
            self.exit_status = status
            self.shutdown()
        elif mode == "respawn":
            assert self._program is not None
            self._program.respawn()
        else:
            _log.info(
                "--wrap-mode ignore: serving on; its port refuses connections until it is back"
            )

    def _close(self) -> None:
        for session in list(self._sessions.values()):
            session.abort()
        self._record_writer.close(RECORD_CLOSE_TIMEOUT)
        for listener in self._listeners:
            listener.sock.close()
        self._listeners = []
        if self._program is not None:
            self._program.stop()
        if self._unix_path:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
        self.loop.close()


def _reopen_log_files() -> List[str]:
    """Point every file handler of our logger at a fresh file of its name; return failures.

    The old file stays in use when the new one cannot be opened, so no line is lost.
    """
    failures = []
    for handler in _log.handlers:
        if not isinstance(handler, logging.FileHandler):
            continue
        try:
            stream = open(handler.baseFilename, "a", encoding=handler.encoding)  # noqa: SIM115
        except OSError as exc:
            failures.append(f"cannot reopen {handler.baseFilename}: {_strerror(exc)}")
            continue
        handler.acquire()
        try:
            old, handler.stream = handler.stream, stream
        finally:
            handler.release()
        if old is not None:
            with contextlib.suppress(OSError):
                old.close()
    return failures


def _after_reopen(failures: Optional[List[str]], error: Optional[Exception]) -> None:
    if error is not None:
        failures = [_describe(error)]
    for failure in failures or ():
        _log.warning("--log-file: %s; still writing to the old file", failure)
    if not failures:
        _log.info("SIGHUP: log files reopened")


def _format_address(address: Any) -> str:
    if isinstance(address, str):
        return address or "unix socket"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _format_peer(address: Any) -> str:
    if isinstance(address, tuple):
        host = str(address[0])
        return host[7:] if host.startswith("::ffff:") else host  # v4 client on a v6 socket
    return "unix"


def _configured_target(options: "Options") -> Target:
    """The one target of the command line (none with a token plugin)."""
    if options.unix_target:
        return Target("unix_socket", 0, options.unix_target)
    assert options.target_host is not None and options.target_port is not None
    return Target(options.target_host, options.target_port)


def _fixed_target(
    options: "Options", program: Optional["_WrappedProgram"] = None
) -> Optional[_TargetAddress]:
    """The target's addresses when a connection needs no worker: no plugin, no DNS."""
    if options.token_plugin or options.auth_plugin:
        return None
    if program is not None:
        return program.target
    try:
        return _resolve_target(
            _configured_target(options), options.prefer_ipv6, socket.AI_NUMERICHOST
        )
    except socket.gaierror:
        return None  # a name: resolved for each connection, as DNS may change


def _web_auth_target(options: "Options") -> Optional[Target]:
    """The target an auth plugin sees for a plain web request: the one target of the
    command line, or none when targets come from tokens."""
    if options.token_plugin or not (options.unix_target or options.target_host):
        return None
    return _configured_target(options)


_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s?#]+")


def _parse_origins(values: Sequence[str]) -> Tuple[str, ...]:
    """--allow-origin values (each one origin or a comma-separated list), lower-cased as
    they are compared; a trailing slash, as copied from an address bar, is dropped."""
    origins = []
    for value in values:
        for origin in value.split(","):
            origin = origin.strip().rstrip("/")
            if not _ORIGIN.fullmatch(origin):
                raise ConfigError(
                    f"--allow-origin: {origin!r} is not an origin (scheme://host[:port])"
                )
            origins.append(origin.lower())
    return tuple(origins)


def _parse_networks(values: Sequence[str]) -> List[_IPNetwork]:
    """--trusted-proxy values: addresses or networks (CIDR), one or a comma-separated list."""
    networks = []
    for value in values:
        for text in value.split(","):
            try:
                networks.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                raise ConfigError(
                    f"--trusted-proxy: {text.strip()!r} is not an IP address or network"
                ) from None
    return networks


def _web_root(directory: str) -> str:
    """The real path of the --web directory; ConfigError if it is not one."""
    if not os.path.isdir(directory):
        raise ConfigError(f"--web: {directory!r} is not a directory")
    mimetypes.init()  # now, once: the worker threads then only read its tables
    return os.path.realpath(directory)


def _open_listeners(options: "Options") -> List[socket.socket]:
    """Bind the listening sockets the options ask for; raise ConfigError if impossible."""
    if options.inetd:
        return [_inherited_listener(0)]
    if options.unix_listen:
        return [_unix_listener(options.unix_listen, options.unix_listen_mode)]
    host, port = options.listen_host, options.listen_port
    reuse_port = options.workers > 1  # each worker then listens on the port too
    if not host:
        return [_dual_stack_listener(port, reuse_port)]
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve listen address {host!r}: {exc}") from None
    if options.prefer_ipv6:
        infos.sort(key=lambda info: info[0] != socket.AF_INET6)
    listeners: List[socket.socket] = []
    for family, _, _, _, address in infos:
        if listeners and port == 0:  # one port on every address of the name
            address = (address[0], listeners[0].getsockname()[1], *address[2:])
        try:
            listeners.append(_tcp_listener(family, address, reuse_port=reuse_port))
        except OSError as exc:
            # An address this host lacks (::1 without IPv6) is skipped if another one works.
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) or (
                not listeners and address == infos[-1][4]
            ):
                for sock in listeners:
                    sock.close()
                raise ConfigError(
                    f"cannot listen on {_format_address(address)}: {_strerror(exc)}"
                ) from None
    if not listeners:
        raise ConfigError(f"cannot listen on {host}:{port}: no usable address")
    return listeners


def _tcp_listener(
    family: int, address: Any, dual_stack: bool = False, reuse_port: bool = False
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port and hasattr(socket, "SO_REUSEPORT"):
            with contextlib.suppress(OSError):  # not everywhere: workers then share this one
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


def _dual_stack_listener(port: int, reuse_port: bool = False) -> socket.socket:
    """All interfaces, IPv4 and IPv6 on one socket; IPv4 alone where there is no IPv6."""
    try:
        if socket.has_ipv6:
            return _tcp_listener(socket.AF_INET6, ("::", port), True, reuse_port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"cannot listen on port {port}: {_strerror(exc)}") from None
    try:
        return _tcp_listener(socket.AF_INET, ("0.0.0.0", port), reuse_port=reuse_port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on port {port}: {_strerror(exc)}") from None


def _unix_listener(path: str, mode: int) -> socket.socket:
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise ConfigError(f"--unix-listen: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # a stale socket left by a process that is gone
        else:
            raise ConfigError(f"--unix-listen: {path} is in use by another process")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"--unix-listen: cannot listen on {path}: {_strerror(exc)}") from None
    return sock


def _inherited_listener(fd: int) -> socket.socket:
    """The listening socket handed to us on *fd* (--inetd: our standard input)."""
    try:
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, os.dup(fd))
        family = probe.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        accepting = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        probe.close()
    except OSError as exc:
        raise ConfigError(f"--inetd: standard input is not a socket ({_strerror(exc)})") from None
    if not accepting:
        raise ConfigError("--inetd: standard input is not a listening socket")
    return socket.socket(family, socket.SOCK_STREAM, 0, os.dup(fd))


# -- worker processes (--workers) ---------------------------------------------------------

_RESTART_DELAY = 1.0  # seconds before restarting a worker that died sooner than this after start


class _ListenAddress(NamedTuple):
    """Where a listening socket is bound, to open another one there."""

    family: int
    address: Any
    dual_stack: bool


def _listen_address(sock: socket.socket) -> _ListenAddress:
    dual = sock.family == socket.AF_INET6 and not sock.getsockopt(
        socket.IPPROTO_IPV6, socket.IPV6_V6ONLY
    )
    return _ListenAddress(sock.family, sock.getsockname(), dual)


def _reuses_port(sock: socket.socket) -> bool:
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not hasattr(socket, "SO_REUSEPORT"):
        return False
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))


_WORKER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # what a worker handles


class _Supervisor:
    """--workers N: N forked processes, each with its own loop, serving the same port.

    With SO_REUSEPORT each worker listens on a socket of its own and the kernel spreads new
    connections among them; where that option is missing, and for a unix socket, every
    worker accepts on the sockets inherited from here. A worker that crashes or is killed
    is replaced; SIGTERM or SIGINT here stops them all (gracefully, as one process would);
    SIGHUP reaches them all.
    """

    def __init__(self, options: "Options", listeners: List[socket.socket]) -> None:
        self.options = options
        self.listeners = listeners
        self.own_sockets = all(_reuses_port(sock) for sock in listeners)
        self.addresses = [_listen_address(sock) for sock in listeners]
        self.workers: Dict[int, float] = {}  # pid -> when it started
        self._signals: List[int] = []
        self._wake_recv, self._wake_send = socket.socketpair()

    def run(self) -> int:
        """Start the workers, keep them running until told to stop; return the exit status."""
        for sock in (self._wake_recv, self._wake_send):
            sock.setblocking(False)
        selector = selectors.DefaultSelector()
        selector.register(self._wake_recv, selectors.EVENT_READ)
        old_wakeup_fd = signal.set_wakeup_fd(self._wake_send.fileno())
        signums = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP)
        old_handlers = {signum: signal.signal(signum, self._on_signal) for signum in signums}
        mode = "own sockets (SO_REUSEPORT)" if self.own_sockets else "shared sockets"
        _log.info("starting %d worker processes, %s", self.options.workers, mode)
        try:
            for index in range(self.options.workers):
                self._spawn(inherit=index == 0)
            if self.own_sockets:  # the first worker has them now; this process accepts nothing
                for sock in self.listeners:
                    sock.close()
            self._supervise(selector)
        finally:
            signal.set_wakeup_fd(old_wakeup_fd)
            for signum, handler in old_handlers.items():
                signal.signal(signum, handler)
            selector.close()
            self._close_sockets()
        return 0

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)

    def _supervise(self, selector: selectors.BaseSelector) -> None:
        restarts: List[float] = []  # when to start a replacement
        stop_by: Optional[float] = None
        while self.workers or (restarts and stop_by is None):
            now = time.monotonic()
            due = [when for when in (*restarts, stop_by) if when is not None]
            timeout = max(0.0, min(due) - now) if due else None
            selector.select(timeout)
            with contextlib.suppress(OSError):
                while self._wake_recv.recv(4096):
                    pass
            signums, self._signals = self._signals, []
            if signal.SIGHUP in signums:  # logrotate: every process reopens its log files
                _after_reopen(_reopen_log_files(), None)
                self._signal_workers(signal.SIGHUP)
            if stop_by is None and (signal.SIGTERM in signums or signal.SIGINT in signums):
                _log.info("stopping %d workers", len(self.workers))
                stop_by = time.monotonic() + CLOSE_TIMEOUT + 5
                restarts = []
                self._signal_workers(signal.SIGTERM)
            for pid, started, status in self._reap():
                if stop_by is not None:
                    continue
                if os.WIFSIGNALED(status) or os.WEXITSTATUS(status):
                    how = (
                        f"was killed by signal {os.WTERMSIG(status)}"
                        if os.WIFSIGNALED(status)
                        else f"exited with status {os.WEXITSTATUS(status)}"
                    )
                    _log.warning("worker %d %s; starting another", pid, how)
                    soon = time.monotonic() - started < _RESTART_DELAY
                    restarts.append(time.monotonic() + (_RESTART_DELAY if soon else 0.0))
                else:  # --timeout, --idle-timeout: it is done, not broken
                    _log.info("worker %d finished", pid)
            now = time.monotonic()
            for when in [when for when in restarts if when <= now]:
                restarts.remove(when)
                self._spawn(inherit=False)
            if stop_by is not None and now >= stop_by and self.workers:
                _log.info("workers still running after %gs: killing them", CLOSE_TIMEOUT + 5)
                self._signal_workers(signal.SIGKILL)
                stop_by = now + 3600  # reaped as they die; nothing more to send

    def _reap(self) -> List[Tuple[int, float, int]]:
        reaped = []
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            started = self.workers.pop(pid, None)
            if started is not None:
                reaped.append((pid, started, status))
        return reaped

    def _signal_workers(self, signum: int) -> None:
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _spawn(self, inherit: bool) -> None:
        # The worker starts with these signals blocked, so one sent while it is still
        # starting (logrotate's SIGHUP) waits for its loop instead of killing it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WORKER_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._serve_in_child(inherit)  # never returns
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.workers[pid] = time.monotonic()

    def _serve_in_child(self, inherit: bool) -> NoReturn:
        status = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            self._wake_recv.close()
            self._wake_send.close()
            if inherit or not self.own_sockets:
                listeners = self.listeners
            else:
                for sock in self.listeners:
                    sock.close()  # another worker's, if still open here
                listeners = [
                    _tcp_listener(where.family, where.address, where.dual_stack, reuse_port=True)
                    for where in self.addresses
                ]
            server = Server(self.options, listeners)
            server.handle_signals()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _WORKER_SIGNALS)  # handled from here
            status = server.serve_forever()
        except BaseException as exc:  # whatever happens, this process must not return
            if not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                _log.error("worker %d failed: %s", os.getpid(), _describe(exc), exc_info=exc)
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)

    def _close_sockets(self) -> None:
        for sock in (*self.listeners, self._wake_recv, self._wake_send):
            sock.close()
        if self.options.unix_listen:
            with contextlib.suppress(OSError):
                os.unlink(self.options.unix_listen)


# -- TLS contexts -------------------------------------------------------------------------

_TLS_VERSIONS = {"default": None, "tlsv1_1": "TLSv1_1", "tlsv1_2": "TLSv1_2", "tlsv1_3": "TLSv1_3"}


def _make_server_context(options: "Options") -> Optional[ssl.SSLContext]:
    """The TLS context for wss:// clients, or None when there is no certificate."""
    cert = options.cert
    if not os.path.exists(cert):
        if options.ssl_only:
            raise ConfigError(f"--ssl-only: certificate file {cert!r} not found (see --cert)")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _set_minimum_version(context, options.ssl_version)
    key_file = options.key or cert
    flag, key_password = _key_password(options)
    asked_password = []

    def password() -> bytes:  # a callback: OpenSSL would otherwise prompt on the terminal
        asked_password.append(True)
        if key_password is None:
            raise ConfigError(f"--key-password: the key in {key_file!r} is encrypted")
        return key_password

    try:
        context.load_cert_chain(cert, options.key or None, password)
    except (OSError, ssl.SSLError) as exc:
        if asked_password:
            raise ConfigError(f"{flag}: wrong password for {key_file!r}") from None
        raise ConfigError(f"--cert/--key: cannot load {cert!r}: {_strerror(exc)}") from None
    if options.ssl_ciphers:
        try:
            context.set_ciphers(options.ssl_ciphers)
        except ssl.SSLError:
            raise ConfigError(f"--ssl-ciphers: no cipher matches {options.ssl_ciphers!r}") from None
    if options.verify_client:
        context.verify_mode = ssl.CERT_REQUIRED
        try:
            if options.cafile:
                context.load_verify_locations(cafile=options.cafile)
            else:
                context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"--cafile: cannot load {options.cafile!r}: {_strerror(exc)}"
            ) from None
    return context


def _key_password(options: "Options") -> Tuple[str, Optional[bytes]]:
    """The key password and the flag that gave it: the command line, a file or a variable.

    A file holds the password alone; one line end after it is not part of it.
    """
    if options.key_password_file:
        path = options.key_password_file
        try:
            with open(path, "rb") as file:
                secret = file.read()
        except OSError as exc:
            raise ConfigError(
                f"--key-password-file: cannot read {path}: {_strerror(exc)}"
            ) from None
        if secret.endswith(b"\n"):
            secret = secret[:-2] if secret.endswith(b"\r\n") else secret[:-1]
        return "--key-password-file", secret
    if options.key_password_env:
        name = options.key_password_env
        value = os.environ.get(name)
        if value is None:
            raise ConfigError(f"--key-password-env: the environment has no {name}")
        return "--key-password-env", os.fsencode(value)
    if options.key_password is not None:
        return "--key-password", options.key_password.encode()
    return "--key-password", None


def _make_target_context(options: "Options") -> ssl.SSLContext:
    """The TLS context for --ssl-target: verify the target, send SNI."""
    context = ssl.create_default_context()
    if options.ssl_target_cafile:
        try:
            context.load_verify_locations(cafile=options.ssl_target_cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"--ssl-target-cafile: cannot load {options.ssl_target_cafile!r}: {_strerror(exc)}"
            ) from None
    return context


def _set_minimum_version(context: ssl.SSLContext, version: str) -> None:
    name = _TLS_VERSIONS[version]
    if name is None:
        return
    if hasattr(ssl, "TLSVersion"):  # 3.7+
        context.minimum_version = getattr(ssl.TLSVersion, name)
        return
    # 3.6: switch off every version below the minimum.
    below = {"TLSv1_1": ("TLSv1",), "TLSv1_2": ("TLSv1", "TLSv1_1")}
    below["TLSv1_3"] = ("TLSv1", "TLSv1_1", "TLSv1_2")
    for old in below[name]:
        context.options |= getattr(ssl, "OP_NO_" + old)


# === 12. Options and CLI ===


class Options(NamedTuple):
    """Everything the command line can say, as one immutable value (see parse_args)."""

    listen_host: str = ""  # "" listens on every interface
    listen_port: int = 0
    target_host: Optional[str] = None
    target_port: Optional[int] = None
    unix_target: Optional[str] = None
    unix_listen: Optional[str] = None
    unix_listen_mode: int = 0o600
    inetd: bool = False
    prefer_ipv6: bool = False
    verbose: bool = False
    traffic: bool = False
    record: Optional[str] = None
    daemon: bool = False
    run_once: bool = False
    timeout: float = 0.0
    idle_timeout: float = 0.0
    heartbeat: float = 0.0
    cert: str = "self.pem"
    key: Optional[str] = None
    key_password: Optional[str] = None
    ssl_only: bool = False
    ssl_target: bool = False
    ssl_target_cafile: Optional[str] = None
    verify_client: bool = False
    cafile: Optional[str] = None
    ssl_version: str = "default"
    ssl_ciphers: Optional[str] = None
    web: Optional[str] = None
    web_auth: bool = False
    file_only: bool = False
    wrap_cmd: Tuple[str, ...] = ()
    wrap_mode: str = "exit"
    rebind: Optional[str] = None  # rebind.so for the wrapped program; None: look beside us
    token_plugin: Optional[str] = None
    token_source: Optional[str] = None
    host_token: bool = False
    auth_plugin: Optional[str] = None
    auth_source: Optional[str] = None
    log_file: Optional[str] = None
    syslog: Optional[str] = None
    legacy_syslog: bool = False
    libserver: bool = False
    max_message_size: int = DEFAULT_MAX_MESSAGE
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    connect_timeout: float = CONNECT_TIMEOUT
    web_timeout: float = WEB_TIMEOUT
    allow_origin: Tuple[str, ...] = ()
    trusted_proxy: Tuple[str, ...] = ()
    pid_file: Optional[str] = None
    user: Optional[str] = None
    group: Optional[str] = None
    key_password_file: Optional[str] = None
    key_password_env: Optional[str] = None
    workers: int = 1  # processes serving the port, each with its own loop


_USAGE = """
    %(prog)s [options] [source_addr:]source_port target_addr:target_port
    %(prog)s [options] --token-plugin CLASS [source_addr:]source_port
    %(prog)s [options] --unix-target FILE [source_addr:]source_port
    %(prog)s [options] [source_addr:]source_port -- WRAP_COMMAND_LINE"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _positive_number(text: str) -> float:
    value = float(text)
    if value < 0 or value != value:
        raise ValueError(text)
    return value


def _byte_count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _octal_mode(text: str) -> int:
    value = int(text, 8)
    if not 0 <= value <= 0o7777:
        raise ValueError(text)
    return value


_positive_number.__name__ = "number"  # argparse names the type in its error messages
_byte_count.__name__ = "byte count"
_octal_mode.__name__ = "octal mode"


def _worker_count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_WORKERS:
        raise ValueError(text)
    return value


_worker_count.__name__ = f"worker count (1 to {MAX_WORKERS})"


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="websockify_min.py",
        usage=_USAGE,
        description="WebSocket to TCP proxy (websockify compatible).",
    )
    add = parser.add_argument
    add("--version", action="version", version=f"%(prog)s {__version__}")
    add("-v", "--verbose", action="store_true", help="verbose messages")
    add("--traffic", action="store_true", help="per frame traffic marks on standard output")
    add("--record", metavar="FILE", help="record sessions to FILE.[session_number]")
    add("-D", "--daemon", action="store_true", help="become a daemon (background process)")
    add("--run-once", action="store_true", help="handle a single WebSocket connection and exit")
    add(
        "--timeout",
        type=_positive_number,
        default=0.0,
        metavar="SECONDS",
        help="after SECONDS stop accepting and exit once sessions end (0: never)",
    )
    add(
        "--idle-timeout",
        type=_positive_number,
        default=0.0,
        metavar="SECONDS",
        help="exit after SECONDS without an active session (0: never)",
    )
    add(
        "--heartbeat",
        type=_positive_number,
        default=0.0,
        metavar="SECONDS",
        help=f"ping the client every SECONDS; drop it after {MISSED_PONGS} unanswered",
    )
    add("--cert", default="self.pem", help="TLS certificate file (may hold key and chain)")
    add("--key", help="TLS key file, if not in the certificate file")
    add("--key-password", help="password of an encrypted TLS key")
    add("--ssl-only", action="store_true", help="refuse clients that do not use TLS")
    add("--ssl-target", action="store_true", help="connect to the target with TLS")
    add(
        "--ssl-target-cafile",
        metavar="FILE",
        help="CA certificates to verify the target with (default: the system store)",
    )
    add("--verify-client", action="store_true", help="require a valid client certificate")
    add("--cafile", help="CA certificates for --verify-client (default: the system store)")
    add(
        "--ssl-version",
        choices=sorted(_TLS_VERSIONS),
        default="default",
        help="minimum TLS version",
    )
    add("--ssl-ciphers", metavar="LIST", help="OpenSSL cipher list")
    add("--unix-listen", metavar="FILE", help="listen on a unix socket instead of TCP")
    add(
        "--unix-listen-mode",
        type=_octal_mode,
        default=0o600,
        metavar="MODE",
        help="file mode of the --unix-listen socket (octal, default 600)",
    )
    add("--unix-target", metavar="FILE", help="connect to a unix socket target")
    add("--inetd", action="store_true", help="the listening socket is standard input")
    add("--web", metavar="DIR", help="also serve files from DIR over plain HTTP")
    add("--web-auth", action="store_true", help="require the auth plugin for --web files too")
    add("--file-only", action="store_true", help="no directory listings for --web")
    add(
        "--allow-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="refuse WebSocket upgrades from other origins (repeatable, or a comma list)",
    )
    add(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="ADDR",
        help="log the client named by X-Forwarded-For/Forwarded from this proxy (IP or CIDR)",
    )
    add(
        "--wrap-mode",
        choices=("exit", "ignore", "respawn"),
        default="exit",
        help="what to do when the wrapped program exits",
    )
    add(
        "--rebind",
        metavar="PATH",
        help="rebind.so for '-- COMMAND' (default: the one beside this script or zipapp)",
    )
    add("-6", "--prefer-ipv6", action="store_true", help="prefer IPv6 when resolving addresses")
    add("--libserver", action="store_true", help="accepted for compatibility; ignored")
    add(
        "--target-config",
        metavar="FILE",
        help="deprecated: same as --token-plugin TokenFile --token-source FILE",
    )
    add("--token-plugin", metavar="CLASS", help="token plugin: a short name or module.Class")
    add("--token-source", metavar="ARG", help="argument for the token plugin")
    add("--host-token", action="store_true", help="take the token from the Host header")
    add("--auth-plugin", metavar="CLASS", help="auth plugin: a short name or module.Class")
    add("--auth-source", metavar="ARG", help="argument for the auth plugin")
    add("--log-file", metavar="FILE", help="also log to FILE")
    add("--syslog", metavar="SERVER", help="log to syslog: a socket path or host:port (UDP)")
    add("--legacy-syslog", action="store_true", help="BSD syslog format instead of RFC 5424")
    add(
        "--max-message-size",
        type=_byte_count,
        default=DEFAULT_MAX_MESSAGE,
        metavar="BYTES",
        help="largest WebSocket message accepted from a client (0: no limit; default 64 MiB)",
    )
    add(
        "--handshake-timeout",
        type=_positive_number,
        default=HANDSHAKE_TIMEOUT,
        metavar="SECONDS",
        help="time a client has to complete its handshake (default 10)",
    )
    add(
        "--connect-timeout",
        type=_positive_number,
        default=CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="time to reach the target, all its addresses together (default 10)",
    )
    add(
        "--web-timeout",
        type=_positive_number,
        default=WEB_TIMEOUT,
        metavar="SECONDS",
        help="drop a --web client that takes nothing of a response for this long (default 60)",
    )
    add("--pid-file", metavar="FILE", help="write the process id to FILE; removed at exit")
    add("--user", metavar="NAME", help="run as this user once listening (start as root)")
    add("--group", metavar="NAME", help="run as this group once listening (start as root)")
    add("--key-password-file", metavar="FILE", help="read the TLS key password from FILE")
    add("--key-password-env", metavar="VAR", help="read the TLS key password from $VAR")
    add(
        "--workers",
        type=_worker_count,
        default=1,
        metavar="N",
        help="serve with N processes, each with its own loop (default 1)",
    )
    add("args", nargs="*", help=argparse.SUPPRESS)
    return parser


def _split_address(text: str, what: str) -> Tuple[str, int]:
    """'host:port', '[v6]:port' or (with an empty host) 'port'."""
    host, _, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"Error parsing {what} port: {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"Error parsing {what} port: {text!r}")
    return host, port


# Upstream's long options. Its optparse takes any unambiguous start of one (--traf);
# our extra options must not make such a start ambiguous (--tr: --traffic or --trusted-proxy).
_UPSTREAM_LONG_OPTIONS = (
    "--help", "--verbose", "--traffic", "--record", "--daemon", "--run-once", "--timeout",
    "--idle-timeout", "--cert", "--key", "--key-password", "--ssl-only", "--ssl-target",
    "--verify-client", "--cafile", "--ssl-version", "--ssl-ciphers", "--unix-listen",
    "--unix-listen-mode", "--unix-target", "--inetd", "--web", "--web-auth", "--file-only",
    "--wrap-mode", "--prefer-ipv6", "--libserver", "--target-config", "--token-plugin",
    "--token-source", "--host-token", "--auth-plugin", "--auth-source", "--heartbeat",
    "--log-file", "--syslog", "--legacy-syslog",
)  # fmt: skip


def _spell_out_upstream_prefix(arg: str) -> str:
    """*arg* with a start of one upstream long option written out in full."""
    name, equals, value = arg.partition("=")
    if not name.startswith("--") or name in _UPSTREAM_LONG_OPTIONS:
        return arg
    matches = [option for option in _UPSTREAM_LONG_OPTIONS if option.startswith(name)]
    return matches[0] + equals + value if len(matches) == 1 else arg


def parse_args(argv: Sequence[str]) -> Options:
    """Options from a command line (without the program name); raises ConfigError."""
    argv = list(argv)
    wrap_cmd: Tuple[str, ...] = ()
    if "--" in argv:
        wrap_cmd = tuple(argv[argv.index("--") + 1 :])
        argv = argv[: argv.index("--")]
        if not wrap_cmd:
            raise ConfigError("'--' must be followed by the command to wrap")
    # Options may come between the addresses, as upstream's optparse allows: argparse
    # leaves positionals after an option unparsed (parse_intermixed_args is 3.7+).
    ns, rest = _build_parser().parse_known_args([_spell_out_upstream_prefix(a) for a in argv])
    unknown = [arg for arg in rest if arg.startswith("-")]
    if unknown:
        raise ConfigError(f"unrecognized arguments: {' '.join(unknown)}")
    args: List[str] = list(ns.args) + rest
    fields: Dict[str, Any] = {
        name: getattr(ns, name) for name in Options._fields if hasattr(ns, name)
    }
    fields["wrap_cmd"] = wrap_cmd
    fields["allow_origin"] = _parse_origins(ns.allow_origin)
    fields["trusted_proxy"] = tuple(str(net) for net in _parse_networks(ns.trusted_proxy))
    if ns.target_config:
        if ns.token_plugin:
            raise ConfigError("--target-config and --token-plugin cannot be combined")
        fields["token_plugin"], fields["token_source"] = "TokenFile", ns.target_config
    token_plugin = fields["token_plugin"]

    if ns.inetd or ns.unix_listen:
        if ns.inetd and ns.unix_listen:
            raise ConfigError("--inetd and --unix-listen cannot be combined")
    else:
        if not args:
            raise ConfigError("Too few arguments")
        fields["listen_host"], fields["listen_port"] = _split_address(args.pop(0), "listen")
    if not wrap_cmd and not token_plugin and not ns.unix_target:
        if not args:
            raise ConfigError("Too few arguments")
        target = args.pop(0)
        if ":" not in target:
            raise ConfigError(f"Error parsing target: {target!r} (expected host:port)")
        host, port = _split_address(target, "target")
        if not host:
            raise ConfigError(f"Error parsing target: {target!r} (expected host:port)")
        fields["target_host"], fields["target_port"] = host, port
    if args:
        raise ConfigError(f"Too many arguments: {' '.join(args)}")

    checks = (
        (ns.token_source and not token_plugin, "--token-source requires --token-plugin"),
        (ns.host_token and not token_plugin, "--host-token requires --token-plugin"),
        (ns.auth_source and not ns.auth_plugin, "--auth-source requires --auth-plugin"),
        (ns.web_auth and not ns.auth_plugin, "--web-auth requires --auth-plugin"),
        (ns.web_auth and not ns.web, "--web-auth requires --web"),
        (ns.legacy_syslog and not ns.syslog, "--legacy-syslog requires --syslog"),
        (ns.ssl_target_cafile and not ns.ssl_target, "--ssl-target-cafile requires --ssl-target"),
        (ns.rebind and not wrap_cmd, "--rebind requires a command to wrap: PORT -- COMMAND"),
        (wrap_cmd and ns.unix_target, "--unix-target and '-- COMMAND' cannot be combined"),
        (
            wrap_cmd and not fields.get("listen_port"),
            "'-- COMMAND' needs the port the command listens on: PORT -- COMMAND",
        ),
        (ns.ssl_only and not os.path.exists(ns.cert), f"--ssl-only: {ns.cert!r} not found"),
        (
            sum(x is not None for x in (ns.key_password, ns.key_password_file, ns.key_password_env))
            > 1,
            "--key-password, --key-password-file and --key-password-env cannot be combined",
        ),
    )
    for failed, message in checks:
        if failed:
            raise ConfigError(message)
    if ns.run_once or ns.inetd:  # one connection, or one inherited socket: one process
        fields["workers"] = 1
    if ns.record and fields["workers"] > 1:  # each worker would number its files from 1
        raise ConfigError("--record cannot be combined with --workers")
    if wrap_cmd and fields["workers"] > 1:  # each worker would start the program again
        raise ConfigError("--workers cannot be combined with a command to wrap")
    return Options(**fields)


SYSLOG_APP_NAME = "WebSockify"  # upstream's ident, so existing syslog filters keep matching
SYSLOG_MAX_BYTES = 16 * 1024  # one datagram; a longer line (a traceback) is cut
SYSLOG_STREAM_BACKLOG = 64 * 1024  # stream /dev/log: bytes waiting for a busy daemon at most
_FACILITY_USER, _FACILITY_DAEMON = 1, 3  # RFC 5424 section 6.2.1
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _syslog_severity(level: int) -> int:
    """RFC 5424 severity of a logging level: crit 2, err 3, warning 4, info 6, debug 7."""
    if level >= logging.CRITICAL:
        return 2
    if level >= logging.ERROR:
        return 3
    if level >= logging.WARNING:
        return 4
    return 6 if level >= logging.INFO else 7


def _is_udp_syslog(server: str) -> bool:
    """--syslog host:port is UDP; anything else (/dev/log) is a unix socket path."""
    return "/" not in server and ":" in server


class _SyslogHandler(logging.Handler):
    """Log records to syslog: RFC 5424 lines, or RFC 3164 (BSD) with *legacy*.

    The stdlib's SysLogHandler writes neither format in full and may block. Here each
    record is one non-blocking send over UDP or a unix datagram socket (such as
    /dev/log); when the receiver is full or gone the line is dropped, never waited for,
    and the number dropped is reported with the next line that gets through.

    A unix stream socket (syslog-ng's ``unix-stream``) gets NUL-terminated lines, as
    glibc's syslog() sends them. What the daemon cannot take at once waits, up to
    SYSLOG_STREAM_BACKLOG bytes, and goes out before the next line; past that, lines
    are dropped. A connection the daemon closed is made again for the next line.
    """

    def __init__(self, server: str, facility: int, legacy: bool) -> None:
        super().__init__()
        self.facility = facility
        self.legacy = legacy
        self.dropped = 0
        self.hostname = "".join(socket.gethostname().split()) or "-"
        self.address: Any = server
        self.stream = False
        self.unsent = bytearray()  # stream: the lines, or their tails, the daemon has not taken
        self.sock: Optional[socket.socket] = None
        if _is_udp_syslog(server):
            host, port = _split_address(server, "--syslog")
            try:
                family, _, _, _, self.address = socket.getaddrinfo(
                    host or None, port, 0, socket.SOCK_DGRAM
                )[0]
            except socket.gaierror as exc:
                raise ConfigError(f"--syslog: cannot resolve {host!r}: {exc}") from None
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
        else:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                probe.connect(server)
            except OSError as exc:
                if exc.errno != errno.EPROTOTYPE:
                    raise ConfigError(
                        f"--syslog: cannot send to {server}: {_strerror(exc)}"
                    ) from None
                self.stream = True  # a stream socket
            finally:
                probe.close()
            if self.stream:
                try:
                    self._connect_stream()
                except OSError as exc:
                    raise ConfigError(
                        f"--syslog: cannot connect to {server}: {_strerror(exc)}"
                    ) from None
                return
            # Unconnected: each line is sent to the path, so a restarted syslog is found again.
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)

    def line(self, record: logging.LogRecord, text: str) -> bytes:
        """The datagram for *record* with message *text*."""
        pri = self.facility * 8 + _syslog_severity(record.levelno)
        if self.legacy:  # RFC 3164: local time without a year, short host name, tag[pid]
            when = time.localtime(record.created)
            stamp = f"{_MONTHS[when.tm_mon - 1]} {when.tm_mday:2d} {when.tm_hour:02d}:"
            stamp += f"{when.tm_min:02d}:{when.tm_sec:02d}"
            host = self.hostname.split(".")[0]
            head = f"<{pri}>{stamp} {host} {SYSLOG_APP_NAME}[{os.getpid()}]: "
        else:  # RFC 5424: VERSION TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            stamp += f".{int(record.msecs * 1000):06d}Z"
            host = self.hostname[:255]
            head = f"<{pri}>1 {stamp} {host} {SYSLOG_APP_NAME} {os.getpid()} - - "
        return (head + text).encode("utf-8", "replace")[:SYSLOG_MAX_BYTES]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            datagram = self.line(record, self.format(record))
        except Exception:
            self.handleError(record)
            return
        if self._send(datagram) and self.dropped:
            dropped, self.dropped = self.dropped, 0
            warning = logging.LogRecord(_log.name, logging.WARNING, "", 0, "", None, None)
            self._send(self.line(warning, f"syslog: {dropped} earlier lines were dropped"))

    def _send(self, datagram: bytes) -> bool:
        if self.stream:
            return self._send_stream(datagram + b"\0")
        assert self.sock is not None
        try:
            self.sock.sendto(datagram, self.address)
        except OSError:  # full (EAGAIN), gone, restarting: drop the line, never wait
            self.dropped += 1
            return False
        return True

    def _send_stream(self, line: bytes) -> bool:
        """Queue *line* behind what is still unsent, and send what the daemon takes now."""
        if self.sock is None:
            try:
                self._connect_stream()
            except OSError:  # not back yet
                self.dropped += 1
                return False
        if len(self.unsent) + len(line) > SYSLOG_STREAM_BACKLOG:
            self.dropped += 1
            self._flush_stream()
            return False
        self.unsent += line
        return self._flush_stream()

    def _flush_stream(self) -> bool:
        assert self.sock is not None
        try:
            sent = self.sock.send(self.unsent)
        except BlockingIOError:
            return True  # the daemon is busy: the next line tries again
        except OSError:  # the daemon closed the connection: what it had not taken is lost
            self.dropped += self.unsent.count(b"\0")
            self.unsent.clear()
            self.sock.close()
            self.sock = None
            return False
        del self.unsent[:sent]
        return True

    def _connect_stream(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(self.address)  # at once for a unix socket, or EAGAIN when it is full
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            if self.unsent:
                self._flush_stream()  # a last try, still without waiting
            if self.sock is not None:
                self.sock.close()
        super().close()


def _configure_logging(options: Options) -> None:
    """Log lines to stderr (not once daemonized), --log-file and --syslog, as upstream does."""
    _log.setLevel(logging.DEBUG if options.verbose else logging.INFO)
    _log.propagate = False
    # No format below shows a record's source line, thread or process: finding them for
    # every record was a quarter of the Python work of a short connection (the logging
    # HOWTO's own "optimization" switches; this process is ours, main() runs it).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if not options.daemon:
        stderr = logging.StreamHandler(sys.stderr)
        stderr.setFormatter(logging.Formatter("%(message)s"))
        _log.addHandler(stderr)
    if options.log_file:
        try:
            to_file = logging.FileHandler(options.log_file)
        except OSError as exc:
            raise ConfigError(
                f"--log-file: cannot open {options.log_file}: {_strerror(exc)}"
            ) from None
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        _log.addHandler(to_file)
    if options.syslog:
        facility = _FACILITY_DAEMON if options.daemon else _FACILITY_USER
        to_syslog = _SyslogHandler(options.syslog, facility, options.legacy_syslog)
        to_syslog.setFormatter(logging.Formatter("%(message)s"))
        _log.addHandler(to_syslog)


# -- running as a service ----------------------------------------------------------------

_PATH_OPTIONS = (
    "cert",
    "key",
    "cafile",
    "ssl_target_cafile",
    "web",
    "record",
    "log_file",
    "pid_file",
    "key_password_file",
    "unix_listen",
    "unix_target",
)


def _absolute_paths(options: Options) -> Options:
    """*options* with every relative path made absolute, as a daemon works from /.

    Plugin sources and --syslog count as paths when they name something that exists.
    """
    changes: Dict[str, Any] = {}
    for name in _PATH_OPTIONS:
        value = getattr(options, name)
        if value:
            changes[name] = os.path.abspath(value)
    for name in ("token_source", "auth_source", "syslog"):
        value = getattr(options, name)
        udp = name == "syslog" and value and _is_udp_syslog(value)
        if value and not udp and not os.path.isabs(value) and os.path.exists(value):
            changes[name] = os.path.abspath(value)
    if options.wrap_cmd:  # looked for beside this file, whose name may be relative
        changes["rebind"] = _find_rebind(options.rebind)
    return options._replace(**changes)


def _daemonize() -> int:
    """Become a daemon: fork, new session, fork, work from /; return the readiness pipe.

    The original process does not return: it waits on the pipe and exits 0 when the
    daemon writes "ready" (its listeners are bound), or prints the error the daemon
    sends and exits 2, so a script can connect as soon as it gets its prompt back.
    """
    read_end, write_end = os.pipe()
    first = os.fork()
    if first:
        os.close(write_end)
        os.waitpid(first, 0)  # it exits at once, leaving the daemon to init
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.readline().decode("utf-8", "replace").rstrip("\n")
        if report == "ready":
            os._exit(0)
        if not report.startswith("error: "):
            report = "error: the daemon exited before it was ready"
        sys.stderr.write(f"websockify_min.py: {report}\n")
        sys.stderr.flush()
        os._exit(2)
    os.close(read_end)
    os.setsid()  # no controlling terminal: a closing shell cannot hang us up
    if os.fork():
        os._exit(0)  # the daemon is not a session leader: it can never get a terminal again
    os.chdir("/")
    return write_end


def _tell_parent(pipe: int, report: str) -> None:
    """Send the waiting parent "ready" or "error: ..." and close the pipe."""
    with contextlib.suppress(OSError):
        os.write(pipe, report.encode("utf-8", "replace") + b"\n")
    os.close(pipe)


def _detach_stdio() -> None:
    """Point standard input, output and error at /dev/null (logging goes on to files)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _write_pid_file(path: str) -> None:
    """Write our pid to *path*, unless it names another process that is still running."""
    try:
        with open(path) as file:
            old = int(file.read().strip() or 0)
    except (OSError, ValueError):
        old = 0
    if old and old != os.getpid() and _process_exists(old):
        raise ConfigError(f"--pid-file: {path} names process {old}, which is running")
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as file:
            file.write(f"{os.getpid()}\n")
        os.replace(temporary, path)  # never a half-written pid file
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise ConfigError(f"--pid-file: cannot write {path}: {_strerror(exc)}") from None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _remove_pid_file(path: str) -> None:
    """Remove *path* if it still holds our pid."""
    try:
        with open(path) as file:
            if file.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except OSError as exc:
        _log.warning("--pid-file: cannot remove %s: %s", path, _strerror(exc))


class _Identity(NamedTuple):
    """Who --user/--group make the proxy: a uid (None: keep it) and a gid."""

    uid: Optional[int]
    gid: int
    user: Optional[str]  # the user name, for its supplementary groups


def _identity(user: Optional[str], group: Optional[str]) -> Optional[_Identity]:
    """Look up --user and --group (names or numbers); None when neither is given.

    Checked before anything starts, so a mistake is one line and exit status 2.
    """
    if not user and not group:
        return None
    if os.geteuid() != 0:
        flag = "--user" if user else "--group"
        raise ConfigError(f"{flag}: changing user needs root (running as uid {os.geteuid()})")
    uid, gid, name = None, os.getgid(), None
    if user:
        try:
            account = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except KeyError:
            raise ConfigError(f"--user: no such user: {user!r}") from None
        uid, gid, name = account.pw_uid, account.pw_gid, account.pw_name
    if group:
        try:
            gid = (grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)).gr_gid
        except KeyError:
            raise ConfigError(f"--group: no such group: {group!r}") from None
    return _Identity(uid, gid, name)


def _drop_privileges(identity: _Identity) -> None:
    """Become *identity*: supplementary groups, then gid, then uid (the order that works).

    Done once the listeners are bound and the certificate, keys and plugins are loaded,
    so those may be readable by root alone.
    """
    try:
        if identity.user is not None:
            os.initgroups(identity.user, identity.gid)  # the user's own supplementary groups
        else:
            os.setgroups([])
        os.setgid(identity.gid)
        if identity.uid is not None:
            os.setuid(identity.uid)
    except OSError as exc:
        raise ConfigError(f"--user/--group: cannot switch: {_strerror(exc)}") from None
    _log.info("running as uid %d, gid %d", os.getuid(), os.getgid())


# === 13. main ===


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the proxy with *argv* (default: ``sys.argv[1:]``); return the exit status."""
    ready_pipe: Optional[int] = None
    pid_file: Optional[str] = None
    server: Optional[Server] = None
    try:
        options = parse_args(sys.argv[1:] if argv is None else argv)
        if options.daemon:
            options = _absolute_paths(options)
        identity = _identity(options.user, options.group)
        _configure_logging(options)  # before forking: the daemon keeps the log file open
        if options.libserver:
            _log.info("--libserver is accepted for compatibility and has no effect")
        if options.cafile and not options.verify_client:  # upstream accepts it too
            _log.warning("--cafile has no effect without --verify-client")
        if options.daemon:
            ready_pipe = _daemonize()
        server = Server(options)
        server.handle_signals()
        if options.pid_file:  # before listening: whoever can connect can read the pid
            _write_pid_file(options.pid_file)
            pid_file = options.pid_file
        server.bind()
        if identity is not None:
            _drop_privileges(identity)
    except ConfigError as exc:
        if pid_file:
            _remove_pid_file(pid_file)
        if server is not None:
            server.close()  # nobody may connect to a proxy that is not going to serve
        if ready_pipe is not None:
            _tell_parent(ready_pipe, f"error: {exc}")
        else:
            print(f"websockify_min.py: error: {exc}", file=sys.stderr)
        return 2
    if ready_pipe is not None:
        _detach_stdio()
        _tell_parent(ready_pipe, "ready")
    try:
        if options.workers > 1:
            return _Supervisor(options, server.hand_over_listeners()).run()
        return server.serve_forever()
    finally:
        if pid_file:
            _remove_pid_file(pid_file)


if __name__ == "__main__":
    sys.exit(main())
