"""Shared fixtures: real proxy processes, real target servers, raw WebSocket clients.

The interpreter that runs the proxy under test comes from WSMIN_PYTHON (default: the one
running the tests), so the same tests can run the proxy under any Python version. What it
runs comes from WSMIN_SCRIPT (default: websockify_min.py; or the zipapp, websockify.pyz);
several paths joined with ":" run each test that starts a proxy once with each.
"""

import base64
import hashlib
import http.server
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
)

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from websockets.sync.client import ClientConnection

ROOT = Path(__file__).resolve().parent.parent
PROXY_SCRIPT = ROOT / "websockify_min.py"  # the source
PROXY_PYTHON = os.environ.get("WSMIN_PYTHON", sys.executable)
PROXY_RUNS = [
    Path(path).resolve() for path in os.environ.get("WSMIN_SCRIPT", "").split(":") if path
] or [PROXY_SCRIPT]
PROXY_RUN = PROXY_RUNS[0]  # what the tests run
DEADLINE = 10.0  # seconds any single wait in the tests may take


def _have_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


HAVE_IPV6 = _have_ipv6_loopback()
needs_ipv6 = pytest.mark.skipif(not HAVE_IPV6, reason="no IPv6 loopback (::1) on this host")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 (and most likely on ::1) right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listen_args() -> Tuple[str, Tuple[str, int]]:
    """A free 127.0.0.1 port as the proxy's listen argument and as the address to connect to."""
    port = free_port()
    return f"127.0.0.1:{port}", ("127.0.0.1", port)


def ws_url(address: Tuple[str, int], path: str = "/websockify") -> str:
    """The ws:// URL of *path* at *address*, IPv6 hosts in brackets."""
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    return f"ws://{host}:{address[1]}{path}"


def basic_auth(credentials: Union[str, bytes], scheme: str = "Basic") -> str:
    """An Authorization header line for *credentials* ("user:password"; a str as UTF-8)."""
    raw = credentials.encode() if isinstance(credentials, str) else credentials
    return f"Authorization: {scheme} {base64.b64encode(raw).decode()}"


def b64url(data: bytes) -> str:
    """Base64url without padding, as JWTs use it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll *predicate* until it holds; fail the test when *timeout* passes first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def can_connect(address: Union[Tuple[str, int], str]) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    if isinstance(address, tuple) and ":" in address[0]:
        family = socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(address)
        except OSError:
            return False
    return True


def env_with_module(folder: Path, name: str, source: str) -> Dict[str, str]:
    """This environment, with *source* importable as module *name* from the new *folder*."""
    folder.mkdir()
    (folder / f"{name}.py").write_text(source)
    return dict(os.environ, PYTHONPATH=str(folder))


def run_captured(
    command: Sequence[str], timeout: float = 60, **kwargs: Any
) -> "subprocess.CompletedProcess[str]":
    """Run *command* to its end, its output captured as text; *timeout* only bounds the wait."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)


def listening_socket(address: Union[Tuple[str, int], str], backlog: int = 8) -> socket.socket:
    """A stream socket listening on *address*: (host, port), or the path of a unix socket."""
    if isinstance(address, str):
        family = socket.AF_UNIX
    else:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen(backlog)
    return sock


def stop_process(proc: "subprocess.Popen[bytes]", timeout: float = DEADLINE) -> int:
    """Stop *proc* by its pid: SIGTERM, then SIGKILL if it lingers; return its status."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
    return int(proc.returncode)


class Proxy:
    """A websockify_min process started for one test."""

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        python: str = PROXY_PYTHON,
        script: Union[Path, str] = PROXY_RUN,
        env: Optional[dict] = None,  # type: ignore[type-arg]
        cwd: Optional[Path] = None,
        preexec_fn: Optional[Callable[[], None]] = None,
        stdin: Optional[int] = None,
        command: Optional[Sequence[str]] = None,  # instead of [python, script]
    ) -> None:
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*(command or (python, str(script))), *self.args],
            stdin=subprocess.DEVNULL if stdin is None else stdin,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd) if cwd else None,
            preexec_fn=preexec_fn,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_listening(self, address: Union[Tuple[str, int], str]) -> "Proxy":
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
            return can_connect(address)

        wait_until(ready, f"the proxy to listen on {address}")
        return self

    def wait_log(self, text: str, timeout: float = DEADLINE) -> None:
        wait_until(lambda: text in self.log(), f"{text!r} in the proxy log", timeout)

    def wait_exit(self, timeout: float = DEADLINE) -> int:
        return int(self.proc.wait(timeout))

    def stop(self) -> int:
        status = stop_process(self.proc)
        self._log.close()
        return status


ProxyFactory = Callable[..., Proxy]


def make(target: str) -> Path:
    """Build *target* with the Makefile's own rule, so the tests see what users get."""
    result = subprocess.run(
        ["make", target],
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=120,
    )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, f"make {target} failed:\n{output}"
    return ROOT / target


