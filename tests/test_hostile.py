"""End to end: hostile clients get their documented answer, and nobody else notices.

Every attack runs next to a healthy WebSocket session (a Bystander echoing in a thread)
that must keep working throughout. Protocol violations inside a WebSocket (2**63-byte
lengths, oversized messages, fragmented control frames, bad close codes and reasons) are
in test_relay.py::test_protocol_violations_close_with_the_right_code, a stalled TLS
ClientHello in test_tls.py::test_stalled_tls_handshake_delays_no_one.
"""

import base64
import random
import resource
import socket
import struct
import time
from pathlib import Path
from typing import Callable, List, Tuple

import pytest
from conftest import (
    DEADLINE,
    Bystander,
    Pki,
    Proxy,
    ProxyFactory,
    RawClient,
    TcpServer,
    cpu_seconds,
    descriptor_count,
    echo_handler,
    listen_args,
    rss_kib,
    upgrade_head,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)


def upgrade_request(path: str = "/websockify", *headers: str) -> bytes:
    return upgrade_head(path, headers).encode("latin-1")  # header values may be any byte


def answer_to(address: Tuple[str, int], request: bytes) -> int:
    """The HTTP status the proxy answers *request* with (the connection then closes)."""
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        sock.sendall(request)
        client = RawClient(sock)
        status, _ = client.read_response()
        if status != 101:
            assert client.at_eof(), "the proxy must close after an error response"
        return status


def start_with_bystander(
    start_proxy: ProxyFactory,
    *args: str,
    connect: Callable[[Tuple[str, int]], RawClient] = RawClient.connect,
    **kwargs: object,
) -> Tuple[Tuple[str, int], Bystander, Proxy]:
    """Start a proxy with *args* (options, then the target if any) and a bystander session
    that *connect* opens."""
    listen, address = listen_args()
    if args and not args[-1].startswith("-") and (len(args) < 2 or args[-2] != "--token-source"):
        args = (*args[:-1], listen, args[-1])
    else:
        args = (*args, listen)
    proxy = start_proxy(*args, listen=address, **kwargs)
    return address, Bystander(connect(address)), proxy


# -- before the handshake ---------------------------------------------------------------------


def test_slowloris_one_byte_per_second_is_dropped_at_the_handshake_deadline(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    address, bystander, _ = start_with_bystander(
        start_proxy, "--handshake-timeout", "2.5", echo_server.target
    )
    request = upgrade_request()
    slow = socket.create_connection(address, timeout=DEADLINE)
    started = time.monotonic()
    sent = 0
    slow.settimeout(1.0)  # each byte waits a second for the proxy to hang up first
    try:
        while sent < len(request):
            slow.sendall(request[sent : sent + 1])
            sent += 1
            try:
                if not slow.recv(1024):
                    break
            except socket.timeout:
                continue
    except (ConnectionResetError, BrokenPipeError):
        pass
    elapsed = time.monotonic() - started
    slow.close()
    # The deadline counts from accept, not from the last byte: every byte in time does not
    # keep the connection open.
    assert sent < 10, f"still connected after {sent} bytes in {elapsed:.1f}s"
    assert 2.0 < elapsed < 2.5 + DEADLINE
    bystander.close()


def test_request_head_over_the_limit_gets_431_and_is_not_buffered(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    address, bystander, proxy = start_with_bystander(start_proxy, echo_server.target)
    assert answer_to(address, b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n") == 431
    # A head that never ends: answered as soon as it passes 16 KiB, not held in memory.
    with socket.create_connection(address, timeout=DEADLINE) as endless:
        endless.sendall(b"GET / HTTP/1.1\r\n")
        line = b"X-Filler: " + b"b" * 1000 + b"\r\n"
        try:
            for _ in range(1024):  # 1 MiB that the proxy reads and discards
                endless.sendall(line)
        except (ConnectionResetError, BrokenPipeError):
            pass
        assert RawClient(endless).read_response()[0] == 431
    assert rss_kib(proxy.pid) < 60 * 1024
    bystander.close()


GARBAGE_KINDS = ("random", "http-ish", "tls-ish", "empty", "reset", "half-request")


def garbage(kind: str, rng: random.Random) -> bytes:
    if kind == "random":
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 600)))
    if kind == "http-ish":
        pieces = [b"GET ", b"/", b" HTTP/1.1", b"\r\n", b"Upgrade: websocket", b":", b"\r\n\r\n"]
        return b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
    if kind == "tls-ish":
        return b"\x16\x03\x01" + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
    if kind == "half-request":
        request = upgrade_request()
        return request[: rng.randint(1, len(request) - 1)]
    return b""


def test_a_thousand_garbage_connections_in_a_row(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    address, bystander, proxy = start_with_bystander(
        start_proxy, "--handshake-timeout", "2", echo_server.target
    )
    baseline = descriptor_count(proxy.pid)
    rng = random.Random(8)
    for number in range(1000):
        kind = GARBAGE_KINDS[number % len(GARBAGE_KINDS)]
        sock = socket.create_connection(address, timeout=DEADLINE)
        data = garbage(kind, rng)
        try:
            if data:
                sock.sendall(data)
            if kind == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):  # an error response or nothing, then EOF
                    pass
        except ConnectionResetError:
            pass
        finally:
            sock.close()
        if number % 100 == 99:
            bystander.assert_unharmed(1)
    bystander.assert_unharmed()
    wait_until(
        lambda: descriptor_count(proxy.pid) <= baseline, "the garbage connections to be closed"
    )
    assert answer_to(address, upgrade_request()) == 101
    bystander.close()


# -- authentication and tokens ----------------------------------------------------------------

SPOOFED_CN_HEADERS = [
    "SSL_CLIENT_S_DN_CN: admin",
    "ssl_client_s_dn_cn: admin",
    "SSL-CLIENT-S-DN-CN: admin",
    "Ssl_Client_S_Dn_Cn: admin",
]


def test_a_client_cannot_fake_its_certificate_with_a_header(
    start_proxy: ProxyFactory, echo_server: TcpServer, pki: Pki
) -> None:
    def tls_client(address: Tuple[str, int], name: str, header: str = "") -> RawClient:
        context = pki.client_context(pki.client_cert(name))
        raw = socket.create_connection(address, timeout=DEADLINE)
        client = RawClient(context.wrap_socket(raw, server_hostname="localhost"))
        client.sock.sendall(upgrade_request("/", header) if header else upgrade_request())
        return client

    def admin(address: Tuple[str, int]) -> RawClient:
        client = tls_client(address, "admin")
        assert client.read_response()[0] == 101
        return client

    address, bystander, _ = start_with_bystander(
        start_proxy,
        "--cert", str(pki.server_pem), "--verify-client", "--cafile", str(pki.ca_pem),
        "--auth-plugin", "ClientCertCNAuth", "--auth-source", "admin",
        echo_server.target,
        connect=admin,
    )  # fmt: skip
    # Over plain ws:// there is no certificate at all: the header alone must not pass.
    for header in SPOOFED_CN_HEADERS:
        assert answer_to(address, upgrade_request("/", header)) == 403, header
    # Over wss:// with a valid certificate for "mallory", claiming to be "admin".
    for header in SPOOFED_CN_HEADERS:
        with tls_client(address, "mallory", header).sock as tls:
            assert RawClient(tls).read_response()[0] == 403, header
    # The real admin gets in, whatever header it adds.
    client = tls_client(address, "admin", "SSL_CLIENT_S_DN_CN: mallory")
    assert client.read_response()[0] == 101
    client.send(0x2, b"admin")
    assert client.recv_data(5) == b"admin"
    client.close()
    bystander.close()


TRAVERSAL_TOKENS = [
    "../secret",
    "..%2fsecret",
    "%2e%2e%2fsecret",
    "%2E%2E/secret",
    "..%5csecret",
    "sub/../../secret",
    "./../secret",
    "..",
    ".",
    "%2e%2e",
    "{dir}/../secret",
    "{parent}/secret",
    "vm1%00",
    "vm1%00/../../secret",
    "escape",  # a symlink in the directory that leads out of it
    "%c0%ae%c0%ae%2fsecret",  # overlong UTF-8 dots
    "..%252fsecret",  # double-encoded
    "%2fetc%2fpasswd",
]


def test_traversal_in_tokens_never_leaves_the_token_directory(
    start_proxy: ProxyFactory, tcp_server: Callable[..., TcpServer], tmp_path: Path
) -> None:
    secret_target = tcp_server(echo_handler)
    good_target = tcp_server(echo_handler)
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "vm1").write_text(f"{good_target.target}\n")
    (tmp_path / "secret").write_text(f"{secret_target.target}\n")
    (tokens / "escape").symlink_to(tmp_path / "secret")
    address, bystander, _ = start_with_bystander(
        start_proxy, "--token-plugin", "TokenFileName", "--token-source", str(tokens),
        connect=lambda address: RawClient.connect(address, path="/websockify?token=vm1"),
    )  # fmt: skip
    for token in TRAVERSAL_TOKENS:
        query = token.format(dir=tokens, parent=tmp_path).replace("/", "%2f")
        status = answer_to(address, upgrade_request(f"/websockify?token={query}"))
        assert status in (400, 404), (token, status)
    assert not secret_target.connections, "a token reached a target outside the directory"
    client = RawClient.connect(address, path="/websockify?token=vm1")
    client.send(0x2, b"inside")
    assert client.recv_data(6) == b"inside"
    client.close()
    bystander.close()


NOT_BASE64 = [
    "Basic !!!!",
    "Basic YWRtaW46czNjcmV0PQ",  # "admin:s3cret=" without its padding
    "Basic YWRt aW46czNjcmV0PQ==",
    "Basic =",
    "Basic ====",
    "Basic " + "A" * 8001,
    "Basic \xe9\xe9\xe9\xe9",
    "Basic",
    "Basic ",
    "Basic YWRtaW4=",  # "admin": valid base64, no colon
]


def test_basic_auth_headers_that_are_not_base64_get_403(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    good = base64.b64encode(b"admin:s3cret").decode()
    address, bystander, _ = start_with_bystander(
        start_proxy, "--auth-plugin", "BasicHTTPAuth", "--auth-source", "admin:s3cret",
        echo_server.target,
        connect=lambda address: RawClient.connect(
            address, headers=[f"Authorization: Basic {good}"]
        ),
    )  # fmt: skip
    for value in NOT_BASE64:
        assert answer_to(address, upgrade_request("/", f"Authorization: {value}")) == 403, value
    # A control character never reaches the plugin: the request itself is malformed.
    assert answer_to(address, upgrade_request("/", f"Authorization: Basic {good}\x01")) == 400
    assert answer_to(address, upgrade_request("/", "Authorization: Basic Zm9vOmJhcg==")) == 401
    assert answer_to(address, upgrade_request("/", f"Authorization: Basic {good}")) == 101
    bystander.close()


# -- file descriptors -------------------------------------------------------------------------


def test_more_clients_than_descriptors_are_refused_or_delayed_without_spinning(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    address, bystander, proxy = start_with_bystander(
        start_proxy, "--handshake-timeout", "30", echo_server.target, preexec_fn=low_limit
    )
    baseline = descriptor_count(proxy.pid)
    crowd: List[socket.socket] = []
    for _ in range(150):  # each session needs two descriptors: at most ~28 fit
        sock = socket.create_connection(address, timeout=DEADLINE)
        sock.sendall(upgrade_request())
        crowd.append(sock)
    proxy.wait_log("new clients wait")
    before = cpu_seconds(proxy.pid)
    started = time.monotonic()
    bystander.assert_unharmed()
    time.sleep(max(0.0, 3.0 - (time.monotonic() - started)))  # CPU use over 3 s is the point
    used = cpu_seconds(proxy.pid) - before
    assert used < 0.6, f"the proxy used {used:.2f}s of CPU in 3s while out of descriptors"
    # Each client of the crowd is served (101), told why not (101 then close 1011 naming
    # the shortage), or still waiting; none is dropped without a word.
    answers = {"served": 0, "refused": 0, "waiting": 0}
    for sock in crowd:
        sock.setblocking(False)
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            answers["waiting"] += 1
        else:
            assert data.startswith(b"HTTP/1.1 101 "), data[:100]
            refused = b"Too many open files" in data
            answers["refused" if refused else "served"] += 1
        sock.close()
    assert answers["served"] > 10, answers
    wait_until(
        lambda: descriptor_count(proxy.pid) <= baseline, "the crowd's descriptors to be freed"
    )
    for _ in range(20):  # served again once descriptors are free
        assert answer_to(address, upgrade_request()) == 101
    bystander.close()


# -- web paths ----------------------------------------------------------------------------------

WEB_TRAVERSALS = [
    "/../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E/secret.txt",
    "/..%2fsecret.txt",
    "/%2e%2e%2fsecret.txt",
    "/..%5csecret.txt",
    "/..\\secret.txt",
    "/sub/../../secret.txt",
    "/sub/%2e%2e/%2e%2e/secret.txt",
    "/./../secret.txt",
    "//../secret.txt",
    "/%252e%252e/secret.txt",  # double-encoded
    "/%c0%ae%c0%ae/secret.txt",  # overlong UTF-8 dots
    "/index.html%00/../../secret.txt",
    "/out",  # a symlink inside the root to the secret outside
    "/outdir/secret.txt",  # through a symlinked directory
    "{root}/../secret.txt",
    "http://localhost/../secret.txt",
    "../secret.txt",
]


def web_get(address: Tuple[str, int], target: str) -> Tuple[int, bytes]:
    """Status and body of GET *target*, sent as is on a raw socket."""
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        request = f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode("latin-1"))
        client = RawClient(sock)
        status, _ = client.read_response()
        assert client.at_eof()
        return status, client.buffer


def test_traversal_in_web_paths_never_leaves_the_web_root(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    root = tmp_path / "www"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_text("<p>public</p>")
    secret = b"SECRET-CONTENT-8f3a"
    (tmp_path / "secret.txt").write_bytes(secret)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_bytes(secret)
    (root / "out").symlink_to(tmp_path / "secret.txt")
    (root / "outdir").symlink_to(tmp_path / "outside")
    address, bystander, _ = start_with_bystander(
        start_proxy, "--web", str(root), echo_server.target
    )
    for target in WEB_TRAVERSALS:
        status, body = web_get(address, target.format(root=root))
        assert status in (400, 404), (target, status)
        assert secret not in body, target
    assert web_get(address, "/index.html") == (200, b"<p>public</p>")
    bystander.close()
