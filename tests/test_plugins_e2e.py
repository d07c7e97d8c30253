"""Token and auth plugins end to end: the real proxy process, real clients, real targets.

Each target greets with its own name before echoing, so a test sees which target a token
led to. Refusals are read with a raw socket: status line, headers, body, and (over plain
TCP) the proxy closing the connection.
"""

import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import textwrap
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import pytest
from conftest import (
    DEADLINE,
    PROXY_PYTHON,
    PROXY_SCRIPT,
    REDIS_PASSWORD,
    HttpService,
    Pki,
    Proxy,
    ProxyFactory,
    RedisServer,
    TcpServer,
    ThreadedServer,
    assert_echoed,
    b64url,
    basic_auth,
    echo_handler,
    env_with_module,
    free_port,
    listening_socket,
    run_captured,
    wait_until,
)
from websockets.sync.client import ClientConnection, connect

pytestmark = pytest.mark.timeout(120)


# --- targets that say who they are ---


def greeter(name: str) -> Callable[[socket.socket], None]:
    """A target handler that sends *name*, then echoes."""

    def handle(conn: socket.socket) -> None:
        conn.sendall(name.encode())
        echo_handler(conn)

    return handle


class Targets:
    """Greeting TCP targets by name, closed when the test ends."""

    def __init__(self, make: Callable[..., TcpServer]) -> None:
        self._make = make
        self.servers: Dict[str, TcpServer] = {}

    def __getitem__(self, name: str) -> TcpServer:
        if name not in self.servers:
            self.servers[name] = self._make(greeter(name))
        return self.servers[name]


@pytest.fixture
def targets(tcp_server: Callable[..., TcpServer]) -> Targets:
    return Targets(tcp_server)


class UnixServer(ThreadedServer):
    """A greeting echo server on a unix socket, one thread per connection."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        super().__init__(listening_socket(str(path), backlog=16), greeter(name))


@pytest.fixture
def unix_server() -> Iterator[Callable[[Path, str], UnixServer]]:
    servers: List[UnixServer] = []

    def make(path: Path, name: str) -> UnixServer:
        servers.append(UnixServer(path, name))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory with a short path: unix socket paths must fit in 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="wsm-", dir="/tmp"))
    yield path
    shutil.rmtree(str(path))


# --- clients ---


def proxy_on(
    start_proxy: ProxyFactory, *args: str, target: Optional[TcpServer] = None, **kwargs: Any
) -> Tuple[Proxy, int]:
    """A proxy with options *args* on a free 127.0.0.1 port, listening."""
    port = free_port()
    positional = [f"127.0.0.1:{port}"] + ([target.target] if target is not None else [])
    proxy = start_proxy(*args, *positional, listen=("127.0.0.1", port), **kwargs)
    return proxy, port


def greeted_by(
    port: int,
    path: str = "/websockify",
    host: Optional[str] = None,
    scheme: str = "ws",
    **kwargs: Any,
) -> str:
    """Connect through the proxy; return the target's greeting after checking the echo.

    *host* goes in the URI (so in the Host header) while the socket still goes to
    127.0.0.1:*port*."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    uri = f"{scheme}://{host or '127.0.0.1'}:{port}{path}"
    with connect(uri, sock=sock, open_timeout=DEADLINE, **kwargs) as ws:
        return exchange(ws)


def exchange(ws: ClientConnection) -> str:
    greeting = ws.recv(DEADLINE)
    assert isinstance(greeting, bytes)
    assert_echoed(ws, os.urandom(1000))
    return greeting.decode()


def run_proxy(
    *options: str, target: Sequence[str] = (), env: Optional[Dict[str, str]] = None
) -> "subprocess.CompletedProcess[str]":
    """Run the proxy on a free port, for a startup error: it exits at once."""
    return run_captured(
        [PROXY_PYTHON, str(PROXY_SCRIPT), *options, f"127.0.0.1:{free_port()}", *target], env=env
    )


class Answer(NamedTuple):
    status: int
    head: str  # status line and header lines
    body: str

    def header(self, name: str) -> Optional[str]:
        for line in self.head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


