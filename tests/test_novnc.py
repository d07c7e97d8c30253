"""noVNC's own path end to end: a real VNC server (TigerVNC's Xvnc) behind the proxy.

Each desktop is a private Xvnc display painted one solid colour with xsetroot, so what a
client shows can be checked against a colour it could not have made up. Everything here
needs Debian packages (`make system-deps` installs them as root); a missing one skips the
test with its name, never passes it.
"""

import base64
import contextlib
import hashlib
import io
import json
import math
import os
import select
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple
from urllib.parse import quote, urlencode

import pytest
import trustme
from conftest import (
    DEADLINE,
    Proxy,
    ProxyFactory,
    free_port,
    run_captured,
    stop_process,
    wait_until,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from PIL import Image
from websockets.sync.client import ClientConnection, connect

pytestmark = pytest.mark.timeout(180)

GEOMETRY = (320, 240)  # small: every pixel of it is checked
Colour = Tuple[int, int, int]
BLUE: Colour = (0x2A, 0x7F, 0xD4)
ORANGE: Colour = (0xD4, 0x64, 0x2A)
NOVNC_DIR = Path("/usr/share/novnc")  # where Debian's novnc package puts vnc.html
BROWSER_DEADLINE = 60.0  # seconds a page may take to show the desktop on a loaded machine
VIEWPORT = (640, 400)
# Set to a path to keep a copy of the first browser screenshot (the README's picture).
SCREENSHOT_COPY = os.environ.get("WSMIN_NOVNC_SCREENSHOT")


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
    """Exact reads from an RFB byte stream that arrives in chunks split anywhere."""

    def __init__(self, receive: Callable[[], bytes]) -> None:
        self.receive = receive
        self.buffer = b""

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            try:
                self.buffer += self.receive()
            except StopIteration:
                raise AssertionError(
                    f"the RFB stream ends {size - len(self.buffer)} bytes early"
                ) from None
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data


def binary_messages(ws: ClientConnection) -> Callable[[], bytes]:
    def receive() -> bytes:
        message = ws.recv(DEADLINE)
        assert isinstance(message, bytes), "VNC data must come as binary messages"
        return message

    return receive


class ServerInit(NamedTuple):
    width: int
    height: int
    name: str


def rfb_handshake(reader: RfbReader, send: Callable[[bytes], None]) -> ServerInit:
    """RFB 3.8 with security type None, a shared session (RFC 6143, 7.1-7.3)."""
    assert reader.read(12) == b"RFB 003.008\n"
    send(b"RFB 003.008\n")
    (count,) = struct.unpack("!B", reader.read(1))
    assert 1 in reader.read(count), "the server offers no security type None"
    send(b"\x01")
    assert reader.read(4) == b"\x00\x00\x00\x00", "SecurityResult is not OK"
    send(b"\x01")  # ClientInit: shared
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
        reader = RfbReader(binary_messages(ws))
        init = rfb_handshake(reader, ws.send)
        assert (init.width, init.height, init.name) == (*GEOMETRY, "websockify_min")
        screen = read_frame_buffer(ws, reader, init.width, init.height)
    red, green, blue = BLUE
    assert screen == bytes((blue, green, red, 0)) * (init.width * init.height)


# -- headless Chromium over the DevTools protocol ------------------------------------------


class DevToolsError(Exception):
    pass


class Browser:
    """Headless Chromium with a fresh profile, driven over one DevTools WebSocket.

    Pages are attached in flat mode: each command names its page's session, and events
    for every page arrive on the same socket (console messages are kept per session).
    """

    def __init__(self, folder: Path, extra_args: Sequence[str] = ()) -> None:
        chromium = need_program("chromium", "chromium")
        profile = folder / "profile"
        profile.mkdir()
        self.log_path = folder / "chromium.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--mute-audio",
                "--force-device-scale-factor=1",
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",  # Chromium picks; DevToolsActivePort tells
                *extra_args,
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: its helpers are stopped with it
        )
        self.messages: Dict[str, List[str]] = {}
        self._next_id = 0
        self._closing = contextlib.ExitStack()
        try:
            port, path = self._devtools_endpoint(profile / "DevToolsActivePort")
            self.ws = self._closing.enter_context(
                connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=DEADLINE)
            )
        except BaseException:
            self.stop()
            raise

    def _devtools_endpoint(self, active_port: Path) -> Tuple[str, str]:
        def written() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"chromium exited with {self.proc.returncode}:\n{self.log()}")
            return active_port.exists() and len(active_port.read_text().splitlines()) >= 2

        wait_until(written, "chromium's DevTools endpoint", BROWSER_DEADLINE)
        port, path = active_port.read_text().splitlines()[:2]
        return port, path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def call(
        self, method: str, params: Optional[Dict[str, Any]] = None, session: str = ""
    ) -> Dict[str, Any]:
        """Send one command; keep the events that come first; return its result."""
        self._next_id += 1
        command: Dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            command["sessionId"] = session
        self.ws.send(json.dumps(command))
        deadline = time.monotonic() + BROWSER_DEADLINE
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no answer to {method} in {BROWSER_DEADLINE}s")
            message = json.loads(self.ws.recv(left))
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise DevToolsError(f"{method}: {message['error']}")
                return dict(message["result"])
            self._keep_event(message)

    def _keep_event(self, event: Dict[str, Any]) -> None:
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled":
            text = " ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"])
            line = f"console.{params['type']}: {text}"
        elif event.get("method") == "Runtime.exceptionThrown":
            line = f"exception: {params['exceptionDetails'].get('text')}"
        else:
            return
        self.messages.setdefault(event.get("sessionId", ""), []).append(line)

    def open(self, url: str) -> "Page":
        """A new tab at *url*, with a fixed viewport and its console captured."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})
        page = Page(self, target, session["sessionId"])
        page.call("Runtime.enable")
        width, height = VIEWPORT
        page.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        page.call("Page.navigate", {"url": url})
        return page

    def stop(self) -> None:
        self._closing.close()
        stop_process(self.proc)
        with contextlib.suppress(ProcessLookupError):  # a helper outliving a killed browser
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


class Page:
    def __init__(self, browser: Browser, target: str, session: str) -> None:
        self.browser = browser
        self.target = target
        self.session = session

    def call(self, method: str, params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        return self.browser.call(method, params, self.session)

    def evaluate(self, expression: str) -> Any:
        reply = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in reply:
            raise DevToolsError(f"{expression}: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])

    def console(self) -> str:
        return "\n".join(self.browser.messages.get(self.session, [])[-30:])

    def close(self) -> None:
        """Close the tab: noVNC's WebSocket goes with it."""
        self.browser.call("Target.closeTarget", {"targetId": self.target})


