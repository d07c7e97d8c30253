"""Benchmark clients: raw sockets, frames built before the clock starts, results verified.

``ws=True`` speaks WebSocket to a proxy; ``ws=False`` sends the same bytes over plain TCP
(socat: the relay limit). Every function raises BenchError when the bytes are wrong.
"""

import os
import selectors
import socket
import ssl
import struct
import threading
import time
import zlib
from typing import List, Optional, Tuple

from wire import (
    CLOSE_FRAME,
    OP_CLOSE,
    PATTERN,
    REPLY,
    handshake_request,
    masked_frame,
    pattern_crc,
    repeated_crc,
    stream_header,
)

Address = Tuple[str, int]
TIMEOUT = 60.0  # seconds any one blocking step may take
UPLOAD_FRAME = 64 * 1024  # payload bytes per client frame
FRAMES_PER_SEND = 16  # frames handed to the kernel per sendall


class BenchError(Exception):
    """A client got wrong bytes or no answer."""


# A blocking socket with kernel timeouts: one system call per send or receive, where a
# Python timeout would poll before each (the client must cost little next to the proxy).
KERNEL_TIMEOUT = struct.pack("ll", int(TIMEOUT), 0)


def connect(address: Address, tls: Optional[ssl.SSLContext] = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, KERNEL_TIMEOUT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, KERNEL_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname="localhost")
    return sock