@pytest.fixture(scope="session", autouse=True)
def fresh_zipapp() -> None:
    """When WSMIN_SCRIPT names the zipapp, rebuild it first if the source is newer."""
    if ROOT / "websockify.pyz" in PROXY_RUNS:
        make("websockify.pyz")


@pytest.fixture(scope="session")
def rebind_so() -> Path:
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        pytest.skip(
            f"NO C COMPILER: {cc!r} is not on PATH, so rebind.so cannot be built and "
            "wrap mode's port rebinding is NOT TESTED"
        )
    return make("rebind.so")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "proxy_run" in metafunc.fixturenames and len(PROXY_RUNS) > 1:
        metafunc.parametrize("proxy_run", PROXY_RUNS, ids=[path.name for path in PROXY_RUNS])


@pytest.fixture
def proxy_run() -> Path:
    """The script or zipapp start_proxy runs (each of WSMIN_SCRIPT's, when it names several)."""
    return PROXY_RUN


@pytest.fixture
def start_proxy(tmp_path: Path, proxy_run: Path) -> Iterator[ProxyFactory]:
    """start_proxy(*args, listen=("127.0.0.1", port) or path or None, **popen) -> Proxy.

    Waits until the proxy accepts connections on *listen* (unless None); every proxy
    started is stopped by its pid when the test ends.
    """
    started: List[Proxy] = []

    def start(
        *args: str, listen: Union[Tuple[str, int], str, None] = None, **kwargs: object
    ) -> Proxy:
        kwargs.setdefault("script", proxy_run)
        proxy = Proxy(args, tmp_path / f"proxy-{len(started)}.log", **kwargs)  # type: ignore[arg-type]
        started.append(proxy)
        if listen is not None:
            proxy.wait_listening(listen)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


# -- targets -------------------------------------------------------------------------------


class ThreadedServer:
    """Serves a listening socket, one thread and one *handler* call per connection."""

    def __init__(self, sock: socket.socket, handler: Callable[[socket.socket], None]) -> None:
        self.sock = sock
        self.handler = handler
        self.connections: List[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        for conn in self.connections:
            try:
                conn.close()
            except OSError:
                pass


class TcpServer(ThreadedServer):
    """A threaded TCP server on 127.0.0.1 with one handler per connection."""

    def __init__(self, handler: Callable[[socket.socket], None], host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, 0))
        sock.listen(512)
        self.port = int(sock.getsockname()[1])
        self.host = host
        super().__init__(sock, handler)

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def echo_handler(conn: socket.socket) -> None:
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)


@pytest.fixture
def echo_server() -> Iterator[TcpServer]:
    server = TcpServer(echo_handler)
    yield server
    server.close()


@pytest.fixture
def tcp_server() -> Iterator[Callable[..., TcpServer]]:
    """tcp_server(handler, host="127.0.0.1") -> TcpServer, closed when the test ends."""
    servers: List[TcpServer] = []

    def make(handler: Callable[[socket.socket], None], host: str = "127.0.0.1") -> TcpServer:
        server = TcpServer(handler, host)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()


# -- redis-server, for the TokenRedis plugin ----------------------------------------------

REDIS_PASSWORD = "s3cr:et"  # with a colon: sources must quote it


class HttpService:
    """An HTTP server on 127.0.0.1 in a thread; each GET is answered by `answer`.

    It records the paths asked for; `release` is what an answer that stalls waits for,
    set when the service closes."""

    def __init__(self) -> None:
        self.paths: List[str] = []
        self.release = threading.Event()
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                service.paths.append(self.path)
                status, body = service.answer(self.path)
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, path: str) -> Tuple[int, bytes]:
        """The status and body for a GET of *path*."""
        raise NotImplementedError

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(DEADLINE)


