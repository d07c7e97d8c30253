"""End to end under load and faults: no data lost, memory bounded, the right close codes.

Already covered in test_relay.py: a refused target (1011), a target or client that resets
mid-stream, a target that stops reading (backpressure, RSS), the heartbeat dropping a
silent client, SIGTERM with idle sessions.
"""

import asyncio
import hashlib
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import struct
import time
from typing import Dict, List, Tuple

import pytest
from conftest import (
    DEADLINE,
    ProxyFactory,
    free_port,
)

from websockify_min import unmask

pytestmark = pytest.mark.timeout(180)

RSS_BOUND_KIB = 60 * 1024  # the proxy's resident memory while a peer is held back


def listen_args() -> Tuple[str, Tuple[str, int]]:
    port = free_port()
    return f"127.0.0.1:{port}", ("127.0.0.1", port)


def raise_descriptor_limit(needed: int) -> None:
    """Let this process (and the proxy it starts) hold *needed* descriptors, or skip."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below the {needed} this test needs")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# -- 500 sessions, 1 MiB each way, checksummed at the far end ---------------------------------

SESSIONS = int(os.environ.get("FAULTS_SESSIONS", "500"))
SIZE = 1024 * 1024
POOL = random.Random(500).randbytes(4 * SIZE) if hasattr(random.Random, "randbytes") else b""
# How each session ends: a closing handshake after both directions are through; the client
# sending its close frame, or its FIN, right behind its last data; the target closing right
# behind its last data.
NORMAL, CLIENT_CLOSE_FRAME, CLIENT_FIN, TARGET_CLOSE = range(4)
ENDINGS = (NORMAL, CLIENT_CLOSE_FRAME, CLIENT_FIN, TARGET_CLOSE)


def session_data(index: int) -> Tuple[bytes, bytes]:
    """(what the client sends, what the target sends) for session *index*."""
    up, down = (index * 7919) % (3 * SIZE), (index * 104729 + SIZE // 3) % (3 * SIZE)
    return POOL[up : up + SIZE], POOL[down : down + SIZE]


async def read_server_frame(reader: asyncio.StreamReader) -> Tuple[int, bytes]:
    first, second = await reader.readexactly(2)
    assert not second & 0x80, "server frames are never masked"
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", await reader.readexactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", await reader.readexactly(8))[0]
    return first & 0x0F, await reader.readexactly(size)


def masked_frame(opcode: int, payload: bytes, rng: random.Random) -> bytes:
    mask = rng.getrandbits(32).to_bytes(4, "big")
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 0x10000:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    return head + mask + bytes(unmask(payload, mask))  # XOR both ways


async def target_side(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, verified: Dict[int, str]
) -> None:
    index, ending = struct.unpack("!II", await reader.readexactly(8))
    expected, mine = session_data(index)
    verified[index] = "started"
    received = hashlib.sha256()
    count = 0
    started = time.monotonic()

    async def read_all() -> None:
        nonlocal count
        while count < SIZE:
            chunk = await reader.read(min(65536, SIZE - count))
            if not chunk:
                raise AssertionError(f"target {index}: EOF after {count} bytes")
            received.update(chunk)
            count += len(chunk)

    async def send(data: bytes) -> None:
        for offset in range(0, len(data), 65536):
            writer.write(data[offset : offset + 65536])
            await writer.drain()

    try:
        if ending == TARGET_CLOSE:
            await asyncio.gather(read_all(), send(mine[: SIZE // 2]))
            writer.write(mine[SIZE // 2 :])
            await writer.drain()
            writer.close()  # right behind the last write
        elif ending == NORMAL:
            await asyncio.gather(read_all(), send(mine))
        else:  # the client leaves first: what it sent must still all arrive, then EOF
            sending = asyncio.ensure_future(send(mine))
            await read_all()
            sending.cancel()
        if ending != TARGET_CLOSE:
            assert await reader.read(1) == b"", f"target {index}: more than was sent"
        if received.digest() != hashlib.sha256(expected).digest():
            raise AssertionError(f"target {index}: checksum mismatch")
        verified[index] = "ok"
    except (ConnectionError, asyncio.CancelledError) as exc:
        verified[index] = (
            f"target {index}: {exc!r} after {count} bytes, {time.monotonic() - started:.1f}s"
        )
    except AssertionError as exc:
        verified[index] = str(exc)
    finally:
        writer.close()


async def client_side(address: Tuple[str, int], index: int, ending: int) -> None:
    rng = random.Random(index)
    mine, expected = session_data(index)
    reader, writer = await asyncio.open_connection(*address, limit=1 << 20)
    key = "dGhlIHNhbXBsZSBub25jZQ=="
    writer.write(
        (
            "GET /websockify HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101 "):
        raise AssertionError(f"{index}: {head[:60]!r}")
    count = 0  # bytes from the target so far, each compared with what it sent

    async def send_all() -> None:
        data = struct.pack("!II", index, ending) + mine
        offset = 0
        while offset < len(data):
            size = rng.randint(1, 65536)
            writer.write(masked_frame(0x2, data[offset : offset + size], rng))
            offset += size
            await writer.drain()
        if ending == CLIENT_CLOSE_FRAME:
            writer.write(masked_frame(0x8, struct.pack("!H", 1000), rng))
        elif ending == CLIENT_FIN:
            writer.write_eof()
        await writer.drain()

    async def read_until_close() -> Tuple[int, bytes]:
        nonlocal count
        while True:
            try:
                opcode, payload = await read_server_frame(reader)
            except asyncio.IncompleteReadError as exc:
                if exc.partial or ending != CLIENT_FIN:
                    raise
                return 0x8, b""  # after the client's FIN, the proxy just closes
            if opcode == 0x8:
                return opcode, payload
            if opcode != 0x2 or payload != expected[count : count + len(payload)]:
                raise AssertionError(f"{index}: corrupt data after {count} bytes")
            count += len(payload)
            if count == SIZE and ending == NORMAL:
                return opcode, b""

    try:
        if ending in (CLIENT_CLOSE_FRAME, CLIENT_FIN):
            _, (opcode, payload) = await asyncio.gather(send_all(), read_until_close())
            # Whatever came before the close is intact; the rest was cut off on purpose.
            if ending == CLIENT_FIN:
                if await reader.read():
                    raise AssertionError(f"{index}: data after the close")
            elif payload != struct.pack("!H", 1000):
                raise AssertionError(f"{index}: close {payload[:20]!r}")
            return
        await asyncio.gather(send_all(), read_until_close())
        if ending == NORMAL:
            writer.write(masked_frame(0x8, struct.pack("!H", 1000), rng))
            opcode, payload = await read_server_frame(reader)
            if (opcode, payload[:2]) != (0x8, struct.pack("!H", 1000)):
                raise AssertionError(f"{index}: expected close 1000, got {payload[:20]!r}")
        if count != SIZE:
            raise AssertionError(f"{index}: {count} of {SIZE} bytes")
        if ending == TARGET_CLOSE:
            writer.write(masked_frame(0x8, struct.pack("!H", 1000), rng))
        if await reader.read():  # the proxy closes after the closing handshake
            raise AssertionError(f"{index}: data after the closing handshake")
    finally:
        writer.close()


def serve_targets(conn: "multiprocessing.connection.Connection", sessions: int) -> None:
    """The targets, in a process of their own: sends its port, then what each session saw."""

    async def run() -> None:
        verified: Dict[int, str] = {}
        server = await asyncio.start_server(
            lambda r, w: target_side(r, w, verified), "127.0.0.1", 0, backlog=sessions * 2
        )
        conn.send(server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, conn.recv)  # the clients are done
        deadline = time.monotonic() + DEADLINE
        while sum(v != "started" for v in verified.values()) < sessions:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        server.close()
        conn.send(verified)

    asyncio.run(run())


@pytest.mark.skipif(not POOL, reason="needs random.randbytes (Python 3.9+) in the test runner")
def test_five_hundred_sessions_lose_no_data(start_proxy: ProxyFactory) -> None:
    raise_descriptor_limit(4 * SESSIONS + 200)
    # Clients here, targets in a process of their own: each side gets its own CPU share.
    context = multiprocessing.get_context("fork")
    conn, child_conn = context.Pipe()
    targets = context.Process(target=serve_targets, args=(child_conn, SESSIONS), daemon=True)
    targets.start()
    try:
        assert conn.poll(DEADLINE), "the target process did not start"
        port = conn.recv()
        listen, address = listen_args()
        start_proxy(listen, f"127.0.0.1:{port}", listen=address)

        async def run_clients() -> List[object]:
            clients = [client_side(address, i, ENDINGS[i % len(ENDINGS)]) for i in range(SESSIONS)]
            return await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), 150)

        results = asyncio.run(run_clients())
        conn.send("done")
        assert conn.poll(2 * DEADLINE), "the target process did not report"
        verified: Dict[int, str] = conn.recv()
    finally:
        targets.join(DEADLINE)
        if targets.is_alive():
            targets.kill()
    failures = [f"client {i}: {r!r}" for i, r in enumerate(results) if r is not None]
    failures += [message for message in verified.values() if message != "ok"]
    failures += [f"target {i}: never connected" for i in range(SESSIONS) if i not in verified]
    assert not failures, f"{len(failures)} sessions failed, e.g. {failures[:5]}"
