"""Section 7: safe path resolution under the web root and the static-file responses."""

import email.utils
import hashlib
import html.parser
import os
import time
import urllib.parse
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from websockify_min import (
    HandshakeError,
    Request,
    WebPathError,
    _check_web_request,
    _content_type,
    _file_head,
    _is_not_modified,
    _listing_page,
    _serve_static,
    _wants_keep_alive,
    _web_message,
    parse_request,
    resolve_web_path,
)


def request(line: str, *fields: str) -> Request:
    return parse_request(("\r\n".join((line, *fields)) + "\r\n\r\n").encode("latin-1"))


@pytest.fixture
def web_root(tmp_path: Path) -> Iterator[Tuple[str, Path]]:
    """A web root (as a real path) with files, a subdirectory, and symlinks in and out."""
    root = tmp_path / "www"
    (root / "sub").mkdir(parents=True)
    (root / "index.html").write_text("<p>home</p>")
    (root / "app.js").write_text("export {};")
    (root / "sub" / "data.bin").write_bytes(os.urandom(100))
    (tmp_path / "secret.txt").write_text("outside")
    (root / "out").symlink_to(tmp_path / "secret.txt")
    (root / "outdir").symlink_to(tmp_path)
    (root / "in").symlink_to(root / "sub" / "data.bin")
    yield os.path.realpath(root), tmp_path


# -- resolve_web_path ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url_path", "relative"),
    [
        ("/", ""),
        ("/index.html", "index.html"),
        ("/sub/data.bin", "sub/data.bin"),
        ("/sub/", "sub"),
        ("//sub//./data.bin", "sub/data.bin"),
        ("/%73ub/data%2Ebin", "sub/data.bin"),  # escaped letters are just letters
        ("/in", "sub/data.bin"),  # a symlink that stays inside is followed
        ("/does/not/exist", "does/not/exist"),  # existence is the caller's business
        ("/caf%C3%A9", "café"),
        ("/...", "..."),
    ],
)
def test_paths_inside_the_root_resolve(
    web_root: Tuple[str, Path], url_path: str, relative: str
) -> None:
    root, _ = web_root
    assert resolve_web_path(root, url_path) == os.path.join(root, relative).rstrip("/")


TRAVERSALS = [
    "/../secret.txt",
    "/sub/../../secret.txt",
    "/..",
    "/%2e%2e/secret.txt",
    "/%2E%2E/secret.txt",
    "/.%2e/secret.txt",
    "/sub/..%2f..%2fsecret.txt",
    "/%2fetc/passwd",
    "/..%5csecret.txt",
    "/..\\secret.txt",
    "/sub\\..\\..\\secret.txt",
    "/index.html%00.png",
    "/%00",
    "/out",  # a symlink to a file outside
    "/outdir/secret.txt",  # through a symlink to a directory outside
    "/outdir",
    "/" + "a" * 256,  # longer than any file name
]


@pytest.mark.parametrize("url_path", TRAVERSALS)
def test_traversal_tricks_are_refused_with_404(web_root: Tuple[str, Path], url_path: str) -> None:
    root, _ = web_root
    with pytest.raises(WebPathError) as caught:
        resolve_web_path(root, url_path)
    assert caught.value.status == 404
    assert caught.value.reason == "Not Found"  # the client learns nothing more
    assert caught.value.detail


@pytest.mark.parametrize("target", ["etc/passwd", "http://example.com/", "*", ""])
def test_a_target_that_is_not_a_path_gets_400(web_root: Tuple[str, Path], target: str) -> None:
    root, _ = web_root
    with pytest.raises(WebPathError) as caught:
        resolve_web_path(root, target)
    assert caught.value.status == 400


def test_web_path_error_is_a_handshake_error() -> None:
    """So the session's one error boundary answers it like any refused request."""
    assert issubclass(WebPathError, HandshakeError)


def test_an_undecodable_string_is_refused(web_root: Tuple[str, Path]) -> None:
    root, _ = web_root
    with pytest.raises(WebPathError):
        resolve_web_path(root, "/\ud800")


def test_the_root_may_be_the_file_system_root() -> None:
    with pytest.raises(WebPathError):
        resolve_web_path("/", "/etc/../etc")  # ".." is refused, not normalised
    assert resolve_web_path("/", "/etc") == os.path.realpath("/etc")


PIECES = st.sampled_from(
    ["/", "..", ".", "%2e", "%2E", "%2f", "%5c", "\\", "%00", "\x00", "%", "sub", "out",
     "outdir", "in", "index.html", "secret.txt", "%c3", "\ud800", "é", "//", "a"]
)  # fmt: skip