def request(
    port: int,
    path: str = "/websockify",
    headers: Sequence[str] = (),
    host: str = "localhost",
    tls: Optional[ssl.SSLContext] = None,
    timeout: float = DEADLINE,
) -> Answer:
    """Send a WebSocket upgrade request; read the answer, and for a refusal its body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if tls is not None:
        sock = tls.wrap_socket(sock, server_hostname="localhost")
    with sock:
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)).decode(),
            "Sec-WebSocket-Version: 13",
            *headers,
        ]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed before an answer: {data!r}"
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        answer = Answer(int(head.split(b" ", 2)[1]), head.decode("latin-1"), "")
        if answer.status == 101:
            return answer
        length = int(answer.header("Content-Length") or "0")
        while len(rest) < length:
            chunk = sock.recv(65536)
            assert chunk, f"closed in the body: {rest!r}"
            rest += chunk
        if tls is None:  # a refusal ends with the proxy closing (over TLS it waits for us)
            assert sock.recv(65536) == b"", "more after the body"
    return answer._replace(body=rest.decode("utf-8", "replace"))


def refused(port: int, path: str = "/websockify", **kwargs: Any) -> Answer:
    answer = request(port, path, **kwargs)
    assert answer.status != 101, f"{path} was let in"
    return answer


# --- token files ---


def write_atomically(path: Path, text: str) -> None:
    """Replace *path* as editors do, so a reader never sees half a file; the new inode
    (and a later mtime) make the change visible however coarse the clock."""
    temporary = path.with_name(path.name + ".new~")
    temporary.write_text(text)
    os.replace(str(temporary), str(path))


def token_file_proxy(
    start_proxy: ProxyFactory, tokens: Path, *args: str, plugin: str = "TokenFile"
) -> Tuple[Proxy, int]:
    """A proxy whose *plugin* takes its targets from *tokens*: a file, directory or key."""
    return proxy_on(start_proxy, "--token-plugin", plugin, "--token-source", str(tokens), *args)


@pytest.mark.smoke
@pytest.mark.parametrize("layout", ["file", "directory"])
def test_token_file_sees_edits_read_only_token_file_does_not(
    start_proxy: ProxyFactory, targets: Targets, tmp_path: Path, layout: str
) -> None:
    if layout == "file":
        source = tmp_path / "tokens"
        source.write_text(f"# VNC hosts\nvm1: {targets['one'].target}\n\n")
        edited = source
    else:
        source = tmp_path / "tokens.d"
        source.mkdir()
        (source / "a").write_text(f"vm1: {targets['one'].target}\n")
        edited = source / "b"
    live, live_port = token_file_proxy(start_proxy, source)
    frozen, frozen_port = token_file_proxy(start_proxy, source, plugin="ReadOnlyTokenFile")
    for port in (live_port, frozen_port):
        assert greeted_by(port, "/websockify?token=vm1") == "one"
        assert refused(port, "/websockify?token=vm2").status == 404

    write_atomically(edited, f"vm2: {targets['two'].target}\n")
    if layout == "file":  # vm1 is gone from the file
        assert refused(live_port, "/websockify?token=vm1").status == 404
    else:
        assert greeted_by(live_port, "/websockify?token=vm1") == "one"
    assert greeted_by(live_port, "/websockify?token=vm2") == "two"
    assert greeted_by(frozen_port, "/websockify?token=vm1") == "one"
    assert refused(frozen_port, "/websockify?token=vm2").status == 404
    assert "token 'vm2' not found by ReadOnlyTokenFile" in frozen.log()
    assert "token 'vm2' not found by TokenFile" in live.log()


def test_target_config_is_token_file(
    start_proxy: ProxyFactory, targets: Targets, tmp_path: Path
) -> None:
    tokens = tmp_path / "targets.cfg"
    tokens.write_text(f"vm1: {targets['one'].target}\n")
    _, port = proxy_on(start_proxy, "--target-config", str(tokens))
    assert greeted_by(port, "/websockify?token=vm1") == "one"
    write_atomically(tokens, f"vm1: {targets['two'].target}\n")
    assert greeted_by(port, "/websockify?token=vm1") == "two"


def test_malformed_lines_are_logged_and_skipped(
    start_proxy: ProxyFactory, targets: Targets, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"garbage line\nvm1: {targets['one'].target}\nvm2: no-port\n")
    proxy, port = token_file_proxy(start_proxy, tokens)
    assert greeted_by(port, "/websockify?token=vm1") == "one"
    assert refused(port, "/websockify?token=vm2").status == 404
    log = proxy.log()
    assert f"TokenFile: skipped {tokens} line 1: expected 'token: host:port'" in log
    assert f"TokenFile: skipped {tokens} line 3: " in log
    assert log.count(f"{tokens} line 1:") == 1  # once, however often the file is read


def test_token_in_the_query_string(
    start_proxy: ProxyFactory, targets: Targets, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"vm 1/x: {targets['one'].target}\nvm2: {targets['two'].target}\n")
    proxy, port = token_file_proxy(start_proxy, tokens)
    token = urllib.parse.quote("vm 1/x", safe="")
    assert greeted_by(port, f"/websockify?width=80&token={token}&height=24") == "one"
    assert greeted_by(port, "/any/path?token=vm2%0A") == "two"  # a trailing newline is dropped
    assert greeted_by(port, "/?token=vm2&token=vm1") == "two"  # the first one counts

    missing = refused(port, "/websockify")
    assert (missing.status, missing.header("Connection")) == (400, "close")
    assert "Token missing" in missing.body
    assert refused(port, "/websockify?token=").status == 400
    # As in upstream, a cookie is not a place for the token.
    assert refused(port, "/websockify", headers=["Cookie: token=vm2"]).status == 400
    unknown = refused(port, "/websockify?token=nope")
    assert unknown.status == 404 and "Token not found" in unknown.body
    log = proxy.log()
    assert "TokenFile: no token in the request" in log
    assert "token 'nope' not found by TokenFile" in log
    assert '"GET /websockify?token=nope" 404 Token not found' in log


def test_token_file_targets_of_every_kind(
    start_proxy: ProxyFactory,
    tcp_server: Callable[..., TcpServer],
    unix_server: Callable[[Path, str], UnixServer],
    short_tmp: Path,
) -> None:
    v4, v6 = tcp_server(greeter("v4")), tcp_server(greeter("v6"), "::1")
    unix_server(short_tmp / "desk.sock", "unix")
    tokens = short_tmp / "tokens"
    tokens.write_text(
        f"v4: 127.0.0.1:{v4.port}\n"
        f"v6: [::1]:{v6.port}\n"
        f"by-name: localhost:{v4.port}\n"
        f"unix: unix_socket:{short_tmp / 'desk.sock'}\n"
        f"a:b:c: {v4.target}\n"  # a token may hold colons: it ends at ": "
    )
    _, port = token_file_proxy(start_proxy, tokens)
    for token, greeting in [
        ("v4", "v4"), ("v6", "v6"), ("by-name", "v4"), ("unix", "unix"), ("a:b:c", "v4")
    ]:  # fmt: skip
        assert greeted_by(port, f"/websockify?token={token}") == greeting


@pytest.mark.smoke
def test_host_token(start_proxy: ProxyFactory, targets: Targets, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"vm1.example: {targets['one'].target}\n::1: {targets['two'].target}\n")
    proxy, port = token_file_proxy(start_proxy, tokens, "--host-token")
    assert greeted_by(port, host="vm1.example") == "one"  # Host: vm1.example:PORT
    assert greeted_by(port, "/websockify?token=ignored", host="[::1]") == "two"
    assert refused(port, host="vm3.example").status == 404
    assert refused(port, host="").status == 400  # no token at all
    assert refused(port, "/websockify?token=vm1.example", host="other").status == 404
    assert "token 'other' not found" in proxy.log()


# --- TokenJSONFile ---


def test_json_token_file_reloads_when_it_changes(
    start_proxy: ProxyFactory, targets: Targets, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"vm1": targets["one"].target}))
    proxy, port = proxy_on(
        start_proxy, "--token-plugin", "TokenJSONFile", "--token-source", str(tokens)
    )
    assert greeted_by(port, "/websockify?token=vm1") == "one"
    assert refused(port, "/websockify?token=vm2").status == 404

    two = targets["two"]
    write_atomically(
        tokens,
        json.dumps(
            {"vm1": {"host": "127.0.0.1", "port": two.port}, "vm2": "bad", "vm3": two.target}
        ),
    )
    assert greeted_by(port, "/websockify?token=vm1") == "two"
    assert greeted_by(port, "/websockify?token=vm3") == "two"
    assert refused(port, "/websockify?token=vm2").status == 404  # skipped as invalid
    assert f"TokenJSONFile: {tokens}: skipped entry 2: " in proxy.log()

    write_atomically(tokens, '{"vm1": ')  # a half-written edit: the last good version stays
    assert greeted_by(port, "/websockify?token=vm3") == "two"
    proxy.wait_log(f"TokenJSONFile: {tokens} unusable, keeping the previous tokens")
    write_atomically(tokens, "{}")  # revokes every token
    assert refused(port, "/websockify?token=vm3").status == 404


# --- TokenFileName and UnixDomainSocketDirectory, and tokens that try to escape ---

ESCAPES = [
    "../outside",
    "..%2Foutside",
    "%2e%2e%2foutside",
    "%2E%2E/outside",
    "sub/../../outside",
    "{outside_abs}",
    "%2F{outside_rel}",
    "outside%00",
    "..",
    ".",
]


def escapes(outside: Path) -> List[str]:
    quoted = urllib.parse.quote(str(outside), safe="")
    return [
        token.replace("{outside_abs}", quoted).replace("{outside_rel}", str(outside)[1:])
        for token in ESCAPES
    ]


def test_token_file_name_directory(
    start_proxy: ProxyFactory, targets: Targets, tmp_path: Path
) -> None:
    directory = tmp_path / "tokens.d"
    (directory / "sub").mkdir(parents=True)
    (directory / "vm1").write_text(targets["one"].target + "\n")
    (directory / "broken").write_text("not a target\n")
    # A live target outside the directory: an escape would connect to it.
    outside = tmp_path / "outside"
    outside.write_text(targets["secret"].target)
    (directory / "link").symlink_to(outside)
    proxy, port = proxy_on(
        start_proxy, "--token-plugin", "TokenFileName", "--token-source", str(directory)
    )
    assert greeted_by(port, "/websockify?token=vm1") == "one"
    (directory / "vm2").write_text(targets["two"].target)  # new files count at once
    assert greeted_by(port, "/websockify?token=vm2") == "two"
    assert refused(port, "/websockify?token=vm3").status == 404
    assert refused(port, "/websockify?token=sub").status == 404  # a directory is no token
    broken = refused(port, "/websockify?token=broken")
    assert broken.status == 400 and "Invalid target for token" in broken.body

    for token in [*escapes(outside), "link"]:
        answer = refused(port, f"/websockify?token={token}")
        assert (answer.status, "Invalid token" in answer.body) == (400, True), token
    log = proxy.log()
    assert "TokenFileName: token is not a plain file name" in log
    assert f"TokenFileName: token leads out of {directory}" in log
    assert f"connecting to: {targets['secret'].target}" not in log
    assert not targets["secret"].connections


def test_unix_domain_socket_directory(
    start_proxy: ProxyFactory,
    unix_server: Callable[[Path, str], UnixServer],
    short_tmp: Path,
) -> None:
    directory = short_tmp / "socks"
    directory.mkdir()
    unix_server(directory / "vm1.sock", "one")
    (directory / "plain-file").write_text("not a socket")
    outside = unix_server(short_tmp / "outside", "secret")
    (directory / "link").symlink_to(short_tmp / "outside")
    proxy, port = proxy_on(
        start_proxy, "--token-plugin", "UnixDomainSocketDirectory", "--token-source", str(directory)
    )
    assert greeted_by(port, "/websockify?token=vm1.sock") == "one"
    unix_server(directory / "vm2.sock", "two")
    assert greeted_by(port, "/websockify?token=vm2.sock") == "two"
    assert refused(port, "/websockify?token=vm3.sock").status == 404
    assert refused(port, "/websockify?token=plain-file").status == 400

    for token in [*escapes(short_tmp / "outside"), "link"]:
        answer = refused(port, f"/websockify?token={token}")
        assert (answer.status, "Invalid token" in answer.body) == (400, True), token
    assert not outside.connections
    assert f"connecting to: unix socket {directory / 'vm1.sock'}" in proxy.log()


# --- token sources that do not exist yet when the proxy starts ---


def create_source(plugin: str, source: Path, targets: Targets, unix_server: Any) -> None:
    """Create *plugin*'s source, where token vm1 leads to the target greeting "one"."""
    if plugin in ("TokenFile", "ReadOnlyTokenFile"):
        write_atomically(source, f"vm1: {targets['one'].target}\n")
    elif plugin == "TokenJSONFile":
        write_atomically(source, json.dumps({"vm1": targets["one"].target}))
    elif plugin == "TokenFileName":
        source.mkdir()
        (source / "vm1").write_text(targets["one"].target)
    else:
        source.mkdir()
        unix_server(source / "vm1", "one")


