"""Benchmark websockify_min against upstream websockify (with numpy) and socat.

Usage: python bench/run.py [--quick] [--cases 1,2,...] [--rounds N]

Run it from the bench virtualenv (``make bench`` builds it): upstream websockify comes
from there, and our proxy runs under the same interpreter. Every case starts the proxies
side by side on 127.0.0.1 in front of the same target process, measures them in turn
(A B A B ...), and reports medians and the ratio ours/upstream; socat, a plain TCP relay
with no WebSocket framing, shows the limit for the throughput cases. The results go to
stdout as a markdown table and to bench/results/latest.md and latest.json; a quick run,
or one of some cases only, writes scratch.md and scratch.json there instead.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import clients
from clients import BenchError

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PYTHON = sys.executable
OURS = ROOT / "websockify_min.py"
MB = 1e6
MIB = 1 << 20
LOG_DIR = Path(tempfile.mkdtemp(prefix="wsmin-bench-"))


# -- processes -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: "subprocess.Popen[bytes]", what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}; see {LOG_DIR}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not listen on port {port} within 30s")


def upstream_command() -> List[str]:
    script = Path(PYTHON).parent / "websockify"
    return [str(script)] if script.exists() else [PYTHON, "-m", "websockify"]


class Proxy:
    """A proxy process (ours, upstream or socat) in its own process group."""

    def __init__(
        self, kind: str, target_port: int, extra: Sequence[str] = (), name: str = ""
    ) -> None:
        self.kind = kind
        self.name = name or kind
        self.port = free_port()
        listen, target = f"127.0.0.1:{self.port}", f"127.0.0.1:{target_port}"
        if kind == "ours":
            cmd = [PYTHON, str(OURS), *extra, listen, target]
        elif kind == "upstream":
            cmd = [*upstream_command(), *extra, listen, target]
        elif kind == "socat":
            cmd = [
                "socat",
                "-b",
                "262144",  # its default 8 KiB buffer would make it the slowest relay
                f"TCP-LISTEN:{self.port},bind=127.0.0.1,reuseaddr,fork,backlog=4096",
                f"TCP:{target},nodelay",
            ]
        else:
            raise ValueError(kind)
        self.log = LOG_DIR / f"{self.name}-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        wait_listening(self.port, self.proc, self.name)

    @property
    def address(self) -> Tuple[str, int]:
        return ("127.0.0.1", self.port)

    def stop(self) -> None:
        """SIGTERM to the group this proxy leads (its forked children too), then SIGKILL."""
        pgid = self.proc.pid  # start_new_session: the proxy leads its own group
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(10)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(pgid, signal.SIGKILL)  # forked children outliving their parent
        except ProcessLookupError:
            pass


class Targets:
    """bench/targets.py in its own process: the sink, source and echo behind every proxy."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, str(BENCH / "targets.py")],
            stdout=subprocess.PIPE,
            cwd=BENCH,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def descendants(pid: int) -> List[int]:
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for child in children.get(parent, []):
            found.append(child)
            todo.append(child)
    return found


def tree_pss_kib(pid: int) -> Tuple[int, int]:
    """PSS in KiB of *pid* and all its descendants, and how many processes that is."""
    total, processes = 0, 0
    for each in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{each}/smaps_rollup") as rollup:
                for line in rollup:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        processes += 1
                        break
        except OSError:
            continue
    return total, processes


# -- measuring -----------------------------------------------------------------------------


def alternate(
    kinds: Sequence[str], rounds: int, measure: Callable[[str, bool], float], warmup: bool = True
) -> Dict[str, List[float]]:
    """Run *measure(kind, verify)* for each kind in turn, *rounds* times (A B A B ...).

    The first round, if *warmup*, checks every byte (verify=True) and is not kept.
    """
    samples: Dict[str, List[float]] = {kind: [] for kind in kinds}
    if warmup:
        for kind in kinds:
            measure(kind, True)
    for _ in range(rounds):
        for kind in kinds:
            samples[kind].append(measure(kind, False))
    return samples


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


