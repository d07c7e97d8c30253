"""noVNC's own path end to end: a real VNC server (TigerVNC's Xvnc) behind the proxy.

Each desktop is a private Xvnc display painted one solid colour with xsetroot, so what a
client shows can be checked against a colour it could not have made up. Everything here
needs Debian packages (`make system-deps` installs them as root); a missing one skips the
test with its name, never passes it.
"""

import os
import select
import shutil
import struct
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator, List, NamedTuple, Tuple

import pytest
from conftest import DEADLINE, ProxyFactory, free_port, stop_process
from websockets.sync.client import ClientConnection, connect

pytestmark = pytest.mark.timeout(180)

GEOMETRY = (320, 240)  # small: every pixel of it is checked
Colour = Tuple[int, int, int]
BLUE: Colour = (0x2A, 0x7F, 0xD4)


def need_program(name: str, package: str) -> str:
    """The path of *name*, or a loud skip naming the Debian package that provides it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"MISSING {name}: install Debian's {package} (`make system-deps` as root) "
            "to run the noVNC end-to-end tests"
        )
    return path


def hex_colour(colour: Colour) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


# -- a VNC server on a private display ------------------------------------------------------


class VncDesktop:
    """Xvnc on a display it picks itself, RFB on 127.0.0.1:port only, no authentication."""

    def __init__(self, colour: Colour, log_path: Path) -> None:
        xvnc = need_program("Xvnc", "tigervnc-standalone-server")
        xsetroot = need_program("xsetroot", "x11-xserver-utils")
        self.colour = colour
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        # -displayfd: the server takes the first free display and writes its number once it
        # accepts X clients, so parallel runs never collide and no wait is guessed.
        display_read, display_write = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [
                    xvnc,
                    "-displayfd",
                    str(display_write),
                    "-geometry",
                    "{}x{}".format(*GEOMETRY),
                    "-depth",
                    "24",
                    "-desktop",
                    "websockify_min",
                    "-SecurityTypes",
                    "None",
                    "-rfbport",
                    str(self.port),
                    "-localhost",
                    "-nolisten",
                    "tcp",
                    "-AlwaysShared",
                ],
                pass_fds=(display_write,),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
            os.close(display_write)
            self.display = ":" + self._read_display(display_read)
        finally:
            os.close(display_read)
        subprocess.run(
            [xsetroot, "-display", self.display, "-solid", hex_colour(colour)],
            check=True,
            timeout=DEADLINE,
        )

    def _read_display(self, fd: int) -> str:
        text = b""
        deadline = time.monotonic() + DEADLINE
        while not text.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"Xvnc did not start in {DEADLINE}s:\n{self.log()}")
            chunk = os.read(fd, 64)
            if not chunk:
                raise AssertionError(f"Xvnc exited at start:\n{self.log()}")
            text += chunk
        return text.decode().strip()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


@pytest.fixture
def vnc_desktop(tmp_path: Path) -> Iterator[Callable[[Colour], VncDesktop]]:
    """vnc_desktop(colour) -> VncDesktop, stopped by its pid when the test ends."""
    started: List[VncDesktop] = []

    def start(colour: Colour) -> VncDesktop:
        desktop = VncDesktop(colour, tmp_path / f"xvnc-{len(started)}.log")
        started.append(desktop)
        return desktop

    yield start
    for desktop in started:
        desktop.stop()


# -- the RFB protocol, just enough to read a whole frame buffer -----------------------------


class RfbReader:
    """Exact reads from a WebSocket whose messages split the RFB stream anywhere."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.buffer = b""

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            message = self.ws.recv(DEADLINE)
            assert isinstance(message, bytes), "VNC data must come as binary messages"
            self.buffer += message
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data


class ServerInit(NamedTuple):
    width: int
    height: int
    name: str


def rfb_handshake(ws: ClientConnection, reader: RfbReader) -> ServerInit:
    """RFB 3.8 with security type None, a shared session (RFC 6143, 7.1-7.3)."""
    assert reader.read(12) == b"RFB 003.008\n"
    ws.send(b"RFB 003.008\n")
    (count,) = struct.unpack("!B", reader.read(1))
    assert 1 in reader.read(count), "the server offers no security type None"
    ws.send(b"\x01")
    assert reader.read(4) == b"\x00\x00\x00\x00", "SecurityResult is not OK"
    ws.send(b"\x01")  # ClientInit: shared
    width, height = struct.unpack("!HH", reader.read(4))
    reader.read(16)  # the server's pixel format: replaced below
    (name_length,) = struct.unpack("!I", reader.read(4))
    return ServerInit(width, height, reader.read(name_length).decode())


def read_frame_buffer(ws: ClientConnection, reader: RfbReader, width: int, height: int) -> bytes:
    """The whole screen as raw 32-bit pixels, blue green red padding, row after row."""
    # SetPixelFormat: 32 bpp, depth 24, little-endian true colour, red at bit 16.
    pixel_format = struct.pack("!BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
    ws.send(struct.pack("!B3x", 0) + pixel_format)
    ws.send(struct.pack("!BxHi", 2, 1, 0))  # SetEncodings: Raw only
    ws.send(struct.pack("!BBHHHH", 3, 0, 0, 0, width, height))  # a full, non-incremental update
    screen = bytearray(width * height * 4)
    covered = 0
    while covered < width * height:
        message_type, _, rects = struct.unpack("!BBH", reader.read(4))
        assert message_type == 0, f"expected a FramebufferUpdate, got message {message_type}"
        for _ in range(rects):
            x, y, w, h, encoding = struct.unpack("!HHHHi", reader.read(12))
            assert encoding == 0, f"asked for Raw, got encoding {encoding}"
            pixels = reader.read(w * h * 4)
            for row in range(h):
                start = ((y + row) * width + x) * 4
                screen[start : start + w * 4] = pixels[row * w * 4 : (row + 1) * w * 4]
            covered += w * h
    return bytes(screen)


@pytest.mark.smoke
def test_vnc_desktop_through_the_proxy(
    start_proxy: ProxyFactory, vnc_desktop: Callable[[Colour], VncDesktop]
) -> None:
    """The harness itself: Xvnc's whole frame buffer, read through the proxy, is the colour."""
    desktop = vnc_desktop(BLUE)
    port = free_port()
    start_proxy(f"127.0.0.1:{port}", desktop.target, listen=("127.0.0.1", port))
    with connect(f"ws://127.0.0.1:{port}/websockify", subprotocols=["binary"]) as ws:  # type: ignore[list-item]
        reader = RfbReader(ws)
        init = rfb_handshake(ws, reader)
        assert (init.width, init.height, init.name) == (*GEOMETRY, "websockify_min")
        screen = read_frame_buffer(ws, reader, init.width, init.height)
    red, green, blue = BLUE
    assert screen == bytes((blue, green, red, 0)) * (init.width * init.height)
