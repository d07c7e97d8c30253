"""End to end under load and faults: no data lost, memory bounded, the right close codes.

Already covered in test_relay.py: a refused target (1011), a target or client that resets
mid-stream, a target that stops reading (backpressure, RSS), the heartbeat dropping a
silent client, SIGTERM with idle sessions; SIGHUP in test_operations.py.
"""

import asyncio
import hashlib
import multiprocessing
import multiprocessing.connection
import os
import random
import resource
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
from conftest import (
    DEADLINE,
    Bystander,
    Proxy,
    ProxyFactory,
    RawClient,
    TcpServer,
    client_frame,
    listen_args,
    rss_kib,
    wait_until,
)
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(180)

RSS_BOUND_KIB = 60 * 1024  # the proxy's resident memory while a peer is held back


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
    return client_frame(opcode, payload, mask=rng.getrandbits(32).to_bytes(4, "big"))


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


@pytest.mark.timeout(300)
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
        # Deadlines far off: on a loaded machine 500 handshakes at once take a while, and
        # what is under test is the data, not the deadlines.
        start_proxy(
            "--handshake-timeout", "120", "--connect-timeout", "120",
            listen, f"127.0.0.1:{port}", listen=address,
        )  # fmt: skip

        async def run_clients() -> List[object]:
            clients = [client_side(address, i, ENDINGS[i % len(ENDINGS)]) for i in range(SESSIONS)]
            return await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), 240)

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


# -- target faults ------------------------------------------------------------------------------


def token_proxy(
    start_proxy: ProxyFactory, tmp_path: Path, targets: Dict[str, str], *options: str
) -> Tuple[Tuple[str, int], Proxy]:
    """A proxy choosing its target by token, so a bystander can reach a healthy one."""
    token_file = tmp_path / "tokens"
    token_file.write_text("".join(f"{token}: {target}\n" for token, target in targets.items()))
    listen, address = listen_args()
    proxy = start_proxy(
        "--token-plugin", "TokenFile", "--token-source", str(token_file), *options, listen,
        listen=address,
    )  # fmt: skip
    return address, proxy


def bystander_for(address: Tuple[str, int]) -> Bystander:
    return Bystander(RawClient.connect(address, path="/websockify?token=echo"))