class Pki(NamedTuple):
    """A CA made at test time, and a server certificate from it."""

    ca: trustme.CA
    server_pem: Path  # key and certificate chain in one file, for localhost, 127.0.0.1, ::1
    ca_pem: Path

    def client_cert(self, common_name: str) -> trustme.LeafCert:
        """A client certificate from the CA whose subject CN is *common_name*."""
        return self.ca.issue_cert(f"{common_name}@example.test", common_name=common_name)

    def encrypted_cert(self, folder: Path, password: bytes, hostname: str) -> Tuple[Path, Path]:
        """A certificate for *hostname* from the CA and its key encrypted with *password*,
        as PEM files in *folder*: (certificate chain, key)."""
        leaf = self.ca.issue_cert(hostname)
        key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
        key_path = folder / "key.pem"
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(password),
            )
        )
        cert_path = folder / "cert.pem"
        cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        return cert_path, key_path

    def client_context(self, cert: Optional[trustme.LeafCert] = None) -> ssl.SSLContext:
        """A client TLS context that trusts the CA and, given *cert*, presents it."""
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if cert is not None:
            cert.configure_cert(context)
        return context


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server_pem, ca_pem = folder / "server.pem", folder / "ca.pem"
    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    server.private_key_and_cert_chain_pem.write_to_path(str(server_pem))
    ca.cert_pem.write_to_path(str(ca_pem))
    return Pki(ca, server_pem, ca_pem)


class RedisServer:
    """A redis-server of its own on a free 127.0.0.1 port, with a password and no disk."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(directory)),
                *("--requirepass", REDIS_PASSWORD),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(self.answers, f"redis-server on port {self.port}")
        except BaseException:
            self.stop()
            raise

    def answers(self) -> bool:
        assert self.process.poll() is None, "redis-server exited"
        try:
            return self.cli("PING") == "PONG"
        except subprocess.CalledProcessError:
            return False

    def cli(self, *args: str, db: int = 0) -> str:
        command = ["redis-cli", "-p", str(self.port), "-n", str(db), "--no-auth-warning"]
        command += ["-a", REDIS_PASSWORD, *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    def stop(self) -> None:
        stop_process(self.process)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server for the module's tests; they skip, loudly, where none is installed."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("REDIS TESTS SKIPPED: redis-server/redis-cli not installed (make system-deps)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


def assert_echoed(ws: ClientConnection, payload: bytes) -> None:
    """Send *payload* through an echo target; it must come back whole, in however many frames."""
    ws.send(payload)
    echoed = b""
    while len(echoed) < len(payload):
        chunk = ws.recv(DEADLINE)
        assert isinstance(chunk, bytes)
        echoed += chunk
    assert echoed == payload


ECHO_WINDOW = 512 * 1024  # far below what the kernel and proxy buffers hold on the way


def echo_checksummed(ws: ClientConnection, size: int, message_size: int) -> None:
    """Send *size* random bytes through an echo target while reading them back; compare.

    At most ECHO_WINDOW bytes are in flight: websockets' sync client holds its lock while
    a send blocks, so its reader cannot drain the socket then, and a send that waits for
    the echo to be read would wait forever. The window keeps every send short of that.
    """
    data = os.urandom(size)
    received = hashlib.sha256()
    sent = got = 0
    while got < size:
        if sent < size and sent - got < ECHO_WINDOW:
            message = data[sent : sent + message_size]
            ws.send(message)
            sent += len(message)
        else:
            chunk = ws.recv(DEADLINE)
            assert isinstance(chunk, bytes)
            received.update(chunk)
            got += len(chunk)
    assert received.hexdigest() == hashlib.sha256(data).hexdigest()


# -- a raw WebSocket client, for what well-behaved libraries refuse to send -----------------


def client_frame(
    opcode: int,
    payload: bytes = b"",
    fin: bool = True,
    mask: Optional[bytes] = b"\x37\xfa\x21\x3d",
    rsv: int = 0,
    length: Optional[int] = None,
) -> bytes:
    """A client frame; *mask* None sends it unmasked, *length* may lie about the size."""
    size = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    mask_bit = 0x80 if mask is not None else 0
    if size < 126:
        head = struct.pack("!BB", first, mask_bit | size)
    elif size < 0x10000:
        head = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, size)
    if mask is None:
        return head + payload
    key = (mask * (len(payload) // 4 + 1))[: len(payload)]  # XOR as big integers: fast
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")
    return head + mask + masked.to_bytes(len(payload), "big")


def upgrade_head(
    path: str = "/websockify", headers: Sequence[str] = (), protocols: Sequence[str] = ()
) -> str:
    """The head of a WebSocket upgrade request with a fresh key, *headers* after the usual."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: localhost",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    lines += list(headers)
    return "\r\n".join(lines) + "\r\n\r\n"


