"""rebind.so end to end: real programs started under LD_PRELOAD, real sockets, no mocks.

Wrap mode relies on one promise: a bind() of REBIND_OLD_PORT lands on loopback
REBIND_NEW_PORT (127.0.0.1 for IPv4, ::1 for IPv6), and every other bind() is left alone.
What got bound where is read from /proc/net, so an accidental 0.0.0.0 bind shows up.
"""

import errno
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set

import pytest
from conftest import HAVE_IPV6, needs_ipv6, process_exited

STARTUP_DEADLINE = 10.0  # seconds a started program gets to bind and answer
STOP_DEADLINE = 5.0  # seconds between SIGTERM and SIGKILL at teardown
POLL_INTERVAL = 0.02  # seconds between two readiness probes


# A program with one or more listeners, given as JSON in argv[1]. Each answers one request
# with its name and the request, so a test can tell which listener replied. Every bind()
# happens before the first answer: once one listener answers, all binds are done.
SERVER = r"""
import json, selectors, socket, sys

sel = selectors.DefaultSelector()
for spec in json.loads(sys.argv[1]):
    family = socket.AF_INET6 if spec["family"] == 6 else socket.AF_INET
    kind = socket.SOCK_DGRAM if spec["proto"] == "udp" else socket.SOCK_STREAM
    sock = socket.socket(family, kind)
    if "v6only" in spec:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, spec["v6only"])
    sock.bind((spec["host"], spec["port"]))
    if kind == socket.SOCK_STREAM:
        sock.listen(8)
    sel.register(sock, selectors.EVENT_READ, spec["name"].encode())
while True:
    for key, _ in sel.select():
        sock, name = key.fileobj, key.data
        if sock.type == socket.SOCK_DGRAM:
            data, peer = sock.recvfrom(512)
            sock.sendto(name + b" " + data, peer)
            continue
        conn, _ = sock.accept()
        with conn:
            conn.settimeout(5)
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(512)
                if not chunk:
                    break
                data += chunk
            conn.sendall(name + b" " + data)
"""

# Calls bind() through ctypes, the way C callers do, to see what the library does to the
# caller's sockaddr and to errno. argv: OLD NEW RESULT_FILE; runs with cwd = tmp_path.
PROBE = r"""
import ctypes, errno, json, os, socket, struct, sys

old, new, result_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)  # global scope: finds the preloaded bind()
SENTINEL = errno.EDOM  # bind() never sets it, so seeing it means errno was left alone

def call_bind(fd, addr):
    buf = ctypes.create_string_buffer(addr, len(addr))
    ctypes.set_errno(SENTINEL)
    rc = libc.bind(fd, buf, len(addr))
    return {"rc": rc, "errno": ctypes.get_errno(), "unchanged": buf.raw == addr}

def sockaddr_in(host, port):
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + (
        socket.inet_pton(socket.AF_INET, host) + bytes(8))

def sockaddr_in6(host, port):
    return struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0) + (
        socket.inet_pton(socket.AF_INET6, host) + struct.pack("=I", 0))

result = {"sentinel": SENTINEL}
v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
result["v4"] = call_bind(v4.fileno(), sockaddr_in("0.0.0.0", old))
result["v4"]["name"] = list(v4.getsockname())
# 127.0.0.1:new is now taken by v4: the error must be the one the real bind() gives.
busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
result["busy"] = call_bind(busy.fileno(), sockaddr_in("0.0.0.0", old))
# Not a socket: the library's own socket probe fails; only bind()'s ENOTSOCK may show.
pipe_r, pipe_w = os.pipe()
result["pipe"] = call_bind(pipe_r, sockaddr_in("0.0.0.0", old))
# An AF_UNIX path whose first bytes sit where sin_port would and spell the old port.
name = struct.pack("!H", old) + b".sock"
unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
result["unix"] = call_bind(unix.fileno(), struct.pack("=H", socket.AF_UNIX) + name + b"\0")
result["unix"]["exists"] = os.path.exists(name.split(b"\0")[0])
if sys.argv[4:] == ["ipv6"]:
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    result["v6"] = call_bind(v6.fileno(), sockaddr_in6("::", old))
    result["v6"]["name"] = list(v6.getsockname()[:2])
# A raw socket has no port to move, even when the sockaddr names one (needs CAP_NET_RAW).
try:
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
except PermissionError:
    result["raw"] = None
else:
    result["raw"] = call_bind(raw.fileno(), sockaddr_in("127.0.0.2", old))
    result["raw"]["name"] = raw.getsockname()[0]
with open(result_file, "w") as f:
    json.dump(result, f)
"""