class ServerCert(NamedTuple):
    pem: Path  # key and certificate chain, for --cert
    spki_sha256: str  # base64 SHA-256 of its public key, as Chromium's pinning flags take it


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    """A certificate for 127.0.0.1 from a throwaway CA."""
    leaf = trustme.CA().issue_cert("127.0.0.1")
    pem = tmp_path_factory.mktemp("pki") / "server.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
    certificate = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ServerCert(pem, base64.b64encode(hashlib.sha256(spki).digest()).decode())


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, server_cert: ServerCert) -> Iterator[Browser]:
    """One Chromium for the module (starting it costs seconds); a fresh tab per test.

    It accepts the test server's key despite its unknown CA, and no other bad certificate.
    """
    chromium = Browser(
        tmp_path_factory.mktemp("chromium"),
        [f"--ignore-certificate-errors-spki-list={server_cert.spki_sha256}"],
    )
    yield chromium
    chromium.stop()


# -- noVNC's page, served by the proxy ------------------------------------------------------


# noVNC's canvas in the page: where it is, its size, and the connection status line.
_CANVAS_STATE = """(() => {
    const canvas = document.querySelector('#noVNC_container canvas');
    const status = document.getElementById('noVNC_status');
    if (!canvas) return null;
    const r = canvas.getBoundingClientRect();
    return {left: r.left, top: r.top, width: r.width, height: r.height,
            pixels: [canvas.width, canvas.height], status: status ? status.textContent : ''};
})()"""