@pytest.mark.smoke
@pytest.mark.parametrize(
    "plugin",
    [
        "TokenFile",
        "ReadOnlyTokenFile",
        "TokenJSONFile",
        "TokenFileName",
        "UnixDomainSocketDirectory",
    ],
)
def test_a_token_source_created_after_startup(
    plugin: str,
    start_proxy: ProxyFactory,
    targets: Targets,
    unix_server: Callable[[Path, str], UnixServer],
    short_tmp: Path,
) -> None:
    """As upstream, which reads its source only when a client comes: the proxy starts at
    boot before the source exists, knows no token meanwhile, and uses the source once
    it is there."""
    source = short_tmp / "later"
    proxy, port = token_file_proxy(start_proxy, source, plugin=plugin)  # listening
    missing = f"{plugin}: {source} does not exist yet; lookups find no token until it does"
    proxy.wait_log(missing)
    for _ in range(3):
        answer = refused(port, "/websockify?token=vm1")
        assert answer.status == 404 and "Token not found" in answer.body
    create_source(plugin, source, targets, unix_server)
    assert greeted_by(port, "/websockify?token=vm1") == "one"
    assert greeted_by(port, "/websockify?token=vm1") == "one"
    if plugin != "UnixDomainSocketDirectory":
        assert refused(port, "/websockify?token=../outside").status in (400, 404)
    log = proxy.log()
    assert log.count(missing) == 1  # once at startup, not once per lookup
    assert log.count(f"{plugin}: {source} is usable now") == 1
    assert proxy.proc.poll() is None