class RawClient:
    """A WebSocket client over a plain socket, frame by frame."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    @classmethod
    def connect(
        cls,
        address: Tuple[str, int],
        path: str = "/websockify",
        headers: Sequence[str] = (),
        protocols: Sequence[str] = ("binary",),
    ) -> "RawClient":
        sock = socket.create_connection(address, timeout=DEADLINE)
        client = cls(sock)
        status, response = client.handshake(path, headers, protocols)
        assert status == 101, response
        return client

    def handshake(
        self, path: str = "/websockify", headers: Sequence[str] = (), protocols: Sequence[str] = ()
    ) -> Tuple[int, str]:
        self.sock.sendall(upgrade_head(path, headers, protocols).encode())
        return self.read_response()

    def read_response(self) -> Tuple[int, str]:
        """The status and head of an HTTP response (its body, if any, stays buffered)."""
        while b"\r\n\r\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed before a response: {self.buffer!r}")
            self.buffer += data
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        text = head.decode("latin-1")
        return int(text.split(" ", 2)[1]), text

    def _read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed mid-frame")
            self.buffer += data
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def recv_frame(self) -> Tuple[int, bytes, bool]:
        """(opcode, payload, fin) of the next server frame, which must be unmasked."""
        first, second = self._read_exact(2)
        assert not second & 0x80, "server frames must not be masked"
        size = second & 0x7F
        if size == 126:
            size = struct.unpack("!H", self._read_exact(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", self._read_exact(8))[0]
        return first & 0x0F, self._read_exact(size), bool(first & 0x80)

    def recv_close(self) -> Tuple[int, str]:
        """Skip data frames until the close frame; return its code and reason."""
        while True:
            opcode, payload, _ = self.recv_frame()
            if opcode == 0x8:
                if not payload:
                    return 1005, ""
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode()

    def recv_data(self, size: int) -> bytes:
        """Gather *size* payload bytes from data frames."""
        got = b""
        while len(got) < size:
            opcode, payload, _ = self.recv_frame()
            assert opcode in (0x0, 0x1, 0x2), f"unexpected opcode {opcode}"
            got += payload
        return got

    def send(self, opcode: int, payload: bytes = b"", **kwargs: object) -> None:
        self.sock.sendall(client_frame(opcode, payload, **kwargs))  # type: ignore[arg-type]

    def at_eof(self, timeout: float = DEADLINE) -> bool:
        """True once the server has closed the TCP connection (after any buffered bytes)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.buffer += data
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


# -- the proxy process as the kernel sees it -------------------------------------------------


def rss_kib(pid: int) -> int:
    """Resident memory of *pid* in KiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time *pid* has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_files(pid: int) -> Set[str]:
    """What the process's descriptors point at ("socket:[inode]" for a socket); a file
    opened anew never matches one closed before, as a reused descriptor number would."""
    files = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            files.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:  # closed while listed
            pass
    return files


def descriptor_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def process_exited(pid: int) -> bool:
    """True once *pid* has exited: reaped, or a zombie its parent has not reaped yet (a
    process that is not our child may be left to an init that is slow to reap, or never)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # the second: it went while being read
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


class Bystander:
    """A healthy WebSocket session echoing in a thread while a test attacks the proxy.

    assert_unharmed() fails unless echoes kept coming back intact since the last check.
    """

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.rounds = 0
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                payload = os.urandom(1 + self.rounds % 3000)
                self.client.send(0x2, payload)
                assert self.client.recv_data(len(payload)) == payload, "echo corrupted"
                self.rounds += 1
                self._stop.wait(0.01)  # pacing, so the bystander does not load the machine
        except BaseException as exc:  # reported by assert_unharmed
            self.error = exc

    def assert_unharmed(self, rounds: int = 3) -> None:
        before = self.rounds
        wait_until(
            lambda: self.error is not None or self.rounds >= before + rounds,
            "the bystander's echoes",
        )
        assert self.error is None, f"the bystander session broke: {self.error!r}"

    def close(self) -> None:
        self.assert_unharmed()
        self._stop.set()
        self._thread.join(DEADLINE)
        self.client.send(0x8, struct.pack("!H", 1000))
        assert self.client.recv_close()[0] == 1000
        self.client.close()