def count_colours(
    png: bytes, box: Tuple[int, int, int, int], colours: Sequence[Colour]
) -> List[int]:
    """How many pixels of each colour the screenshot has inside *box*."""
    with Image.open(io.BytesIO(png)) as image:
        region = image.convert("RGB").crop(box)
        counts = {colour: n for n, colour in region.getcolors(region.width * region.height) or ()}
    return [counts.get(colour, 0) for colour in colours]


def wait_for_desktop(page: Page, colour: Colour, absent: Sequence[Colour] = ()) -> bytes:
    """Poll screenshots until noVNC's canvas shows the whole desktop in *colour*.

    The canvas must have the desktop's size, and at least 95% of its pixels on screen must be
    exactly the colour (noVNC's controls may overlap an edge); no pixel may be one of
    *absent*. Returns that screenshot as PNG.
    """
    last: Dict[str, Any] = {}

    def shows_desktop() -> bool:
        state = page.evaluate(_CANVAS_STATE)
        last["state"] = state
        if not state or state["pixels"] != list(GEOMETRY):
            return False
        png = page.screenshot()
        # Whole pixels inside the canvas (its edges may fall between pixels).
        left, top = math.ceil(state["left"]), math.ceil(state["top"])
        right = math.floor(state["left"] + state["width"])
        bottom = math.floor(state["top"] + state["height"])
        counts = count_colours(png, (left, top, right, bottom), [colour, *absent])
        last["counts"], last["png"] = counts, png
        area = (right - left) * (bottom - top)
        return counts[0] >= 0.95 * area and not any(counts[1:])

    try:
        wait_until(shows_desktop, "noVNC's canvas to show the desktop", BROWSER_DEADLINE)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\nlast canvas state: {last.get('state')}\n"
            f"pixels of {colour} then of {absent}: {last.get('counts')}\n"
            f"page console:\n{page.console()}"
        ) from None
    return bytes(last["png"])


def novnc_url(base: str, port: int, **settings: str) -> str:
    """vnc.html under *base*, told to connect at once to 127.0.0.1:port (noVNC 1.3 names)."""
    query = {"autoconnect": "1", "host": "127.0.0.1", "port": str(port), "resize": "off"}
    query.update(settings)
    return f"{base}/vnc.html?{urlencode(query, quote_via=quote)}"


class NoVncServer(NamedTuple):
    proxy: Proxy
    port: int
    page: str  # the URL vnc.html and the rest of noVNC are under


def start_novnc_proxy(
    start_proxy: ProxyFactory, *options: str, target: str = "", tls: bool = False
) -> NoVncServer:
    """The proxy serving Debian's noVNC with --web on a fresh port, as the README advises:
    WebSockets only from pages of its own origin."""
    if not (NOVNC_DIR / "vnc.html").is_file():
        pytest.skip(f"MISSING noVNC: no {NOVNC_DIR}/vnc.html; install Debian's novnc")
    port = free_port()
    page = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    web = ("--web", str(NOVNC_DIR), "--allow-origin", page)
    targets = [target] if target else []
    listen = ("127.0.0.1", port)
    proxy = start_proxy(*web, *options, f"127.0.0.1:{port}", *targets, listen=listen)
    return NoVncServer(proxy, port, page)


def test_novnc_shows_the_desktop(
    start_proxy: ProxyFactory,
    vnc_desktop: Callable[[Colour], VncDesktop],
    browser: Browser,
    tmp_path: Path,
) -> None:
    """vnc.html from the proxy's --web, connected through the proxy, shows Xvnc's desktop."""
    desktop = vnc_desktop(BLUE)
    novnc = start_novnc_proxy(start_proxy, target=desktop.target)
    page = browser.open(novnc_url(novnc.page, novnc.port))
    png = wait_for_desktop(page, BLUE)
    (tmp_path / "novnc.png").write_bytes(png)
    if SCREENSHOT_COPY:
        Path(SCREENSHOT_COPY).write_bytes(png)
    assert "Connected (unencrypted)" in page.evaluate(_CANVAS_STATE)["status"]
    page.close()
    novnc.proxy.wait_log("client closed the WebSocket")


