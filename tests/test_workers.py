"""--workers N: real worker processes, killed and stopped by pid, serving real clients."""

import os
import signal
import socket
import struct
from pathlib import Path
from typing import List, Set, Tuple

import pytest
from conftest import (
    DEADLINE,
    Proxy,
    ProxyFactory,
    RawClient,
    TcpServer,
    env_with_module,
    free_port,
    listen_args,
    open_files,
    process_exited,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)


def children_of(pid: int) -> Set[int]:
    """The live child processes of *pid* (zombies, already dead, are left out)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry))
    return found


def wait_workers(proxy: Proxy, count: int) -> Set[int]:
    workers: Set[int] = set()

    def started() -> bool:
        nonlocal workers
        workers = children_of(proxy.pid)
        return len(workers) == count

    wait_until(started, f"{count} worker processes")
    return workers


def accepted_from(clients: List[RawClient]) -> Set[str]:
    """The sockets at the far end of *clients*' connections, the proxy's, as open_files()
    names them."""
    ports = {client.sock.getsockname()[1] for client in clients}
    sockets = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)  # the column names
            for line in lines:
                fields = line.split()
                remote_port, inode = int(fields[2].rsplit(":", 1)[1], 16), int(fields[9])
                if remote_port in ports and inode:
                    sockets.add(f"socket:[{inode}]")
    return sockets


def start_workers(
    start_proxy: ProxyFactory, target: str, count: int, *options: str
) -> Tuple[Proxy, Tuple[str, int], Set[int]]:
    """A proxy to *target* with *count* workers and *options*, its address, and the workers'
    pids once all of them run."""
    listen, address = listen_args()
    proxy = start_proxy("--workers", str(count), *options, listen, target, listen=address)
    return proxy, address, wait_workers(proxy, count)


def echo_through(clients: List[RawClient]) -> None:
    for index, client in enumerate(clients):
        payload = f"client {index}".encode()
        client.send(0x2, payload)
        assert client.recv_data(len(payload)) == payload


@pytest.mark.smoke
def test_two_workers_share_the_port_and_both_serve(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    proxy, address, workers = start_workers(start_proxy, echo_server.target, 2)
    clients = [RawClient.connect(address) for _ in range(24)]
    try:
        echo_through(clients)
        # The kernel spreads connections over the workers' sockets: each holds some now
        # (24 connections all landing on one of two workers: odds of 1 in 8 million).
        accepted = accepted_from(clients)
        assert len(accepted) == len(clients)
        for pid in workers:
            assert open_files(pid) & accepted, f"worker {pid} got no connection"
        assert "starting 2 worker processes" in proxy.log()
    finally:
        for client in clients:
            client.close()


def test_a_killed_worker_is_replaced_and_service_continues(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    proxy, address, workers = start_workers(start_proxy, echo_server.target, 2)
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: process_exited(victim), "the killed worker to be reaped")
    replaced = wait_workers(proxy, 2)
    assert victim not in replaced and len(replaced & workers) == 1
    proxy.wait_log(f"worker {victim} was killed by signal 9")
    clients = [RawClient.connect(address) for _ in range(12)]
    try:
        echo_through(clients)
    finally:
        for client in clients:
            client.close()
    assert proxy.proc.poll() is None


def test_sigterm_stops_every_worker_gracefully(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    proxy, address, workers = start_workers(start_proxy, echo_server.target, 3)
    clients = [RawClient.connect(address) for _ in range(6)]
    echo_through(clients)
    os.kill(proxy.pid, signal.SIGTERM)
    for client in clients:  # every worker says goodbye to its sessions
        assert client.recv_close() == (1001, "Server shutting down")
        client.send(0x8, struct.pack("!H", 1001))
        client.close()
    assert proxy.wait_exit() == 0
    # Reaped by the supervisor, not orphaned and still running.
    wait_until(lambda: all(process_exited(pid) for pid in workers), "every worker to be gone")
    with pytest.raises(OSError):
        RawClient.connect(address)


def test_run_once_and_inetd_serve_in_one_process(
    start_proxy: ProxyFactory, echo_server: TcpServer
) -> None:
    listen, address = listen_args()
    proxy = start_proxy("--workers", "4", "--run-once", listen, echo_server.target, listen=address)
    assert children_of(proxy.pid) == set()
    client = RawClient.connect(address)
    echo_through([client])
    client.send(0x8, struct.pack("!H", 1000))
    assert client.recv_close()[0] == 1000
    client.close()
    assert proxy.wait_exit() == 0
    assert "worker" not in proxy.log()


def test_unix_listen_workers_share_the_inherited_socket(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    path = str(tmp_path / "proxy.sock")
    proxy = start_proxy("--workers", "2", "--unix-listen", path, echo_server.target, listen=path)
    wait_workers(proxy, 2)
    assert "shared sockets" in proxy.log()
    clients = []
    for _ in range(8):
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(DEADLINE)
        sock.connect(path)
        client = RawClient(sock)
        status, _ = client.handshake(protocols=("binary",))
        assert status == 101
        clients.append(client)
    echo_through(clients)
    for client in clients:
        client.close()
    os.kill(proxy.pid, signal.SIGTERM)
    assert proxy.wait_exit() == 0
    assert not os.path.exists(path)  # removed once, by the supervisor, at the end


@pytest.mark.parametrize(
    "args",
    [
        ["--workers", "0", "127.0.0.1:1"],
        ["--workers", "-2", "127.0.0.1:1"],
        ["--workers", "many", "127.0.0.1:1"],
        ["--workers", "257", "127.0.0.1:1"],
        ["--workers", "2", "--record", "/tmp/never-written", "127.0.0.1:1"],
        ["--workers", "2", "--", "true"],
    ],
)
def test_bad_worker_options_exit_2_with_one_line(
    start_proxy: ProxyFactory, args: List[str]
) -> None:
    proxy = start_proxy(f"127.0.0.1:{free_port()}", *args)
    assert proxy.wait_exit() == 2
    output = proxy.log().strip()
    assert len(output.splitlines()) == 1, output
    assert "--workers" in output and "Traceback" not in output


def test_sighup_reaches_every_worker_and_stops_none(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    log_file = tmp_path / "proxy.log"
    proxy, address, workers = start_workers(
        start_proxy, echo_server.target, 2, "--log-file", str(log_file)
    )
    log_file.rename(tmp_path / "proxy.log.1")  # as logrotate does before signalling
    os.kill(proxy.pid, signal.SIGHUP)

    def reopened_by_all() -> bool:
        return log_file.exists() and log_file.read_text().count("log files reopened") == 3

    wait_until(reopened_by_all, "the supervisor and both workers to reopen the log file")
    assert children_of(proxy.pid) == workers and proxy.proc.poll() is None
    client = RawClient.connect(address)
    echo_through([client])
    client.close()


SLOW_START_PLUGIN = """
import time