def test_a_token_directory_created_after_startup_keeps_tokens_inside(
    start_proxy: ProxyFactory, targets: Targets, tmp_path: Path
) -> None:
    directory = tmp_path / "tokens.d"
    proxy, port = token_file_proxy(start_proxy, directory, plugin="TokenFileName")
    assert refused(port, "/websockify?token=vm1").status == 404
    directory.mkdir()
    (directory / "vm1").write_text(targets["one"].target)
    outside = tmp_path / "outside"
    outside.write_text(targets["secret"].target)
    (directory / "link").symlink_to(outside)
    assert greeted_by(port, "/websockify?token=vm1") == "one"
    for token in [*escapes(outside), "link"]:
        answer = refused(port, f"/websockify?token={token}")
        assert (answer.status, "Invalid token" in answer.body) == (400, True), token
    assert f"TokenFileName: token leads out of {directory}" in proxy.log()
    assert not targets["secret"].connections


# --- token services over HTTP ---


class TokenService(HttpService):
    """A token API: /plain/TOKEN answers host:port, /json/TOKEN JSON;
    token "broken" gets 503, and "stall" no answer until the service closes."""

    def __init__(self, table: Dict[str, TcpServer]) -> None:
        self.table = table
        super().__init__()

    def answer(self, path: str) -> Tuple[int, bytes]:
        kind, _, token = path.lstrip("/").partition("/")
        token = urllib.parse.unquote(token)
        if token == "broken":
            return 503, b""
        if token == "stall":
            self.release.wait(3 * DEADLINE)
            return 200, b""
        if token not in self.table:
            return 404, b""
        if kind == "plain":
            return 200, self.table[token].target.encode()
        return 200, json.dumps({"host": "127.0.0.1", "port": self.table[token].port}).encode()


def no_proxy_env() -> Dict[str, str]:
    """The environment without HTTP proxy settings: the service is on 127.0.0.1."""
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


@pytest.mark.parametrize(("plugin", "kind"), [("BaseTokenAPI", "plain"), ("JSONTokenApi", "json")])
def test_token_apis(start_proxy: ProxyFactory, targets: Targets, plugin: str, kind: str) -> None:
    service = TokenService({"vm1": targets["one"], "vm 2": targets["two"]})
    try:
        proxy, port = proxy_on(
            start_proxy,
            *("--token-plugin", plugin, "--token-source", f"{service.url}/{kind}/%s"),
            env=no_proxy_env(),
        )
        assert greeted_by(port, "/websockify?token=vm1") == "one"
        assert greeted_by(port, "/websockify?token=vm%202") == "two"
        assert refused(port, "/websockify?token=vm3").status == 404
        failed = refused(port, "/websockify?token=broken")
        assert failed.status == 500 and "Token lookup failed" in failed.body
        assert service.paths == [
            f"/{kind}/vm1",
            f"/{kind}/vm%202",
            f"/{kind}/vm3",
            f"/{kind}/broken",
        ]
        assert f"token plugin {plugin} failed for token 'broken': HTTPError" in proxy.log()
    finally:
        service.close()


def test_a_stalled_token_api_times_out_and_delays_no_one_else(
    start_proxy: ProxyFactory, targets: Targets
) -> None:
    service = TokenService({"vm1": targets["one"]})
    try:
        proxy, port = proxy_on(
            start_proxy,
            *("--token-plugin", "JSONTokenApi", "--token-source", f"{service.url}/json/%s"),
            env=no_proxy_env(),
        )
        stalled: Dict[str, Any] = {"started": time.monotonic()}

        def stalled_client() -> None:
            stalled["answer"] = refused(port, "/?token=stall", timeout=3 * DEADLINE)
            stalled["answered"] = time.monotonic()

        thread = threading.Thread(target=stalled_client)
        thread.start()
        try:
            wait_until(lambda: "/json/stall" in service.paths, "the stalled lookup")
            for _ in range(3):
                assert greeted_by(port, "/websockify?token=vm1") == "one"
            served = time.monotonic()
        finally:
            thread.join(3 * DEADLINE)
        assert not thread.is_alive()
        assert stalled["answer"].status == 500  # the plugin's own 5 s timeout
        assert stalled["answered"] - stalled["started"] >= 5
        assert served < stalled["answered"]
        assert "token plugin JSONTokenApi failed for token 'stall': " in proxy.log()
    finally:
        service.close()


def test_token_api_that_is_down_refuses_with_500(start_proxy: ProxyFactory) -> None:
    proxy, port = proxy_on(
        start_proxy,
        *("--token-plugin", "JSONTokenApi", "--token-source", f"http://127.0.0.1:{free_port()}/%s"),
        env=no_proxy_env(),
    )
    assert refused(port, "/websockify?token=vm1").status == 500
    assert "token plugin JSONTokenApi failed for token 'vm1': URLError" in proxy.log()


# --- TokenRedis ---


def test_token_redis(
    start_proxy: ProxyFactory, targets: Targets, redis: RedisServer, tmp_path: Path
) -> None:
    redis.cli("SET", "vnc:vm1", json.dumps({"host": targets["one"].target}))
    redis.cli("SET", "vnc:vm2", targets["two"].target)
    redis.cli("SET", "vnc:bad", "no-port")
    redis.cli("SET", "vm1", targets["three"].target, db=2)
    password_file = tmp_path / "redis-password"
    password_file.write_text(REDIS_PASSWORD + "\n")
    proxy, port = proxy_on(
        start_proxy,
        *("--token-plugin", "TokenRedis"),
        *("--token-source", f'127.0.0.1:{redis.port}:0:"{REDIS_PASSWORD}":vnc'),
    )
    assert greeted_by(port, "/websockify?token=vm1") == "one"
    assert greeted_by(port, "/websockify?token=vm2") == "two"
    assert refused(port, "/websockify?token=vm3").status == 404
    assert refused(port, "/websockify?token=bad").status == 400
    redis.cli("SET", "vnc:vm3", targets["three"].target)  # seen at once
    assert greeted_by(port, "/websockify?token=vm3") == "three"
    redis.cli("DEL", "vnc:vm1")
    assert refused(port, "/websockify?token=vm1").status == 404

    _, db_port = proxy_on(
        start_proxy,
        *("--token-plugin", "websockify.token_plugins.TokenRedis"),
        *("--token-source", f"127.0.0.1:{redis.port}:2:@{password_file}"),
    )
    assert greeted_by(db_port, "/websockify?token=vm1") == "three"
    assert REDIS_PASSWORD not in proxy.log()