def test_novnc_over_wss(
    start_proxy: ProxyFactory,
    vnc_desktop: Callable[[Colour], VncDesktop],
    browser: Browser,
    server_cert: ServerCert,
) -> None:
    """The page over https:// and the VNC session over wss://, both from one TLS port."""
    desktop = vnc_desktop(ORANGE)
    novnc = start_novnc_proxy(
        start_proxy, "--cert", str(server_cert.pem), "--ssl-only", target=desktop.target, tls=True
    )
    page = browser.open(novnc_url(novnc.page, novnc.port, encrypt="1"))
    wait_for_desktop(page, ORANGE)
    assert "Connected (encrypted)" in page.evaluate(_CANVAS_STATE)["status"]
    page.close()


def test_novnc_token_file_routes_each_token_to_its_desktop(
    start_proxy: ProxyFactory,
    vnc_desktop: Callable[[Colour], VncDesktop],
    browser: Browser,
    tmp_path: Path,
) -> None:
    """Two tabs at once, one per token, each showing its own desktop and not the other."""
    blue, orange = vnc_desktop(BLUE), vnc_desktop(ORANGE)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"blue: {blue.target}\norange: {orange.target}\n")
    novnc = start_novnc_proxy(
        start_proxy, "--token-plugin", "TokenFile", "--token-source", str(tokens)
    )
    blue_page = browser.open(novnc_url(novnc.page, novnc.port, path="websockify?token=blue"))
    orange_page = browser.open(novnc_url(novnc.page, novnc.port, path="websockify?token=orange"))
    wait_for_desktop(blue_page, BLUE, absent=[ORANGE])
    wait_for_desktop(orange_page, ORANGE, absent=[BLUE])
    blue_page.close()
    orange_page.close()


def test_novnc_session_recording_reads_back_in_javascript(
    start_proxy: ProxyFactory,
    vnc_desktop: Callable[[Colour], VncDesktop],
    browser: Browser,
    tmp_path: Path,
) -> None:
    """--record of the browser session: node loads the file as noVNC's playback does, and the
    bytes it gives back are that session's RFB handshake, both ways."""
    node = need_program("node", "nodejs")
    desktop = vnc_desktop(BLUE)
    record = tmp_path / "session"
    novnc = start_novnc_proxy(start_proxy, "--record", str(record), target=desktop.target)
    page = browser.open(novnc_url(novnc.page, novnc.port))
    wait_for_desktop(page, BLUE)
    page.close()

    def recording_closed() -> bool:
        files = list(tmp_path.glob("session.*"))
        return len(files) == 1 and files[0].read_text().endswith("'EOF'];\n")

    wait_until(recording_closed, "the session's record file to be closed")
    (path,) = tmp_path.glob("session.*")
    result = run_captured([node, str(Path(__file__).parent / "record_frames.js"), str(path)])
    assert result.returncode == 0, result.stderr
    replay = json.loads(result.stdout)
    to_client = base64.b64decode(replay["toClient"])
    from_client = io.BytesIO(base64.b64decode(replay["fromClient"]))

    def sent_by_client(data: bytes) -> None:
        assert from_client.read(len(data)) == data

    server = RfbReader(iter([to_client]).__next__)
    init = rfb_handshake(server, sent_by_client)
    assert (init.width, init.height, init.name) == (*GEOMETRY, "websockify_min")
    # Then noVNC sets its pixel format and encodings, and the server sends the desktop.
    assert from_client.read(1) in (b"\x00", b"\x02"), "no SetPixelFormat or SetEncodings"
    assert server.buffer, "nothing was recorded from the server after its ServerInit"