class Report:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.rows: List[Dict[str, Any]] = []

    def add(
        self,
        case: str,
        name: str,
        unit: str,
        better: str,
        values: Mapping[str, Optional[float]],
        target: Optional[float] = None,
        samples: Optional[Dict[str, List[float]]] = None,
        note: str = "",
        base: str = "upstream",
    ) -> None:
        ours, other = values.get("ours"), values.get(base)
        ratio = ours / other if ours is not None and other else None
        met = None
        if ratio is not None and target is not None:
            met = ratio >= target if better == "higher" else ratio <= target
        socat = values.get("socat")
        row = {
            "case": case,
            "name": name,
            "unit": unit,
            "better": better,
            "values": values,
            "ratio": ratio,
            "ratio_of": base,
            "target": target,
            "met": met,
            "of_socat": ours / socat if ours is not None and socat else None,
            "samples": samples or {},
            "note": note,
        }
        self.rows.append(row)
        print("  " + self.format_row(row), flush=True)

    @staticmethod
    def _num(value: Optional[float]) -> str:
        if value is None:
            return "n/a"
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"

    def format_row(self, row: Dict[str, Any]) -> str:
        values = row["values"]
        ratio = row["ratio"]
        if ratio is None:
            ratio_text = "n/a"
        elif ratio < 0.1:
            ratio_text = f"1/{1 / ratio:,.0f}"
        else:
            ratio_text = f"{ratio:.2f}"
        if row["target"] is not None:
            sign = "≥" if row["better"] == "higher" else "≤"
            mark = "met" if row["met"] else "missed" if row["met"] is not None else ""
            goal = row["target"]
            goal_text = f"1/{1 / goal:g}" if goal < 0.1 else f"{goal:g}"
            target_text = f"{sign} {goal_text} {mark}".strip()
        else:
            target_text = ""
        of_socat = row["of_socat"]
        cells = [
            row["case"],
            f"{row['name']} ({row['unit']})",
            self._num(values.get("ours")),
            self._num(values.get(row["ratio_of"])),
            ratio_text,
            target_text,
            self._num(values.get("socat")) if "socat" in values else "",
            f"{of_socat:.0%}" if of_socat is not None else "",
            row["note"],
        ]
        return "| " + " | ".join(cells) + " |"

    def table(self) -> str:
        lines = [
            "| # | benchmark | ours | upstream | ours/upstream | target | socat | ours/socat "
            "| note |",
            "|---|---|--:|--:|--:|---|--:|--:|---|",
        ]
        lines += [self.format_row(row) for row in self.rows]
        return "\n".join(lines)


def machine() -> Dict[str, Any]:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def version(package: str) -> str:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "missing"

    try:
        socat = subprocess.run(
            ["socat", "-V"], capture_output=True, text=True, check=False
        ).stdout.splitlines()
        socat_version = next((line for line in socat if "socat version" in line), "?")
    except OSError:
        socat_version = "missing"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "upstream_websockify": version("websockify"),
        "numpy": version("numpy"),
        "socat": socat_version.replace("socat by Gerhard Rieger and contributors - see ", ""),
        "load_average_at_start": os.getloadavg()[0],
    }


def transfer_rate(
    procs: Dict[str, Proxy],
    func: Callable[..., float],
    total: int,
    tls: Optional[ssl.SSLContext],
) -> Callable[[str, bool], float]:
    """measure(kind, verify) for alternate(): MB/s of one upload or download of *total*."""

    def measure(kind: str, verify: bool) -> float:
        seconds = func(procs[kind].address, total, kind != "socat", tls, verify)
        return total / seconds / MB

    return measure


