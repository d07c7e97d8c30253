"""wss:// clients and TLS targets, with certificates made at test time."""

import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Iterator, List, NamedTuple

import pytest
import trustme
from conftest import (
    DEADLINE,
    Pki,
    ProxyFactory,
    RawClient,
    TcpServer,
    echo_checksummed,
    echo_handler,
    listen_args,
    listening_socket,
)
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(120)


@pytest.mark.smoke
def test_wss_and_ws_on_one_port(
    start_proxy: ProxyFactory, echo_server: TcpServer, pki: Pki
) -> None:
    listen, address = listen_args()
    proxy = start_proxy("--cert", str(pki.server_pem), listen, echo_server.target, listen=address)
    with connect(f"wss://localhost:{address[1]}/", ssl=pki.client_context()) as ws:
        ws.send(b"secure")
        assert ws.recv(DEADLINE) == b"secure"
    with connect(f"ws://127.0.0.1:{address[1]}/") as ws:
        ws.send(b"plain")
        assert ws.recv(DEADLINE) == b"plain"
    log = proxy.log()
    assert "SSL/TLS (wss://) WebSocket connection" in log
    assert "Plain non-SSL (ws://) WebSocket connection" in log


def test_ten_mebibytes_each_way_over_wss(
    start_proxy: ProxyFactory, echo_server: TcpServer, pki: Pki
) -> None:
    listen, address = listen_args()
    start_proxy("--cert", str(pki.server_pem), listen, echo_server.target, listen=address)
    url = f"wss://localhost:{address[1]}/"
    with connect(url, ssl=pki.client_context(), max_size=None) as ws:
        echo_checksummed(ws, 10 * 1024 * 1024, 65536)


def test_ssl_only_refuses_plain_clients(
    start_proxy: ProxyFactory, echo_server: TcpServer, pki: Pki
) -> None:
    listen, address = listen_args()
    proxy = start_proxy(
        "--ssl-only", "--cert", str(pki.server_pem), listen, echo_server.target, listen=address
    )
    with socket.create_connection(address, timeout=DEADLINE) as sock:
        client = RawClient(sock)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.at_eof()
        assert client.buffer == b""
    proxy.wait_log("non-TLS connection refused (--ssl-only)")
    with connect(f"wss://localhost:{address[1]}/", ssl=pki.client_context()) as ws:
        ws.send(b"tls still works")
        assert ws.recv(DEADLINE) == b"tls still works"


@pytest.mark.smoke
def test_verify_client_accepts_good_certificates_only(
    start_proxy: ProxyFactory, echo_server: TcpServer, pki: Pki
) -> None:
    listen, address = listen_args()
    proxy = start_proxy(
        "--cert", str(pki.server_pem), "--verify-client", "--cafile", str(pki.ca_pem),
        listen, echo_server.target, listen=address,
    )  # fmt: skip
    url = f"wss://localhost:{address[1]}/"
    with connect(url, ssl=pki.client_context(pki.client_cert("client-one"))) as ws:
        ws.send(b"known client")
        assert ws.recv(DEADLINE) == b"known client"
    # TLS 1.3 clients learn of the refusal after their side of the handshake: on first use.
    refused = (ssl.SSLError, OSError, ConnectionClosed, InvalidHandshake)
    with pytest.raises(refused), connect(url, ssl=pki.client_context()) as ws:
        ws.send(b"no certificate")
        ws.recv(DEADLINE)
    stranger = trustme.CA().issue_cert("stranger@example.test")
    context = pki.client_context(stranger)
    with pytest.raises(refused), connect(url, ssl=context, open_timeout=DEADLINE) as ws:
        ws.send(b"unknown CA")
        ws.recv(DEADLINE)
    proxy.wait_log("TLS handshake failed")


def test_cafile_without_verify_client_is_a_warning_as_upstream_accepts_it(
    start_proxy: ProxyFactory, echo_server: TcpServer, pki: Pki
) -> None:
    listen, address = listen_args()
    proxy = start_proxy(
        "--cert", str(pki.server_pem), "--cafile", str(pki.ca_pem),
        listen, echo_server.target, listen=address,
    )  # fmt: skip
    proxy.wait_log("--cafile has no effect without --verify-client")
    # No client certificate is asked for: a client without one gets through.
    with connect(f"wss://localhost:{address[1]}/", ssl=pki.client_context()) as ws:
        ws.send(b"no certificate needed")
        assert ws.recv(DEADLINE) == b"no certificate needed"


@pytest.mark.smoke
def test_minimum_tls_version(start_proxy: ProxyFactory, echo_server: TcpServer, pki: Pki) -> None:
    listen, address = listen_args()
    start_proxy(
        "--cert", str(pki.server_pem), "--ssl-version", "tlsv1_3",
        listen, echo_server.target, listen=address,
    )  # fmt: skip
    old = pki.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        connect(f"wss://localhost:{address[1]}/", ssl=old, open_timeout=DEADLINE)
    with connect(f"wss://localhost:{address[1]}/", ssl=pki.client_context()) as ws:
        ws.send(b"tls 1.3")
        assert ws.recv(DEADLINE) == b"tls 1.3"