@settings(max_examples=400, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(), st.lists(PIECES, max_size=12).map("".join)))
@example("/outdir/secret.txt")
@example("/in/../../secret.txt")
def test_any_string_resolves_inside_the_root_or_raises_web_path_error(
    web_root: Tuple[str, Path], url_path: str
) -> None:
    root, _ = web_root
    try:
        path = resolve_web_path(root, url_path)
    except WebPathError:
        return
    assert path == os.path.realpath(path)
    assert os.path.commonpath([root, path]) == root


# -- types, dates, keep-alive, methods ----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vnc.html", "text/html"),
        ("app.js", "text/javascript"),
        ("module.MJS", "text/javascript"),
        ("style.css", "text/css"),
        ("logo.svg", "image/svg+xml"),
        ("icon.png", "image/png"),
        ("a.wasm", "application/wasm"),
        ("backup.tar.gz", "application/gzip"),
        ("drawing.svgz", "application/gzip"),
        ("no-suffix", "application/octet-stream"),
        ("weird.zzqq", "application/octet-stream"),
    ],
)
def test_content_type(name: str, expected: str) -> None:
    assert _content_type(f"/www/{name}") == expected


MTIME = 1_700_000_000


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ((), False),
        ((f"If-Modified-Since: {email.utils.formatdate(MTIME, usegmt=True)}",), True),
        ((f"If-Modified-Since: {email.utils.formatdate(MTIME + 60, usegmt=True)}",), True),
        ((f"If-Modified-Since: {email.utils.formatdate(MTIME - 1, usegmt=True)}",), False),
        (("If-Modified-Since: Tue, 14 Nov 2023 22:13:20",), True),  # no zone: GMT
        (("If-Modified-Since: yesterday",), False),
        (("If-Modified-Since: ",), False),
        (("If-Modified-Since: Mon, 99 Foo 2023 99:99:99 GMT",), False),
        (("If-Modified-Since: Fri, 31 Dec 9999 23:59:59 GMT",), False),  # future: ignored
        (
            (
                f"If-Modified-Since: {email.utils.formatdate(MTIME, usegmt=True)}",
                'If-None-Match: "x"',
            ),
            False,
        ),
    ],
)
def test_if_modified_since(fields: Tuple[str, ...], expected: bool) -> None:
    headers = request("GET / HTTP/1.1", *fields).headers
    assert _is_not_modified(headers, MTIME + 0.5, time.time()) is expected


@pytest.mark.parametrize(
    ("line", "fields", "expected"),
    [
        ("GET / HTTP/1.1", (), True),
        ("GET / HTTP/1.1", ("Connection: close",), False),
        ("GET / HTTP/1.1", ("Connection: foo, Close",), False),
        ("GET / HTTP/1.0", (), False),
        ("GET / HTTP/1.0", ("Connection: Keep-Alive",), True),
    ],
)
def test_keep_alive(line: str, fields: Tuple[str, ...], expected: bool) -> None:
    assert _wants_keep_alive(request(line, *fields)) is expected


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"])
def test_other_methods_get_405_with_allow(method: str) -> None:
    with pytest.raises(HandshakeError) as caught:
        _check_web_request(request(f"{method} / HTTP/1.1"))
    assert caught.value.status == 405
    assert caught.value.headers == {"Allow": "GET, HEAD"}


@pytest.mark.parametrize(
    "fields", [("Content-Length: 5",), ("Transfer-Encoding: chunked",), ("Content-Length: x",)]
)
def test_a_get_with_a_body_gets_400(fields: Tuple[str, ...]) -> None:
    with pytest.raises(HandshakeError) as caught:
        _check_web_request(request("GET / HTTP/1.1", *fields))
    assert caught.value.status == 400


def test_get_and_head_pass() -> None:
    _check_web_request(request("GET / HTTP/1.1"))
    _check_web_request(request("HEAD / HTTP/1.1", "Content-Length: 0"))


# -- response builders ----------------------------------------------------------------------


def parse_head(data: bytes) -> Tuple[int, dict]:  # type: ignore[type-arg]
    text = data.decode("latin-1")
    assert text.endswith("\r\n\r\n")
    lines = text[:-4].split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), fields


def test_file_head_200() -> None:
    now = time.time()
    status, fields = parse_head(_file_head(200, 1234, MTIME + 0.9, "text/css", True, now))
    assert status == 200
    assert fields == {
        "Content-Type": "text/css",
        "Content-Length": "1234",
        "Date": email.utils.formatdate(now, usegmt=True),
        "Last-Modified": "Tue, 14 Nov 2023 22:13:20 GMT",
        "Connection": "keep-alive",
    }


def test_file_head_304_has_no_body_fields() -> None:
    status, fields = parse_head(_file_head(304, 0, MTIME, "", False, time.time()))
    assert status == 304
    assert set(fields) == {"Date", "Last-Modified", "Connection"}
    assert fields["Connection"] == "close"


