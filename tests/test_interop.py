"""Other real WebSocket clients through the proxy: Node's ws and Python's websocket-client.

Each sends random data in many messages to an echo target and must get the very same bytes
back (compared by SHA-256), over ws:// and over wss:// with a CA made at test time.
"""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import websocket
from conftest import DEADLINE, Pki, ProxyFactory, TcpServer, free_port, run_captured

pytestmark = pytest.mark.timeout(120)

TESTS = Path(__file__).resolve().parent
SIZE = 3 * 1024 * 1024  # bytes each way: enough for many frames and some backpressure
WINDOW = 256 * 1024  # bytes the Python client lets travel before it reads the echo
# Message sizes, used in turn: 7-bit, 16-bit and 64-bit frame lengths and their edges.
MESSAGE_SIZES = (1, 125, 126, 1000, 65535, 65536, 70000)


def start_echo_proxy(
    start_proxy: ProxyFactory, echo_server: TcpServer, pki: Pki, scheme: str
) -> str:
    """The proxy in front of *echo_server*; its URL for *scheme* (ws or wss)."""
    port = free_port()
    tls = ("--cert", str(pki.server_pem)) if scheme == "wss" else ()
    listen = f"127.0.0.1:{port}"
    start_proxy(*tls, listen, echo_server.target, listen=("127.0.0.1", port))
    return f"{scheme}://127.0.0.1:{port}/websockify"


def node_ws_client() -> str:
    """The node program, or a loud skip when node or the pinned ws package is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("MISSING node: install Debian's nodejs (`make system-deps` as root)")
    if not (TESTS / "node_modules" / "ws" / "package.json").is_file():
        pytest.skip("MISSING Node's ws package: run `make node-deps` (npm ci into tests/)")
    return node


@pytest.mark.smoke
@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_node_ws_client_gets_its_data_back(
    start_proxy: ProxyFactory, echo_server: TcpServer, pki: Pki, tmp_path: Path, scheme: str
) -> None:
    node = node_ws_client()
    url = start_echo_proxy(start_proxy, echo_server, pki, scheme)
    sent, returned = tmp_path / "sent", tmp_path / "returned"
    sent.write_bytes(os.urandom(SIZE))
    command = [node, str(TESTS / "ws_echo_client.js"), url, str(sent), str(returned)]
    command += [",".join(map(str, MESSAGE_SIZES)), str(pki.ca_pem)]
    result = run_captured(command)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"code":1000' in result.stdout, result.stdout
    digest = hashlib.sha256(sent.read_bytes()).hexdigest()
    assert hashlib.sha256(returned.read_bytes()).hexdigest() == digest


@pytest.mark.smoke
@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_websocket_client_gets_its_data_back(
    start_proxy: ProxyFactory, echo_server: TcpServer, pki: Pki, scheme: str
) -> None:
    url = start_echo_proxy(start_proxy, echo_server, pki, scheme)
    ws = websocket.create_connection(
        url, subprotocols=["binary"], sslopt={"ca_certs": str(pki.ca_pem)}, timeout=DEADLINE
    )
    try:
        assert ws.getsubprotocol() == "binary"
        data = os.urandom(SIZE)
        received = hashlib.sha256()
        sent = count = turn = 0
        # One thread, at most WINDOW bytes in flight: an SSL socket must not be read and
        # written from two threads at once, and the window fits in the buffers on the way.
        while count < SIZE:
            if sent < SIZE and sent - count < WINDOW:
                size = MESSAGE_SIZES[turn % len(MESSAGE_SIZES)]
                ws.send_binary(data[sent : sent + size])
                sent, turn = min(sent + size, SIZE), turn + 1
                continue
            opcode, chunk = ws.recv_data()
            assert opcode == websocket.ABNF.OPCODE_BINARY, f"opcode {opcode}"
            received.update(chunk)
            count += len(chunk)
        assert received.hexdigest() == hashlib.sha256(data).hexdigest()
        ws.send("text reaches the target as bytes")
        assert ws.recv_data() == (websocket.ABNF.OPCODE_BINARY, b"text reaches the target as bytes")
    finally:
        ws.close()