def test_a_target_that_never_accepts_gets_1011_at_the_connect_deadline(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    # A listener whose backlog is full and that never accepts: the kernel drops further
    # SYNs, so a connect neither succeeds nor fails.
    deaf = socket.socket()
    deaf.bind(("127.0.0.1", 0))
    deaf.listen(0)
    fillers = []
    for _ in range(8):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(deaf.getsockname())
        fillers.append(filler)
    address, _ = token_proxy(
        start_proxy, tmp_path,
        {"echo": echo_server.target, "deaf": f"127.0.0.1:{deaf.getsockname()[1]}"},
        "--connect-timeout", "1",
    )  # fmt: skip
    bystander = bystander_for(address)
    started = time.monotonic()
    client = RawClient.connect(address, path="/websockify?token=deaf")
    code, reason = client.recv_close()
    assert (code, "timed out" in reason) == (1011, True), reason
    assert 0.9 < time.monotonic() - started < 1 + DEADLINE
    bystander.close()
    for sock in [*fillers, deaf]:
        sock.close()


def test_a_target_that_accepts_and_resets_at_once(
    start_proxy: ProxyFactory, echo_server: TcpServer, tcp_server: Callable[..., TcpServer],
    tmp_path: Path,
) -> None:  # fmt: skip
    def reset(conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    resetting = tcp_server(reset)
    address, _ = token_proxy(
        start_proxy, tmp_path, {"echo": echo_server.target, "reset": resetting.target}
    )
    bystander = bystander_for(address)
    for _ in range(20):
        client = RawClient.connect(address, path="/websockify?token=reset")
        code, _reason = client.recv_close()
        assert code in (1000, 1011), code  # an EOF or a reset, depending on timing
        client.send(0x8, struct.pack("!H", 1000))
        assert client.at_eof()
        client.close()
    bystander.close()


# -- client faults ------------------------------------------------------------------------------


class Flood:
    """A target handler that sends a known stream as fast as the proxy takes it."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._pattern = random.Random(total).randbytes(1024 * 1024 + 7)  # repeated: no 200 MiB
        self._twice = self._pattern * 2
        self.sent = 0
        self.conn: socket.socket | None = None
        self.done = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        self.conn = conn
        conn.settimeout(0.2)
        while self.sent < self.total:
            try:
                start = self.sent % len(self._pattern)
                self.sent += conn.send(self._twice[start : start + 65536])
            except socket.timeout:
                continue
        self.done.set()
        conn.settimeout(DEADLINE)
        while conn.recv(65536):  # until the proxy closes
            pass

    def prefix(self, size: int) -> bytes:
        """The first *size* bytes of the stream."""
        return (self._pattern * (size // len(self._pattern) + 1))[:size]

    def wait_stalled(self, what: str) -> None:
        """Wait until the proxy stops taking data (its count stays put for a while)."""
        last, steady_since = -1, time.monotonic()

        def stalled() -> bool:
            nonlocal last, steady_since
            if self.sent != last:
                last, steady_since = self.sent, time.monotonic()
            return time.monotonic() - steady_since > 0.5

        wait_until(stalled, what, timeout=30)


def read_stream(client: RawClient, size: int) -> bytes:
    """At least *size* payload bytes (whole frames), gathered without quadratic copying."""
    parts, got = [], 0
    while got < size:
        opcode, payload, _ = client.recv_frame()
        assert opcode == 0x2, opcode
        parts.append(payload)
        got += len(payload)
    return b"".join(parts)


@pytest.mark.skipif(not POOL, reason="needs random.randbytes (Python 3.9+) in the test runner")
def test_a_client_that_stops_reading_while_the_target_floods(
    start_proxy: ProxyFactory, tcp_server: Callable[..., TcpServer]
) -> None:
    flood = Flood(200 * 1024 * 1024)
    target = tcp_server(flood)
    listen, address = listen_args()
    proxy = start_proxy(listen, target.target, listen=address)
    client = RawClient.connect(address)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    flood.wait_stalled("the target to be held back")
    # Held back after kernel buffers and the proxy's high-water mark, not after 200 MiB.
    assert flood.sent < 32 * 1024 * 1024, flood.sent
    assert rss_kib(proxy.pid) < RSS_BOUND_KIB
    # Reading again, the client gets the stream intact, and the rest follows.
    received = read_stream(client, 32 * 1024 * 1024)
    if received != flood.prefix(len(received)):
        raise AssertionError("the data read after the stall is corrupt")
    assert flood.sent >= len(received)
    client.close()


def test_heartbeat_drops_a_peer_that_neither_reads_nor_answers(
    start_proxy: ProxyFactory, tcp_server: Callable[..., TcpServer]
) -> None:
    flood = Flood(64 * 1024 * 1024)
    target = tcp_server(flood)
    listen, address = listen_args()
    proxy = start_proxy("--heartbeat", "0.3", listen, target.target, listen=address)
    client = RawClient.connect(address)  # never reads, never answers: a dead peer
    started = time.monotonic()
    proxy.wait_log("sent nothing for 3 pings")  # MISSED_PONGS, though its queue is full
    assert 0.3 * 3 <= time.monotonic() - started < 0.3 * 3 + DEADLINE
    assert client.at_eof()  # what was queued for it, then the end
    client.close()


# -- signals ----------------------------------------------------------------------------------


def tcp_queues(local_port: int, remote_port: int) -> Tuple[int, int]:
    """(tx_queue, rx_queue) of the loopback TCP socket with these ports, from /proc/net/tcp."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1].split(":")[1], fields[2].split(":")[1]
        if (int(local, 16), int(remote, 16)) == (local_port, remote_port):
            tx, rx = fields[4].split(":")
            return int(tx, 16), int(rx, 16)
    raise AssertionError(f"no socket {local_port} -> {remote_port}")


@pytest.mark.skipif(not POOL, reason="needs random.randbytes (Python 3.9+) in the test runner")
def test_sigterm_delivers_everything_queued_then_closes_with_1001(
    start_proxy: ProxyFactory, tcp_server: Callable[..., TcpServer], echo_server: TcpServer
) -> None:
    flood = Flood(64 * 1024 * 1024)
    target = tcp_server(flood)
    listen, address = listen_args()
    proxy = start_proxy(listen, target.target, listen=address)
    client = RawClient.connect(address)  # reads nothing until the proxy is told to stop
    flood.wait_stalled("the proxy's queue for the client to fill")
    assert flood.conn is not None
    target_port, proxy_port = flood.conn.getsockname()[1], flood.conn.getpeername()[1]
    target_unsent, _ = tcp_queues(target_port, proxy_port)
    _, proxy_unread = tcp_queues(proxy_port, target_port)
    taken_by_proxy = flood.sent - target_unsent - proxy_unread
    os.kill(proxy.pid, signal.SIGTERM)
    # Every byte the proxy took from the target reaches the client, then the 1001.
    received = bytearray()
    while True:
        opcode, payload, _ = client.recv_frame()
        if opcode == 0x8:
            assert struct.unpack("!H", payload[:2])[0] == 1001
            break
        received += payload
    assert len(received) == taken_by_proxy, (len(received), taken_by_proxy)
    if received != flood.prefix(len(received)):
        raise AssertionError("the data before the 1001 is corrupt")
    client.send(0x8, struct.pack("!H", 1001))
    assert proxy.wait_exit() == 0


def test_a_client_flooding_pings_it_never_reads_is_held_back(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    listen, address = listen_args()
    proxy = start_proxy(listen, echo_server.target, listen=address)
    bystander = Bystander(RawClient.connect(address))
    client = RawClient.connect(address)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.sock.setblocking(False)
    pings = b"".join(client_frame(0x9, os.urandom(125)) for _ in range(512))
    sent, last_progress = 0, time.monotonic()
    while time.monotonic() - last_progress < 1.0 and sent < 256 * 1024 * 1024:
        try:
            sent += client.sock.send(pings[sent % len(pings) :])
            last_progress = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)  # polling a non-blocking send is the measurement here
    # Its pongs pile up only to the high-water mark; then the proxy stops reading it.
    assert sent < 64 * 1024 * 1024, sent
    assert rss_kib(proxy.pid) < RSS_BOUND_KIB
    bystander.close()
    client.close()


def test_heartbeat_spares_a_client_held_back_for_a_slow_target(
    start_proxy: ProxyFactory, tcp_server: Callable[..., TcpServer]
) -> None:
    """While the proxy stops reading a client because the target is slow, the client's
    pongs wait unread: they are late, not missing."""
    release = threading.Event()
    received = hashlib.sha256()

    def slow_then_sink(conn: socket.socket) -> None:
        release.wait(DEADLINE)
        while True:
            data = conn.recv(65536)
            if not data:
                return
            received.update(data)

    target = tcp_server(slow_then_sink)
    listen, address = listen_args()
    proxy = start_proxy("--heartbeat", "0.2", listen, target.target, listen=address)
    data = os.urandom(16 * 1024 * 1024)
    with connect(f"ws://127.0.0.1:{address[1]}/", max_size=None) as ws:  # answers pings

        def send_all() -> None:
            for offset in range(0, len(data), 65536):
                ws.send(data[offset : offset + 65536])

        sender = threading.Thread(target=send_all)
        sender.start()
        time.sleep(1.5)  # the target stalls for 7 heartbeats: the behaviour under test
        release.set()
        sender.join(60)
        assert not sender.is_alive()
        ws.send(b"")  # still open: this goes through
    wait_until(lambda: received.digest() == hashlib.sha256(data).digest(), "all the data")
    assert "sent nothing for" not in proxy.log()
