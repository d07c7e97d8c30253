"""What the benchmark clients and targets agree on: the data, the stream header, frames.

Every stream a client opens starts with a 16-byte header telling the target what to do:
upload ("U": count the bytes that follow, then answer with their count and CRC), download ("D": send
that many bytes of the pattern), echo ("E": send back everything). The data is a fixed
pseudo-random pattern, so either side can tell what the right bytes are.
"""

import base64
import functools
import random
import struct
import zlib
from typing import Tuple

PATTERN_SIZE = 1 << 20
PATTERN = random.Random(20240601).randbytes(PATTERN_SIZE)
MASK = b"\x5a\x13\xc7\x8e"

HEADER = struct.Struct("!cB6xQ")  # mode, flags, length
VERIFY = 1  # flag: the sink also computes a CRC of everything it receives
REPLY = struct.Struct("!QI")  # what the upload sink answers: byte count, CRC (0 unless VERIFY)

OP_BINARY, OP_CLOSE = 0x2, 0x8
HANDSHAKE_KEY = base64.b64encode(b"websockify-bench").decode()


def stream_header(mode: bytes, length: int, verify: bool = False) -> bytes:
    return HEADER.pack(mode, VERIFY if verify else 0, length)


def parse_header(data: bytes) -> Tuple[bytes, bool, int]:
    mode, flags, length = HEADER.unpack(data)
    return mode, bool(flags & VERIFY), length


def masked_frame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    """A complete client frame: masked, as RFC 6455 requires of clients."""
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 0x10000:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    key = (MASK * (size // 4 + 1))[:size]
    body = (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        size, "little"
    )
    return head + MASK + body


CLOSE_FRAME = masked_frame(struct.pack("!H", 1000), OP_CLOSE)


def handshake_request(host: str = "127.0.0.1") -> bytes:
    return (
        "GET /websockify HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {HANDSHAKE_KEY}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: binary\r\n"
        "\r\n"
    ).encode("ascii")


def pattern_at(offset: int, size: int) -> memoryview:
    """*size* bytes (at most PATTERN_SIZE) of the endless pattern, from *offset*."""
    start = offset % PATTERN_SIZE
    if start + size <= PATTERN_SIZE:
        return memoryview(PATTERN)[start : start + size]
    return memoryview(PATTERN[start:] + PATTERN[: size - (PATTERN_SIZE - start)])


@functools.lru_cache(maxsize=None)
def repeated_crc(block: bytes, times: int) -> int:
    """CRC-32 of *block* repeated *times*."""
    crc = 0
    for _ in range(times):
        crc = zlib.crc32(block, crc)
    return crc


@functools.lru_cache(maxsize=None)
def pattern_crc(length: int) -> int:
    """CRC-32 of the first *length* bytes of the endless pattern."""
    crc, done = 0, 0
    while done < length:
        size = min(PATTERN_SIZE, length - done)
        crc = zlib.crc32(PATTERN[:size], crc)
        done += size
    return crc
