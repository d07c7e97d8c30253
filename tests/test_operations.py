"""Operations end to end: record files, daemon, pid file, logging, privileges, key passwords."""

import base64
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import List, Tuple

import pytest
from conftest import (
    DEADLINE,
    ProxyFactory,
    RawClient,
    TcpServer,
    echo_checksummed,
    free_port,
    wait_until,
)
from websockets.sync.client import connect

pytestmark = pytest.mark.timeout(120)

NODE = shutil.which("node")


def listen_args() -> Tuple[str, Tuple[str, int]]:
    port = free_port()
    return f"127.0.0.1:{port}", ("127.0.0.1", port)


def ws_url(address: Tuple[str, int], path: str = "/websockify") -> str:
    return f"ws://{address[0]}:{address[1]}{path}"


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
            ws.send(payload)
            got = b""
            while len(got) < len(payload):
                chunk = ws.recv(DEADLINE)
                assert isinstance(chunk, bytes)
                got += chunk
            assert got == payload
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