def test_token_redis_failures_refuse_with_500(
    start_proxy: ProxyFactory, redis: RedisServer
) -> None:
    redis.cli("SET", "vm1", "127.0.0.1:1")
    wrong, wrong_port = proxy_on(
        start_proxy,
        *("--token-plugin", "TokenRedis", "--token-source", f"127.0.0.1:{redis.port}:0:wrong"),
    )
    assert refused(wrong_port, "/websockify?token=vm1").status == 500
    assert "token plugin TokenRedis failed for token 'vm1': _RedisError" in wrong.log()
    down, down_port = proxy_on(
        start_proxy, "--token-plugin", "TokenRedis", "--token-source", f"127.0.0.1:{free_port()}"
    )
    assert refused(down_port, "/websockify?token=vm1").status == 500
    assert "token plugin TokenRedis failed for token 'vm1': ConnectionRefusedError" in down.log()


# --- JWTTokenApi ---

HMAC_KEY = b"an HMAC key of thirty-two bytes!"


def hs256(claims: Dict[str, Any], key: bytes = HMAC_KEY) -> str:
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    signature = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(signature)}"


def test_jwt_hs256(start_proxy: ProxyFactory, targets: Targets, tmp_path: Path) -> None:
    key_file = tmp_path / "jwt.key"
    key_file.write_text(b64url(HMAC_KEY) + "\n")
    proxy, port = proxy_on(
        start_proxy, "--token-plugin", "JWTTokenApi", "--token-source", str(key_file)
    )
    one = targets["one"]
    now = int(time.time())
    claims = {"host": "127.0.0.1", "port": one.port}
    assert greeted_by(port, "/websockify?token=" + hs256(claims)) == "one"
    window = dict(claims, nbf=now - 60, exp=now + 600)
    assert greeted_by(port, "/websockify?token=" + hs256(window)) == "one"

    def answer(token: str) -> Tuple[int, str]:
        refusal = refused(port, "/websockify?token=" + token)
        return refusal.status, refusal.body.partition(": ")[2].strip()

    assert answer(hs256(dict(claims, exp=now - 60))) == (403, "Token expired")
    assert answer(hs256(dict(claims, nbf=now + 600))) == (403, "Token not yet valid")
    forged = hs256(claims, key=b"another key of thirty-two bytes!")
    assert answer(forged) == (403, "Invalid token")
    head, _, signature = hs256(claims).split(".")
    other_body = b64url(json.dumps({"host": "127.0.0.1", "port": 1}).encode())
    assert answer(f"{head}.{other_body}.{signature}") == (403, "Invalid token")
    assert answer("not-a-jwt") == (403, "Invalid token")
    assert answer(hs256({"host": "127.0.0.1"})) == (400, "Invalid target for token")
    log = proxy.log()
    assert "JWTTokenApi: token expired" in log
    assert "JWTTokenApi: token not yet valid" in log
    assert "JWTTokenApi: bad signature" in log
    assert not targets["one"].connections[2:]  # only the two valid tokens got through


def write_key(path: Path, key: bytes) -> None:
    write_atomically(path, b64url(key) + "\n")


def test_jwt_key_rotation_applies_without_a_restart(
    start_proxy: ProxyFactory, targets: Targets, tmp_path: Path
) -> None:
    key_file = tmp_path / "jwt.key"
    write_key(key_file, HMAC_KEY)
    proxy, port = token_file_proxy(start_proxy, key_file, plugin="JWTTokenApi")
    claims = {"host": "127.0.0.1", "port": targets["one"].port}
    old_token = hs256(claims)
    assert greeted_by(port, "/websockify?token=" + old_token) == "one"
    new_key = b"the next key, thirty-two bytes.."
    write_key(key_file, new_key)
    assert greeted_by(port, "/websockify?token=" + hs256(claims, key=new_key)) == "one"
    answer = refused(port, "/websockify?token=" + old_token)
    assert answer.status == 403 and "Invalid token" in answer.body
    assert "JWTTokenApi: bad signature" in proxy.log()
    assert len(targets["one"].connections) == 2


def test_jwt_key_created_after_startup(
    start_proxy: ProxyFactory, targets: Targets, tmp_path: Path
) -> None:
    key_file = tmp_path / "jwt.key"
    proxy, port = token_file_proxy(start_proxy, key_file, plugin="JWTTokenApi")
    missing = f"JWTTokenApi: {key_file} does not exist yet; lookups find no token until it does"
    proxy.wait_log(missing)
    token = hs256({"host": "127.0.0.1", "port": targets["one"].port})
    for _ in range(3):
        assert refused(port, "/websockify?token=" + token).status == 404
    write_key(key_file, HMAC_KEY)
    assert greeted_by(port, "/websockify?token=" + token) == "one"
    write_atomically(key_file, "not base64url!\n")  # broken: no key is used, not the old one
    assert refused(port, "/websockify?token=" + token).status == 404
    proxy.wait_log(f"JWTTokenApi: {key_file} is unusable, lookups find no token until it is fixed")
    write_key(key_file, HMAC_KEY)
    assert greeted_by(port, "/websockify?token=" + token) == "one"
    log = proxy.log()
    assert log.count(missing) == 1
    assert log.count(f"JWTTokenApi: {key_file} is usable now") == 2