class SlowStart:
    def __init__(self, source):
        seconds, self.target = source.split(" ")
        time.sleep(float(seconds))  # each worker loads its plugins while starting

    def lookup(self, token):
        host, port = self.target.rsplit(":", 1)
        return (host, port)
"""


def test_sighup_while_workers_start_waits_for_them_and_kills_none(
    start_proxy: ProxyFactory, echo_server: TcpServer, tmp_path: Path
) -> None:
    log_file = tmp_path / "proxy.log"
    env = env_with_module(tmp_path / "plugins", "slow_start", SLOW_START_PLUGIN)
    listen, address = listen_args()
    proxy = start_proxy(
        "--workers", "2", "--log-file", str(log_file),
        "--token-plugin", "slow_start.SlowStart", "--token-source", f"2 {echo_server.target}",
        listen, listen=address, env=env,
    )  # fmt: skip
    workers = wait_workers(proxy, 2)  # both still in their plugin's two-second start
    log_file.rename(tmp_path / "proxy.log.1")
    os.kill(proxy.pid, signal.SIGHUP)

    def reopened_by_all() -> bool:
        return log_file.exists() and log_file.read_text().count("log files reopened") == 3

    wait_until(reopened_by_all, "the supervisor and both workers to reopen the log file")
    assert children_of(proxy.pid) == workers and proxy.proc.poll() is None
    assert "killed by signal" not in proxy.log() + log_file.read_text()
    client = RawClient.connect(address, path="/websockify?token=any")
    echo_through([client])
    client.close()