class TlsTarget(NamedTuple):
    port: int
    server_names: List[str]  # the SNI each client sent


@pytest.fixture
def tls_echo_target(pki: Pki) -> Iterator[TlsTarget]:
    """A TLS echo server on 127.0.0.1 with a certificate for "localhost"."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.server_pem))
    listener = listening_socket(("127.0.0.1", 0), backlog=16)
    seen_names: List[str] = []

    def sni(sock: ssl.SSLObject, name: str, ctx: ssl.SSLContext) -> None:
        seen_names.append(name)

    context.sni_callback = sni

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                tls = context.wrap_socket(conn, server_side=True)
            except (ssl.SSLError, OSError):
                conn.close()
                continue
            threading.Thread(target=echo_handler, args=(tls,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield TlsTarget(int(listener.getsockname()[1]), seen_names)
    listener.close()


def test_ssl_target_with_a_private_ca(
    start_proxy: ProxyFactory, tls_echo_target: TlsTarget, pki: Pki
) -> None:
    listen, address = listen_args()
    target = f"localhost:{tls_echo_target.port}"
    start_proxy(
        "--ssl-target", "--ssl-target-cafile", str(pki.ca_pem), listen, target, listen=address
    )
    with connect(f"ws://127.0.0.1:{address[1]}/") as ws:
        ws.send(b"to a TLS target")
        assert ws.recv(DEADLINE) == b"to a TLS target"
    assert tls_echo_target.server_names == ["localhost"]  # SNI was sent

    # Without the CA the target's certificate cannot be verified: 1011, not a silent pass.
    listen, address = listen_args()
    proxy = start_proxy("--ssl-target", listen, target, listen=address)
    client = RawClient.connect(address)
    code, _ = client.recv_close()
    assert code == 1011
    proxy.wait_log("CERTIFICATE_VERIFY_FAILED")


def test_stalled_tls_handshake_delays_no_one(
    start_proxy: ProxyFactory, echo_server: TcpServer, pki: Pki
) -> None:
    listen, address = listen_args()
    start_proxy(
        "--cert", str(pki.server_pem), "--handshake-timeout", "2",
        listen, echo_server.target, listen=address,
    )  # fmt: skip
    stalled = socket.create_connection(address, timeout=DEADLINE)
    stalled.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
    started = time.monotonic()
    with connect(f"wss://localhost:{address[1]}/", ssl=pki.client_context()) as ws:
        ws.send(b"not delayed")
        assert ws.recv(DEADLINE) == b"not delayed"
    assert time.monotonic() - started < 1.5
    assert RawClient(stalled).at_eof()  # dropped at the handshake deadline
    stalled.close()


def test_encrypted_key_with_password(
    start_proxy: ProxyFactory, echo_server: TcpServer, pki: Pki, tmp_path: Path
) -> None:
    cert_path, key_path = pki.encrypted_cert(tmp_path, b"s3cret", "localhost")
    listen, address = listen_args()
    common = ["--cert", str(cert_path), "--key", str(key_path)]
    start_proxy(*common, "--key-password", "s3cret", listen, echo_server.target, listen=address)
    with connect(f"wss://localhost:{address[1]}/", ssl=pki.client_context()) as ws:
        ws.send(b"unlocked")
        assert ws.recv(DEADLINE) == b"unlocked"

    wrong = start_proxy(*common, "--key-password", "wrong", listen, echo_server.target)
    assert wrong.wait_exit() == 2
    assert "--key-password: wrong password" in wrong.log()
    missing = start_proxy(*common, listen, echo_server.target)
    assert missing.wait_exit() == 2
    assert "is encrypted" in missing.log()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ssl-ciphers", "NO-SUCH-CIPHER"], "--ssl-ciphers"),
        (["--verify-client", "--cafile", "/nonexistent/ca.pem"], "--cafile"),
        (["--ssl-target", "--ssl-target-cafile", "/nonexistent/ca.pem"], "--ssl-target-cafile"),
    ],
)
def test_tls_startup_errors(
    start_proxy: ProxyFactory,
    pki: Pki,
    extra: List[str],
    message: str,
) -> None:
    proxy = start_proxy("--cert", str(pki.server_pem), *extra, "6080", "127.0.0.1:1")
    assert proxy.wait_exit() == 2
    output = proxy.log().strip()
    assert len(output.splitlines()) == 1 and message in output, output


def test_unreadable_certificate_is_a_startup_error(
    start_proxy: ProxyFactory, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    proxy = start_proxy("--cert", str(garbage), "6080", "127.0.0.1:1")
    assert proxy.wait_exit() == 2
    assert "--cert" in proxy.log()