# --- helpers ---


class Program:
    """A process started for one test; the `spawn` fixture stops it by pid."""

    def __init__(self, proc: "subprocess.Popen[bytes]", log: Path) -> None:
        self.proc, self.log = proc, log

    def describe(self) -> str:
        status = self.proc.poll()
        state = "running" if status is None else f"exited with {status}"
        return f"pid {self.proc.pid} {state}; output:\n{self.log.read_text(errors='replace')}"


Spawn = Callable[[Sequence[str], Dict[str, str]], Program]


def _stop(program: Program) -> None:
    if program.proc.poll() is None:
        os.kill(program.proc.pid, signal.SIGTERM)
        try:
            program.proc.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            os.kill(program.proc.pid, signal.SIGKILL)
            program.proc.wait(STOP_DEADLINE)


def free_port(taken: Sequence[int] = ()) -> int:
    """A port free on 127.0.0.1 (and ::1 when there is IPv6) and not in *taken*."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port in taken:
            continue
        if HAVE_IPV6:
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock6:
                    sock6.bind(("::1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port found in 100 tries")


def ports(count: int) -> List[int]:
    chosen: List[int] = []
    while len(chosen) < count:
        chosen.append(free_port(chosen))
    return chosen


def preload_env(so: Path, old: Optional[str], new: Optional[str]) -> Dict[str, str]:
    """The environment wrap mode gives a program; None leaves a variable out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBIND_")}
    env["LD_PRELOAD"] = str(so)
    if old is not None:
        env["REBIND_OLD_PORT"] = old
    if new is not None:
        env["REBIND_NEW_PORT"] = new
    return env


def bound(proto: str, port: int) -> Set[str]:
    """Local addresses with a TCP listener (or any UDP socket) on *port*, from /proc/net."""
    found: Set[str] = set()
    for suffix, family in (("", socket.AF_INET), ("6", socket.AF_INET6)):
        table = Path(f"/proc/net/{proto}{suffix}")
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            hex_addr, hex_port = fields[1].split(":")
            if int(hex_port, 16) != port or (proto == "tcp" and fields[3] != "0A"):  # LISTEN
                continue
            # The kernel prints the address as 32-bit words in host byte order.
            words = [int(hex_addr[i : i + 8], 16) for i in range(0, len(hex_addr), 8)]
            found.add(socket.inet_ntop(family, struct.pack(f"={len(words)}I", *words)))
    return found


def accepts(host: str, port: int) -> bool:
    try:
        conn = socket.create_connection((host, port), timeout=2)
    except ConnectionRefusedError:
        return False
    conn.close()
    return True


def wait_listening(program: Program, host: str, port: int) -> None:
    """Return once *host*:*port* accepts connections; fail at the deadline or if *program* dies."""
    deadline = time.monotonic() + STARTUP_DEADLINE
    while not accepts(host, port):
        if program.proc.poll() is not None:
            pytest.fail(f"program quit before listening on {host}:{port}: {program.describe()}")
        if time.monotonic() > deadline:
            pytest.fail(
                f"nothing listens on {host}:{port} after {STARTUP_DEADLINE}s: {program.describe()}"
            )
        time.sleep(POLL_INTERVAL)


def tcp_request(host: str, port: int, payload: bytes) -> bytes:
    with socket.create_connection((host, port), timeout=5) as conn:
        conn.sendall(payload)
        reply = b""
        while True:
            chunk = conn.recv(512)
            if not chunk:
                return reply
            reply += chunk


