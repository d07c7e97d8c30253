"""Soak test: mixed traffic through one websockify_min process for a given time.

    python3 bench/soak.py --duration 600        # or: make soak DURATION=600

Runs an echo target and, against a proxy in front of it: persistent sessions exchanging
small echoes, sessions streaming bulk data both ways (checksummed), reconnect churn (clean
and abrupt closes) and bad clients (garbage, oversized heads, protocol violations,
handshakes that never finish). Every --interval seconds it samples the proxy's resident
memory, open descriptors and CPU time, and the traffic and errors of the interval. Prints a
table and writes bench/results/soak-latest.json and soak-latest.md.

Needs only the standard library (Python 3.7+, and Linux's /proc); the proxy runs under
--python, any version the proxy supports.
"""

import argparse
import asyncio
import base64
import hashlib
import json
import os
import platform
import random
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))
from websockify_min import unmask  # noqa: E402  (the masking the proxy itself trusts)

SMALL_SESSIONS = 20  # persistent sessions echoing small messages
BULK_WORKERS = 2  # sessions at a time streaming BULK_BYTES each way, one after another
BULK_BYTES = 8 * 1024 * 1024
CHURN_WORKERS = 4  # connect, one echo, close (clean or reset), again
BAD_WORKERS = 2  # one bad client after another


