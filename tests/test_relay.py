"""End to end: the real proxy process between real WebSocket clients and real TCP targets."""

import hashlib
import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Callable, List, Tuple

import pytest
from conftest import (
    DEADLINE,
    ProxyFactory,
    RawClient,
    TcpServer,
    can_connect,
    client_frame,
    cpu_seconds,
    echo_checksummed,
    free_port,
    listen_args,
    listening_socket,
    open_files,
    rss_kib,
    wait_until,
    ws_url,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(120)


@pytest.mark.smoke
def test_echo_selects_binary_subprotocol(start_proxy: ProxyFactory, echo_server: TcpServer) -> None:
    listen, address = listen_args()
    start_proxy(listen, echo_server.target, listen=address)
    with connect(ws_url(address), subprotocols=["base64", "binary"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "binary"
        ws.send(b"\x00hello\xff")
        assert ws.recv(DEADLINE) == b"\x00hello\xff"
        ws.send("text frames reach the target as bytes")
        assert ws.recv(DEADLINE) == b"text frames reach the target as bytes"
    with connect(ws_url(address)) as ws:
        assert ws.subprotocol is None
        ws.send(b"no subprotocol offered")
        assert ws.recv(DEADLINE) == b"no subprotocol offered"


@pytest.mark.smoke
def test_ten_mebibytes_each_way_arrive_intact(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    listen, address = listen_args()
    start_proxy(listen, echo_server.target, listen=address)
    with connect(ws_url(address), max_size=None) as ws:
        echo_checksummed(ws, 10 * 1024 * 1024, 100_000)  # sizes that do not line up with reads


def test_two_hundred_concurrent_clients(start_proxy: ProxyFactory, echo_server: TcpServer) -> None:
    listen, address = listen_args()
    start_proxy(listen, echo_server.target, listen=address)
    clients = [RawClient.connect(address) for _ in range(200)]
    for number, client in enumerate(clients):
        client.send(0x2, f"client {number}".encode() * 10)
    for number, client in enumerate(clients):
        expected = f"client {number}".encode() * 10
        assert client.recv_data(len(expected)) == expected
        client.send(0x8, struct.pack("!H", 1000))
    for client in clients:
        assert client.recv_close()[0] == 1000
        assert client.at_eof()
        client.close()


def test_ipv6_and_host_names_on_both_sides(
    start_proxy: ProxyFactory, tcp_server: Callable[..., TcpServer]
) -> None:
    from conftest import echo_handler

    v6_target = tcp_server(echo_handler, "::1")
    port = free_port()
    start_proxy(f"[::1]:{port}", v6_target.target, listen=("::1", port))
    with connect(ws_url(("::1", port))) as ws:
        ws.send(b"over v6")
        assert ws.recv(DEADLINE) == b"over v6"

    # "localhost" may resolve to ::1 first; the target listens on 127.0.0.1 only, so this
    # passes only if every resolved address is tried in turn.
    v4_target = tcp_server(echo_handler, "127.0.0.1")
    port = free_port()
    start_proxy(str(port), f"localhost:{v4_target.port}", listen=("127.0.0.1", port))
    for host in ("127.0.0.1", "::1"):  # a bare port listens dual-stack
        with connect(ws_url((host, port))) as ws:
            ws.send(f"via {host}".encode())
            assert ws.recv(DEADLINE) == f"via {host}".encode()


def test_unix_target_and_unix_listener(
    start_proxy: ProxyFactory, tmp_path: Path, echo_server: TcpServer
) -> None:
    target_path = str(tmp_path / "target.sock")
    target = listening_socket(target_path)

    def serve() -> None:
        conn, _ = target.accept()
        with conn:
            conn.sendall(b"unix hello")
            data = conn.recv(100)
            conn.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    listen, address = listen_args()
    start_proxy("--unix-target", target_path, listen, listen=address)
    with connect(ws_url(address)) as ws:
        assert ws.recv(DEADLINE) == b"unix hello"
        ws.send(b"shout")
        assert ws.recv(DEADLINE) == b"SHOUT"
    target.close()

    listen_path = str(tmp_path / "proxy.sock")
    start_proxy(
        "--unix-listen", listen_path, "--unix-listen-mode", "660", echo_server.target,
        listen=listen_path,
    )  # fmt: skip
    assert os.stat(listen_path).st_mode & 0o777 == 0o660
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(DEADLINE)
    sock.connect(listen_path)
    client = RawClient(sock)
    assert client.handshake(protocols=["binary"])[0] == 101
    client.send(0x2, b"through a unix listener")
    assert client.recv_data(23) == b"through a unix listener"
    client.close()


def test_inetd_serves_the_listening_socket_on_stdin(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    listener = listening_socket(("127.0.0.1", 0))
    address = listener.getsockname()
    proxy = start_proxy("--inetd", echo_server.target, stdin=listener.fileno())
    listener.close()
    with connect(ws_url(address), open_timeout=DEADLINE) as ws:
        ws.send(b"inetd")
        assert ws.recv(DEADLINE) == b"inetd"
    proxy.stop()


def http_status(address: Tuple[str, int], request: bytes) -> Tuple[int, str]:
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        sock.sendall(request)
        client = RawClient(sock)
        status, head = client.read_response()
        assert client.at_eof(), "the proxy must close after an error response"
        return status, head


@pytest.mark.smoke
def test_bad_handshakes_get_http_errors(start_proxy: ProxyFactory, echo_server: TcpServer) -> None:
    listen, address = listen_args()
    proxy = start_proxy(listen, echo_server.target, listen=address)
    key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\n"
    cases = [
        ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", 426),  # a plain GET without --web
        ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
        (f"GET / HTTP/1.1\r\n{upgrade}{key}Sec-WebSocket-Version: 8\r\n\r\n", 426),
        (f"GET / HTTP/1.1\r\n{upgrade}Sec-WebSocket-Version: 13\r\n\r\n", 400),
        (f"GET / HTTP/1.0\r\n{upgrade}{key}Sec-WebSocket-Version: 13\r\n\r\n", 400),
        (f"GET / HTTP/1.1\r\nUpgrade: websocket\r\n{key}Sec-WebSocket-Version: 13\r\n\r\n", 400),
        ("GARBAGE\r\n\r\n", 400),
        ("GET / HTTP/1.1\r\nX: " + "a" * 20000 + "\r\n\r\n", 431),
    ]
    for request, expected in cases:
        status, head = http_status(address, request.encode())
        assert status == expected, (request[:60], head)
        if expected == 426:
            assert "Sec-WebSocket-Version: 13" in head
    assert "Path" not in proxy.log()  # none of them got as far as a WebSocket
    with connect(ws_url(address)) as ws:  # and the proxy still serves
        ws.send(b"still fine")
        assert ws.recv(DEADLINE) == b"still fine"


def test_handshake_deadline_drops_slow_clients(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    listen, address = listen_args()
    start_proxy("--handshake-timeout", "0.5", listen, echo_server.target, listen=address)
    slow = socket.create_connection(address, timeout=DEADLINE)
    slow.sendall(b"GET / HTTP/1.1\r\n")
    started = time.monotonic()
    with connect(ws_url(address)) as ws:  # others are served meanwhile
        ws.send(b"fast")
        assert ws.recv(DEADLINE) == b"fast"
    assert RawClient(slow).at_eof()
    assert 0.4 < time.monotonic() - started < 5
    slow.close()


VIOLATIONS = [
    (client_frame(0x2, b"unmasked", mask=None), 1002),
    (client_frame(0x2, b"rsv", rsv=4), 1002),
    (client_frame(0x3, b"reserved opcode"), 1002),
    (client_frame(0x9, b"fragmented ping", fin=False), 1002),
    (client_frame(0x9, b"x" * 126), 1002),
    (client_frame(0x0, b"continuation first"), 1002),
    (client_frame(0x1, b"\xff\xfe not utf-8"), 1007),
    (client_frame(0x8, struct.pack("!H", 1005)), 1002),
    (client_frame(0x8, struct.pack("!H", 1000) + b"\xc3"), 1007),
    (client_frame(0x8, b"\x03"), 1002),
    (client_frame(0x2, b"", length=2**63), 1002),
    (client_frame(0x2, b"", length=2**63 - 1), 1009),
    (client_frame(0x2, b"x" * 2000), 1009),  # over --max-message-size 1000
    (client_frame(0x2, b"x" * 600, fin=False) + client_frame(0x0, b"x" * 600), 1009),
    (client_frame(0x2, b"a", fin=False) + client_frame(0x2, b"b"), 1002),
]


@pytest.mark.smoke
def test_protocol_violations_close_with_the_right_code(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    listen, address = listen_args()
    start_proxy("--max-message-size", "1000", listen, echo_server.target, listen=address)
    bystander = RawClient.connect(address)
    for wire, code in VIOLATIONS:
        client = RawClient.connect(address)
        client.send(0x2, b"before")  # sent before the violation: must still arrive
        assert client.recv_data(6) == b"before"
        client.sock.sendall(wire)
        assert client.recv_close()[0] == code, wire[:20]
        assert client.at_eof()
        client.close()
        bystander.send(0x2, b"unharmed")
        assert bystander.recv_data(8) == b"unharmed"
    bystander.close()


def test_data_in_front_of_a_violation_is_delivered(
    start_proxy: ProxyFactory, tcp_server: Callable[..., TcpServer]
) -> None:
    received: List[bytes] = []
    done = threading.Event()

    def sink(conn: socket.socket) -> None:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            received.append(data)
        done.set()

    target = tcp_server(sink)
    listen, address = listen_args()
    start_proxy(listen, target.target, listen=address)
    client = RawClient.connect(address)
    client.sock.sendall(client_frame(0x2, b"kept") + client_frame(0x2, b"bad", mask=None))
    assert client.recv_close()[0] == 1002
    assert done.wait(DEADLINE)
    assert b"".join(received) == b"kept"


def test_ping_pong_and_close_handshake(start_proxy: ProxyFactory, echo_server: TcpServer) -> None:
    listen, address = listen_args()
    start_proxy(listen, echo_server.target, listen=address)
    client = RawClient.connect(address)
    client.send(0x9, b"are you there")
    assert client.recv_frame() == (0xA, b"are you there", True)
    client.send(0x2, b"frag", fin=False)
    client.send(0x9, b"between fragments")
    client.send(0x0, b"mented")
    # Data streams through as it arrives, so the echo and the pong may come in any order.
    frames = [client.recv_frame()]
    while sum(len(p) for op, p, _ in frames if op == 0x2) < 10 or len(frames) < 3:
        frames.append(client.recv_frame())
    assert (0xA, b"between fragments", True) in frames
    assert b"".join(p for op, p, _ in frames if op == 0x2) == b"fragmented"
    client.send(0x8, struct.pack("!H", 4000) + "bye ✓".encode())
    assert client.recv_close() == (4000, "")  # the code is echoed
    assert client.at_eof()


def test_heartbeat_pings_and_drops_a_silent_client(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    listen, address = listen_args()
    proxy = start_proxy("--heartbeat", "0.2", listen, echo_server.target, listen=address)
    with connect(ws_url(address)) as ws:  # answers pings by itself: stays connected
        time.sleep(1.2)  # several heartbeats' worth of time: the behaviour under test
        ws.send(b"alive")
        assert ws.recv(DEADLINE) == b"alive"
    silent = RawClient.connect(address)
    started = time.monotonic()
    pings = 0
    try:
        while True:
            opcode, _, _ = silent.recv_frame()
            pings += opcode == 0x9
    except ConnectionError:
        pass
    assert pings == 3
    assert 0.5 < time.monotonic() - started < 5
    proxy.wait_log("sent nothing for 3 pings")


def test_target_close_flushes_then_closes_with_1000(
    start_proxy: ProxyFactory, tcp_server: Callable[..., TcpServer]
) -> None:
    payload = os.urandom(3 * 1024 * 1024)

    def burst_then_close(conn: socket.socket) -> None:
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)

    target = tcp_server(burst_then_close)
    listen, address = listen_args()
    start_proxy(listen, target.target, listen=address)
    client = RawClient.connect(address)
    assert client.recv_data(len(payload)) == payload
    assert client.recv_close() == (1000, "Target closed")
    client.send(0x8, struct.pack("!H", 1000))
    assert client.at_eof()


def test_client_close_flushes_to_the_target_then_closes_it(
    start_proxy: ProxyFactory, tcp_server: Callable[..., TcpServer]
) -> None:
    received = hashlib.sha256()
    finished = threading.Event()

    def slow_sink(conn: socket.socket) -> None:
        time.sleep(0.3)  # let the proxy queue data for us before we read
        while True:
            data = conn.recv(65536)
            if not data:
                break
            received.update(data)
        finished.set()

    target = tcp_server(slow_sink)
    listen, address = listen_args()
    start_proxy(listen, target.target, listen=address)
    client = RawClient.connect(address)
    data = os.urandom(4 * 1024 * 1024)
    for offset in range(0, len(data), 65536):
        client.send(0x2, data[offset : offset + 65536])
    client.send(0x8, struct.pack("!H", 1000))
    assert client.recv_close()[0] == 1000
    assert finished.wait(30), "the target never saw EOF"
    assert received.hexdigest() == hashlib.sha256(data).hexdigest()


def test_unreachable_target_closes_with_1011(start_proxy: ProxyFactory) -> None:
    listen, address = listen_args()
    dead = free_port()
    proxy = start_proxy(listen, f"127.0.0.1:{dead}", listen=address)
    client = RawClient.connect(address)
    code, reason = client.recv_close()
    assert code == 1011
    assert "Connection refused" in reason
    proxy.wait_log("Failed to connect to 127.0.0.1")


def test_abrupt_resets_close_the_other_side(
    start_proxy: ProxyFactory, tcp_server: Callable[..., TcpServer]
) -> None:
    target_eof = threading.Event()

    def wait_eof(conn: socket.socket) -> None:
        while conn.recv(65536):
            pass
        target_eof.set()

    target = tcp_server(wait_eof)
    listen, address = listen_args()
    start_proxy(listen, target.target, listen=address)
    client = RawClient.connect(address)
    client.sock.sendall(client_frame(0x2, b"x" * 1000)[:500])  # half a frame, then RST
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    assert target_eof.wait(DEADLINE)

    def reset_target(conn: socket.socket) -> None:
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    resetting = tcp_server(reset_target)
    listen, address = listen_args()
    start_proxy(listen, resetting.target, listen=address)
    client = RawClient.connect(address)
    client.send(0x2, b"trigger")
    code, _ = client.recv_close()
    assert code in (1000, 1011)
    client.send(0x8, struct.pack("!H", 1000))
    assert client.at_eof()


def test_backpressure_bounds_memory_when_the_target_stops_reading(
    start_proxy: ProxyFactory, tcp_server: Callable[..., TcpServer]
) -> None:
    release = threading.Event()

    def stalled(conn: socket.socket) -> None:
        release.wait(60)

    target = tcp_server(stalled)
    listen, address = listen_args()
    proxy = start_proxy(listen, target.target, listen=address)
    client = RawClient.connect(address)
    client.sock.setblocking(False)
    frame = client_frame(0x2, os.urandom(65536))
    sent, last_progress = 0, time.monotonic()
    while time.monotonic() - last_progress < 1.0 and sent < 512 * 1024 * 1024:
        try:
            sent += client.sock.send(frame[sent % len(frame) :])  # resume a partial frame
            last_progress = time.monotonic()
        except BlockingIOError:
            time.sleep(0.01)
    release.set()
    # The proxy stopped reading: the client was held back after a few MiB of kernel
    # buffers, and the proxy's memory stayed small.
    assert sent < 64 * 1024 * 1024, sent
    assert rss_kib(proxy.pid) < 60 * 1024


def test_a_client_that_reads_no_downloads_still_uploads(
    start_proxy: ProxyFactory, tcp_server: Callable[..., TcpServer]
) -> None:
    """The directions are independent: a full download queue does not stop the upload."""
    upload = os.urandom(8 * 1024 * 1024)
    download_sent = [0]
    received = hashlib.sha256()
    received_size = [0]

    def talkative(conn: socket.socket) -> None:
        def send_forever() -> None:
            try:
                while True:
                    conn.sendall(b"d" * 65536)
                    download_sent[0] += 65536
            except OSError:
                pass  # the session ended

        threading.Thread(target=send_forever, daemon=True).start()
        while received_size[0] < len(upload):
            data = conn.recv(1 << 20)
            if not data:
                return
            received.update(data)
            received_size[0] += len(data)

    target = tcp_server(talkative)
    listen, address = listen_args()
    start_proxy(listen, target.target, listen=address)
    client = RawClient.connect(address)

    def download_stalled() -> bool:  # every buffer on the way to the client is full
        before = download_sent[0]
        time.sleep(0.5)
        return before > 0 and download_sent[0] == before

    wait_until(download_stalled, "the download to fill every buffer")
    for start in range(0, len(upload), 65536):
        client.sock.sendall(client_frame(0x2, upload[start : start + 65536]))
    wait_until(lambda: received_size[0] >= len(upload), "the whole upload at the target")
    assert received.digest() == hashlib.sha256(upload).digest()
    client.close()


def test_sigterm_closes_websockets_with_1001_and_exits_0(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    listen, address = listen_args()
    proxy = start_proxy(listen, echo_server.target, listen=address)
    clients = [RawClient.connect(address) for _ in range(3)]
    for client in clients:
        client.send(0x2, b"hi")
        assert client.recv_data(2) == b"hi"
    os.kill(proxy.pid, 15)
    for client in clients:
        assert client.recv_close() == (1001, "Server shutting down")
        client.send(0x8, struct.pack("!H", 1001))
    assert proxy.wait_exit() == 0


def test_run_once_timeout_and_idle_timeout_exit(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    listen, address = listen_args()
    proxy = start_proxy("--run-once", listen, echo_server.target, listen=address)
    with connect(ws_url(address)) as ws:
        ws.send(b"once")
        assert ws.recv(DEADLINE) == b"once"
    assert proxy.wait_exit() == 0

    listen, address = listen_args()
    started = time.monotonic()
    proxy = start_proxy("--idle-timeout", "1", listen, echo_server.target, listen=address)
    assert proxy.wait_exit() == 0
    assert time.monotonic() - started >= 0.9

    listen, address = listen_args()
    proxy = start_proxy("--timeout", "1", listen, echo_server.target, listen=address)
    with connect(ws_url(address)) as ws:  # a session open at the timeout keeps it alive
        wait_until(lambda: not can_connect(address), "the listener to close")
        ws.send(b"still here")
        assert ws.recv(DEADLINE) == b"still here"
    assert proxy.wait_exit() == 0


def test_out_of_descriptors_does_not_spin_and_recovers(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    import resource

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    listen, address = listen_args()
    proxy = start_proxy(listen, echo_server.target, listen=address, preexec_fn=low_limit)
    clients = [socket.create_connection(address, timeout=DEADLINE) for _ in range(60)]
    # Accepting pauses at the sessions the limit allows, or when accept() itself fails.
    wait_until(
        lambda: "new clients wait" in proxy.log() or "cannot accept" in proxy.log(),
        "accepting to pause",
    )
    before = cpu_seconds(proxy.pid)
    time.sleep(1.0)  # measuring CPU use over a second is the point here
    assert cpu_seconds(proxy.pid) - before < 0.3
    for sock in clients:
        sock.close()
    deadline = time.monotonic() + DEADLINE
    while True:  # accepted again once descriptors are free
        try:
            with connect(ws_url(address), open_timeout=2) as ws:
                ws.send(b"back")
                assert ws.recv(DEADLINE) == b"back"
                break
        except (OSError, TimeoutError, ConnectionClosed):
            assert time.monotonic() < deadline, "never recovered"


def test_traffic_marks_and_log_file(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    log_file = tmp_path / "proxy.log"
    listen, address = listen_args()
    proxy = start_proxy(
        "--traffic", "--log-file", str(log_file), listen, echo_server.target, listen=address
    )
    with connect(ws_url(address)) as ws:
        ws.send(b"marks")
        assert ws.recv(DEADLINE) == b"marks"
    proxy.stop()
    output = proxy.log()
    for mark in ("}", ">", "{", "<"):
        assert mark in output
    assert "WebSocket connection" in log_file.read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "Too few arguments"),
        (["6080"], "Too few arguments"),
        (["6080", "host:1", "extra"], "Too many arguments"),
        (["sixty", "host:1"], "listen port"),
        (["6080", "host:port"], "target port"),
        (["6080", "hostonly"], "Error parsing target"),
        (["--heartbeat", "x", "6080", "h:1"], "--heartbeat"),
        (["--token-source", "f", "6080", "h:1"], "--token-source requires --token-plugin"),
        (["--auth-source", "f", "6080", "h:1"], "--auth-source requires --auth-plugin"),
        (["--legacy-syslog", "6080", "h:1"], "--legacy-syslog requires --syslog"),
        (["--target-config", "t", "--token-plugin", "TokenFile", "6080"], "cannot be combined"),
        (["--ssl-only", "--cert", "/nonexistent.pem", "6080", "h:1"], "--ssl-only"),
        (["--ssl-version", "sslv3", "6080", "h:1"], "--ssl-version"),
        (["--unix-listen-mode", "999", "--unix-listen", "/tmp/x", "h:1"], "--unix-listen-mode"),
    ],
)
def test_bad_options_exit_2_with_one_line(
    start_proxy: ProxyFactory, args: List[str], message: str
) -> None:
    proxy = start_proxy(*args)
    assert proxy.wait_exit() == 2
    output = proxy.log().strip()
    assert len(output.splitlines()) == 1, output
    assert message in output
    assert "Traceback" not in output


def test_listen_port_in_use_is_a_startup_error(start_proxy: ProxyFactory) -> None:
    with listening_socket(("127.0.0.1", 0), backlog=1) as busy:
        port = busy.getsockname()[1]
        proxy = start_proxy(f"127.0.0.1:{port}", "127.0.0.1:1")
        assert proxy.wait_exit() == 2
        assert "cannot listen" in proxy.log()


def test_sessions_leave_no_descriptors_behind(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    listen, address = listen_args()
    proxy = start_proxy(listen, echo_server.target, listen=address)
    with connect(ws_url(address)) as ws:  # the first session starts the worker-free path
        ws.send(b"warm up")
        assert ws.recv(DEADLINE) == b"warm up"
    wait_until(lambda: "client closed the WebSocket" in proxy.log(), "the first session to end")
    # The warm-up session's sockets may still be closing: count only what opens from now on.
    baseline = open_files(proxy.pid)
    clients = [RawClient.connect(address) for _ in range(50)]
    for client in clients:  # an echo proves the session's target connection is up
        client.send(0x2, b"ping")
        assert client.recv_data(4) == b"ping"
    assert len(open_files(proxy.pid) - baseline) >= 100  # a client and a target socket each
    for number, client in enumerate(clients):
        if number % 3 == 0:
            client.send(0x8, struct.pack("!H", 1000))  # a clean close
            assert client.recv_close()[0] == 1000
        elif number % 3 == 1:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # the rest just drop the connection
    wait_until(lambda: open_files(proxy.pid) <= baseline, "every descriptor to be closed")