# -- the cases -----------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.quick = args.quick
        self.rounds = args.rounds or (2 if self.quick else 5)
        self.report = Report(self.quick)
        self.targets = Targets()
        self.has_socat = shutil.which("socat") is not None
        self.tls_dir = Path(tempfile.mkdtemp(prefix="wsmin-bench-tls-"))
        self.client_tls: Optional[ssl.SSLContext] = None

    def proxies(self, kinds: Sequence[str], extra: Sequence[str] = ()) -> Dict[str, Proxy]:
        started: Dict[str, Proxy] = {}
        try:
            for kind in kinds:
                started[kind] = Proxy(kind, self.targets.port, extra if kind != "socat" else ())
        except BaseException:
            for proxy in started.values():
                proxy.stop()
            raise
        return started

    def plain_kinds(self, with_socat: bool = True) -> List[str]:
        kinds = ["ours", "upstream"]
        if with_socat and self.has_socat:
            kinds.append("socat")
        return kinds

    def close(self) -> None:
        self.targets.stop()

    # 1, 2
    def throughput(self) -> None:
        up = (32 if self.quick else 256) * MIB
        down = (64 if self.quick else 512) * MIB
        procs = self.proxies(self.plain_kinds())
        try:
            for case, name, total, func, target in (
                ("1", "upload", up, clients.upload, 1.5),
                ("2", "download", down, clients.download, 1.5),
            ):
                measure = transfer_rate(procs, func, total, None)
                samples = alternate(list(procs), self.rounds, measure)
                values = {k: statistics.median(v) for k, v in samples.items()}
                self.report.add(case, name, "MB/s", "higher", values, target, samples)
        finally:
            for proxy in procs.values():
                proxy.stop()

    # 3
    def latency(self) -> None:
        count = 1000 if self.quick else 3000
        procs = self.proxies(self.plain_kinds())
        try:
            pooled: Dict[str, List[float]] = {kind: [] for kind in procs}
            for kind in procs:  # warm-up
                clients.echo_latency(procs[kind].address, 100, kind != "socat")
            for _ in range(self.rounds):
                for kind, proxy in procs.items():
                    pooled[kind] += clients.echo_latency(proxy.address, count, kind != "socat")
            for case, name, fraction in (("3", "echo p50", 0.5), ("3", "echo p99", 0.99)):
                values = {k: percentile(v, fraction) * 1e6 for k, v in pooled.items()}
                self.report.add(case, name, "µs", "lower", values, 1.0)
        finally:
            for proxy in procs.values():
                proxy.stop()

    # 4
    def memory(self) -> None:
        for count in (400, 1000):
            values: Dict[str, Optional[float]] = {}
            notes = []
            for kind in ("ours", "upstream"):
                if self.quick and kind == "upstream" and count > 400:
                    notes.append("upstream not tried in quick mode")
                    continue
                per_session, held, processes = self._memory_one(kind, count)
                values[kind] = per_session
                if held < count:
                    values[kind] = None
                    notes.append(f"{kind} kept only {held} of {count} sessions open")
                else:
                    notes.append(f"{kind}: {processes} processes")
            self.report.add(
                "4",
                f"memory, {count} idle sessions",
                "KiB PSS/session",
                "lower",
                values,
                1 / 20,
                note="; ".join(notes),
            )

    def _memory_one(self, kind: str, count: int) -> Tuple[Optional[float], int, int]:
        proxy = Proxy(kind, self.targets.port)
        socks: List[socket.socket] = []
        try:
            clients.one_connection(proxy.address, True)  # what the first session loads
            time.sleep(0.5)
            before, _ = tree_pss_kib(proxy.proc.pid)
            socks = clients.hold_sessions(proxy.address, count, timeout=60 if count > 500 else 120)
            time.sleep(1.0)  # let the last sessions settle (upstream: finish forking)
            after, processes = tree_pss_kib(proxy.proc.pid)
            held = clients.still_open(socks)  # a 101 is not enough: the session must live on
            return ((after - before) / held if held else None), held, processes
        finally:
            for sock in socks:
                sock.close()
            proxy.stop()

    # 5
    def connection_rate(self) -> None:
        seconds = 0.7 if self.quick else 2.0
        procs = self.proxies(["ours", "upstream"])
        # The same exchange in plain TCP straight to the target: what the benchmark's own
        # client and target allow on this machine, the ceiling of any proxy's rate.
        direct = ("127.0.0.1", self.targets.port)
        try:
            for parallel in (1, 16):

                def measure(kind: str, verify: bool, parallel: int = parallel) -> float:
                    duration = 0.3 if verify else seconds
                    if kind == "no proxy":
                        return clients.connection_rate(direct, duration, parallel, ws=False)
                    return clients.connection_rate(procs[kind].address, duration, parallel)

                samples = alternate([*procs, "no proxy"], self.rounds, measure)
                values = {k: statistics.median(v) for k, v in samples.items()}
                name = (
                    "connections, sequential"
                    if parallel == 1
                    else f"connections, {parallel} parallel"
                )
                ceiling = values.pop("no proxy")
                note = f"client and target alone, no proxy: {ceiling:,.0f}/s"
                self.report.add("5", name, "/s", "higher", values, 20.0, samples, note=note)
        finally:
            for proxy in procs.values():
                proxy.stop()

    # 6
    def many_sessions(self) -> None:
        sessions = 50
        each = (2 if self.quick else 8) * MIB
        procs = self.proxies(self.plain_kinds())
        try:

            def measure(kind: str, verify: bool) -> float:
                seconds = clients.parallel_download(
                    procs[kind].address, sessions, each, kind != "socat"
                )
                return sessions * each / seconds / MB

            samples = alternate(list(procs), self.rounds, measure)
            values = {k: statistics.median(v) for k, v in samples.items()}
            self.report.add(
                "6",
                f"{sessions} sessions downloading",
                "MB/s total",
                "higher",
                values,
                1.5,
                samples,
            )
        finally:
            for proxy in procs.values():
                proxy.stop()

    # 7
    def _make_cert(self) -> Tuple[Path, Path]:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert_path, key_path = self.tls_dir / "cert.pem", self.tls_dir / "key.pem"
        cert.cert_chain_pems[0].write_to_path(str(cert_path))
        for pem in cert.cert_chain_pems[1:]:
            pem.write_to_path(str(cert_path), append=True)
        cert.private_key_pem.write_to_path(str(key_path))
        context = ssl.create_default_context()
        ca.configure_trust(context)
        self.client_tls = context
        return cert_path, key_path

    def tls(self) -> None:
        cert, key = self._make_cert()
        up = (32 if self.quick else 128) * MIB
        down = (64 if self.quick else 256) * MIB
        procs = self.proxies(["ours", "upstream"], ["--cert", str(cert), "--key", str(key)])
        try:
            for name, total, func in (
                ("wss upload", up, clients.upload),
                ("wss download", down, clients.download),
            ):
                measure = transfer_rate(procs, func, total, self.client_tls)
                samples = alternate(list(procs), self.rounds, measure)
                values = {k: statistics.median(v) for k, v in samples.items()}
                self.report.add("7", name, "MB/s", "higher", values, 1.0, samples)
        finally:
            for proxy in procs.values():
                proxy.stop()

    # 8
    def startup(self) -> None:
        commands = {
            "ours": [PYTHON, str(OURS), "--help"],
            "upstream": [*upstream_command(), "--help"],
        }

        def measure(kind: str, verify: bool) -> float:
            start = time.perf_counter()
            done = subprocess.run(commands[kind], capture_output=True, check=False)
            elapsed = time.perf_counter() - start
            if done.returncode != 0 or b"usage" not in done.stdout.lower():
                raise BenchError(f"{kind} --help failed: {done.stderr[-300:]!r}")
            return elapsed * 1000

        samples = alternate(["ours", "upstream"], 4 if self.quick else 15, measure)
        values = {k: statistics.median(v) for k, v in samples.items()}
        self.report.add("8", "startup, --help", "ms", "lower", values, 1.0, samples)

    # 9
    def workers(self) -> None:
        helped = subprocess.run([PYTHON, str(OURS), "--help"], capture_output=True, text=True)
        if "--workers" not in helped.stdout:
            print("  (skipped: this websockify_min has no --workers)")
            return
        sessions = 8
        down = (4 if self.quick else 32) * MIB
        up = (2 if self.quick else 16) * MIB
        procs = {
            "one": Proxy("ours", self.targets.port, ["--workers", "1"], "ours-1-worker"),
            "two": Proxy("ours", self.targets.port, ["--workers", "2"], "ours-2-workers"),
        }
        try:

            def download(kind: str, verify: bool) -> float:
                seconds = clients.parallel_download(procs[kind].address, sessions, down, True)
                return sessions * down / seconds / MB

            def upload(kind: str, verify: bool) -> float:
                seconds = clients.parallel_upload(procs[kind].address, sessions, up)
                return sessions * up / seconds / MB

            for what, measure in (("downloading", download), ("uploading", upload)):
                samples = alternate(list(procs), self.rounds, measure)
                values = {k: statistics.median(v) for k, v in samples.items()}
                self.report.add(
                    "9",
                    f"--workers 2 vs 1, {sessions} sessions {what}",
                    "MB/s",
                    "higher",
                    {"ours": values["two"], "one": values["one"]},
                    None,
                    samples,
                    note="ours: 2 workers; upstream column: 1 worker",
                    base="one",
                )
        finally:
            for proxy in procs.values():
                proxy.stop()