def read_upgrade(sock: socket.socket) -> bytes:
    """Read the 101 response; return what came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise BenchError(f"closed during the handshake: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise BenchError(f"handshake refused: {head[:200]!r}")
    return rest


HANDSHAKE = handshake_request()


def open_ws(address: Address, tls: Optional[ssl.SSLContext] = None) -> Tuple[socket.socket, bytes]:
    sock = connect(address, tls)
    sock.sendall(HANDSHAKE)
    return sock, read_upgrade(sock)


class FrameReader:
    """Server frames from a socket, payload bytes counted (and CRC'd or kept if asked)."""

    def __init__(
        self, sock: socket.socket, verify: bool = False, keep: bool = False, size: int = 1 << 20
    ) -> None:
        self.sock = sock
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.pending = bytearray()  # the start of a frame header split across reads
        self.left = 0  # payload bytes still to come in the current frame
        self.opcode = 0
        self.payload = 0  # data payload bytes so far
        self.crc = 0
        self.verify = verify
        self.kept: Optional[bytearray] = bytearray() if keep else None
        self.closed = False

    def feed(self, data: memoryview) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self.left:
                take = min(self.left, end - pos)
                if self.opcode != OP_CLOSE:
                    chunk = data[pos : pos + take]
                    self.payload += take
                    if self.verify:
                        self.crc = zlib.crc32(chunk, self.crc)
                    if self.kept is not None:
                        self.kept += chunk
                self.left -= take
                pos += take
                continue
            before = len(self.pending)
            head = self.pending + data[pos : pos + 10]
            used = self._header(head)
            if not used:
                self.pending = head
                return
            pos += used - before
            self.pending = bytearray()

    def _header(self, head: bytearray) -> int:
        if len(head) < 2:
            return 0
        if head[1] & 0x80:
            raise BenchError("the server masked a frame")
        size, used = head[1] & 0x7F, 2
        if size == 126:
            if len(head) < 4:
                return 0
            size, used = struct.unpack_from("!H", head, 2)[0], 4
        elif size == 127:
            if len(head) < 10:
                return 0
            size, used = struct.unpack_from("!Q", head, 2)[0], 10
        self.opcode, self.left = head[0] & 0x0F, size
        if self.opcode == OP_CLOSE:
            self.closed = True
        return used

    def read_some(self) -> int:
        size = self.sock.recv_into(self.buffer)
        if size:
            self.feed(self.view[:size])
        return size

    def read_payload(self, total: int) -> None:
        while self.payload < total:
            if not self.read_some():
                raise BenchError(f"closed after {self.payload} of {total} bytes")
            if self.closed and self.payload < total:
                raise BenchError(f"close frame after {self.payload} of {total} bytes")


def _close_ws(sock: socket.socket) -> None:
    """Close frame, then wait for the server to close (bounded by the socket timeout)."""
    try:
        sock.sendall(CLOSE_FRAME)
        while sock.recv(65536):
            pass
    except OSError:
        pass
    finally:
        sock.close()


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise BenchError(f"closed after {len(data)} of {size} bytes")
        data += chunk
    return data


# -- 1, 7: upload --------------------------------------------------------------------------


def upload(
    address: Address, total: int, ws: bool, tls: Optional[ssl.SSLContext], verify: bool
) -> float:
    """Send *total* payload bytes in 64 KiB frames; seconds until the sink confirmed them."""
    block = PATTERN[:UPLOAD_FRAME]
    frames = total // UPLOAD_FRAME
    total = frames * UPLOAD_FRAME
    frame = masked_frame(block)
    burst = frame * FRAMES_PER_SEND
    if ws:
        sock, _ = open_ws(address, tls)
        first = masked_frame(stream_header(b"U", total, verify))
        expected_count, expected_crc = total, repeated_crc(block, frames)
    else:  # the frames go through unchanged, headers and all
        sock = connect(address, tls)
        length = frames * len(frame)
        first = stream_header(b"U", length, verify)
        expected_count, expected_crc = length, repeated_crc(frame, frames)
    try:
        start = time.perf_counter()
        sock.sendall(first)
        left = frames
        while left >= FRAMES_PER_SEND:
            sock.sendall(burst)
            left -= FRAMES_PER_SEND
        for _ in range(left):
            sock.sendall(frame)
        if ws:
            reader = FrameReader(sock, keep=True)
            while reader.payload < REPLY.size:
                if not reader.read_some():
                    raise BenchError("closed before the sink answered")
            assert reader.kept is not None
            reply = bytes(reader.kept[: REPLY.size])
        else:
            reply = _recv_exact(sock, REPLY.size)
        elapsed = time.perf_counter() - start
    finally:
        if ws:
            _close_ws(sock)
        else:
            sock.close()
    count, crc = REPLY.unpack(reply)
    if count != expected_count:
        raise BenchError(f"upload: the sink got {count} bytes, not {expected_count}")
    if verify and crc != expected_crc:
        raise BenchError("upload: the sink got different bytes")
    return elapsed


# -- 2, 7: download ------------------------------------------------------------------------


def download(
    address: Address, total: int, ws: bool, tls: Optional[ssl.SSLContext], verify: bool
) -> float:
    """Ask for *total* bytes; seconds until all arrived (frame headers parsed, bytes counted)."""
    if ws:
        sock, rest = open_ws(address, tls)
        request = masked_frame(stream_header(b"D", total))
    else:
        sock, rest = connect(address, tls), b""
        request = stream_header(b"D", total)
    try:
        start = time.perf_counter()
        sock.sendall(request)
        if ws:
            reader = FrameReader(sock, verify=verify)
            if rest:
                reader.feed(memoryview(rest))
            reader.read_payload(total)
            got, crc = reader.payload, reader.crc
        else:
            got, crc = _read_raw(sock, total, verify)
        elapsed = time.perf_counter() - start
    finally:
        if ws:
            _close_ws(sock)
        else:
            sock.close()
    if got != total:
        raise BenchError(f"download: got {got} bytes, not {total}")
    if verify and crc != pattern_crc(total):
        raise BenchError("download: wrong bytes")
    return elapsed


def _read_raw(sock: socket.socket, total: int, verify: bool) -> Tuple[int, int]:
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    got = crc = 0
    while got < total:
        size = sock.recv_into(buffer)
        if not size:
            raise BenchError(f"closed after {got} of {total} bytes")
        if verify:
            crc = zlib.crc32(view[:size], crc)
        got += size
    return got, crc


# -- 3: echo latency -----------------------------------------------------------------------


def echo_latency(address: Address, count: int, ws: bool) -> List[float]:
    """Round trips of 32-byte messages, in seconds, one at a time."""
    payload = PATTERN[:32]
    if ws:
        sock, rest = open_ws(address)
        sock.sendall(masked_frame(stream_header(b"E", 0)))
        message, reply = masked_frame(payload), bytes((0x82, 32)) + payload
    else:
        sock, rest = connect(address), b""
        sock.sendall(stream_header(b"E", 0))
        message = reply = masked_frame(payload)  # socat relays it unchanged
    if rest:
        raise BenchError("unexpected data after the handshake")
    size = len(reply)
    times: List[float] = []
    clock = time.perf_counter
    try:
        for _ in range(count):
            start = clock()
            sock.sendall(message)
            got = sock.recv(size)
            while len(got) < size:
                more = sock.recv(size - len(got))
                if not more:
                    raise BenchError("closed during the echo test")
                got += more
            times.append(clock() - start)
            if got != reply:
                raise BenchError(f"echo: wrong reply {got!r}")
    finally:
        if ws:
            _close_ws(sock)
        else:
            sock.close()
    return times


# -- 5: connection rate --------------------------------------------------------------------


ECHO_PAYLOAD = PATTERN[:32]
ECHO_REQUEST = stream_header(b"E", 0) + ECHO_PAYLOAD
ECHO_REQUEST_FRAME = masked_frame(ECHO_REQUEST)
ECHO_REPLY_FRAME = bytes((0x82, 32)) + ECHO_PAYLOAD


def one_connection(address: Address, ws: bool) -> None:
    """Handshake, one 32-byte echo, close: what a short-lived client does."""
    if ws:
        sock, rest = open_ws(address)
        sock.sendall(ECHO_REQUEST_FRAME)
        expected = ECHO_REPLY_FRAME
    else:
        sock, rest = connect(address), b""
        sock.sendall(ECHO_REQUEST)
        expected = ECHO_PAYLOAD
    got = rest
    try:
        while len(got) < len(expected):
            more = sock.recv(4096)
            if not more:
                raise BenchError("closed before the echo")
            got += more
        if ws:  # the echo may come back in two frames if the target read it in two parts
            reader = FrameReader(sock, size=4096)
            reader.feed(memoryview(got))
            if reader.payload < 32:
                reader.read_payload(32)
        elif got != expected:
            raise BenchError("connection test: wrong echo")
    finally:
        if ws:
            _close_ws(sock)
        else:
            sock.close()


def connection_rate(address: Address, seconds: float, parallel: int, ws: bool = True) -> float:
    """Connections per second, *parallel* at a time, each as one_connection() does.

    One at a time, a blocking loop (one system call per step); more, one thread drives
    them all with a selector, as client threads would spend the CPU the proxy needs on
    switching among themselves. With *ws* false the same exchange is plain TCP, no
    handshake, and the client closes: straight to the target, the ceiling the client
    and target set without any proxy between them.
    """
    done = 0
    stop_at = time.perf_counter() + seconds
    if parallel == 1:
        start = time.perf_counter()
        while time.perf_counter() < stop_at:
            one_connection(address, ws)
            done += 1
        return done / (time.perf_counter() - start)
    sel = selectors.DefaultSelector()

    def start_one() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect_ex(address)
        sel.register(sock, selectors.EVENT_WRITE, _Short(sock))

    def step(conn: "_Short") -> bool:
        """Advance *conn*; True once the server has closed it after the echo."""
        sock = conn.sock
        if conn.state == "connect":
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                raise BenchError(f"connect: {os.strerror(error)}")
            sock.send(HANDSHAKE if ws else ECHO_REQUEST)
            conn.state = "upgrade" if ws else "raw echo"
            sel.modify(sock, selectors.EVENT_READ, conn)
            return False
        data = sock.recv(4096)
        if not data:
            if conn.state != "close":
                raise BenchError(f"closed by the server in state {conn.state}")
            return True
        if conn.state == "raw echo":
            conn.head += data
            if len(conn.head) < len(ECHO_PAYLOAD):
                return False
            if conn.head != ECHO_PAYLOAD:
                raise BenchError("connection test: wrong echo")
            return True  # the client closes
        if conn.state == "upgrade":
            conn.head += data
            if b"\r\n\r\n" not in conn.head:
                return False
            head, _, rest = conn.head.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise BenchError(f"handshake refused: {head[:200]!r}")
            conn.state = "echo"
            sock.send(ECHO_REQUEST_FRAME)
            data = rest
        if conn.state == "echo" and data:
            conn.reader.feed(memoryview(data))
            if conn.reader.payload >= len(ECHO_PAYLOAD):
                if bytes(conn.reader.kept or b"") != ECHO_PAYLOAD:
                    raise BenchError("connection test: wrong echo")
                sock.send(CLOSE_FRAME)
                conn.state = "close"
        return False  # "close": the close frame; then the server closes

    for _ in range(parallel):
        start_one()
    active, deadline = parallel, time.monotonic() + seconds + TIMEOUT
    start = time.perf_counter()
    try:
        while active:
            if time.monotonic() > deadline:
                raise BenchError("connection test: timed out")
            for key, _ in sel.select(1.0):
                conn = key.data
                if not step(conn):
                    continue
                sel.unregister(conn.sock)
                conn.sock.close()
                done += 1
                if time.perf_counter() < stop_at:
                    start_one()
                else:
                    active -= 1
        elapsed = time.perf_counter() - start
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        sel.close()
    return done / elapsed


class _Short:
    """One short connection of connection_rate()."""

    __slots__ = ("head", "reader", "sock", "state")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.state = "connect"
        self.head = b""
        self.reader = FrameReader(sock, keep=True, size=0)


# -- 6: many sessions at once --------------------------------------------------------------


def parallel_download(address: Address, sessions: int, each: int, ws: bool) -> float:
    """*sessions* downloads of *each* bytes at once; seconds until the last one finished."""
    socks = []
    readers = []
    sel = selectors.DefaultSelector()
    try:
        for _ in range(sessions):
            if ws:
                sock, rest = open_ws(address)
            else:
                sock, rest = connect(address), b""
            if rest:
                raise BenchError("unexpected data after the handshake")
            socks.append(sock)
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        start = time.perf_counter()
        request = stream_header(b"D", each)
        for sock in socks:
            sock.sendall(masked_frame(request) if ws else request)
            sock.setblocking(False)
            reader = FrameReader(sock)
            readers.append(reader)
            sel.register(sock, selectors.EVENT_READ, reader)
        left = sessions
        raw_counts = {id(r): 0 for r in readers}
        deadline = time.monotonic() + TIMEOUT
        while left:
            if time.monotonic() > deadline:
                raise BenchError("parallel download: timed out")
            for key, _ in sel.select(1.0):
                reader = key.data
                try:
                    size = reader.sock.recv_into(buffer)
                except BlockingIOError:
                    continue
                if not size:
                    raise BenchError("parallel download: a session closed early")
                if ws:
                    reader.feed(view[:size])
                    got = reader.payload
                else:
                    raw_counts[id(reader)] += size
                    got = raw_counts[id(reader)]
                if got >= each:
                    if got > each:
                        raise BenchError("parallel download: too many bytes")
                    sel.unregister(reader.sock)
                    left -= 1
        elapsed = time.perf_counter() - start
    finally:
        sel.close()
        for sock in socks:
            if ws:
                sock.setblocking(True)
                sock.settimeout(5.0)
                _close_ws(sock)
            else:
                sock.close()
    return elapsed


# -- 4: idle sessions ----------------------------------------------------------------------


def hold_sessions(address: Address, count: int, timeout: float) -> List[socket.socket]:
    """Open up to *count* WebSocket sessions and leave them idle; stop at the first failure."""
    socks: List[socket.socket] = []
    deadline = time.monotonic() + timeout
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            sock = socket.create_connection(address, timeout=5.0)
            sock.sendall(HANDSHAKE)
            read_upgrade(sock)
        except (OSError, BenchError):
            break
        socks.append(sock)
    return socks


def parallel_upload(address: Address, sessions: int, each: int) -> float:
    """*sessions* uploads of *each* bytes at once (a thread each: sendall releases the GIL);
    seconds until the last sink confirmed its bytes."""
    errors: List[BaseException] = []
    start_together = threading.Barrier(sessions + 1)

    def one() -> None:
        try:
            start_together.wait()
            upload(address, each, True, None, False)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(sessions)]
    for thread in threads:
        thread.start()
    start_together.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise BenchError(f"parallel upload: {errors[0]!r}")
    return elapsed


def still_open(socks: List[socket.socket]) -> int:
    """How many of these idle sessions the server still holds: nothing to read, no EOF."""
    alive = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            sock.recv(1, socket.MSG_PEEK)  # data here is a close frame; b"" is EOF
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive
