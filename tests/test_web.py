"""End to end: --web serves files on the WebSocket port, through the real proxy process."""

import email.utils
import hashlib
import http.client
import ipaddress
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest
import trustme
from conftest import (
    DEADLINE,
    Proxy,
    ProxyFactory,
    RawClient,
    TcpServer,
    assert_echoed,
    basic_auth,
    echo_checksummed,
    env_with_module,
    listen_args,
    rss_kib,
    ws_url,
)
from hypothesis import given
from hypothesis import strategies as st
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from websockify_min import _forwarded_for, _real_client, parse_request

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024
SIZES = [0, 1, 1000, 64 * 1024 - 1, 256 * 1024 + 1, 3 * MiB + 17]


class Site(NamedTuple):
    root: Path
    secret: Path  # a file next to the root, which must never be served
    sums: Dict[str, str]  # sha256 of each file, by URL path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def write_sparse(path: Path, size: int) -> None:
    """*size* bytes: random 1 MiB blocks every 4 MiB, holes between them."""
    with open(path, "wb") as file:
        file.truncate(size)
        for offset in range(0, size, 4 * MiB):
            file.seek(offset)
            file.write(os.urandom(min(MiB, size - offset)))


@pytest.fixture
def site(tmp_path: Path) -> Site:
    root = tmp_path / "www"
    (root / "app").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    sums = {}
    for size in SIZES:
        path = root / f"file-{size}.bin"
        path.write_bytes(os.urandom(size))
        sums[f"/file-{size}.bin"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (root / "app" / "index.html").write_text("<!DOCTYPE html><title>noVNC</title>")
    (root / "app" / "ui.js").write_text("export const ui = 1;\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET outside the web root\n")
    (root / "link-out").symlink_to(secret)
    (root / "dir-out").symlink_to(tmp_path)
    return Site(root, secret, sums)


def start_web(
    start_proxy: ProxyFactory, site: Site, target: str, *extra: str
) -> Tuple[Proxy, Tuple[str, int]]:
    listen, address = listen_args()
    proxy = start_proxy("--web", str(site.root), *extra, listen, target, listen=address)
    return proxy, address


class Response(NamedTuple):
    status: int
    headers: Dict[str, str]
    body: bytes


def raw_exchange(address: Tuple[str, int], request: bytes) -> Tuple[Response, bool]:
    """Send *request* on a new connection; the response (body by Content-Length), and
    whether the proxy closed the connection after it."""
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        sock.sendall(request)
        client = RawClient(sock)
        response = read_response(client)
        return response, client.at_eof(2.0)


def read_response(client: RawClient, head_only: bool = False) -> Response:
    status, head = client.read_response()
    headers = {}
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(": ")
        headers[name.lower()] = value
    size = 0 if head_only or status == 304 else int(headers.get("content-length", "0"))
    body = client._read_exact(size)
    return Response(status, headers, body)


def get(address: Tuple[str, int], path: str, *fields: str) -> Response:
    """One GET on a new connection, which is then dropped."""
    head = "".join(f"{field}\r\n" for field in (f"GET {path} HTTP/1.1", "Host: x", *fields))
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        sock.sendall(head.encode() + b"\r\n")
        return read_response(RawClient(sock))


# -- files ---------------------------------------------------------------------------------


@pytest.mark.smoke
def test_plain_get_and_websocket_on_one_port(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    proxy, address = start_web(start_proxy, site, echo_server.target)
    response = get(address, "/app/ui.js")
    assert response.status == 200
    assert response.body == b"export const ui = 1;\n"
    assert response.headers["content-type"] == "text/javascript"
    assert response.headers["content-length"] == str(len(response.body))
    mtime = int((site.root / "app" / "ui.js").stat().st_mtime)
    assert response.headers["last-modified"] == email.utils.formatdate(mtime, usegmt=True)
    assert email.utils.parsedate_to_datetime(response.headers["date"]) is not None
    with connect(ws_url(address)) as ws:
        ws.send(b"same port")
        assert ws.recv(DEADLINE) == b"same port"
    assert '"GET /app/ui.js" 200 21' in proxy.log()


def test_files_of_several_sizes_on_one_keep_alive_connection(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    _, address = start_web(start_proxy, site, echo_server.target)
    conn = http.client.HTTPConnection(*address, timeout=DEADLINE)
    sockets = set()
    for path, digest in sorted(site.sums.items()) * 2:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, path
        assert response.getheader("Content-Type") == "application/octet-stream"
        assert hashlib.sha256(body).hexdigest() == digest, path
        assert conn.sock is not None
        sockets.add(conn.sock.fileno())
    assert len(sockets) == 1, "every request went over the one connection"
    conn.close()


def test_a_file_over_50_mib_while_a_websocket_keeps_flowing(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    size = 60 * MiB + 12345
    big = site.root / "big.iso"
    write_sparse(big, size)
    expected = sha256_file(big)
    proxy, address = start_web(start_proxy, site, echo_server.target)
    rss_before = rss_kib(proxy.pid)
    with connect(ws_url(address), max_size=None) as ws, socket.create_connection(
        address, timeout=DEADLINE
    ) as download:
        _download_beside_a_websocket(ws, download, size, expected, proxy.pid, rss_before)


def test_web_timeout_drops_a_client_that_stops_reading_but_not_a_slow_one(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    write_sparse(site.root / "big.iso", 32 * MiB)
    proxy, address = start_web(start_proxy, site, echo_server.target, "--web-timeout", "1")
    stalled, slow = (socket.create_connection(address, timeout=DEADLINE) for _ in range(2))
    with stalled, slow:
        for sock in (stalled, slow):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(b"GET /big.iso HTTP/1.1\r\nHost: x\r\n\r\n")
        # The slow client takes 64 KiB every 0.4 s for 4 s, four times the timeout.
        taken = 0
        for _ in range(10):
            time.sleep(0.4)
            taken += len(slow.recv(64 * 1024))
        proxy.wait_log("took nothing of the response for 1s (--web-timeout), closing")
        assert proxy.log().count("--web-timeout") == 1, "only the client that stopped reading"
        assert RawClient(stalled).at_eof(), "the stalled download was not closed"
        assert len(slow.recv(64 * 1024)) > 0 and taken > 10 * 4096
    with connect(ws_url(address)) as ws:  # everyone else carries on
        assert_echoed(ws, b"still here")


def _download_beside_a_websocket(
    ws: ClientConnection,
    download: socket.socket,
    size: int,
    expected: str,
    pid: int,
    rss_before: int,
) -> None:
    download.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    download.sendall(b"GET /big.iso HTTP/1.1\r\nHost: x\r\n\r\n")
    client = RawClient(download)
    status, head = client.read_response()
    assert status == 200 and f"Content-Length: {size}" in head
    digest = hashlib.sha256(client.buffer)
    received = len(client.buffer)
    client.buffer = b""
    # The downloader reads nothing now: the proxy must hold back the file, not read it all
    # into memory, and must keep serving the WebSocket meanwhile.
    rss_peak = 0
    for round_trip in range(20):
        message = os.urandom(1000 + round_trip)
        ws.send(message)
        assert ws.recv(DEADLINE) == message
        rss_peak = max(rss_peak, rss_kib(pid))
    echo_checksummed(ws, 2 * MiB, 65536)
    rss_peak = max(rss_peak, rss_kib(pid))
    assert rss_peak - rss_before < 24 * 1024, "the proxy buffered the file instead of streaming"
    # Now read as fast as possible, with the WebSocket busy at the same time.
    done = threading.Event()

    def read_rest() -> None:
        nonlocal received
        while received < size:
            data = download.recv(MiB)
            if not data:
                break
            digest.update(data)
            received += len(data)
        done.set()

    reader = threading.Thread(target=read_rest)
    reader.start()
    echoes = 0
    while not done.is_set() and echoes < 200:
        ws.send(b"during the download")
        assert ws.recv(DEADLINE) == b"during the download"
        echoes += 1
    reader.join(120)
    assert not reader.is_alive()
    assert received == size
    assert digest.hexdigest() == expected


def test_head_sends_headers_only(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    _, address = start_web(start_proxy, site, echo_server.target)
    path = f"/file-{SIZES[-1]}.bin"
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        client = RawClient(sock)
        sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = read_response(client, head_only=True)
        assert head.status == 200
        assert head.headers["content-length"] == str(SIZES[-1])
        # Had any body followed the head, this response would not parse.
        sock.sendall(b"GET /app/ui.js HTTP/1.1\r\nHost: x\r\n\r\n")
        after = read_response(client)
        assert after.status == 200 and after.body == b"export const ui = 1;\n"


def test_if_modified_since_gets_304(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    _, address = start_web(start_proxy, site, echo_server.target)
    first = get(address, "/app/ui.js")
    last_modified = first.headers["last-modified"]
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        client = RawClient(sock)
        sock.sendall(
            f"GET /app/ui.js HTTP/1.1\r\nIf-Modified-Since: {last_modified}\r\n\r\n".encode()
        )
        cached = read_response(client)
        assert cached.status == 304 and cached.body == b""
        assert cached.headers["last-modified"] == last_modified
        assert "content-length" not in cached.headers
        older = email.utils.formatdate(time.time() - 86400 * 365 * 30, usegmt=True)
        sock.sendall(f"GET /app/ui.js HTTP/1.1\r\nIf-Modified-Since: {older}\r\n\r\n".encode())
        assert read_response(client).body == first.body


HOSTILE = '<img src=x onerror="alert(1)">&amp;.txt'


def test_directory_listing_escapes_names(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    (site.root / "empty-dir" / HOSTILE).write_text("hostile but harmless")
    (site.root / "empty-dir" / "child").mkdir()
    _, address = start_web(start_proxy, site, echo_server.target)
    listing = get(address, "/empty-dir/")
    assert listing.status == 200
    assert listing.headers["content-type"] == "text/html; charset=utf-8"
    page = listing.body.decode()
    assert "<img" not in page
    assert '&lt;img src=x onerror="alert(1)"&gt;&amp;amp;.txt' in page
    assert 'href="child/"' in page
    href = page.split('<a href="')[1].split('"')[0]
    assert get(address, "/empty-dir/" + href).body == b"hostile but harmless"
    moved = get(address, "/empty-dir")
    assert moved.status == 301 and moved.headers["location"] == "/empty-dir/"
    index = get(address, "/app/")
    assert index.status == 200 and b"<title>noVNC</title>" in index.body


def test_file_only_turns_listings_off(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    _, address = start_web(start_proxy, site, echo_server.target, "--file-only")
    assert get(address, "/empty-dir/").status == 404
    assert get(address, "/").status == 404
    assert get(address, "/app/").status == 200  # index files are still served


TRAVERSALS = [
    "/../secret.txt",
    "/app/../../secret.txt",
    "/%2e%2e/secret.txt",
    "/.%2E/secret.txt",
    "/app/..%2f..%2fsecret.txt",
    "/%2f..%2fsecret.txt",
    "/..%5csecret.txt",
    "/..\\secret.txt",
    "/app\\..\\..\\secret.txt",
    "/app/ui.js%00.png",
    "/link-out",
    "/dir-out/secret.txt",
    "http://localhost/../secret.txt",  # absolute-form target
]


@pytest.mark.smoke  # realpath and unquote differ between Python versions: check them all
def test_every_traversal_trick_is_refused_and_logged(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    proxy, address = start_web(start_proxy, site, echo_server.target)
    for target in TRAVERSALS:
        response, closed = raw_exchange(address, f"GET {target} HTTP/1.1\r\n\r\n".encode())
        assert response.status in (400, 404), target
        assert b"SECRET" not in response.body, target
        assert closed, target
        proxy.wait_log(f'"GET {target}" {response.status}')
    log = proxy.log()
    assert log.count("path refused") == len(TRAVERSALS)
    assert "SECRET" not in log
    # A file system path is a path under the root like any other: not found there.
    for absolute in (str(site.secret), "/" + str(site.secret)):
        response = get(address, absolute)
        assert response.status == 404 and b"SECRET" not in response.body
    assert get(address, "/app/ui.js").status == 200  # and the proxy still serves


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_other_methods_get_405_with_allow(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site, method: str
) -> None:
    _, address = start_web(start_proxy, site, echo_server.target)
    request = f"{method} /app/ui.js HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode()
    response, closed = raw_exchange(address, request)
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert closed


# -- connections -----------------------------------------------------------------------------


def test_pipelined_requests_on_one_socket(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    _, address = start_web(start_proxy, site, echo_server.target)
    paths = ["/app/ui.js", f"/file-{SIZES[-1]}.bin", "/missing", "/app/", "/file-0.bin"]
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        sock.sendall(b"".join(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode() for p in paths))
        client = RawClient(sock)
        statuses = [read_response(client) for _ in paths]
        assert [r.status for r in statuses] == [200, 200, 404, 200, 200]
        assert hashlib.sha256(statuses[1].body).hexdigest() == site.sums[paths[1]]
        assert all(r.headers["connection"] == "keep-alive" for r in statuses)
        assert not client.at_eof(0.3)  # still open for more


@pytest.mark.parametrize(
    ("version", "connection", "stays_open"),
    [
        ("HTTP/1.1", None, True),
        ("HTTP/1.1", "close", False),
        ("HTTP/1.0", None, False),
        ("HTTP/1.0", "keep-alive", True),
    ],
)
def test_connection_close_and_http_1_0(
    start_proxy: ProxyFactory,
    echo_server: TcpServer,
    site: Site,
    version: str,
    connection: Optional[str],
    stays_open: bool,
) -> None:
    _, address = start_web(start_proxy, site, echo_server.target)
    field = f"Connection: {connection}\r\n" if connection else ""
    request = f"GET /file-1000.bin {version}\r\n{field}\r\n".encode()
    response, closed = raw_exchange(address, request)
    assert response.status == 200 and len(response.body) == 1000
    assert response.headers["connection"] == ("keep-alive" if stays_open else "close")
    assert closed is not stays_open


def test_idle_deadline_applies_between_requests_not_during_one(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    write_sparse(site.root / "slow.bin", 8 * MiB)
    expected = sha256_file(site.root / "slow.bin")
    _, address = start_web(start_proxy, site, echo_server.target, "--handshake-timeout", "0.5")
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /slow.bin HTTP/1.1\r\n\r\n")
        client = RawClient(sock)
        status, _ = client.read_response()
        assert status == 200
        time.sleep(1.5)  # a reader slower than the deadline: the response must not be cut
        body = client._read_exact(8 * MiB)
        assert hashlib.sha256(body).hexdigest() == expected
        started = time.monotonic()
        assert client.at_eof(DEADLINE)  # now idle: closed after the deadline
        assert time.monotonic() - started < DEADLINE


def test_upgrade_after_plain_requests_on_the_same_connection(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    _, address = start_web(start_proxy, site, echo_server.target)
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        client = RawClient(sock)
        for _ in range(3):
            sock.sendall(b"GET /app/ui.js HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(client).status == 200
        status, _ = client.handshake(protocols=["binary"])
        assert status == 101
        client.send(0x2, b"after three files")
        assert client.recv_data(17) == b"after three files"


def test_many_browsers_loading_at_once(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    _, address = start_web(start_proxy, site, echo_server.target)
    failures: List[str] = []

    def browser() -> None:
        conn = http.client.HTTPConnection(*address, timeout=DEADLINE)
        try:
            for path, digest in sorted(site.sums.items()):
                conn.request("GET", path)
                body = conn.getresponse().read()
                if hashlib.sha256(body).hexdigest() != digest:
                    failures.append(path)
        except OSError as exc:
            failures.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=browser) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures


def test_web_needs_a_directory(start_proxy: ProxyFactory, tmp_path: Path) -> None:
    listen, _ = listen_args()
    proxy = start_proxy("--web", str(tmp_path / "nope"), listen, "127.0.0.1:1")
    assert proxy.wait_exit() == 2
    assert proxy.log().strip().splitlines() == [
        f"websockify_min.py: error: --web: {str(tmp_path / 'nope')!r} is not a directory"
    ]


# -- --web-auth, --allow-origin, --trusted-proxy ----------------------------------------------


def test_web_auth_puts_files_behind_the_auth_plugin(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    auth = ("--auth-plugin", "BasicHTTPAuth", "--auth-source", "alice:s3cret")
    proxy, address = start_web(start_proxy, site, echo_server.target, "--web-auth", *auth)
    refused, closed = raw_exchange(address, b"GET /app/ui.js HTTP/1.1\r\n\r\n")
    assert refused.status == 401 and closed
    assert refused.headers["www-authenticate"] == 'Basic realm="Websockify"'
    assert b"export" not in refused.body
    assert get(address, "/app/ui.js", basic_auth("alice:wrong")).status == 401
    allowed = get(address, "/app/ui.js", basic_auth("alice:s3cret"))
    assert allowed.status == 200 and allowed.body == b"export const ui = 1;\n"
    with pytest.raises(InvalidStatus):
        connect(ws_url(address)).close()
    with connect(
        ws_url(address),
        additional_headers={"Authorization": basic_auth("alice:s3cret").split(": ", 1)[1]},
    ) as ws:
        ws.send(b"upgrades too")
        assert ws.recv(DEADLINE) == b"upgrades too"
    proxy.wait_log("authentication refused")


def test_without_web_auth_files_are_public_but_upgrades_are_not(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    auth = ("--auth-plugin", "BasicHTTPAuth", "--auth-source", "alice:s3cret")
    _, address = start_web(start_proxy, site, echo_server.target, *auth)
    assert get(address, "/app/ui.js").status == 200
    with pytest.raises(InvalidStatus) as caught:
        connect(ws_url(address)).close()
    assert caught.value.response.status_code == 401


def test_web_auth_plugin_sees_the_request_and_no_target_with_tokens(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site, tmp_path: Path
) -> None:
    env = env_with_module(
        tmp_path / "plugins",
        "seen",
        "from websockify.auth_plugins import AuthenticationError\n"
        "class Seen:\n"
        "    def __init__(self, src):\n"
        "        self.src = src\n"
        "    def authenticate(self, headers, target_host, target_port):\n"
        "        if headers.get('X-Pass') != self.src:\n"
        "            raise AuthenticationError(response_code=403, response_msg='No pass')\n"
        "        print('auth saw', target_host, target_port, flush=True)\n",
    )
    tokens = tmp_path / "tokens"
    tokens.write_text(f"vm: {echo_server.target}\n")
    listen, address = listen_args()
    proxy = start_proxy(
        "--web", str(site.root), "--web-auth", "--auth-plugin", "seen.Seen",
        "--auth-source", "letmein", "--token-plugin", "TokenFile", "--token-source",
        str(tokens), listen, listen=address,
        env=env,
    )  # fmt: skip
    assert get(address, "/app/ui.js").status == 403
    assert get(address, "/app/ui.js", "X-Pass: letmein").status == 200
    proxy.wait_log("auth saw None None")


def test_a_slow_web_auth_plugin_holds_up_no_one(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site, tmp_path: Path
) -> None:
    release = tmp_path / "release"
    env = env_with_module(
        tmp_path / "plugins",
        "slow",
        "import os, time\n"
        "class Slow:\n"
        "    def __init__(self, src):\n"
        "        self.release = src\n"
        "    def authenticate(self, headers, target_host, target_port):\n"
        "        if headers.get('X-Slow'):\n"
        "            print('plugin waiting', flush=True)\n"
        "            deadline = time.monotonic() + 30\n"
        "            while not os.path.exists(self.release) and time.monotonic() < deadline:\n"
        "                time.sleep(0.01)\n",
    )
    listen, address = listen_args()
    proxy = start_proxy(
        "--web", str(site.root), "--web-auth", "--auth-plugin", "slow.Slow",
        "--auth-source", str(release), listen, echo_server.target, listen=address,
        env=env,
    )  # fmt: skip
    with socket.create_connection(address, timeout=DEADLINE) as slow:
        slow.sendall(b"GET /app/ui.js HTTP/1.1\r\nX-Slow: 1\r\n\r\n")
        proxy.wait_log("plugin waiting")
        # The plugin holds its worker until released: everyone else is served meanwhile.
        assert get(address, "/app/ui.js").status == 200
        with connect(ws_url(address)) as ws:
            ws.send(b"not held up")
            assert ws.recv(DEADLINE) == b"not held up"
        release.touch()
        assert read_response(RawClient(slow)).status == 200


ORIGIN = "https://novnc.example:8443"


@pytest.mark.parametrize(
    ("origin", "accepted"),
    [
        (ORIGIN, True),
        ("HTTPS://NoVNC.example:8443", True),  # origins compare without regard to case
        ("https://other.example", True),  # the second value of the comma list
        ("https://novnc.example", False),  # another port is another origin
        ("https://evil.example", False),
        (None, False),
    ],
)
def test_allow_origin(
    start_proxy: ProxyFactory,
    echo_server: TcpServer,
    site: Site,
    origin: Optional[str],
    accepted: bool,
) -> None:
    allow = (
        "--allow-origin",
        ORIGIN + "/",
        "--allow-origin",
        "https://a.example, https://other.example",
    )
    proxy, address = start_web(start_proxy, site, echo_server.target, *allow)
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        client = RawClient(sock)
        status, _ = client.handshake(headers=[f"Origin: {origin}"] if origin else [])
        if accepted:
            assert status == 101
            client.send(0x2, b"origin ok")
            assert client.recv_data(9) == b"origin ok"
        else:
            assert status == 403
            assert client.at_eof()
            proxy.wait_log("is not allowed (--allow-origin)")
    assert get(address, "/app/ui.js").status == 200  # plain requests carry no Origin check


FORWARDED_CASES = [
    # (header, trusted, what the log names as the client)
    ("X-Forwarded-For: 203.0.113.9", "127.0.0.0/8", "203.0.113.9 via 127.0.0.1"),
    # The client may send its own X-Forwarded-For: only the rightmost untrusted entry counts.
    (
        "X-Forwarded-For: 198.51.100.66, 203.0.113.9, 127.0.0.7",
        "127.0.0.1,127.0.0.7",
        "203.0.113.9 via 127.0.0.1",
    ),
    (
        'Forwarded: for="[2001:db8::17]:4711";proto=https, for=127.0.0.3',
        "127.0.0.0/8",
        "2001:db8::17 via 127.0.0.1",
    ),
    ("X-Forwarded-For: <script>", "127.0.0.1", "unknown via 127.0.0.1"),
    ("X-Forwarded-For: 203.0.113.9", "10.0.0.0/8", None),  # the peer is not trusted
]


@pytest.mark.parametrize(("header", "trusted", "client"), FORWARDED_CASES)
def test_trusted_proxy_logs_the_real_client(
    start_proxy: ProxyFactory,
    echo_server: TcpServer,
    site: Site,
    header: str,
    trusted: str,
    client: Optional[str],
) -> None:
    proxy, address = start_web(start_proxy, site, echo_server.target, "--trusted-proxy", trusted)
    get(address, "/app/ui.js", header)
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        assert RawClient(sock).handshake(headers=[header])[0] == 101
        name = client or "127.0.0.1"
        proxy.wait_log(f'{name}: "GET /app/ui.js" 200')
        proxy.wait_log(f"{name}: Plain non-SSL (ws://) WebSocket connection")
    if client is None:
        assert "203.0.113.9" not in proxy.log()
    assert "<script>" not in proxy.log()


def test_forwarded_headers_are_ignored_without_trusted_proxy(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site
) -> None:
    proxy, address = start_web(start_proxy, site, echo_server.target)
    get(address, "/app/ui.js", "X-Forwarded-For: 203.0.113.9", "Forwarded: for=203.0.113.9")
    proxy.wait_log('127.0.0.1: "GET /app/ui.js" 200')
    assert "203.0.113.9" not in proxy.log()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--allow-origin", "novnc.example"), "--allow-origin: 'novnc.example' is not an origin"),
        (("--allow-origin", "https://a.example/path"), "is not an origin"),
        (("--allow-origin", ""), "--allow-origin: '' is not an origin"),
        (("--trusted-proxy", "10.0.0.0/33"), "--trusted-proxy: '10.0.0.0/33' is not an IP"),
        (("--trusted-proxy", "proxy.example"), "--trusted-proxy: 'proxy.example' is not an IP"),
        (("--web-auth", "--web", "."), "--web-auth requires --auth-plugin"),
    ],
)
def test_option_mistakes_are_one_line_and_status_2(
    start_proxy: ProxyFactory, args: Tuple[str, ...], message: str
) -> None:
    listen, _ = listen_args()
    proxy = start_proxy(*args, listen, "127.0.0.1:1")
    assert proxy.wait_exit() == 2
    lines = proxy.log().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("websockify_min.py: error: ")
    assert message in lines[0]


# -- the forwarding headers, sans-IO ----------------------------------------------------------


def headers_of(*fields: str) -> http.client.HTTPMessage:
    return parse_request(
        ("GET / HTTP/1.1\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n").encode()
    ).headers


@pytest.mark.parametrize(
    ("fields", "nodes"),
    [
        ((), []),
        (("X-Forwarded-For: 1.2.3.4, 5.6.7.8",), ["1.2.3.4", "5.6.7.8"]),
        (("X-Forwarded-For: 1.2.3.4", "X-Forwarded-For: , 5.6.7.8"), ["1.2.3.4", "5.6.7.8"]),
        (
            ('Forwarded: for=192.0.2.60;proto=http;by=203.0.113.43, for="[2001:db8::1]:80"',),
            ["192.0.2.60", "[2001:db8::1]:80"],
        ),
        (('Forwarded: For="a,b;c", by=x',), ["a,b;c", "unknown"]),
        (('Forwarded: for="\\"q\\""',), ['"q"']),
        (("Forwarded: for=1.1.1.1", "X-Forwarded-For: 9.9.9.9"), ["1.1.1.1"]),  # Forwarded wins
    ],
)
def test_forwarded_for(fields: Tuple[str, ...], nodes: List[str]) -> None:
    assert _forwarded_for(headers_of(*fields)) == nodes


TRUSTED = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


@pytest.mark.parametrize(
    ("peer", "nodes", "client"),
    [
        ("192.0.2.1", ["198.51.100.1"], None),  # an untrusted peer: headers ignored
        ("10.0.0.1", [], None),  # a trusted peer that names nobody
        ("10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", ["6.6.6.6", "198.51.100.1", "10.0.0.2"], "198.51.100.1"),
        ("10.0.0.1", ["10.9.9.9", "10.0.0.2"], "10.9.9.9"),  # all trusted: the first
        ("10.0.0.1", ["198.51.100.1:5555"], "198.51.100.1"),
        ("10.0.0.1", ["[2001:db8::5]:80"], "2001:db8::5"),
        ("10.0.0.1", ["::ffff:198.51.100.1"], "198.51.100.1"),
        ("fd00::1", ["2001:db8::5"], "2001:db8::5"),
        ("10.0.0.1", ["_hidden"], "unknown"),
        ("10.0.0.1", ["198.51.100.1", "garbage"], "unknown"),
        ("unix", ["198.51.100.1"], None),
    ],
)
def test_real_client(peer: str, nodes: List[str], client: Optional[str]) -> None:
    assert _real_client(peer, nodes, TRUSTED) == client


@given(st.text(), st.lists(st.text(max_size=50), max_size=5))
def test_real_client_names_an_ip_address_or_unknown(peer: str, nodes: List[str]) -> None:
    client = _real_client("10.0.0.1", nodes, TRUSTED)
    if client is not None and client != "unknown":
        ipaddress.ip_address(client)
    _real_client(peer, nodes, TRUSTED)


def test_https_and_wss_on_one_port(
    start_proxy: ProxyFactory, echo_server: TcpServer, site: Site, tmp_path: Path
) -> None:
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    _, address = start_web(start_proxy, site, echo_server.target, "--cert", str(pem))
    conn = http.client.HTTPSConnection(*address, timeout=DEADLINE, context=context)
    for path in sorted(site.sums):
        conn.request("GET", path)
        body = conn.getresponse().read()
        assert hashlib.sha256(body).hexdigest() == site.sums[path]
    conn.close()
    with connect(f"wss://127.0.0.1:{address[1]}/", ssl=context) as ws:
        ws.send(b"secure")
        assert ws.recv(DEADLINE) == b"secure"