def test_web_message_head_only_keeps_the_length() -> None:
    full = _web_message(404, "gone\n", True)
    head = _web_message(404, "gone\n", True, head_only=True)
    assert full.body == b"gone\n" and head.body == b""
    assert parse_head(full.head)[1]["Content-Length"] == "5"
    assert parse_head(head.head)[1]["Content-Length"] == "5"


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: List[str] = []
        self.tags: List[str] = []
        self.text: List[str] = []

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, object]]) -> None:  # type: ignore[override]
        self.tags.append(tag)
        self.hrefs += [str(value) for name, value in attrs if name == "href"]

    def handle_data(self, data: str) -> None:
        self.text.append(data)


HOSTILE = '<img src=x onerror="alert(1)">&amp;\'"'


def test_listing_escapes_hostile_names() -> None:
    page = _listing_page("/dir%3Cb%3E/", [(HOSTILE, False), ("sub dir", True), ("b.txt", False)])
    assert "<img" not in page and "<b>" not in page
    links = _Links()
    links.feed(page)
    assert "img" not in links.tags and "b" not in links.tags
    assert links.hrefs[1:] == ["b.txt", "sub%20dir/"]  # sorted, directories with a slash
    assert not set(links.hrefs[0]) & set("<>\"'& /")
    assert HOSTILE in "".join(links.text)
    assert "Directory listing for /dir<b>/" in "".join(links.text)


def test_listing_links_decode_back_to_the_names() -> None:
    names = [HOSTILE, "a b", "100%", "é", "#frag", "?q"]
    links = _Links()
    links.feed(_listing_page("/", [(name, False) for name in names]))
    assert sorted(urllib.parse.unquote(href) for href in links.hrefs) == sorted(names)
    assert all(":" not in href and "?" not in href and "#" not in href for href in links.hrefs)


# -- serve_static -----------------------------------------------------------------------------


def test_serve_a_file(web_root: Tuple[str, Path]) -> None:
    root, _ = web_root
    data = (Path(root) / "sub" / "data.bin").read_bytes()
    response = _serve_static(root, request("GET /sub/data.bin HTTP/1.1"), False, True)
    assert response.status == 200 and response.file is not None and response.length == 100
    try:
        assert hashlib.sha256(response.file.read()).digest() == hashlib.sha256(data).digest()
    finally:
        response.file.close()
    assert parse_head(response.head)[1]["Content-Length"] == "100"


def test_head_opens_nothing(web_root: Tuple[str, Path]) -> None:
    root, _ = web_root
    response = _serve_static(root, request("HEAD /app.js HTTP/1.1"), False, True)
    assert response.status == 200 and response.file is None and response.body == b""
    assert parse_head(response.head)[1]["Content-Type"] == "text/javascript"


def test_directory_index_and_redirect(web_root: Tuple[str, Path]) -> None:
    root, _ = web_root
    response = _serve_static(root, request("GET / HTTP/1.1"), True, True)
    assert response.status == 200 and response.file is not None
    response.file.close()
    moved = _serve_static(root, request("GET //sub?x=1 HTTP/1.1"), False, True)
    assert moved.status == 301
    assert parse_head(moved.head)[1]["Location"] == "/sub/?x=1"  # never "//sub/"


def test_listing_on_and_off(web_root: Tuple[str, Path]) -> None:
    root, _ = web_root
    listing = _serve_static(root, request("GET /sub/ HTTP/1.1"), False, True)
    assert listing.status == 200 and b"data.bin" in listing.body
    assert parse_head(listing.head)[1]["Content-Type"] == "text/html; charset=utf-8"
    assert _serve_static(root, request("GET /sub/ HTTP/1.1"), True, True).status == 404


def test_missing_file_special_file_and_slash_after_a_file(web_root: Tuple[str, Path]) -> None:
    root, _ = web_root
    os.mkfifo(os.path.join(root, "fifo"))
    for path in ("/nothing", "/fifo", "/app.js/"):
        assert _serve_static(root, request(f"GET {path} HTTP/1.1"), False, True).status == 404


def test_not_modified(web_root: Tuple[str, Path]) -> None:
    root, _ = web_root
    os.utime(os.path.join(root, "app.js"), (MTIME, MTIME))
    line = "GET /app.js HTTP/1.1"
    for since, status in ((MTIME, 304), (MTIME + 1, 304), (MTIME - 1, 200)):
        field = f"If-Modified-Since: {email.utils.formatdate(since, usegmt=True)}"
        response = _serve_static(root, request(line, field), False, False)
        assert response.status == status
        assert (response.file is None) is (status == 304)
        if response.file is not None:
            response.file.close()