def udp_request(program: Program, host: str, port: int, payload: bytes) -> bytes:
    """Send *payload* until an answer comes back; datagrams before the bind() are lost."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + STARTUP_DEADLINE
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        while True:
            sock.sendto(payload, (host, port))
            try:
                reply: bytes = sock.recv(512)
                return reply
            except (socket.timeout, ConnectionRefusedError):
                pass  # ICMP port unreachable shows up as a refused recv
            if program.proc.poll() is not None:
                pytest.fail(f"program quit before answering on {host}:{port}: {program.describe()}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"no UDP answer from {host}:{port} after {STARTUP_DEADLINE}s: "
                    f"{program.describe()}"
                )


def start_server(spawn: Spawn, tmp_path: Path, env: Dict[str, str], specs: Any) -> Program:
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    return spawn([sys.executable, str(script), json.dumps(specs)], env)


# --- fixtures ---


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """Start programs in tmp_path with their output in a log; stop each one by pid afterwards."""
    programs: List[Program] = []

    def start(argv: Sequence[str], env: Dict[str, str]) -> Program:
        log = tmp_path / f"program{len(programs)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                env=env,
                cwd=str(tmp_path),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        programs.append(Program(proc, log))
        return programs[-1]

    try:
        yield start
    finally:
        for program in programs:
            _stop(program)


# --- tests ---


def test_http_server_on_any_ipv4_address_moves_to_loopback(
    rebind_so: Path, spawn: Spawn, tmp_path: Path
) -> None:
    old, new = ports(2)
    (tmp_path / "hello.txt").write_bytes(b"hello through rebind\n")
    argv = [sys.executable, "-m", "http.server", str(old), "--bind", "0.0.0.0"]
    program = spawn(argv, preload_env(rebind_so, str(old), str(new)))

    wait_listening(program, "127.0.0.1", new)
    conn = http.client.HTTPConnection("127.0.0.1", new, timeout=5)
    try:
        conn.request("GET", "/hello.txt")
        response = conn.getresponse()
        assert (response.status, response.read()) == (200, b"hello through rebind\n")
    finally:
        conn.close()
    assert bound("tcp", new) == {"127.0.0.1"}
    assert bound("tcp", old) == set()
    assert not accepts("127.0.0.1", old)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2"])
def test_specific_ipv4_address_moves_to_loopback(
    rebind_so: Path, spawn: Spawn, tmp_path: Path, host: str
) -> None:
    old, new = ports(2)
    spec = {"name": "old", "family": 4, "proto": "tcp", "host": host, "port": old}
    program = start_server(spawn, tmp_path, preload_env(rebind_so, str(old), str(new)), [spec])

    wait_listening(program, "127.0.0.1", new)
    assert tcp_request("127.0.0.1", new, b"ping\n") == b"old ping\n"
    assert bound("tcp", new) == {"127.0.0.1"}
    assert bound("tcp", old) == set()


@needs_ipv6
@pytest.mark.parametrize(
    ("host", "v6only"),
    [
        ("::", 1),
        ("::", 0),  # dual stack: still only ::1, see test_dual_stack_any_is_ipv6_only
        ("::1", 1),
        ("::ffff:127.0.0.1", 0),  # v4-mapped needs a dual-stack socket
    ],
)
def test_ipv6_address_moves_to_ipv6_loopback(
    rebind_so: Path, spawn: Spawn, tmp_path: Path, host: str, v6only: int
) -> None:
    old, new = ports(2)
    spec = {"name": "old", "family": 6, "proto": "tcp", "host": host, "port": old}
    spec["v6only"] = v6only
    program = start_server(spawn, tmp_path, preload_env(rebind_so, str(old), str(new)), [spec])

    wait_listening(program, "::1", new)
    assert tcp_request("::1", new, b"ping6\n") == b"old ping6\n"
    assert bound("tcp", new) == {"::1"}
    assert bound("tcp", old) == set()
    assert not accepts("::1", old)
    assert not accepts("127.0.0.1", old)


@needs_ipv6
def test_dual_stack_any_is_ipv6_only(rebind_so: Path, spawn: Spawn, tmp_path: Path) -> None:
    """[::]:OLD with IPV6_V6ONLY=0 served IPv4 too; after the move only [::1]:NEW answers."""
    old, new = ports(2)
    spec = {"name": "old", "family": 6, "proto": "tcp", "host": "::", "port": old, "v6only": 0}
    program = start_server(spawn, tmp_path, preload_env(rebind_so, str(old), str(new)), [spec])

    wait_listening(program, "::1", new)
    assert not accepts("127.0.0.1", new)


@needs_ipv6
def test_ipv4_and_ipv6_binds_of_one_port_both_move(
    rebind_so: Path, spawn: Spawn, tmp_path: Path
) -> None:
    old, new = ports(2)
    specs = [
        {"name": "v4", "family": 4, "proto": "tcp", "host": "0.0.0.0", "port": old},
        {"name": "v6", "family": 6, "proto": "tcp", "host": "::", "port": old, "v6only": 1},
    ]
    program = start_server(spawn, tmp_path, preload_env(rebind_so, str(old), str(new)), specs)

    wait_listening(program, "127.0.0.1", new)
    assert tcp_request("127.0.0.1", new, b"a\n") == b"v4 a\n"
    assert tcp_request("::1", new, b"b\n") == b"v6 b\n"
    assert bound("tcp", new) == {"127.0.0.1", "::1"}
    assert bound("tcp", old) == set()


@pytest.mark.parametrize(
    ("family", "host", "loopback"),
    [
        (4, "0.0.0.0", "127.0.0.1"),
        pytest.param(6, "::", "::1", marks=needs_ipv6),
    ],
)
def test_udp_bind_moves_to_loopback(
    rebind_so: Path, spawn: Spawn, tmp_path: Path, family: int, host: str, loopback: str
) -> None:
    old, new = ports(2)
    spec = {"name": "udp", "family": family, "proto": "udp", "host": host, "port": old}
    program = start_server(spawn, tmp_path, preload_env(rebind_so, str(old), str(new)), [spec])

    assert udp_request(program, loopback, new, b"dgram") == b"udp dgram"
    assert bound("udp", new) == {loopback}
    assert bound("udp", old) == set()


def test_bind_to_another_port_is_not_moved(rebind_so: Path, spawn: Spawn, tmp_path: Path) -> None:
    old, new, other = ports(3)
    specs = [
        {"name": "old", "family": 4, "proto": "tcp", "host": "0.0.0.0", "port": old},
        {"name": "other", "family": 4, "proto": "tcp", "host": "0.0.0.0", "port": other},
    ]
    program = start_server(spawn, tmp_path, preload_env(rebind_so, str(old), str(new)), specs)

    wait_listening(program, "127.0.0.1", new)
    assert tcp_request("127.0.0.1", new, b"x\n") == b"old x\n"
    assert tcp_request("127.0.0.1", other, b"y\n") == b"other y\n"
    assert bound("tcp", other) == {"0.0.0.0"}
    assert bound("tcp", old) == set()


@pytest.mark.parametrize(
    ("old_value", "new_value"),
    [
        (None, None),
        ("{old}", None),
        (None, "{new}"),
        ("", "{new}"),
        ("{old}", ""),
        ("http", "{new}"),
        ("{old}x", "{new}"),
        (" {old}", "{new}"),
        ("+{old}", "{new}"),
        ("{old}", "-1"),
        ("{old}", "0"),
        ("{old}", "65536"),
        ("{old}", "99999999999999999999999"),
        ("0x10", "{new}"),
    ],
)
def test_missing_or_invalid_env_changes_nothing(
    rebind_so: Path,
    spawn: Spawn,
    tmp_path: Path,
    old_value: Optional[str],
    new_value: Optional[str],
) -> None:
    old, new = ports(2)

    def fill(value: Optional[str]) -> Optional[str]:
        return None if value is None else value.format(old=old, new=new)

    spec = {"name": "plain", "family": 4, "proto": "tcp", "host": "0.0.0.0", "port": old}
    env = preload_env(rebind_so, fill(old_value), fill(new_value))
    program = start_server(spawn, tmp_path, env, [spec])

    wait_listening(program, "127.0.0.1", old)
    assert tcp_request("127.0.0.1", old, b"z\n") == b"plain z\n"
    assert bound("tcp", old) == {"0.0.0.0"}
    assert bound("tcp", new) == set()


def run_probe(rebind_so: Path, spawn: Spawn, tmp_path: Path, old: int, new: int) -> Any:
    """Run PROBE under the library and return what it found."""
    script, result_file = tmp_path / "probe.py", tmp_path / "probe.json"
    script.write_text(PROBE)
    argv = [sys.executable, str(script), str(old), str(new), str(result_file)]
    program = spawn(
        argv + (["ipv6"] if HAVE_IPV6 else []), preload_env(rebind_so, str(old), str(new))
    )
    try:
        status = program.proc.wait(STARTUP_DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"probe still running after {STARTUP_DEADLINE}s: {program.describe()}")
    assert status == 0, program.describe()
    return json.loads(result_file.read_text())


def test_caller_sockaddr_and_errno_are_left_alone(
    rebind_so: Path, spawn: Spawn, tmp_path: Path
) -> None:
    old, new = ports(2)
    result = run_probe(rebind_so, spawn, tmp_path, old, new)
    sentinel = result["sentinel"]

    # Moved: the caller's buffer is untouched and a successful bind() leaves errno as it was.
    assert result["v4"] == {
        "rc": 0,
        "errno": sentinel,
        "unchanged": True,
        "name": ["127.0.0.1", new],
    }
    # Errors are the real bind()'s, for the moved address.
    assert result["busy"] == {"rc": -1, "errno": errno.EADDRINUSE, "unchanged": True}
    assert result["pipe"] == {"rc": -1, "errno": errno.ENOTSOCK, "unchanged": True}
    # Only inet families have a port: a path that looks like one is not an address to move.
    assert result["unix"] == {"rc": 0, "errno": sentinel, "unchanged": True, "exists": True}
    if HAVE_IPV6:
        assert result["v6"] == {"rc": 0, "errno": sentinel, "unchanged": True, "name": ["::1", new]}


def test_raw_socket_is_not_moved(rebind_so: Path, spawn: Spawn, tmp_path: Path) -> None:
    old, new = ports(2)
    result = run_probe(rebind_so, spawn, tmp_path, old, new)
    if result["raw"] is None:
        pytest.skip("raw sockets need CAP_NET_RAW")
    sentinel = result["sentinel"]
    assert result["raw"] == {"rc": 0, "errno": sentinel, "unchanged": True, "name": "127.0.0.2"}


# argv: pids file, REBIND_PARENT_PID's value ("{parent}": this process's pid). Starts a
# child under the library (LD_PRELOAD from the environment, which this process does not
# use itself); the child starts a grandchild and writes both pids; all three sleep.
FAMILY = r"""
import os, subprocess, sys, time

