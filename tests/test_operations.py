"""Operations end to end: record files, daemon, pid file, logging, privileges, key passwords."""

import base64
import datetime
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
from conftest import (
    DEADLINE,
    PROXY_SCRIPT,
    Pki,
    ProxyFactory,
    RawClient,
    TcpServer,
    assert_echoed,
    can_connect,
    client_frame,
    echo_checksummed,
    free_port,
    listen_args,
    process_exited,
    wait_until,
    ws_url,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(120)

NODE = shutil.which("node")


# -- record files ---------------------------------------------------------------------------

RecordEntry = Tuple[str, int, bytes]  # direction mark, milliseconds, payload

# Evaluates the file as JavaScript and prints its entries as JSON, payloads in base64.
_NODE_READER = r"""
const fs = require('fs'), vm = require('vm');
const context = {};
vm.runInNewContext(fs.readFileSync(process.argv[1], 'utf8'), context);
const frames = context.VNC_frame_data;
if (!Array.isArray(frames) || frames[frames.length - 1] !== 'EOF') throw new Error('no EOF');
const out = frames.slice(0, -1).map(function (frame) {
  const m = /^([{}])(\d+)\1([\s\S]*)$/.exec(frame);
  if (!m) throw new Error('bad frame ' + JSON.stringify(frame.slice(0, 40)));
  for (let i = 0; i < m[3].length; i++) {
    if (m[3].charCodeAt(i) > 255) throw new Error('not a byte string');
  }
  return [m[1], Number(m[2]), Buffer.from(m[3], 'latin1').toString('base64')];
});
process.stdout.write(JSON.stringify(out));
"""

_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[nrt\\'])")
_LINE = re.compile(r"'([{}])(\d+)\1((?:[^'\\\n]|\\(?:x[0-9a-fA-F]{2}|[nrt\\']))*)',")


def read_record_strictly(path: Path) -> List[RecordEntry]:
    """The same reading as _NODE_READER, for machines without node: a strict grammar."""
    lines = path.read_text("ascii").split("\n")
    assert lines[0] == "var VNC_frame_data = [" and lines[-2:] == ["'EOF'];", ""], lines[-2:]
    simple = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", "'": "'"}
    entries = []
    for line in lines[1:-2]:
        match = _LINE.fullmatch(line)
        assert match, line[:80]
        text = _ESCAPE.sub(
            lambda m: chr(int(m.group(1)[1:], 16)) if len(m.group(1)) == 3 else simple[m.group(1)],
            match.group(3),
        )
        entries.append((match.group(1), int(match.group(2)), text.encode("latin-1")))
    return entries


def read_record(path: Path) -> List[RecordEntry]:
    if NODE is None:
        return read_record_strictly(path)
    output = subprocess.run(
        [NODE, "-e", _NODE_READER, str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert output.returncode == 0, output.stderr.decode()
    return [(mark, ms, base64.b64decode(data)) for mark, ms, data in json.loads(output.stdout)]


def record_files(stem: Path) -> List[Path]:
    """FILE.<n> files of a --record FILE, by session number."""
    found = [
        p for p in stem.parent.iterdir() if re.fullmatch(re.escape(stem.name) + r"\.\d+", p.name)
    ]
    return sorted(found, key=lambda p: int(p.suffix[1:]))


def is_closed_record(path: Path) -> bool:
    return path.exists() and path.read_bytes().endswith(b"'EOF'];\n")


def directions(entries: List[RecordEntry]) -> Tuple[bytes, bytes]:
    """(bytes from the client, bytes to the client) of a record."""
    ms = [entry[1] for entry in entries]
    assert ms == sorted(ms), "times go backwards"
    received = b"".join(data for mark, _, data in entries if mark == "}")
    sent = b"".join(data for mark, _, data in entries if mark == "{")
    return received, sent


# Every byte value, quotes of both kinds, backslashes, newlines and escapes-lookalikes.
TRICKY = [
    bytes(range(256)),
    b"'\"\\'\\\\x41\\n\n\r\t",
    "caf\u00e9 \u2028 \U0001f600".encode(),
    b"</script><!--",
]


@pytest.mark.smoke
def test_record_files_parse_and_decode_to_the_bytes_sent(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    stem = tmp_path / "rec"
    listen, address = listen_args()
    proxy = start_proxy("--record", str(stem), listen, echo_server.target, listen=address)
    large = os.urandom(300_000)  # several writer hand-overs
    with connect(ws_url(address), max_size=None) as ws:
        for payload in [*TRICKY, large]:
            assert_echoed(ws, payload)
    with connect(ws_url(address)) as ws:  # a second session gets a file of its own
        ws.send(b"second session")
        assert ws.recv(DEADLINE) == b"second session"
    wait_until(lambda: len(record_files(stem)) == 2, "two record files")
    first, second = record_files(stem)
    wait_until(lambda: is_closed_record(first) and is_closed_record(second), "closed records")
    assert int(first.suffix[1:]) < int(second.suffix[1:])
    expected = b"".join([*TRICKY, large])
    assert directions(read_record(first)) == (expected, expected)
    assert directions(read_record(second)) == (b"second session", b"second session")
    if NODE is not None:  # the fallback parser agrees with node
        assert read_record_strictly(first) == read_record(first)
    assert proxy.stop() == 0


def test_record_of_a_large_transfer_and_of_sessions_open_at_shutdown(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    stem = tmp_path / "big"
    listen, address = listen_args()
    proxy = start_proxy("--record", str(stem), listen, echo_server.target, listen=address)
    with connect(ws_url(address), max_size=None) as ws:
        echo_checksummed(ws, 8 * 1024 * 1024, 100_000)  # the relay keeps flowing while it records
    wait_until(lambda: any(is_closed_record(p) for p in record_files(stem)), "the big record")
    (big,) = record_files(stem)
    received, sent = directions(read_record(big))
    assert len(received) == len(sent) == 8 * 1024 * 1024 and received == sent

    open_clients = [RawClient.connect(address) for _ in range(3)]
    for number, client in enumerate(open_clients):
        message = b"open at shutdown %d" % number
        client.send(0x2, message)
        assert client.recv_data(len(message)) == message
    os.kill(proxy.pid, signal.SIGTERM)  # the proxy ends these sessions itself
    for client in open_clients:
        assert client.recv_close()[0] == 1001
        client.close()
    assert proxy.wait_exit() == 0
    files = record_files(stem)[1:]
    assert len(files) == 3 and all(is_closed_record(p) for p in files)
    assert sorted(directions(read_record(p)) for p in files) == [
        (b"open at shutdown %d" % n, b"open at shutdown %d" % n) for n in range(3)
    ]


def test_record_of_a_session_the_target_ends(
    start_proxy: ProxyFactory, tcp_server: Callable[..., TcpServer], tmp_path: Path
) -> None:
    def greet_and_hang_up(conn: socket.socket) -> None:
        conn.sendall(b"RFB 003.008\n")
        assert conn.recv(100) == b"RFB 003.008\n"

    target = tcp_server(greet_and_hang_up)
    stem = tmp_path / "vnc"
    listen, address = listen_args()
    start_proxy("--record", str(stem), listen, target.target, listen=address)
    client = RawClient.connect(address)
    assert client.recv_data(12) == b"RFB 003.008\n"
    client.send(0x2, b"RFB 003.008\n")
    assert client.recv_close() == (1000, "Target closed")
    client.close()
    wait_until(lambda: any(is_closed_record(p) for p in record_files(stem)), "a closed record")
    (record,) = record_files(stem)
    entries = read_record(record)
    assert [mark for mark, _, _ in entries] == ["{", "}"]  # the server speaks first in VNC
    assert directions(entries) == (b"RFB 003.008\n", b"RFB 003.008\n")


def test_record_file_that_cannot_be_written_leaves_the_session_alone(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    listen, address = listen_args()
    stem = tmp_path / "missing-directory" / "rec"
    proxy = start_proxy("--record", str(stem), listen, echo_server.target, listen=address)
    with connect(ws_url(address)) as ws:
        ws.send(b"x" * 100_000)
        assert len(ws.recv(DEADLINE)) > 0
    proxy.wait_log("--record: cannot write")
    with connect(ws_url(address)) as ws:
        ws.send(b"still serving")
        assert ws.recv(DEADLINE) == b"still serving"


# -- log file and SIGHUP --------------------------------------------------------------------


def test_log_file_names_client_address_kind_path_and_target(
    start_proxy: ProxyFactory,
    echo_server: TcpServer,
    tmp_path: Path,
    pki: Pki,
) -> None:
    pem, log_file = str(pki.server_pem), tmp_path / "proxy.log"
    listen, address = listen_args()
    start_proxy(
        "--cert", pem, "--log-file", str(log_file), listen, echo_server.target, listen=address
    )
    with connect(ws_url(address, "/plain?one=1")) as ws:
        ws.send(b"ws")
        assert ws.recv(DEADLINE) == b"ws"
    wss_url = f"wss://{address[0]}:{address[1]}/secure/path"
    with connect(wss_url, ssl=pki.client_context()) as ws:
        ws.send(b"wss")
        assert ws.recv(DEADLINE) == b"wss"
    wait_until(lambda: log_file.read_text().count("client closed") >= 2, "both sessions logged")
    lines = log_file.read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", line) for line in lines)

    def line_with(*words: str) -> str:
        found = [line for line in lines if all(word in line for word in words)]
        assert found, f"no log line with {words}:\n" + "\n".join(lines)
        return found[0]

    line_with("127.0.0.1", "(ws://)")
    line_with("127.0.0.1", "(wss://)")
    line_with("127.0.0.1", "/plain?one=1")
    line_with("127.0.0.1", "/secure/path")
    assert len([line for line in lines if echo_server.target in line]) >= 2


def test_sighup_reopens_the_log_file_and_never_stops_the_proxy(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    log_file = tmp_path / "proxy.log"
    rotated = tmp_path / "proxy.log.1"
    listen, address = listen_args()
    proxy = start_proxy("--log-file", str(log_file), listen, echo_server.target, listen=address)
    with connect(ws_url(address, "/before")) as ws:
        ws.send(b"before")
        assert ws.recv(DEADLINE) == b"before"
    wait_until(lambda: "/before" in log_file.read_text(), "the first session in the log")
    log_file.rename(rotated)  # what logrotate does
    os.kill(proxy.pid, signal.SIGHUP)
    wait_until(lambda: log_file.exists() and "reopened" in log_file.read_text(), "a new log file")
    with connect(ws_url(address, "/after")) as ws:
        ws.send(b"after")
        assert ws.recv(DEADLINE) == b"after"
    wait_until(lambda: "/after" in log_file.read_text(), "the second session in the new log")
    assert "/after" not in rotated.read_text()
    assert "/before" not in log_file.read_text()
    os.kill(proxy.pid, signal.SIGHUP)  # also without a file to move, and more than once
    wait_until(lambda: log_file.read_text().count("reopened") == 2, "a second reopen")
    assert proxy.proc.poll() is None
    assert proxy.stop() == 0


def test_sighup_without_a_log_file_is_harmless(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    listen, address = listen_args()
    proxy = start_proxy(listen, echo_server.target, listen=address)
    os.kill(proxy.pid, signal.SIGHUP)
    proxy.wait_log("reopened")
    with connect(ws_url(address)) as ws:
        ws.send(b"alive")
        assert ws.recv(DEADLINE) == b"alive"
    assert proxy.stop() == 0


# -- syslog ---------------------------------------------------------------------------------

RFC5424 = re.compile(
    r"<(?P<pri>\d{1,3})>(?P<version>1) (?P<timestamp>\S+) (?P<hostname>\S+) (?P<app>\S+) "
    r"(?P<procid>\S+) (?P<msgid>\S+) (?P<sd>-) (?P<msg>.*)",
    re.DOTALL,
)
RFC3164 = re.compile(
    r"<(?P<pri>\d{1,3})>(?P<timestamp>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d) (?P<hostname>\S+) "
    r"(?P<app>[^\[\s]+)\[(?P<procid>\d+)\]: (?P<msg>.*)",
    re.DOTALL,
)


def receive_lines(sock: socket.socket, until: str) -> List[str]:
    """Datagrams from *sock* up to and including one containing *until*."""
    lines: List[str] = []
    sock.settimeout(DEADLINE)
    while not lines or until not in lines[-1]:
        lines.append(sock.recv(65536).decode())
    return lines


def check_rfc5424(line: str, pid: int, facility: int) -> str:
    match = RFC5424.fullmatch(line)
    assert match, line
    assert int(match["pri"]) >> 3 == facility
    assert int(match["pri"]) & 7 in (3, 4, 6, 7)
    stamp = datetime.datetime.strptime(match["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ")
    now = datetime.datetime.utcnow()
    assert abs((now - stamp).total_seconds()) < 120, (stamp, now)
    assert match["hostname"] == socket.gethostname()
    assert match["app"] == "WebSockify"
    assert match["procid"] == str(pid)
    return match["msg"]


def check_rfc3164(line: str, pid: int, facility: int) -> str:
    match = RFC3164.fullmatch(line)
    assert match, line
    assert int(match["pri"]) >> 3 == facility
    now = datetime.datetime.now()
    stamp = datetime.datetime.strptime(f"{now.year} {match['timestamp']}", "%Y %b %d %H:%M:%S")
    assert abs((now - stamp).total_seconds()) < 120, (stamp, now)
    assert match["hostname"] == socket.gethostname().split(".")[0]
    assert match["app"] == "WebSockify"
    assert match["procid"] == str(pid)
    return match["msg"]


@pytest.mark.smoke
def test_syslog_over_udp_in_rfc5424(start_proxy: ProxyFactory, echo_server: TcpServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        syslog = f"127.0.0.1:{receiver.getsockname()[1]}"
        listen, address = listen_args()
        proxy = start_proxy("--syslog", syslog, listen, echo_server.target, listen=address)
        with connect(ws_url(address, "/via-syslog")) as ws:
            ws.send(b"hello")
            assert ws.recv(DEADLINE) == b"hello"
        lines = receive_lines(receiver, "client closed")
        messages = [check_rfc5424(line, proxy.pid, facility=1) for line in lines]
        assert any(m.startswith("listening on 127.0.0.1:") for m in messages)
        assert any("/via-syslog" in m for m in messages)
        assert int(RFC5424.fullmatch(lines[0])["pri"]) == 1 * 8 + 6  # type: ignore[index]


def test_syslog_over_a_unix_socket_in_the_legacy_format_drops_rather_than_blocks(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    path = str(tmp_path / "log.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    listen, address = listen_args()
    proxy = start_proxy(
        "-v", "--syslog", path, "--legacy-syslog", listen, echo_server.target, listen=address
    )
    with connect(ws_url(address, "/legacy")) as ws:
        ws.send(b"hello")
        assert ws.recv(DEADLINE) == b"hello"
    lines = receive_lines(receiver, "client closed")
    messages = [check_rfc3164(line, proxy.pid, facility=1) for line in lines]
    assert any("/legacy" in m for m in messages)
    assert {int(RFC3164.fullmatch(line)["pri"]) & 7 for line in lines} >= {6, 7}  # type: ignore[index]

    # A receiver that reads nothing: its queue fills up, the proxy drops lines, never waits.
    for _ in range(150):
        with connect(ws_url(address, "/flood")) as ws:
            ws.send(b"x")
            assert ws.recv(DEADLINE) == b"x"
    # The receiver goes away and comes back (a restarted syslog daemon): found again.
    receiver.close()
    os.unlink(path)
    with connect(ws_url(address, "/while-gone")) as ws:
        ws.send(b"y")
        assert ws.recv(DEADLINE) == b"y"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    with receiver, connect(ws_url(address, "/back")) as ws:
        ws.send(b"z")
        assert ws.recv(DEADLINE) == b"z"
        lines = receive_lines(receiver, "/back")
        notes = [check_rfc3164(line, proxy.pid, facility=1) for line in lines]
        assert any(re.search(r"syslog: \d+ earlier lines were dropped", n) for n in notes)
    assert proxy.stop() == 0


def receive_stream_lines(conn: socket.socket, until: str) -> List[str]:
    """NUL-terminated lines from a stream connection, up to and including one with *until*."""
    conn.settimeout(DEADLINE)
    data = b""
    while until.encode() not in data:
        more = conn.recv(65536)
        assert more, "the proxy closed its syslog connection"
        data += more
    while not data.endswith(b"\0"):
        data += conn.recv(65536)
    return [line.decode() for line in data.split(b"\0")[:-1]]


def test_syslog_over_a_unix_stream_socket_and_a_restarted_daemon(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    """syslog-ng's unix-stream("/dev/log"): NUL-terminated lines, as glibc sends them."""
    path = str(tmp_path / "log.sock")

    def stream_daemon() -> socket.socket:
        daemon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        daemon.bind(path)
        daemon.listen(4)
        daemon.settimeout(DEADLINE)
        return daemon

    daemon = stream_daemon()
    listen, address = listen_args()
    proxy = start_proxy("--syslog", path, listen, echo_server.target, listen=address)
    conn, _ = daemon.accept()
    with connect(ws_url(address, "/over-a-stream")) as ws:
        assert_echoed(ws, b"hello")
    lines = receive_stream_lines(conn, "client closed")
    messages = [check_rfc5424(line, proxy.pid, facility=1) for line in lines]
    assert any(m.startswith("listening on 127.0.0.1:") for m in messages)
    assert any("/over-a-stream" in m for m in messages)

    # The daemon restarts: its connection and socket go, and lines meanwhile are lost.
    conn.close()
    daemon.close()
    os.unlink(path)
    with connect(ws_url(address, "/while-gone")) as ws:
        assert_echoed(ws, b"y")
    daemon = stream_daemon()
    with daemon, connect(ws_url(address, "/back")) as ws:
        assert_echoed(ws, b"z")
        conn, _ = daemon.accept()
        with conn:
            lines = receive_stream_lines(conn, "/back")
    notes = [check_rfc5424(line, proxy.pid, facility=1) for line in lines]
    assert any(re.search(r"syslog: \d+ earlier lines were dropped", n) for n in notes)
    assert not any("/while-gone" in n for n in notes)
    assert proxy.stop() == 0


@pytest.mark.parametrize(
    ("syslog", "message"),
    [("/nonexistent/log.sock", "--syslog: cannot send to"), ("host:port", "--syslog port")],
)
def test_syslog_that_cannot_work_is_a_startup_error(
    start_proxy: ProxyFactory, syslog: str, message: str
) -> None:
    proxy = start_proxy("--syslog", syslog, "127.0.0.1:0", "127.0.0.1:1")
    assert proxy.wait_exit() == 2
    output = proxy.log().strip()
    assert len(output.splitlines()) == 1 and message in output, output


# -- daemon and pid file --------------------------------------------------------------------


def kill_daemon(pid_file: Path) -> None:
    """Stop a daemon a failed test may have left running, by the pid in its pid file."""
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return
    if not process_exited(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.smoke
def test_daemon_serves_once_the_parent_exits_and_stops_by_its_pid_file(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    pid_file = work / "proxy.pid"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        listen, address = listen_args()
        parent = start_proxy(
            "-D",
            "--pid-file", "proxy.pid",  # relative paths: the daemon works from /
            "--log-file", "proxy.log",
            "--record", "rec",
            "--syslog", f"127.0.0.1:{receiver.getsockname()[1]}",
            listen, echo_server.target,
            cwd=work,
        )  # fmt: skip
        try:
            assert parent.wait_exit() == 0, parent.log()
            with connect(ws_url(address, "/daemon")) as ws:  # no waiting: it is listening
                ws.send(b"from a daemon")
                assert ws.recv(DEADLINE) == b"from a daemon"
            pid = int(pid_file.read_text())
            assert pid != parent.pid
            assert os.readlink(f"/proc/{pid}/cwd") == "/"
            assert os.getsid(pid) != os.getsid(0) and os.getsid(pid) != pid
            for fd in (0, 1, 2):
                assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
            lines = receive_lines(receiver, "client closed")
            messages = [check_rfc5424(line, pid, facility=3) for line in lines]
            assert any("/daemon" in m for m in messages)
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: process_exited(pid), "the daemon to exit")
        finally:
            kill_daemon(pid_file)
    assert not pid_file.exists()
    assert "/daemon" in (work / "proxy.log").read_text()
    (record,) = record_files(work / "rec")
    assert directions(read_record(record)) == (b"from a daemon", b"from a daemon")
    assert parent.log() == ""  # the terminal gets nothing from a daemon that started well


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--heartbeat", "soon"], "--heartbeat"),  # found before forking
        (["--cert", "/nonexistent.pem", "--ssl-only"], "--ssl-only"),
        (["--key-password-file", "/nonexistent/pw", "--cert", "{pem}"], "--key-password-file"),
        (["--pid-file", "{busy_pid_file}"], "names process"),
        (["--user", "no-such-user-here"], "--user: no such user"),
    ],
)
def test_daemon_that_cannot_start_prints_the_error_and_exits_2(
    start_proxy: ProxyFactory,
    tmp_path: Path,
    pki: Pki,
    args: List[str],
    message: str,
) -> None:
    busy_pid_file = tmp_path / "busy.pid"
    busy_pid_file.write_text(f"{os.getpid()}\n")  # a process that is running: this one
    args = [a.format(pem=pki.server_pem, busy_pid_file=busy_pid_file) for a in args]
    listen, address = listen_args()
    proxy = start_proxy("-D", *args, listen, "127.0.0.1:1")
    assert proxy.wait_exit() == 2
    output = proxy.log().strip()
    assert len(output.splitlines()) == 1 and message in output, output
    assert output.startswith("websockify_min.py: error: ")
    assert not can_connect(address)  # no daemon was left behind
    assert busy_pid_file.read_text() == f"{os.getpid()}\n"


def test_daemon_listen_port_in_use_is_reported_by_the_parent(start_proxy: ProxyFactory) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        proxy = start_proxy("-D", f"127.0.0.1:{busy.getsockname()[1]}", "127.0.0.1:1")
        assert proxy.wait_exit() == 2
        output = proxy.log().strip()
        assert len(output.splitlines()) == 1 and "cannot listen" in output, output


def test_pid_file_without_daemon(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    pid_file = tmp_path / "fg.pid"
    stale = 2**22 + 1  # above pid_max's ceiling: no such process can exist
    pid_file.write_text(f"{stale}\n")  # left by a proxy that died: overwritten
    listen, address = listen_args()
    proxy = start_proxy("--pid-file", str(pid_file), listen, echo_server.target, listen=address)
    assert pid_file.read_text() == f"{proxy.pid}\n"
    assert proxy.stop() == 0
    assert not pid_file.exists()


# -- privileges -----------------------------------------------------------------------------


def ids_of(pid: int) -> Tuple[List[int], List[int], List[int]]:
    """(real, effective, saved, fs) uids, the same gids, and supplementary groups of *pid*."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = [int(v) for v in value.split()] if key in ("Uid", "Gid", "Groups") else []
    return fields["Uid"], fields["Gid"], fields["Groups"]


def become_nobody() -> None:
    os.setgroups([])
    os.setgid(pwd.getpwnam("nobody").pw_gid)
    os.setuid(pwd.getpwnam("nobody").pw_uid)


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="SKIPPED LOUDLY: dropping privileges can only be tested as root"
)


@needs_root
def test_user_and_group_drop_privileges_after_loading_a_root_only_key(
    start_proxy: ProxyFactory,
    echo_server: TcpServer,
    tmp_path: Path,
    pki: Pki,
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    root_only = secret / "server.pem"
    shutil.copy(pki.server_pem, root_only)
    root_only.chmod(0o600)
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid)
    listen, address = listen_args()
    proxy = start_proxy(
        "--user", "nobody", "--group", group.gr_name, "--cert", str(root_only),
        listen, echo_server.target, listen=address,
    )  # fmt: skip
    proxy.wait_log("running as uid")
    uids, gids, groups = ids_of(proxy.pid)
    assert uids == [nobody.pw_uid] * 4 and gids == [group.gr_gid] * 4, (uids, gids)
    assert 0 not in groups
    with connect(f"wss://127.0.0.1:{address[1]}/", ssl=pki.client_context()) as ws:
        ws.send(b"served by nobody")
        assert ws.recv(DEADLINE) == b"served by nobody"
    assert proxy.stop() == 0

    listen, address = listen_args()  # --user alone: the user's own group
    proxy = start_proxy("--user", "nobody", listen, echo_server.target, listen=address)
    proxy.wait_log("running as uid")
    uids, gids, _ = ids_of(proxy.pid)
    assert uids == [nobody.pw_uid] * 4 and gids == [nobody.pw_gid] * 4
    assert proxy.stop() == 0


@needs_root
@pytest.mark.parametrize(
    ("args", "as_nobody", "message"),
    [
        (["--user", "nobody"], True, "--user: changing user needs root"),
        (["--group", "nogroup"], True, "--group: changing user needs root"),
        (["--user", "no-such-user-here"], False, "--user: no such user"),
        (["--group", "no-such-group-here"], False, "--group: no such group"),
    ],
)
def test_privilege_drop_that_cannot_happen_exits_2(
    start_proxy: ProxyFactory, args: List[str], as_nobody: bool, message: str
) -> None:
    listen, address = listen_args()
    kwargs: Dict[str, object] = {}
    if as_nobody:  # an interpreter nobody may run (a venv under /root is out of reach)
        system_python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
        if system_python is None:
            pytest.skip("SKIPPED LOUDLY: no system python3 that user nobody can run")
        kwargs = {"preexec_fn": become_nobody, "python": system_python}
    proxy = start_proxy(*args, listen, "127.0.0.1:1", **kwargs)
    assert proxy.wait_exit() == 2
    output = proxy.log().strip()
    assert len(output.splitlines()) == 1 and message in output, output
    assert not can_connect(address)


# -- key password from a file or the environment -------------------------------------------


@pytest.fixture(scope="module")
def encrypted_key(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Tuple[Path, Path]:
    """A certificate and its key encrypted with the password "s3cret pass"."""
    return pki.encrypted_cert(tmp_path_factory.mktemp("encrypted"), b"s3cret pass", "127.0.0.1")


def test_key_password_from_a_file_or_an_environment_variable(
    start_proxy: ProxyFactory,
    echo_server: TcpServer,
    tmp_path: Path,
    encrypted_key: Tuple[Path, Path],
    pki: Pki,
) -> None:
    cert, key = encrypted_key
    password_file = tmp_path / "password"
    password_file.write_text("s3cret pass\n")  # as `echo` writes it
    password_file.chmod(0o600)
    env = dict(os.environ, KEY_PW="s3cret pass")
    common = ["--cert", str(cert), "--key", str(key)]
    sources = [["--key-password-file", str(password_file)], ["--key-password-env", "KEY_PW"]]
    for source in sources:
        listen, address = listen_args()
        proxy = start_proxy(*common, *source, listen, echo_server.target, listen=address, env=env)
        with connect(f"wss://127.0.0.1:{address[1]}/", ssl=pki.client_context()) as ws:
            ws.send(b"unlocked")
            assert ws.recv(DEADLINE) == b"unlocked"
        assert "s3cret" not in Path(f"/proc/{proxy.pid}/cmdline").read_text()
        assert proxy.stop() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--key-password-file", "{wrong}"], "--key-password-file: wrong password"),
        (["--key-password-file", "/nonexistent/password"], "--key-password-file: cannot read"),
        (["--key-password-env", "NO_SUCH_VARIABLE_HERE"], "--key-password-env: the environment"),
        (["--key-password-env", "WRONG_PASSWORD"], "--key-password-env: wrong password"),
        (
            ["--key-password", "x", "--key-password-env", "WRONG_PASSWORD"],
            "cannot be combined",
        ),
        (["--key-password-file", "{wrong}", "--key-password", "x"], "cannot be combined"),
    ],
)
def test_key_password_sources_that_fail_exit_2(
    start_proxy: ProxyFactory,
    tmp_path: Path,
    encrypted_key: Tuple[Path, Path],
    args: List[str],
    message: str,
) -> None:
    cert, key = encrypted_key
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password")
    env = dict(os.environ, WRONG_PASSWORD="not the password")
    env.pop("NO_SUCH_VARIABLE_HERE", None)
    args = [a.format(wrong=wrong) for a in args]
    proxy = start_proxy(
        "--cert", str(cert), "--key", str(key), *args, "127.0.0.1:0", "h:1", env=env
    )
    assert proxy.wait_exit() == 2
    output = proxy.log().strip()
    assert len(output.splitlines()) == 1 and message in output, output


# -- traffic marks and --run-once -----------------------------------------------------------


def test_traffic_marks_follow_upstreams_legend(
    start_proxy: ProxyFactory, tcp_server: Callable[..., TcpServer]
) -> None:
    chunk = b"t" * 65536
    stop_sending = threading.Event()
    stop_uploading = threading.Event()
    release = threading.Event()
    sent = [0]

    def slow_target(conn: socket.socket) -> None:
        # However large the kernel's buffers grow, the target keeps sending to a client that
        # does not read until the proxy has to queue part of a frame; then it ends with a marker.
        while not stop_sending.is_set():
            conn.sendall(chunk)
            sent[0] += len(chunk)
        conn.sendall(b"END")
        release.wait(6 * DEADLINE)  # and reads nothing meanwhile
        while conn.recv(1 << 20):
            pass

    target = tcp_server(slow_target)
    listen, address = listen_args()
    proxy = start_proxy("--traffic", listen, target.target, listen=address)
    legend_end = "<. - Client send partial"
    proxy.wait_log(legend_end)
    legend = proxy.log().split(legend_end)[0]
    for line in ("Traffic Legend:", "} - Client receive", "}. - Client receive partial"):
        assert line in legend

    def marks() -> str:
        return proxy.log().split(legend_end, 1)[1]

    client = RawClient.connect(address)
    # Generous deadlines: on a loaded machine megabytes through the proxy can take a while.
    slow = 3 * DEADLINE
    wait_until(lambda: "<." in marks(), "<.: the client reads nothing, part of a frame waits", slow)
    stop_sending.set()
    frame = client_frame(0x2, b"0123456789")
    client.sock.sendall(frame[:9])  # a frame cut in the middle of its payload
    wait_until(lambda: "}." in marks(), "}.: a partial frame from the client", slow)
    client.sock.sendall(frame[9:])
    wait_until(lambda: marks().count("}") > marks().count("}."), "}: a complete frame", slow)
    # Masked by a zero key: large frames built without a per-byte loop. As with the download,
    # the client keeps sending to a target that does not read until the proxy queues part.
    upload_frame = struct.pack("!BBQ", 0x82, 0x80 | 127, 1 << 20) + b"\0\0\0\0" + b"c" * (1 << 20)

    def upload() -> None:
        while not stop_uploading.is_set():
            client.sock.sendall(upload_frame)

    sender = threading.Thread(target=upload)
    sender.start()
    wait_until(
        lambda: ">." in marks(), ">.: the target reads nothing, part of the data waits", slow
    )
    stop_uploading.set()
    release.set()
    received = bytearray()
    while not received.endswith(b"END"):
        received += client.recv_data(1)
    assert received == chunk * (sent[0] // len(chunk)) + b"END"
    sender.join(60)
    assert not sender.is_alive(), "the upload never reached the target"
    assert set(re.findall(r"[{}<>]\.?", marks())) == {"}", "}.", "{", ">", ">.", "<", "<."}
    client.close()


def test_traffic_marks_are_off_by_default(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    listen, address = listen_args()
    proxy = start_proxy(listen, echo_server.target, listen=address)
    with connect(ws_url(address)) as ws:
        ws.send(b"quiet")
        assert ws.recv(DEADLINE) == b"quiet"
    assert proxy.stop() == 0
    assert not re.search(r"[{}<>]", proxy.log()), proxy.log()


def test_run_once_counts_a_websocket_whose_target_is_unreachable(
    start_proxy: ProxyFactory,
) -> None:
    listen, address = listen_args()
    proxy = start_proxy("--run-once", listen, f"127.0.0.1:{free_port()}", listen=address)
    client = RawClient.connect(address)  # the readiness probe before it did not count
    assert client.recv_close()[0] == 1011
    client.close()
    assert proxy.wait_exit() == 0


@pytest.mark.smoke  # before 3.9 a script's __file__ is relative: the case that matters
def test_daemon_wraps_a_program_when_started_by_a_relative_script_name(
    start_proxy: ProxyFactory, rebind_so: Path, tmp_path: Path
) -> None:
    """rebind.so is found beside the script before the daemon moves to /."""
    pid_file = tmp_path / "wrap.pid"
    log_file = tmp_path / "wrap.log"
    port = free_port()
    program = [sys.executable, "-m", "http.server", str(port), "--bind", "0.0.0.0"]
    parent = start_proxy(
        "-D", "--pid-file", str(pid_file), "--log-file", str(log_file),
        f"127.0.0.1:{port}", "--", *program,
        script=PROXY_SCRIPT.name, cwd=PROXY_SCRIPT.parent,
    )  # fmt: skip
    program_pid = 0
    try:
        assert parent.wait_exit() == 0, parent.log()
        wait_until(lambda: "started the wrapped program" in log_file.read_text(), "the program")
        program_pid = int(re.findall(r"wrapped program \(pid (\d+)\)", log_file.read_text())[0])
        request = b"GET / HTTP/1.0\r\n\r\n"

        def answered() -> bool:  # until the program has bound its port, the target is refused
            try:
                with connect(ws_url(("127.0.0.1", port), "/")) as ws:
                    ws.send(request)
                    reply = ws.recv(DEADLINE)
            except ConnectionClosed:
                return False
            return isinstance(reply, bytes) and reply.startswith(b"HTTP/1.0 200")

        wait_until(answered, "the wrapped http.server to answer through the daemon")
        daemon = int(pid_file.read_text())
        os.kill(daemon, signal.SIGTERM)
        wait_until(lambda: process_exited(daemon), "the daemon to exit")
        wait_until(lambda: process_exited(program_pid), "the wrapped program to be stopped")
    finally:
        kill_daemon(pid_file)
        if program_pid and not process_exited(program_pid):
            os.kill(program_pid, signal.SIGKILL)