CASES: Dict[str, Callable[[Bench], None]] = {
    "1": Bench.throughput,  # 1 and 2 together
    "3": Bench.latency,
    "4": Bench.memory,
    "5": Bench.connection_rate,
    "6": Bench.many_sessions,
    "7": Bench.tls,
    "8": Bench.startup,
    "9": Bench.workers,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs (under 2 minutes)")
    parser.add_argument("--cases", default="", help="comma-separated case numbers (default all)")
    parser.add_argument("--rounds", type=int, default=0, help="measured rounds per case")
    parser.add_argument("--out", default=str(RESULTS), help="where the results go")
    args = parser.parse_args(argv)
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()] or list(CASES)
    wanted = ["1" if c == "2" else c for c in wanted]
    info = machine()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"upstream websockify {info['upstream_websockify']} + numpy {info['numpy']}"
    )
    started = time.monotonic()
    bench = Bench(args)
    failures = []
    try:
        for case in dict.fromkeys(wanted):
            print(f"case {case} ...", flush=True)
            try:
                CASES[case](bench)
            except (BenchError, RuntimeError, OSError) as exc:
                failures.append(f"case {case}: {exc}")
                print(f"  FAILED: {exc}", flush=True)
    finally:
        bench.close()
    info["load_average_at_end"] = os.getloadavg()[0]
    info["seconds"] = round(time.monotonic() - started, 1)
    table = bench.report.table()
    mode = "quick" if args.quick else "full"
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"{mode} run, {when}, {bench.rounds} rounds per case; "
        f"{info['cpu']}, {info['cores']} cores, Linux {info['kernel']}, "
        f"Python {info['python']}, upstream websockify {info['upstream_websockify']} "
        f"with numpy {info['numpy']}, {info['socat']}; load average "
        f"{info['load_average_at_start']:.1f} at start, {info['load_average_at_end']:.1f} at end"
    )
    print()
    print(header)
    print()
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Only a full run of every case replaces latest.*, the results the README shows.
    stem = "latest" if mode == "full" and not args.cases else "scratch"
    (out / f"{stem}.md").write_text(header + "\n\n" + table + "\n")
    result = {
        "mode": mode,
        "date": when,
        "machine": info,
        "rounds": bench.rounds,
        "rows": bench.report.rows,
        "failures": failures,
    }
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