def test_jwt_rs256_with_jwcrypto(
    start_proxy: ProxyFactory, targets: Targets, tmp_path: Path
) -> None:
    jwk = pytest.importorskip("jwcrypto.jwk", reason="jwcrypto (optional) is not installed")
    jwt = pytest.importorskip("jwcrypto.jwt")
    key = jwk.JWK.generate(kty="RSA", size=2048)
    public_pem = tmp_path / "public.pem"
    public_pem.write_bytes(key.export_to_pem())
    probe = [PROXY_PYTHON, "-c", "import jwcrypto.jwk"]
    if subprocess.run(probe, stderr=subprocess.DEVNULL, timeout=60).returncode != 0:
        # The proxy's interpreter lacks jwcrypto: then a PEM key is a clear startup error.
        done = run_proxy("--token-plugin", "JWTTokenApi", "--token-source", str(public_pem))
        assert done.returncode == 2
        assert "a PEM key needs jwcrypto (pip install jwcrypto)" in done.stderr
        return
    proxy, port = proxy_on(
        start_proxy, "--token-plugin", "JWTTokenApi", "--token-source", str(public_pem)
    )

    def rs256(claims: Dict[str, Any], signer: Any = key) -> str:
        token = jwt.JWT(header={"alg": "RS256"}, claims=claims)
        token.make_signed_token(signer)
        return str(token.serialize())

    claims = {"host": "127.0.0.1", "port": str(targets["one"].port)}
    assert greeted_by(port, "/websockify?token=" + rs256(claims)) == "one"
    expired = dict(claims, exp=int(time.time()) - 60)
    assert refused(port, "/websockify?token=" + rs256(expired)).status == 403
    stranger = jwk.JWK.generate(kty="RSA", size=2048)
    assert refused(port, "/websockify?token=" + rs256(claims, stranger)).status == 403
    # An HMAC token keyed with the public key's text must not pass (algorithm confusion).
    confused = hs256(claims, key=public_pem.read_bytes())
    assert refused(port, "/websockify?token=" + confused).status == 403
    assert "algorithm 'HS256' is not allowed with a PEM key" in proxy.log()


# --- auth plugins ---


@pytest.mark.smoke
def test_basic_http_auth(start_proxy: ProxyFactory, targets: Targets) -> None:
    proxy, port = proxy_on(
        start_proxy,
        *("--auth-plugin", "BasicHTTPAuth", "--auth-source", "admin:s3:cret"),
        target=targets["one"],
    )
    # The websockets client sends the URI's user and password as Basic credentials.
    assert greeted_by(port, host="admin:s3%3Acret@127.0.0.1") == "one"
    assert (
        greeted_by(port, additional_headers={"Authorization": "bAsIc YWRtaW46czM6Y3JldA=="})
        == "one"
    )

    for headers in ([], [basic_auth("admin:wrong")], [basic_auth("root:s3:cret")]):
        answer = refused(port, headers=headers)
        assert answer.status == 401, headers
        assert answer.header("WWW-Authenticate") == 'Basic realm="Websockify"'
    for header in (
        "Authorization: Bearer abc",
        "Authorization: Basic !!!not-base64!!!",
        basic_auth("no colon"),
    ):
        answer = refused(port, headers=[header])
        assert (answer.status, answer.header("WWW-Authenticate")) == (403, None), header
    log = proxy.log()
    assert "authentication refused: 401 no credentials" in log
    assert "authentication refused: 401 wrong credentials for user 'root'" in log
    assert "authentication refused: 403 malformed Authorization header" in log
    assert "s3:cret" not in log and "wrong" not in log.replace("wrong credentials", "")
    assert len(targets["one"].connections) == 2


def test_expect_origin(start_proxy: ProxyFactory, targets: Targets) -> None:
    proxy, port = proxy_on(
        start_proxy,
        *("--auth-plugin", "ExpectOrigin"),
        *("--auth-source", "https://novnc.example http://127.0.0.1:8080"),
        target=targets["one"],
    )
    assert greeted_by(port, origin="https://novnc.example") == "one"
    assert greeted_by(port, origin="HTTP://127.0.0.1:8080") == "one"
    for headers in ([], ["Origin: https://evil.example"], ["Origin: https://novnc.example.evil"]):
        answer = refused(port, headers=headers)
        assert (answer.status, "Invalid Origin" in answer.body) == (403, True), headers
    assert "refused: 403 origin 'https://evil.example' is not one of https://novnc" in proxy.log()
    assert len(targets["one"].connections) == 2


@pytest.mark.smoke
def test_client_cert_cn_auth(start_proxy: ProxyFactory, targets: Targets, pki: Pki) -> None:
    proxy, port = proxy_on(
        start_proxy,
        *("--cert", str(pki.server_pem), "--verify-client", "--cafile", str(pki.ca_pem)),
        *("--auth-plugin", "ClientCertCNAuth", "--auth-source", "alice bob"),
        target=targets["one"],
    )
    alice, mallory = (
        pki.client_context(pki.client_cert("alice")),
        pki.client_context(pki.client_cert("mallory")),
    )
    assert greeted_by(port, scheme="wss", host="localhost", ssl=alice) == "one"
    assert refused(port, tls=mallory).status == 403
    # Mallory's certificate is valid, but a header cannot make her alice.
    for name in ("SSL_CLIENT_S_DN_CN", "ssl_client_s_dn_cn", "SSL_Client_S_DN_CN"):
        assert refused(port, headers=[f"{name}: alice"], tls=mallory).status == 403
    log = proxy.log()
    assert "client certificate CN 'mallory' is not allowed" in log
    assert "client certificate CN 'alice'" not in log
    assert len(targets["one"].connections) == 1


def test_client_cert_header_from_a_client_without_certificate_is_ignored(
    start_proxy: ProxyFactory, targets: Targets, pki: Pki
) -> None:
    # No --verify-client: ws:// and wss:// clients without certificates reach the plugin.
    proxy, port = proxy_on(
        start_proxy,
        *("--cert", str(pki.server_pem)),
        *("--auth-plugin", "ClientCertCNAuth", "--auth-source", "alice"),
        target=targets["one"],
    )
    for tls in (None, pki.client_context()):
        answer = refused(port, headers=["SSL_CLIENT_S_DN_CN: alice"], tls=tls)
        assert answer.status == 403
    assert "client certificate CN None is not allowed" in proxy.log()
    assert not targets["one"].connections


# --- plugins of one's own ---

