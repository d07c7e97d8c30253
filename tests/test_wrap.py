"""Wrap mode end to end: PORT -- PROGRAM, with rebind.so moving the program's port.

Real programs (http.server, small servers written here, sh) run under the real proxy; a
websockets client sends an HTTP request over the relay and reads the answer.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
from conftest import (
    DEADLINE,
    PROXY_PYTHON,
    PROXY_RUN,
    Proxy,
    ProxyFactory,
    free_port,
    needs_ipv6,
    process_exited,
    run_captured,
    wait_until,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

import websockify_min

# Serves one HTTP request on 0.0.0.0:argv[1], naming its pid, then exits with status 3.
ONE_SHOT = r"""
import os, socket, sys

with socket.socket() as server:
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", int(sys.argv[1])))
    server.listen(1)
    conn, _ = server.accept()
    with conn:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nserved by %d" % os.getpid())
sys.exit(3)
"""

# Serves forever on 0.0.0.0:argv[1] and ignores SIGTERM.
STUBBORN = r"""
import signal, socket, sys

signal.signal(signal.SIGTERM, signal.SIG_IGN)
with socket.socket() as server:
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", int(sys.argv[1])))
    server.listen(8)
    while True:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nstubborn")
"""


def exchange(port: int, request: bytes) -> Tuple[bytes, Optional[int]]:
    """Send *request* over a WebSocket to the proxy; return what came back and the close code."""
    reply = b""
    try:
        with connect(f"ws://127.0.0.1:{port}/", open_timeout=DEADLINE) as ws:
            ws.send(request)
            while True:
                chunk = ws.recv(DEADLINE)
                assert isinstance(chunk, bytes)
                reply += chunk
    except ConnectionClosed as exc:
        return reply, exc.rcvd.code if exc.rcvd else None


def http_get(port: int, path: str = "/") -> bytes:
    """GET *path* from the wrapped program through the proxy.

    Until the program has bound its port, connecting to it fails and the WebSocket is
    closed with 1011; that is retried until the deadline.
    """
    request = f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode()
    deadline = time.monotonic() + DEADLINE
    while True:
        reply, code = exchange(port, request)
        if code == 1000:
            return reply
        assert code == 1011, (code, reply)
        assert time.monotonic() < deadline, "the wrapped program never answered"
        time.sleep(0.05)


def program_pids(proxy: Proxy) -> List[int]:
    """The pids the proxy says it started the wrapped program with, in order."""
    return [
        int(pid) for pid in re.findall(r"started the wrapped program \(pid (\d+)\)", proxy.log())
    ]


def python_server(tmp_path: Path, name: str, source: str) -> Tuple[int, List[str]]:
    """A free port, and the command that runs *source* (saved as *name*) serving on it."""
    port = free_port()
    script = tmp_path / name
    script.write_text(source)
    return port, [sys.executable, str(script), str(port)]


def start_wrapped(
    start_proxy: ProxyFactory, port: int, command: List[str], *options: str, **kwargs: object
) -> Proxy:
    proxy = start_proxy(*options, f"127.0.0.1:{port}", "--", *command, **kwargs)
    proxy.wait_log("started the wrapped program")
    return proxy


@pytest.mark.smoke
def test_http_server_on_ipv4_any_is_reached_on_the_same_port(
    start_proxy: ProxyFactory, rebind_so: Path, tmp_path: Path
) -> None:
    port = free_port()
    (tmp_path / "hello.txt").write_bytes(b"hello from the wrapped server\n")
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "0.0.0.0"]
    proxy = start_wrapped(start_proxy, port, command, cwd=tmp_path)

    reply = http_get(port, "/hello.txt")
    assert reply.startswith(b"HTTP/1.0 200 OK\r\n")
    assert reply.endswith(b"\r\n\r\nhello from the wrapped server\n")
    (pid,) = program_pids(proxy)
    moved = re.search(r"moved to loopback port (\d+)", proxy.log())
    assert moved and int(moved.group(1)) != port

    assert proxy.stop() == 0
    assert process_exited(pid), "the wrapped program outlived the proxy"
    assert f"the wrapped program (pid {pid}) was killed by SIGTERM" in proxy.log()


@needs_ipv6
def test_server_on_ipv6_any_is_reached_on_the_same_port(
    start_proxy: ProxyFactory, rebind_so: Path, tmp_path: Path
) -> None:
    """http.server binds [::] dual-stack; rebind.so moves it to [::1] only, which the
    proxy tries after 127.0.0.1."""
    port = free_port()
    (tmp_path / "six.txt").write_bytes(b"over IPv6\n")
    command = [sys.executable, "-u", "-m", "http.server", str(port), "--bind", "::"]
    proxy = start_wrapped(start_proxy, port, command, cwd=tmp_path)

    reply = http_get(port, "/six.txt")
    assert reply.startswith(b"HTTP/1.0 200 OK\r\n") and reply.endswith(b"\r\n\r\nover IPv6\n")
    assert "Serving HTTP on ::1 port" in proxy.log()  # the program's own output


@pytest.mark.parametrize(
    ("command", "status", "logged"),
    [
        (["{python}", "{one_shot}", "{port}"], 3, "exited with status 3"),
        (["sh", "-c", "kill -KILL $$"], 128 + signal.SIGKILL, "was killed by SIGKILL"),
        (["sh", "-c", "exit 0"], 0, "exited with status 0"),
    ],
    ids=["status", "signal", "success"],
)
def test_exit_mode_exits_with_the_program_status(
    start_proxy: ProxyFactory,
    rebind_so: Path,
    tmp_path: Path,
    command: List[str],
    status: int,
    logged: str,
) -> None:
    port = free_port()
    (tmp_path / "one_shot.py").write_text(ONE_SHOT)
    fill = {"python": sys.executable, "one_shot": str(tmp_path / "one_shot.py"), "port": port}
    proxy = start_wrapped(start_proxy, port, [arg.format(**fill) for arg in command])
    if status == 3:  # the one-shot server answers once before it exits
        assert b"served by" in http_get(port)

    assert proxy.wait_exit() == status, proxy.log()
    assert logged in proxy.log()


def test_ignore_mode_keeps_serving_after_the_program_exits(
    start_proxy: ProxyFactory, rebind_so: Path, tmp_path: Path
) -> None:
    port, command = python_server(tmp_path, "one_shot.py", ONE_SHOT)
    proxy = start_wrapped(start_proxy, port, command, "--wrap-mode", "ignore")

    assert b"served by" in http_get(port)
    proxy.wait_log("exited with status 3")
    reply, code = exchange(port, b"GET / HTTP/1.0\r\n\r\n")
    assert (reply, code) == (b"", 1011)
    assert proxy.proc.poll() is None
    assert "--wrap-mode ignore: serving on" in proxy.log()
    assert len(program_pids(proxy)) == 1
    assert proxy.stop() == 0


def test_respawn_mode_restarts_the_program(
    start_proxy: ProxyFactory, rebind_so: Path, tmp_path: Path
) -> None:
    port, command = python_server(tmp_path, "one_shot.py", ONE_SHOT)
    proxy = start_wrapped(start_proxy, port, command, "--wrap-mode", "respawn")

    first = http_get(port)
    second = http_get(port)  # served by the program started again after the first exited
    pids = program_pids(proxy)
    assert len(pids) >= 2 and pids[0] != pids[1]
    assert first.endswith(b"served by %d" % pids[0])
    assert second.endswith(b"served by %d" % pids[1])
    assert proxy.stop() == 0
    assert all(process_exited(pid) for pid in pids)


def test_respawn_is_throttled_to_three_starts_in_ten_seconds(
    start_proxy: ProxyFactory, rebind_so: Path, tmp_path: Path
) -> None:
    starts = tmp_path / "starts"
    command = ["sh", "-c", f"date +%s.%N >> {starts}"]  # records each start, exits at once
    proxy = start_wrapped(start_proxy, free_port(), command, "--wrap-mode", "respawn")

    def times() -> List[float]:
        return [float(line) for line in starts.read_text().split()] if starts.exists() else []

    limit, window = websockify_min.RESPAWN_LIMIT, websockify_min.RESPAWN_WINDOW
    wait_until(lambda: len(times()) >= 2 * limit, "two rounds of starts", window + DEADLINE)
    started = times()
    # Three starts at once, then a pause until ten seconds after the first, and so on.
    assert started[limit - 1] - started[0] < window
    for first, fourth in zip(started, started[limit:]):
        assert fourth - first >= window - 1.0, started  # 1.0: process start-up jitter
    assert "--wrap-mode respawn: started 3 times within 10s; restarting it in" in proxy.log()
    assert proxy.stop() == 0


def test_program_that_ignores_sigterm_is_killed_when_the_proxy_stops(
    start_proxy: ProxyFactory, rebind_so: Path, tmp_path: Path
) -> None:
    port, command = python_server(tmp_path, "stubborn.py", STUBBORN)
    proxy = start_wrapped(start_proxy, port, command)
    assert http_get(port).endswith(b"stubborn")
    (pid,) = program_pids(proxy)

    assert proxy.stop() == 0
    assert process_exited(pid)
    log = proxy.log()
    assert "is still running 5s after SIGTERM: killing it" in log
    assert f"the wrapped program (pid {pid}) was killed by SIGKILL" in log


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_program_goes_when_the_proxy_is_killed(
    start_proxy: ProxyFactory, rebind_so: Path, tmp_path: Path
) -> None:
    """SIGKILL gives the proxy no chance to stop the program: rebind.so has it follow."""
    port, command = python_server(tmp_path, "forever.py", STUBBORN.replace("SIG_IGN", "SIG_DFL"))
    # Through a shell that execs the server, as wrapper scripts do: the tie survives exec.
    proxy = start_wrapped(start_proxy, port, ["sh", "-c", 'exec "$@"', "sh", *command])
    assert http_get(port).endswith(b"stubborn")
    (pid,) = program_pids(proxy)
    os.kill(proxy.pid, signal.SIGKILL)
    proxy.wait_exit()
    try:
        wait_until(lambda: process_exited(pid), "the program to exit after the proxy was killed")
    finally:
        if not process_exited(pid):
            os.kill(pid, signal.SIGKILL)


def run_proxy(args: List[str], script: Path = PROXY_RUN) -> "subprocess.CompletedProcess[str]":
    return run_captured([PROXY_PYTHON, str(script), *args], timeout=DEADLINE)


def test_missing_rebind_so_is_one_startup_error(tmp_path: Path) -> None:
    alone = tmp_path / PROXY_RUN.name  # a copy with no rebind.so beside it
    shutil.copy(str(PROXY_RUN), str(alone))
    result = run_proxy([f"127.0.0.1:{free_port()}", "--", "sh", "-c", "exit 0"], alone)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert f"rebind.so, which is not in {tmp_path}" in lines[0]
    assert "make rebind.so" in lines[0] and "--rebind PATH" in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rebind", "/nonexistent/rebind.so", "{port}", "--", "true"], "--rebind: '/nonex"),
        (["--rebind", "{rebind}", "{port}", "localhost:1"], "--rebind requires a command"),
        (["{port}", "--", "no-such-program-here"], "'no-such-program-here' is not an exec"),
        (["--unix-target", "/tmp/x.sock", "{port}", "--", "true"], "cannot be combined"),
        (["--inetd", "--", "true"], "needs the port the command listens on"),
        (["{port}", "--"], "'--' must be followed by the command"),
    ],
)
def test_wrap_option_errors(rebind_so: Path, args: List[str], message: str) -> None:
    filled = [arg.format(port=free_port(), rebind=rebind_so) for arg in args]
    result = run_proxy(filled)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_rebind_option_gives_the_library(
    start_proxy: ProxyFactory, rebind_so: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "lib" / "librebind.so"
    elsewhere.parent.mkdir()
    shutil.copy(str(rebind_so), str(elsewhere))
    alone = tmp_path / PROXY_RUN.name
    shutil.copy(str(PROXY_RUN), str(alone))
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    start_wrapped(start_proxy, port, command, "--rebind", str(elsewhere), script=alone)
    assert http_get(port).startswith(b"HTTP/1.0 200 OK\r\n")


def test_embedded_server_supervises_the_program_from_a_thread(
    rebind_so: Path, tmp_path: Path
) -> None:
    """Outside the main thread there is no SIGCHLD handler; a waiter thread stands in."""
    pid_file = tmp_path / "pid"
    command = [
        "sh",
        "-c",
        f"echo $$ > {pid_file}.new && mv {pid_file}.new {pid_file}; exec sleep 60",
    ]
    options = websockify_min.parse_args([f"127.0.0.1:{free_port()}", "--", *command])
    server = websockify_min.Server(options)
    server.start()
    try:
        wait_until(pid_file.exists, "the wrapped program to start")
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)  # the program ends, so exit mode stops the server

        def serving() -> bool:
            return any(thread.name == "websockify-min" for thread in threading.enumerate())

        wait_until(lambda: not serving(), "the server to stop")
        assert server.exit_status == 128 + signal.SIGTERM
        assert process_exited(pid)
    finally:
        server.stop()