class Stats:
    """Counters of the current interval; errors keep their kind."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.bytes = 0  # payload bytes echoed back and verified
        self.messages = 0
        self.sessions = 0  # sessions opened
        self.bad = 0  # bad clients that got their documented answer
        self.errors: Dict[str, int] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


# -- a minimal WebSocket client on asyncio streams ---------------------------------------------


def frame(opcode: int, payload: bytes, rng: random.Random, masked: bool = True) -> bytes:
    size = len(payload)
    first = 0x80 | opcode
    bit = 0x80 if masked else 0
    if size < 126:
        head = struct.pack("!BB", first, bit | size)
    elif size < 0x10000:
        head = struct.pack("!BBH", first, bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, bit | 127, size)
    if not masked:
        return head + payload
    mask = rng.getrandbits(32).to_bytes(4, "big")
    return head + mask + bytes(unmask(payload, mask))


async def read_frame(reader: asyncio.StreamReader) -> Tuple[int, bytes]:
    first, second = await reader.readexactly(2)
    size = second & 0x7F
    if size == 126:
        size = struct.unpack("!H", await reader.readexactly(2))[0]
    elif size == 127:
        size = struct.unpack("!Q", await reader.readexactly(8))[0]
    return first & 0x0F, await reader.readexactly(size)


def request(path: str = "/websockify") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.rng = random.Random()

    @classmethod
    async def open(cls, address: Tuple[str, int], stats: Stats) -> "Client":
        reader, writer = await asyncio.open_connection(*address, limit=1 << 20)
        writer.write(request())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        if not head.startswith(b"HTTP/1.1 101 "):
            writer.close()
            raise ConnectionError(f"handshake answered {head[:40]!r}")
        stats.sessions += 1
        return cls(reader, writer)

    async def send(self, payload: bytes) -> None:
        self.writer.write(frame(0x2, payload, self.rng))
        await self.writer.drain()

    async def receive(self, size: int) -> bytes:
        parts, got = [], 0
        while got < size:
            opcode, payload = await read_frame(self.reader)
            if opcode == 0x9:  # the proxy's heartbeat
                self.writer.write(frame(0xA, payload, self.rng))
                continue
            if opcode != 0x2:
                raise ConnectionError(f"opcode {opcode} while expecting data")
            parts.append(payload)
            got += len(payload)
        return b"".join(parts)

    async def close(self, abrupt: bool = False) -> None:
        if abrupt:
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.writer.close()
            return
        self.writer.write(frame(0x8, struct.pack("!H", 1000), self.rng))
        while True:
            opcode, _ = await asyncio.wait_for(read_frame(self.reader), 30)
            if opcode == 0x8:
                break
        await self.reader.read()
        self.writer.close()


# -- the workloads ----------------------------------------------------------------------------


async def small_echoes(address: Tuple[str, int], stats: Stats, stop: asyncio.Event) -> None:
    rng = random.Random()
    while not stop.is_set():
        client: Optional[Client] = None
        try:
            client = await Client.open(address, stats)
            while not stop.is_set():
                message = os.urandom(rng.randint(1, 200))
                await client.send(message)
                if await asyncio.wait_for(client.receive(len(message)), 30) != message:
                    stats.error("small echo corrupted")
                    break
                stats.messages += 1
                stats.bytes += len(message)
                await asyncio.sleep(0.02)
            await client.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            stats.error(f"small echo: {type(exc).__name__}")
            if client is not None:
                client.writer.close()
            await asyncio.sleep(0.5)


async def send_bulk(client: Client, data: bytes) -> None:
    for offset in range(0, len(data), 65536):
        await client.send(data[offset : offset + 65536])


async def bulk(address: Tuple[str, int], stats: Stats, stop: asyncio.Event) -> None:
    rng = random.Random()
    while not stop.is_set():
        data = rng.getrandbits(BULK_BYTES * 8).to_bytes(BULK_BYTES, "little")
        client: Optional[Client] = None
        try:
            client = await Client.open(address, stats)

            _, echoed = await asyncio.wait_for(
                asyncio.gather(send_bulk(client, data), client.receive(BULK_BYTES)), 120
            )
            if hashlib.sha256(echoed).digest() != hashlib.sha256(data).digest():
                stats.error("bulk checksum mismatch")
            else:
                stats.bytes += BULK_BYTES
            await client.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            stats.error(f"bulk: {type(exc).__name__}")
            if client is not None:
                client.writer.close()
            await asyncio.sleep(0.5)


async def churn(address: Tuple[str, int], stats: Stats, stop: asyncio.Event) -> None:
    rng = random.Random()
    while not stop.is_set():
        client: Optional[Client] = None
        try:
            client = await Client.open(address, stats)
            message = b"churn %d" % rng.getrandbits(32)
            await client.send(message)
            if await asyncio.wait_for(client.receive(len(message)), 30) != message:
                stats.error("churn echo corrupted")
            stats.messages += 1
            await client.close(abrupt=rng.random() < 0.3)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            stats.error(f"churn: {type(exc).__name__}")
            if client is not None:
                client.writer.close()
            await asyncio.sleep(0.5)
        await asyncio.sleep(0.01)


async def bad_client(address: Tuple[str, int], stats: Stats, stop: asyncio.Event) -> None:
    """One misbehaving client after another; each must get its documented answer."""
    rng = random.Random()
    kinds = ("garbage", "oversized", "unmasked", "bad-close", "silent")
    while not stop.is_set():
        kind = rng.choice(kinds)
        try:
            reader, writer = await asyncio.open_connection(*address)
            answer: bytes = b""
            if kind == "garbage":
                writer.write(os.urandom(rng.randint(1, 300)) + b"\r\n\r\n")
                answer = await asyncio.wait_for(reader.read(), 30)
                ok = answer.startswith(b"HTTP/1.1 4") or answer == b""  # TLS-looking: dropped
            elif kind == "oversized":
                writer.write(b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n")
                answer = await asyncio.wait_for(reader.read(), 30)
                ok = answer.startswith(b"HTTP/1.1 431")
            elif kind == "silent":  # connects and never finishes its request
                writer.write(request()[:20])
                answer = await asyncio.wait_for(reader.read(), 60)
                ok = answer == b""
            else:
                writer.write(request())
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                if kind == "unmasked":
                    writer.write(frame(0x2, b"unmasked", rng, masked=False))
                    expected = 1002
                else:
                    writer.write(frame(0x8, struct.pack("!H", 1005), rng))
                    expected = 1002
                opcode, payload = await asyncio.wait_for(read_frame(reader), 30)
                ok = opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == expected
            writer.close()
            if ok:
                stats.bad += 1
            else:
                stats.error(f"bad client {kind}: answered {answer[:30]!r}")
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            stats.error(f"bad client {kind}: {type(exc).__name__}")
        await asyncio.sleep(0.05)


async def echo_target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(262144)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


# -- the proxy, as /proc sees it --------------------------------------------------------------


def proc_sample(pid: int) -> Dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "cpu_s": cpu}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def soak(args: argparse.Namespace) -> Dict[str, Any]:
    target = await asyncio.start_server(echo_target, "127.0.0.1", 0, backlog=1024)
    target_port = target.sockets[0].getsockname()[1]
    port = free_port()
    log = open(RESULTS / "soak-proxy.log", "wb")  # noqa: SIM115 - closed below
    proxy = subprocess.Popen(
        [args.python, str(ROOT / "websockify_min.py"), "--heartbeat", "5",
         "--handshake-timeout", "5", f"127.0.0.1:{port}", f"127.0.0.1:{target_port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    print(f"proxy pid {proxy.pid} on port {port}, for {args.duration:.0f} s; its log: "
          f"{RESULTS / 'soak-proxy.log'}")  # fmt: skip
    address = ("127.0.0.1", port)
    for _ in range(200):
        try:
            socket.create_connection(address, timeout=1).close()
            break
        except OSError:
            await asyncio.sleep(0.05)
    stats, stop = Stats(), asyncio.Event()
    workers = [small_echoes(address, stats, stop) for _ in range(SMALL_SESSIONS)]
    workers += [bulk(address, stats, stop) for _ in range(BULK_WORKERS)]
    workers += [churn(address, stats, stop) for _ in range(CHURN_WORKERS)]
    workers += [bad_client(address, stats, stop) for _ in range(BAD_WORKERS)]
    tasks = [asyncio.ensure_future(worker) for worker in workers]
    samples: List[Dict[str, Any]] = []
    started = time.monotonic()
    last = proc_sample(proxy.pid)
    print(f"{'t (s)':>6} {'MB/s':>7} {'msg/s':>7} {'sess/s':>7} {'bad/s':>6} "
          f"{'RSS MiB':>8} {'fds':>5} {'CPU %':>6} errors")  # fmt: skip
    try:
        while time.monotonic() - started < args.duration:
            await asyncio.sleep(args.interval)
            if proxy.poll() is not None:
                raise SystemExit(f"the proxy exited with {proxy.returncode}")
            now = proc_sample(proxy.pid)
            elapsed = args.interval
            sample = {
                "t": round(time.monotonic() - started, 1),
                "mb_per_s": round(stats.bytes / elapsed / 1e6, 2),
                "messages_per_s": round(stats.messages / elapsed, 1),
                "sessions_per_s": round(stats.sessions / elapsed, 1),
                "bad_clients_per_s": round(stats.bad / elapsed, 1),
                "rss_kib": now["rss_kib"],
                "fds": now["fds"],
                "cpu_percent": round(100 * (now["cpu_s"] - last["cpu_s"]) / elapsed, 1),
                "errors": dict(stats.errors),
            }
            last = now
            stats.reset()
            samples.append(sample)
            print(f"{sample['t']:>6.0f} {sample['mb_per_s']:>7.1f} "
                  f"{sample['messages_per_s']:>7.0f} {sample['sessions_per_s']:>7.1f} "
                  f"{sample['bad_clients_per_s']:>6.1f} {now['rss_kib'] / 1024:>8.1f} "
                  f"{now['fds']:>5} {sample['cpu_percent']:>6.0f} "
                  f"{sum(sample['errors'].values()) or ''}", flush=True)  # fmt: skip
    finally:
        stop.set()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(ignore_cancelled)  # the workers' inner futures, cut off
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        proxy.send_signal(signal.SIGTERM)
        try:
            status: Optional[int] = proxy.wait(30)
        except subprocess.TimeoutExpired:
            proxy.kill()
            status = None
        log.close()
        target.close()
    return summarize(args, samples, status)


def ignore_cancelled(loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
    if not isinstance(context.get("exception"), asyncio.CancelledError):
        loop.default_exception_handler(context)


def summarize(
    args: argparse.Namespace, samples: List[Dict[str, Any]], status: Optional[int]
) -> Dict[str, Any]:
    settled = samples[len(samples) // 5 :] or samples  # after warm-up
    errors: Dict[str, int] = {}
    for sample in samples:
        for kind, count in sample["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    return {
        "duration_s": args.duration,
        "interval_s": args.interval,
        "python": args.python,
        "python_version": subprocess.run(
            [args.python, "-c", "import platform; print(platform.python_version())"],
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        ).stdout.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "workload": {
            "small_echo_sessions": SMALL_SESSIONS,
            "bulk_workers": BULK_WORKERS,
            "bulk_bytes_each_way": BULK_BYTES,
            "churn_workers": CHURN_WORKERS,
            "bad_client_workers": BAD_WORKERS,
        },
        "mean_mb_per_s": round(sum(s["mb_per_s"] for s in samples) / max(1, len(samples)), 2),
        "rss_kib_after_warmup": {
            "first": settled[0]["rss_kib"] if settled else None,
            "max": max((s["rss_kib"] for s in settled), default=None),
            "last": settled[-1]["rss_kib"] if settled else None,
        },
        "fds": {
            "min": min((s["fds"] for s in samples), default=None),
            "max": max((s["fds"] for s in samples), default=None),
            "last": samples[-1]["fds"] if samples else None,
        },
        "errors": errors,
        "proxy_exit_status": status,
        "samples": samples,
    }


def markdown(result: Dict[str, Any]) -> str:
    rss = result["rss_kib_after_warmup"]
    lines = [
        f"Soak: {result['duration_s']:.0f} s, proxy under Python {result['python_version']}, "
        f"{result['machine']}.",
        "",
        "| t (s) | MB/s | messages/s | sessions/s | bad clients/s | RSS (MiB) | fds | CPU % "
        "| errors |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in result["samples"]:
        errors = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "0"
        lines.append(
            f"| {s['t']:.0f} | {s['mb_per_s']:.1f} | {s['messages_per_s']:.0f} "
            f"| {s['sessions_per_s']:.1f} | {s['bad_clients_per_s']:.1f} "
            f"| {s['rss_kib'] / 1024:.1f} | {s['fds']} | {s['cpu_percent']:.0f} | {errors} |"
        )
    lines += [
        "",
        f"Mean throughput {result['mean_mb_per_s']} MB/s (verified echo payload). "
        f"RSS after warm-up: first {rss['first'] / 1024:.1f} MiB, max {rss['max'] / 1024:.1f} MiB, "
        f"last {rss['last'] / 1024:.1f} MiB. Descriptors: {result['fds']['min']} to "
        f"{result['fds']['max']}, last {result['fds']['last']}. "
        f"Errors: {sum(result['errors'].values())}. "
        f"Proxy exit status after SIGTERM: {result['proxy_exit_status']}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds (default 600)")
    parser.add_argument("--interval", type=float, default=10, help="seconds between samples")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the proxy")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    result = asyncio.run(soak(args))
    (RESULTS / "soak-latest.json").write_text(json.dumps(result, indent=1) + "\n")
    report = markdown(result)
    (RESULTS / "soak-latest.md").write_text(report)
    print()
    print(report.splitlines()[-1])
    return 1 if result["errors"] or result["proxy_exit_status"] != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