PLUGIN_MODULE = '''
"""Plugins as users write them for upstream websockify."""
import os
import sys
import time

from websockify.auth_plugins import AuthenticationError
from websockify.token_plugins import BasePlugin


class Table(BasePlugin):
    """Source: "token=host:port,..."; token "boom" raises, "exit" exits, "slow-X" sleeps
    a little, "hang" a long time."""

    def __init__(self, src):
        super().__init__(src)
        self.table = dict(entry.split("=", 1) for entry in src.split(","))

    def lookup(self, token):
        if token == "boom":
            raise RuntimeError("the inventory database is down")
        if token == "exit":
            sys.exit("giving up")
        if token.startswith("slow-"):
            time.sleep(SLOW_SECONDS)
            token = token[len("slow-"):]
        if token == "hang":
            time.sleep(60)
        if token not in self.table:
            return None
        host, port = self.table[token].rsplit(":", 1)
        return [host, port]


class Gate(object):
    """Lets in requests whose X-Gate header is the source and whose target is the
    one the X-Target header names."""

    def __init__(self, src):
        self.source = src

    def authenticate(self, headers, target_host, target_port):
        if headers.get("X-Gate") == "boom":
            raise ValueError("a bug in the plugin")
        if headers.get("X-Gate") == "busy":
            raise AuthenticationError(
                log_msg="too many attempts",
                response_code=429,
                response_headers={"Retry-After": "7", "X-Bad": "a\\r\\nInjected: yes"},
                response_msg="Slow down",
            )
        if headers.get("X-Gate") != self.source:
            raise AuthenticationError(log_msg="wrong gate")
        if headers.get("X-Target") != "%s:%s" % (target_host, target_port):
            raise AuthenticationError(
                response_code=409, response_msg="target %s:%s" % (target_host, target_port)
            )


class PortList(object):
    """Lets in targets whose port is in the source, compared as upstream's TokenFile
    hands the port on: a string."""

    def __init__(self, src):
        self.ports = src.split(",")

    def authenticate(self, headers, target_host, target_port):
        if target_port not in self.ports:
            raise AuthenticationError(response_msg="port %r not allowed" % (target_port,))
'''

SLOW_SECONDS = 3.0


@pytest.fixture
def plugin_env(tmp_path: Path) -> Dict[str, str]:
    """The proxy's environment, with a module of plugins on PYTHONPATH."""
    source = PLUGIN_MODULE.replace("SLOW_SECONDS", repr(SLOW_SECONDS))
    return env_with_module(tmp_path / "plugins", "site_plugins", textwrap.dedent(source))


def table(targets: Targets, *names: str) -> str:
    return ",".join(f"{name}={targets[name].target}" for name in names)


def table_proxy(
    start_proxy: ProxyFactory,
    plugin_env: Dict[str, str],
    targets: Targets,
    *names: str,
    gate: bool = False,
) -> Tuple[Proxy, int]:
    """A proxy whose token plugin site_plugins.Table knows the targets *names*; with *gate*,
    the auth plugin site_plugins.Gate too, its gate "open"."""
    gate_options = ("--auth-plugin", "site_plugins.Gate", "--auth-source", "open") if gate else ()
    return proxy_on(
        start_proxy,
        *("--token-plugin", "site_plugins.Table", "--token-source", table(targets, *names)),
        *gate_options,
        env=plugin_env,
    )


@pytest.mark.smoke
def test_plugins_of_ones_own_from_pythonpath(
    start_proxy: ProxyFactory, targets: Targets, plugin_env: Dict[str, str]
) -> None:
    proxy, port = table_proxy(start_proxy, plugin_env, targets, "one", "two", gate=True)
    two = targets["two"].target
    let_in = {"X-Gate": "open", "X-Target": two}
    assert greeted_by(port, "/websockify?token=two", additional_headers=let_in) == "two"
    assert refused(port, "/websockify?token=zzz", headers=["X-Gate: open"]).status == 404
    wrong = refused(port, "/websockify?token=two", headers=["X-Gate: shut"])
    assert wrong.status == 403
    # The auth plugin sees the target the token plugin found.
    seen = refused(port, "/websockify?token=one", headers=["X-Gate: open", f"X-Target: {two}"])
    assert seen.status == 409 and f"target {targets['one'].target}" in seen.body
    # AuthenticationError's status and headers reach the client; unsafe headers do not.
    busy = refused(port, "/websockify?token=one", headers=["X-Gate: busy"])
    assert (busy.status, busy.header("Retry-After")) == (429, "7")
    assert "Slow down" in busy.body and busy.header("X-Bad") is None
    assert "Injected" not in busy.head
    log = proxy.log()
    assert "authentication refused: 403 wrong gate" in log
    assert "authentication refused: 429 too many attempts" in log
    assert not targets["one"].connections


def test_an_auth_plugin_sees_the_port_as_the_token_file_wrote_it(
    start_proxy: ProxyFactory, targets: Targets, plugin_env: Dict[str, str], tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"vm1: {targets['one'].target}\nvm2: {targets['two'].target}\n")
    one_port = str(targets["one"].port)
    _, port = proxy_on(
        start_proxy,
        *("--token-plugin", "TokenFile", "--token-source", str(tokens)),
        *("--auth-plugin", "site_plugins.PortList", "--auth-source", one_port),
        env=plugin_env,
    )
    assert greeted_by(port, "/websockify?token=vm1") == "one"
    two = refused(port, "/websockify?token=vm2")
    assert two.status == 403 and f"port '{targets['two'].port}' not allowed" in two.body


def test_upstream_dotted_names(start_proxy: ProxyFactory, targets: Targets, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"vm1: {targets['one'].target}\n")
    _, port = proxy_on(
        start_proxy,
        *("--token-plugin", "websockify.token_plugins.TokenFile", "--token-source", str(tokens)),
        *("--auth-plugin", "websockify.auth_plugins.BasicHTTPAuth", "--auth-source", "u:p"),
    )
    assert greeted_by(port, "/websockify?token=vm1", host="u:p@127.0.0.1") == "one"
    assert refused(port, "/websockify?token=vm1").status == 401
    assert refused(port, "/websockify?token=vm2", headers=[basic_auth("u:p")]).status == 404