CHILD = r'''
import os, subprocess, sys, time

grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
with open(sys.argv[1], "w") as out:
    out.write("%d %d" % (os.getpid(), grandchild.pid))
time.sleep(120)
'''
pids_file, value = sys.argv[1], sys.argv[2]
env = dict(os.environ, LD_PRELOAD=os.environ["FAMILY_PRELOAD"])
env["REBIND_PARENT_PID"] = value.format(parent=os.getpid())
subprocess.Popen([sys.executable, "-c", CHILD, pids_file], env=env)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize(
    ("value", "child_follows"),
    [("{parent}", True), ("1", False), ("", False), ("{parent}x", False), ("-{parent}", False)],
)
def test_parent_pid_makes_only_its_child_follow_the_parent(
    rebind_so: Path, spawn: Spawn, tmp_path: Path, value: str, child_follows: bool
) -> None:
    script, pids_file = tmp_path / "family.py", tmp_path / "pids"
    script.write_text(FAMILY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REBIND_")}
    env["FAMILY_PRELOAD"] = str(rebind_so)
    parent = spawn([sys.executable, str(script), str(pids_file), value], env)
    deadline = time.monotonic() + STARTUP_DEADLINE
    while not pids_file.exists() or len(pids_file.read_text().split()) < 2:
        assert time.monotonic() < deadline, parent.describe()
        time.sleep(POLL_INTERVAL)
    child, grandchild = (int(pid) for pid in pids_file.read_text().split())
    try:
        os.kill(parent.proc.pid, signal.SIGKILL)
        parent.proc.wait(STOP_DEADLINE)
        # SIGTERM comes as the parent dies; a child that is not tied gets a second to show it.
        deadline = time.monotonic() + (STOP_DEADLINE if child_follows else 1.0)
        while not process_exited(child) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        assert process_exited(child) == child_follows
        assert not process_exited(grandchild)  # the child's own children are never tied
    finally:
        for pid in (grandchild, child):
            if not process_exited(pid):
                os.kill(pid, signal.SIGKILL)