def test_a_failing_plugin_refuses_only_its_client(
    start_proxy: ProxyFactory, targets: Targets, plugin_env: Dict[str, str]
) -> None:
    proxy, port = table_proxy(start_proxy, plugin_env, targets, "one", gate=True)
    one = targets["one"].target
    let_in = {"X-Gate": "open", "X-Target": one}
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    uri = f"ws://127.0.0.1:{port}/websockify?token=one"
    with connect(uri, sock=sock, additional_headers=let_in, open_timeout=DEADLINE) as ws:
        assert exchange(ws) == "one"
        token_bug = refused(port, "/websockify?token=boom", headers=["X-Gate: open"])
        assert token_bug.status == 500 and "Token lookup failed" in token_bug.body
        exits = refused(port, "/websockify?token=exit", headers=["X-Gate: open"])
        assert exits.status == 500
        auth_bug = refused(port, "/websockify?token=one", headers=["X-Gate: boom"])
        assert auth_bug.status == 500 and "Authentication failed" in auth_bug.body
        # The session that was already relaying never noticed.
        assert_echoed(ws, os.urandom(5000))
    assert greeted_by(port, "/websockify?token=one", additional_headers=let_in) == "one"
    assert proxy.proc.poll() is None
    log = proxy.log()
    assert (
        "token plugin Table failed for token 'boom': RuntimeError: the inventory database is down"
        in log
    )
    assert "token plugin Table failed for token 'exit': SystemExit: giving up" in log
    assert "auth plugin Gate failed: ValueError: a bug in the plugin" in log
    assert "Traceback" not in log  # one line each; tracebacks only with -v


def test_a_slow_plugin_delays_no_other_client(
    start_proxy: ProxyFactory, targets: Targets, plugin_env: Dict[str, str]
) -> None:
    _, port = table_proxy(start_proxy, plugin_env, targets, "one", "two")
    slow: Dict[str, Any] = {}

    def slow_client() -> None:
        slow["started"] = time.monotonic()
        slow["greeting"] = greeted_by(port, "/websockify?token=slow-one")
        slow["answered"] = time.monotonic()

    thread = threading.Thread(target=slow_client)
    thread.start()
    try:
        wait_until(lambda: "started" in slow, "the slow client to start")
        fast_done = []
        for _ in range(3):  # three whole sessions, each connect + echo + close
            assert greeted_by(port, "/websockify?token=two") == "two"
            fast_done.append(time.monotonic())
    finally:
        thread.join(SLOW_SECONDS + 2 * DEADLINE)
    assert not thread.is_alive()
    assert slow["greeting"] == "one"
    assert slow["answered"] - slow["started"] >= SLOW_SECONDS  # the plugin really was slow
    # Every fast session ended while the slow one was still waiting for its plugin.
    assert fast_done[-1] < slow["answered"], (
        f"fast sessions done after {fast_done[-1] - slow['started']:.2f} s, "
        f"slow one answered after {slow['answered'] - slow['started']:.2f} s"
    )
    print(
        f"3 fast sessions done {fast_done[-1] - slow['started']:.3f} s after the slow client "
        f"started; it was answered after {slow['answered'] - slow['started']:.3f} s"
    )


def test_a_plugin_that_hangs_is_given_up_on(
    start_proxy: ProxyFactory, targets: Targets, plugin_env: Dict[str, str]
) -> None:
    proxy, port = table_proxy(start_proxy, plugin_env, targets, "one")
    started = time.monotonic()
    hung: Dict[str, Answer] = {}

    def hang() -> None:
        hung["answer"] = refused(port, "/?token=hang", timeout=3 * DEADLINE)

    thread = threading.Thread(target=hang)
    thread.start()
    try:
        proxy.wait_log("Path: '/?token=hang'")
        assert greeted_by(port, "/websockify?token=one") == "one"  # meanwhile
    finally:
        thread.join(3 * DEADLINE)
    assert not thread.is_alive()
    answer = hung["answer"]
    assert answer.status == 504 and "Looking up the target took too long" in answer.body
    assert time.monotonic() - started >= 10  # LOOKUP_TIMEOUT: given up on, not failed
    assert greeted_by(port, "/websockify?token=one") == "one"


def test_a_token_file_that_vanishes_is_an_unknown_token_until_it_is_back(
    start_proxy: ProxyFactory, targets: Targets, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"vm1: {targets['one'].target}\n")
    proxy, port = token_file_proxy(start_proxy, tokens)
    assert greeted_by(port, "/websockify?token=vm1") == "one"
    tokens.unlink()
    for _ in range(3):
        answer = refused(port, "/websockify?token=vm1")
        assert answer.status == 404 and "Token not found" in answer.body
    tokens.write_text(f"vm1: {targets['two'].target}\n")
    assert greeted_by(port, "/websockify?token=vm1") == "two"
    gone = f"TokenFile: {tokens} no longer exists; lookups find no token until it is back"
    assert proxy.log().count(gone) == 1  # once, not once per lookup
    assert proxy.log().count(f"TokenFile: {tokens} is usable now") == 1


def test_plugin_errors_at_startup_are_one_line_and_exit_2(
    tmp_path: Path, plugin_env: Dict[str, str]
) -> None:
    broken = tmp_path / "plugins" / "broken_plugins.py"
    broken.write_text("raise ImportError('needs libfoo')\n")
    cases = [
        (["--token-plugin", "NoSuchPlugin"], "--token-plugin: unknown plugin 'NoSuchPlugin'"),
        (["--token-plugin", "site_plugins.Nope"], "site_plugins has no class Nope"),
        (["--token-plugin", "broken_plugins.X"], "cannot import broken_plugins: ImportError"),
        (
            ["--token-plugin", "TokenFileName", "--token-source", str(broken)],
            "is not a directory",
        ),
        (["--auth-plugin", "BasicHTTPAuth", "--auth-source", "nocolon"], "user:password"),
        (["--auth-plugin", "TokenFile"], "--auth-plugin: TokenFile is for --token-plugin"),
    ]
    for args, message in cases:
        target = [] if "--token-plugin" in args else ["127.0.0.1:1"]
        done = run_proxy(*args, target=target, env=plugin_env)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, done.stderr)
