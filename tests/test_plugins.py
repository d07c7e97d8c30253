"""Section 6, plugins: against real files, sockets, an HTTP server and redis-server."""

import base64
import hashlib
import hmac
import http.client
import http.server
import importlib
import io
import json
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import pytest
from conftest import REDIS_PASSWORD, HttpService, RedisServer, b64url, basic_auth, run_captured
from hypothesis import given
from hypothesis import strategies as st

import websockify_min as wm
from websockify_min import (
    AuthenticationError,
    ConfigError,
    HandshakeError,
    Target,
    check_auth,
    load_plugin,
    lookup_target,
    token_from_request,
)

LOGGER = "websockify_min"


# --- helpers ---


def headers_of(*lines: str) -> http.client.HTTPMessage:
    """The HTTPMessage the HTTP layer hands to auth plugins, from header lines."""
    raw = "".join(line + "\r\n" for line in lines) + "\r\n"
    return http.client.parse_headers(io.BytesIO(raw.encode("latin-1")))


def refusal(function: Callable[..., object], *args: Any) -> HandshakeError:
    """The HandshakeError that function(*args) raises."""
    with pytest.raises(HandshakeError) as info:
        function(*args)
    return info.value


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def warnings_of(caplog: pytest.LogCaptureFixture) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def touch_newer(path: Path) -> None:
    """Move mtime forward so a reload check cannot miss the edit on a coarse clock."""
    info = path.stat()
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 2_000_000_000))


class Recorder:
    """A token or auth plugin written by a user, as the loop would see it."""

    def __init__(self, answer: object = None, error: Optional[BaseException] = None) -> None:
        self.answer, self.error = answer, error
        self.calls: List[Tuple[object, ...]] = []

    def lookup(self, token: str) -> Any:
        self.calls.append((token,))
        if self.error is not None:
            raise self.error
        return self.answer

    def authenticate(
        self, headers: http.client.HTTPMessage, target_host: Any, target_port: Any
    ) -> None:
        self.calls.append((headers, target_host, target_port))
        if self.error is not None:
            raise self.error


# --- Target and lookup_target ---


def test_target_prints_as_an_address() -> None:
    assert str(Target("example.com", 5900)) == "example.com:5900"
    assert str(Target("::1", 5900)) == "[::1]:5900"
    assert str(Target("unix_socket", 0, "/run/vnc.sock")) == "unix socket /run/vnc.sock"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (("host", "5900"), Target("host", 5900)),
        (["host", 5900], Target("host", 5900)),
        (("host", b"5900"), Target("host", 5900)),  # upstream's BaseTokenAPI returns bytes
        ((b"host", "1"), Target("host", 1)),
        (("[::1]", "5900"), Target("::1", 5900)),
        (("unix_socket", "/run/a.sock"), Target("unix_socket", 0, "/run/a.sock")),
        (("unix_socket", Path("/run/a.sock")), Target("unix_socket", 0, "/run/a.sock")),
        (Target("h", 2), Target("h", 2)),
    ],
)
def test_lookup_target_normalises_what_plugins_return(answer: object, expected: Target) -> None:
    plugin = Recorder(answer)
    assert lookup_target(plugin, "tok") == expected
    assert plugin.calls == [("tok",)]


@pytest.mark.parametrize(
    "answer",
    [
        ("host",),
        ("host", "5900", "x"),
        "host:5900",
        ("host", "0"),
        ("host", "65536"),
        ("host", "59 00"),
        ("host", "\uff15\uff19\uff10\uff10"),  # fullwidth digits: int() takes them, a port must not
        ("host", True),
        ("host", None),
        ("", "5900"),
        ("bad host", "5900"),
        ("host\r\n", "5900"),
        (None, "5900"),
        ("unix_socket", ""),
        ("unix_socket", "/a\x00b"),
        ("unix_socket", 5900),
        {"host": "h", "port": 1},
    ],
)
def test_lookup_target_refuses_unusable_answers_with_400(
    answer: object, caplog: pytest.LogCaptureFixture
) -> None:
    error = refusal(lookup_target, Recorder(answer), "tok")
    assert (error.status, error.reason) == (400, "Invalid target for token")
    assert len(warnings_of(caplog)) == 1


def test_lookup_target_statuses(caplog: pytest.LogCaptureFixture) -> None:
    assert refusal(lookup_target, Recorder(("h", 1)), None).status == 400
    assert refusal(lookup_target, Recorder(("h", 1)), "").status == 400
    assert refusal(lookup_target, Recorder(None), "nope").status == 404
    assert len(warnings_of(caplog)) == 3
    assert not any(record.exc_info for record in caplog.records)


@pytest.mark.parametrize(
    "error", [RuntimeError("boom"), KeyError("x"), SystemExit(1), OSError(5, "io")]
)
def test_a_failing_plugin_becomes_500_without_a_traceback(
    error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, LOGGER)
    failure = refusal(lookup_target, Recorder(error=error), "tok")
    assert (failure.status, failure.reason) == (500, "Token lookup failed")
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert record.levelno == logging.ERROR and not record.exc_info
    assert type(error).__name__ in record.getMessage()


def test_a_failing_plugin_shows_its_traceback_with_verbose(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, LOGGER)
    refusal(lookup_target, Recorder(error=RuntimeError("boom")), "tok")
    refusal(check_auth, Recorder(error=RuntimeError("boom")), headers_of(), None)
    assert [bool(r.exc_info) for r in caplog.records if r.levelno == logging.ERROR] == [True, True]


def test_a_handshake_error_from_a_plugin_passes_through(caplog: pytest.LogCaptureFixture) -> None:
    raised = HandshakeError(429, "Too Many Requests")
    assert refusal(lookup_target, Recorder(error=raised), "tok") is raised
    assert len(warnings_of(caplog)) == 1


def test_long_tokens_are_cut_short_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    refusal(lookup_target, Recorder(None), "x" * 5000 + "\n")
    (record,) = warnings_of(caplog)
    assert len(record.getMessage()) < 200 and "\n" not in record.getMessage()


# --- token_from_request ---


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("token=abc", "abc"),
        ("?token=abc", "abc"),
        ("a=1&token=x%2Fy%20z&b=2", "x/y z"),
        ("token=first&token=second", "first"),
        ("token=abc%0A", "abc"),
        ("token=", None),
        ("tokens=abc", None),
        ("", None),
        ("token", None),
    ],
)
def test_token_from_the_query(query: str, expected: Optional[str]) -> None:
    assert token_from_request(query, "ignored.example:80", False) == expected


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("vm1.example.com", "vm1.example.com"),
        ("vm1.example.com:6080", "vm1.example.com"),
        ("[::1]:6080", "::1"),
        ("[fe80::1]", "fe80::1"),
        ("[::1", None),
        ("[]:80", None),
        (":80", None),
        ("", None),
        (None, None),
    ],
)
def test_token_from_the_host_header(host: Optional[str], expected: Optional[str]) -> None:
    assert token_from_request("token=from-query", host, True) == expected


# --- check_auth ---


def test_check_auth_passes_headers_and_target_as_upstream_does() -> None:
    plugin = Recorder()
    headers = headers_of("Origin: https://a.example")
    check_auth(plugin, headers, Target("h", 5900))
    check_auth(plugin, headers, Target("unix_socket", 0, "/s.sock"))
    check_auth(plugin, headers, None)
    check_auth(plugin, headers, ["h", "5900"])  # a token plugin's answer goes on as it is
    assert plugin.calls == [
        (headers, "h", 5900),
        (headers, "unix_socket", "/s.sock"),
        (headers, None, None),
        (headers, "h", "5900"),
    ]


def test_check_auth_turns_authentication_error_into_its_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    error = AuthenticationError(
        log_msg="go away",
        response_code=401,
        response_headers={"WWW-Authenticate": 'Basic realm="x"'},
        response_msg="Who are you",
    )
    answer = refusal(check_auth, Recorder(error=error), headers_of(), None)
    assert (answer.status, answer.reason, answer.headers) == (
        401,
        "Who are you",
        {"WWW-Authenticate": 'Basic realm="x"'},
    )
    (record,) = warnings_of(caplog)
    assert "go away" in record.getMessage() and not record.exc_info


def test_check_auth_defaults_and_cleans_what_a_plugin_asks_to_send() -> None:
    plain = refusal(check_auth, Recorder(error=AuthenticationError()), headers_of(), None)
    assert (plain.status, plain.reason, plain.headers) == (403, "Forbidden", {})
    nasty = AuthenticationError(
        response_code=200,  # not a refusal: made one
        response_headers={"X-Ok": "fine", "X-Bad": "a\r\nSet-Cookie: x=1", "Bad Name": "v"},
        response_msg="no\r\nInjected: yes",
    )
    cleaned = refusal(check_auth, Recorder(error=nasty), headers_of(), None)
    assert (cleaned.status, cleaned.reason, cleaned.headers) == (403, "Forbidden", {"X-Ok": "fine"})


def test_check_auth_understands_upstreams_authentication_error_class() -> None:
    class AuthenticationError(Exception):  # what `websockify.auth_plugins` defines
        def __init__(self, response_code: int = 403) -> None:
            super().__init__(f"{response_code} refused")
            self.code = response_code
            self.headers: Dict[str, str] = {}
            self.msg = None

    answer = refusal(
        lambda: check_auth(Recorder(error=AuthenticationError(401)), headers_of(), None)
    )
    assert (answer.status, answer.reason) == (401, "Unauthorized")


@pytest.mark.parametrize("error", [RuntimeError("bug"), SystemExit(2), ValueError("x")])
def test_check_auth_fails_closed_with_500(
    error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    answer = refusal(check_auth, Recorder(error=error), headers_of(), None)
    assert answer.status == 500
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert record.levelno == logging.ERROR and not record.exc_info


def test_check_auth_passes_a_handshake_error_through() -> None:
    raised = HandshakeError(429, "Slow down", {"Retry-After": "5"})
    assert refusal(check_auth, Recorder(error=raised), headers_of(), None) is raised


# --- ReadOnlyTokenFile and TokenFile ---

TOKEN_FILE = """\
# a comment
vm1: 10.0.0.1:5900

vm2:\t[2001:db8::7]:5901
   vm3:   host.example:5902
with:colon: h:1
sock: unix_socket:/run/vm:4.sock
broken line
bad-port: h:99999
two: a: b:1
"""


def test_token_file_entries_and_skipped_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    path.write_text(TOKEN_FILE)
    plugin = load_plugin("token", "ReadOnlyTokenFile", str(path))
    assert plugin.lookup("vm1") == ("10.0.0.1", "5900")  # a string, as upstream splits it
    assert lookup_target(plugin, "vm2") == Target("2001:db8::7", 5901)
    assert lookup_target(plugin, "vm3") == Target("host.example", 5902)
    assert lookup_target(plugin, "with:colon") == Target("h", 1)
    assert lookup_target(plugin, "sock") == Target("unix_socket", 0, "/run/vm:4.sock")
    assert plugin.lookup("broken") is None and plugin.lookup("two") is None
    skipped = [r.getMessage() for r in warnings_of(caplog)]
    assert len(skipped) == 3
    assert [m.rsplit(" line ", 1)[1].split(":")[0] for m in skipped] == ["8", "9", "10"]


def test_token_file_edits_apply_to_token_file_only(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("vm1: a:1\n")
    read_once = load_plugin("token", "ReadOnlyTokenFile", str(path))
    live = load_plugin("token", "TokenFile", str(path))
    path.write_text("vm1: b:2\nvm2: c:3\n")
    assert read_once.lookup("vm1") == ("a", "1") and read_once.lookup("vm2") is None
    assert live.lookup("vm1") == ("b", "2") and live.lookup("vm2") == ("c", "3")
    path.write_text("")
    assert live.lookup("vm1") is None


def test_token_file_logs_a_bad_line_once_however_often_it_is_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    path.write_text("nonsense\nvm1: a:1\n")
    plugin = load_plugin("token", "TokenFile", str(path))
    for _ in range(3):
        assert plugin.lookup("vm1") == ("a", "1")
    assert len(warnings_of(caplog)) == 1


def test_token_directory_reads_every_file_but_backups_and_hidden_ones(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text("vm1: a:1\nshared: a:9\n")
    (tmp_path / "b.conf").write_text("vm2: b:2\nshared: b:9\n")
    (tmp_path / "b.conf~").write_text("old: o:1\nshared: o:9\n")
    (tmp_path / ".b.conf.swp").write_text("swap: s:1\n")
    (tmp_path / "subdir").mkdir()
    (tmp_path / "subdir" / "c.conf").write_text("vm3: c:3\n")
    plugin = load_plugin("token", "TokenFile", str(tmp_path))
    assert plugin.lookup("vm1") == ("a", "1") and plugin.lookup("vm2") == ("b", "2")
    assert plugin.lookup("shared") == ("b", "9")  # name order: the later file wins
    for hidden in ("old", "swap", "vm3"):
        assert plugin.lookup(hidden) is None
    (tmp_path / "c.conf").write_text("vm3: c:3\n")
    assert plugin.lookup("vm3") == ("c", "3")


@pytest.fixture
def source_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """caplog, with the info lines that say a token source is usable again."""
    caplog.set_level(logging.INFO, LOGGER)
    return caplog


def source_messages(caplog: pytest.LogCaptureFixture, path: Path) -> List[str]:
    """What was logged about the token source *path* itself (not about one token)."""
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and str(path) in r.getMessage()
    ]


def test_token_file_that_vanishes_is_an_unknown_token_until_it_is_back(
    tmp_path: Path, source_log: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens"
    path.write_text("vm1: a:1\n")
    plugin = load_plugin("token", "TokenFile", str(path))
    path.unlink()
    for _ in range(3):
        assert refusal(lookup_target, plugin, "vm1").status == 404
    path.write_text("vm1: b:2\n")
    for _ in range(3):
        assert lookup_target(plugin, "vm1") == Target("b", 2)
    path.unlink()
    assert refusal(lookup_target, plugin, "vm1").status == 404
    assert source_messages(source_log, path) == [
        f"TokenFile: {path} no longer exists; lookups find no token until it is back",
        f"TokenFile: {path} is usable now",
        f"TokenFile: {path} no longer exists; lookups find no token until it is back",
    ]


@pytest.mark.parametrize("plugin_name", ["TokenFile", "ReadOnlyTokenFile"])
@pytest.mark.parametrize("layout", ["file", "directory"])
def test_token_file_missing_at_startup(
    plugin_name: str, layout: str, tmp_path: Path, source_log: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "later"
    plugin = load_plugin("token", plugin_name, str(source))
    assert source_messages(source_log, source) == [
        f"{plugin_name}: {source} does not exist yet; lookups find no token until it does"
    ]
    for _ in range(3):
        assert refusal(lookup_target, plugin, "vm1").status == 404
    assert len(source_messages(source_log, source)) == 1  # not once per lookup
    if layout == "file":
        source.write_text("vm1: a:1\n")
        edited = source
    else:
        source.mkdir()
        (source / "x").write_text("vm1: a:1\n")
        edited = source / "x"
    assert lookup_target(plugin, "vm1") == Target("a", 1)
    assert source_messages(source_log, source)[1:] == [f"{plugin_name}: {source} is usable now"]
    edited.write_text("vm1: b:2\n")
    expected = Target("b", 2) if plugin_name == "TokenFile" else Target("a", 1)
    assert lookup_target(plugin, "vm1") == expected  # ReadOnlyTokenFile read it once


def test_a_token_source_that_is_not_there_yet_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    plugin = load_plugin("token", "ReadOnlyTokenFile", "tokens")
    monkeypatch.chdir("/")
    (tmp_path / "tokens").write_text("vm1: a:1\n")
    assert plugin.lookup("vm1") == ("a", "1")


def test_token_file_source_is_absolute_so_a_chdir_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "tokens").write_text("vm1: a:1\n")
    monkeypatch.chdir(tmp_path)
    plugin = load_plugin("token", "TokenFile", "tokens")
    monkeypatch.chdir("/")
    assert plugin.lookup("vm1") == ("a", "1")


# --- TokenFileName and UnixDomainSocketDirectory: no escaping the directory ---

ESCAPES = ["../secret", "..", ".", "", "/etc/passwd", "a/b", "a\x00b", "x" * 300, "sub/../x"]


def test_token_file_name(tmp_path: Path) -> None:
    (tmp_path / "vm1").write_text("10.0.0.1:5900\n")
    (tmp_path / "sock").write_text("unix_socket:/run/x.sock")
    (tmp_path / "garbage").write_text("not a target")
    (tmp_path / "big").write_bytes(b"h:1" + b" " * (70 * 1024))
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")  # opening a FIFO must not block the worker
    plugin = load_plugin("token", "TokenFileName", str(tmp_path))
    assert plugin.lookup("vm1") == ("10.0.0.1", "5900")  # a string, as upstream splits it
    assert lookup_target(plugin, "vm1") == Target("10.0.0.1", 5900)
    assert lookup_target(plugin, "sock") == Target("unix_socket", 0, "/run/x.sock")
    assert refusal(lookup_target, plugin, "missing").status == 404
    assert refusal(lookup_target, plugin, "dir").status == 404
    assert refusal(lookup_target, plugin, "fifo").status == 404
    assert refusal(lookup_target, plugin, "garbage").status == 400
    assert refusal(lookup_target, plugin, "big").status == 400
    (tmp_path / "vm1").write_text("10.0.0.2:5901")
    assert lookup_target(plugin, "vm1") == Target("10.0.0.2", 5901)


@pytest.mark.parametrize("token", ESCAPES)
def test_token_file_name_refuses_paths(
    token: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tmp_path / "secret").write_text("10.9.9.9:22")
    (tokens / "sub").mkdir()
    (tokens / "x").write_text("h:1")
    plugin = load_plugin("token", "TokenFileName", str(tokens))
    assert refusal(lookup_target, plugin, token).status == 400
    assert len(warnings_of(caplog)) == 1


def test_token_file_name_refuses_symlinks_out_of_the_directory(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tmp_path / "secret").write_text("10.9.9.9:22")
    (tokens / "inside").write_text("h:1")
    (tokens / "out").symlink_to(tmp_path / "secret")
    (tokens / "alias").symlink_to(tokens / "inside")
    plugin = load_plugin("token", "TokenFileName", str(tokens))
    assert refusal(lookup_target, plugin, "out").status == 400
    assert lookup_target(plugin, "alias") == Target("h", 1)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Short, because a unix socket path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="wsm-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def bound_unix_socket(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    return server


def test_unix_domain_socket_directory(socket_dir: Path) -> None:
    sockets = socket_dir / "s"
    sockets.mkdir()
    (sockets / "plain").write_text("not a socket")
    with bound_unix_socket(sockets / "vm1"), bound_unix_socket(socket_dir / "outside"):
        (sockets / "link").symlink_to(socket_dir / "outside")
        plugin = load_plugin("token", "UnixDomainSocketDirectory", str(sockets))
        assert lookup_target(plugin, "vm1") == Target("unix_socket", 0, str(sockets / "vm1"))
        assert refusal(lookup_target, plugin, "missing").status == 404
        assert refusal(lookup_target, plugin, "plain").status == 400
        assert refusal(lookup_target, plugin, "link").status == 400
        for token in [*ESCAPES, "../outside"]:
            assert refusal(lookup_target, plugin, token).status == 400, token


@pytest.mark.parametrize("plugin_name", ["TokenFileName", "UnixDomainSocketDirectory"])
def test_token_directory_missing_at_startup(
    plugin_name: str, socket_dir: Path, source_log: pytest.LogCaptureFixture
) -> None:
    directory = socket_dir / "later"
    plugin = load_plugin("token", plugin_name, str(directory))
    for _ in range(3):
        assert refusal(lookup_target, plugin, "vm1").status == 404
        assert refusal(lookup_target, plugin, "../outside").status == 404  # nothing to leave
    assert source_messages(source_log, directory) == [
        f"{plugin_name}: {directory} does not exist yet; lookups find no token until it does"
    ]
    (socket_dir / "outside").write_text("h:1")
    directory.mkdir()
    (directory / "link").symlink_to(socket_dir / "outside")
    with bound_unix_socket(directory / "vm1"):
        if plugin_name == "TokenFileName":
            (directory / "vm1").unlink()
            (directory / "vm1").write_text("h:2")
            expected = Target("h", 2)
        else:
            expected = Target("unix_socket", 0, str(directory / "vm1"))
        assert lookup_target(plugin, "vm1") == expected
        for token in [*ESCAPES, "../outside", "link"]:
            assert refusal(lookup_target, plugin, token).status == 400, token
    assert source_messages(source_log, directory)[1] == f"{plugin_name}: {directory} is usable now"


def test_token_file_name_follows_its_directory_while_running(
    tmp_path: Path, source_log: pytest.LogCaptureFixture
) -> None:
    """The real path is found at each lookup: a directory swapped in (as a symlink) counts,
    and escapes are judged against the directory in force."""
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    (old / "vm1").write_text("h:1")
    (new / "vm1").write_text("h:2")
    (new / "back").symlink_to(old / "vm1")  # inside the old directory, but out of the new
    current = tmp_path / "current"
    current.symlink_to(old)
    plugin = load_plugin("token", "TokenFileName", str(current))
    assert lookup_target(plugin, "vm1") == Target("h", 1)
    swap = tmp_path / "current.new"
    swap.symlink_to(new)
    os.replace(str(swap), str(current))
    assert lookup_target(plugin, "vm1") == Target("h", 2)
    assert refusal(lookup_target, plugin, "back").status == 400
    assert f"TokenFileName: token leads out of {new}" in source_log.text


@pytest.mark.parametrize("plugin_name", ["TokenFileName", "UnixDomainSocketDirectory"])
def test_token_directory_replaced_by_a_file(
    plugin_name: str, tmp_path: Path, source_log: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "tokens"
    directory.mkdir()
    plugin = load_plugin("token", plugin_name, str(directory))
    directory.rmdir()
    directory.write_text("vm1")
    for _ in range(3):
        assert refusal(lookup_target, plugin, "vm1").status == 404
    assert source_messages(source_log, directory) == [
        f"{plugin_name}: {directory} is unusable, lookups find no token until it is fixed: "
        "not a directory"
    ]
    with pytest.raises(ConfigError, match=r"is not a directory$"):  # at startup, an error
        load_plugin("token", plugin_name, str(directory))


# --- TokenJSONFile ---


def test_json_token_file_values_and_reload(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(
        json.dumps(
            {
                "vm1": "10.0.0.1:5900",
                "vm2": {"host": "h2", "port": 5901},
                "vm3": {"host": "h3", "port": "5902"},
                "vm4": {"host": "h4:5903"},
                "sock": {"host": "unix_socket", "port": "/run/s.sock"},
                "bad": 12,
                "worse": {"host": "h"},
            }
        )
    )
    plugin = load_plugin("token", "TokenJSONFile", str(path))
    assert plugin.lookup("vm1") == ("10.0.0.1", 5900)
    assert plugin.lookup("vm2") == ("h2", 5901)
    assert plugin.lookup("vm3") == ("h3", 5902)
    assert plugin.lookup("vm4") == ("h4", 5903)
    assert plugin.lookup("sock") == ("unix_socket", "/run/s.sock")
    assert plugin.lookup("bad") is None and plugin.lookup("worse") is None
    assert len(warnings_of(caplog)) == 2

    path.write_text('{"vm1": "new:1"}')
    touch_newer(path)
    assert plugin.lookup("vm1") == ("new", 1) and plugin.lookup("vm2") is None

    caplog.clear()
    path.write_text('{"vm1": "typo:1",')  # a broken edit keeps the last good tokens
    touch_newer(path)
    for _ in range(3):
        assert plugin.lookup("vm1") == ("new", 1)
    assert len(warnings_of(caplog)) == 1

    path.unlink()
    assert plugin.lookup("vm1") == ("new", 1)
    path.write_bytes(b'\xef\xbb\xbf{"vm1": "bom:2"}')  # a BOM, as some editors write
    assert plugin.lookup("vm1") == ("bom", 2)


def errors_of_lookups_during(
    lookup: Callable[[], None], change: Callable[[], None]
) -> List[BaseException]:
    """Call *lookup* over and over in 4 threads while *change* runs; what the calls raised."""
    errors: List[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                lookup()
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        change()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    return errors


def test_json_token_file_is_consistent_under_concurrent_reloads(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text('{"vm": "old:1"}')
    plugin = load_plugin("token", "TokenJSONFile", str(path))
    seen: List[object] = []

    def rewrite() -> None:
        for generation in range(50):
            replacement = tmp_path / "tokens.json.new"
            replacement.write_text(json.dumps({"vm": f"gen{generation}:1"}))
            os.replace(replacement, path)  # atomic, as careful tools write

    errors = errors_of_lookups_during(lambda: seen.append(plugin.lookup("vm")), rewrite)
    assert not errors
    assert all(isinstance(v, tuple) and v[1] == 1 for v in seen)
    assert plugin.lookup("vm") == ("gen49", 1)


def test_json_token_file_missing_at_startup(
    tmp_path: Path, source_log: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tokens.json"
    plugin = load_plugin("token", "TokenJSONFile", str(path))
    for _ in range(3):
        assert refusal(lookup_target, plugin, "vm1").status == 404
    path.write_text('{"vm1": ')  # half written: still no token
    for _ in range(3):
        assert refusal(lookup_target, plugin, "vm1").status == 404
    path.write_text('{"vm1": "a:1"}')
    touch_newer(path)
    assert lookup_target(plugin, "vm1") == Target("a", 1)
    path.unlink()  # from now on, as for any edit: the last good tokens stay
    assert lookup_target(plugin, "vm1") == Target("a", 1)
    messages = source_messages(source_log, path)
    assert messages[:2] == [
        f"TokenJSONFile: {path} does not exist yet; lookups find no token until it does",
        f"TokenJSONFile: {path} is unusable, lookups find no token until it is fixed: "
        "JSONDecodeError: Expecting value: line 1 column 9 (char 8)",
    ]
    assert messages[2] == f"TokenJSONFile: {path} is usable now"
    assert "keeping the previous tokens" in messages[3] and len(messages) == 4


@pytest.mark.parametrize("content", ["[1, 2]", "not json", '"a:1"', "", "[" * 100_000])
def test_json_token_file_must_start_valid(content: str, tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"^--token-plugin TokenJSONFile: --token-source"):
        load_plugin("token", "TokenJSONFile", str(path))


# --- BaseTokenAPI and JSONTokenApi against a real HTTP server ---


class TokenService(HttpService):
    """A token API that answers by path: /plain/, /json/, /status/N, /slow/, /big/, /raw/."""

    def __init__(self) -> None:
        self.targets = {"vm1": "10.0.0.1:5900", "vm2": "h2:5901"}
        super().__init__()

    def answer(self, path: str) -> Tuple[int, bytes]:
        kind, _, token = path.lstrip("/").partition("/")
        if kind == "status":
            return int(token), b""
        if kind == "slow":
            self.release.wait(10)
            return 200, b"h:1"
        if kind == "big":
            return 200, b"h:1" + b" " * (70 * 1024)
        if kind == "raw":
            return 200, token.encode()
        if token not in self.targets:
            return 404, b""
        if kind == "plain":
            return 200, self.targets[token].encode()
        if kind == "json":
            host, port = self.targets[token].rsplit(":", 1)
            return 200, json.dumps({"host": host, "port": int(port)}).encode()
        return 200, b""


@pytest.fixture
def token_service(monkeypatch: pytest.MonkeyPatch) -> Iterator[TokenService]:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    service = TokenService()
    try:
        yield service
    finally:
        service.close()


def test_token_api_plain_and_json(token_service: TokenService) -> None:
    plain = load_plugin("token", "BaseTokenAPI", token_service.url + "/plain/%s")
    as_json = load_plugin("token", "JSONTokenApi", token_service.url + "/json/%s")
    assert lookup_target(plain, "vm1") == Target("10.0.0.1", 5900)
    assert lookup_target(as_json, "vm2") == Target("h2", 5901)
    # The port as upstream's plugins return it: split off text, or the JSON's number.
    assert plain.lookup("vm1") == ("10.0.0.1", "5900")
    assert as_json.lookup("vm2") == ("h2", 5901)
    assert refusal(lookup_target, plain, "nope").status == 404
    assert refusal(lookup_target, as_json, "nope").status == 404


def test_token_api_quotes_the_token(token_service: TokenService) -> None:
    plugin = load_plugin("token", "BaseTokenAPI", token_service.url + "/plain/%s?x=%41")
    assert plugin.lookup("a/b c?&%") is None
    assert token_service.paths == ["/plain/a%2Fb%20c%3F%26%25?x=%41"]


def test_token_api_statuses(token_service: TokenService, monkeypatch: pytest.MonkeyPatch) -> None:
    def status_of(url: str, token: str = "t") -> int:
        return refusal(
            lambda: lookup_target(load_plugin("token", "BaseTokenAPI", url), token)
        ).status

    assert status_of(token_service.url + "/status/%s", "403") == 404  # a refusal: unknown token
    assert status_of(token_service.url + "/status/%s", "503") == 500  # the service is broken
    assert status_of(token_service.url + "/raw/%s", "no-port") == 400
    assert status_of(token_service.url + "/big/%s") == 400
    assert status_of(f"http://127.0.0.1:{free_port()}/%s") == 500  # nobody listens
    monkeypatch.setattr(wm, "_TOKEN_SERVICE_TIMEOUT", 0.3)
    started = time.monotonic()
    assert status_of(token_service.url + "/slow/%s") == 500
    assert time.monotonic() - started < 5


def test_token_api_keeps_upstreams_process_result_hook(token_service: TokenService) -> None:
    class Reversed(wm.BaseTokenAPI):
        def process_result(self, resp: Any) -> Tuple[str, str]:
            assert resp.ok and resp.status_code == 200
            host, port = resp.text.split(":")
            return (host[::-1], port)

    plugin = Reversed(token_service.url + "/plain/%s")
    assert lookup_target(plugin, "vm2") == Target("2h", 5901)


@pytest.mark.parametrize(
    "source", ["http://x/no-placeholder", "ftp://x/%s", "file:///etc/%s", "", None]
)
def test_token_api_sources(source: Optional[str]) -> None:
    with pytest.raises(ConfigError, match=r"^--token-plugin JSONTokenApi: "):
        load_plugin("token", "JSONTokenApi", source)


# --- TokenRedis against a real redis-server ---


def redis_source(redis: RedisServer, *rest: str) -> str:
    return ":".join(["127.0.0.1", str(redis.port), *rest])


def test_redis_values_db_and_namespace(redis: RedisServer, tmp_path: Path) -> None:
    redis.cli("SET", "plain", "10.0.0.1:5900")
    redis.cli("SET", "json", '{"host": "h2:5901"}')
    redis.cli("SET", "spaced", "  h3:5902\n")
    redis.cli("SET", "v6", '{"host": "[::1]:5903"}')
    redis.cli("SET", "in-db-3", "h4:5904", db=3)
    redis.cli("SET", "app:one:tok", "h5:5905")
    redis.cli("SET", "garbage", "{not json")
    redis.cli("SET", "no-port", "justahost")
    quoted_password = f'"{REDIS_PASSWORD}"'
    plugin = load_plugin("token", "TokenRedis", redis_source(redis, "", quoted_password))
    assert lookup_target(plugin, "plain") == Target("10.0.0.1", 5900)
    assert lookup_target(plugin, "json") == Target("h2", 5901)
    assert plugin.lookup("json") == ("h2", "5901")  # upstream splits "host:port" here too
    assert lookup_target(plugin, "spaced") == Target("h3", 5902)
    assert lookup_target(plugin, "v6") == Target("::1", 5903)
    assert refusal(lookup_target, plugin, "in-db-3").status == 404
    assert refusal(lookup_target, plugin, "garbage").status == 400
    assert refusal(lookup_target, plugin, "no-port").status == 400
    assert refusal(lookup_target, plugin, "missing").status == 404

    in_db = load_plugin("token", "TokenRedis", redis_source(redis, "3", quoted_password))
    assert lookup_target(in_db, "in-db-3") == Target("h4", 5904)
    spaced = load_plugin(
        "token", "TokenRedis", redis_source(redis, "", quoted_password, '"app:one"')
    )
    assert lookup_target(spaced, "tok") == Target("h5", 5905)
    assert spaced.lookup("app:one:tok") is None

    secret_file = tmp_path / "password"
    secret_file.write_text(REDIS_PASSWORD + "\n")
    from_file = load_plugin("token", "TokenRedis", redis_source(redis, "0", "@" + str(secret_file)))
    assert lookup_target(from_file, "plain") == Target("10.0.0.1", 5900)


def test_redis_tokens_with_protocol_characters(redis: RedisServer) -> None:
    token = "a b\r\n*1\r\n$4\r\nPING"  # length-prefixed: cannot inject a command
    plugin = load_plugin("token", "TokenRedis", redis_source(redis, "", f'"{REDIS_PASSWORD}"'))
    assert plugin.lookup(token) is None


def test_redis_failures_are_500(redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    redis.cli("SET", "plain", "10.0.0.1:5900")
    redis.cli("RPUSH", "a-list", "x")
    for source in (
        redis_source(redis),  # no password: NOAUTH
        redis_source(redis, "", "wrong"),
        f"127.0.0.1:{free_port()}",  # nobody listens
    ):
        plugin = load_plugin("token", "TokenRedis", source)
        assert refusal(lookup_target, plugin, "plain").status == 500
    plugin = load_plugin("token", "TokenRedis", redis_source(redis, "", f'"{REDIS_PASSWORD}"'))
    assert refusal(lookup_target, plugin, "a-list").status == 500  # WRONGTYPE
    assert all(REDIS_PASSWORD not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    "source",
    [
        None,
        "",
        ":6379",
        "h:port",
        "h:0",
        "h:70000",
        "h:1:db",
        "h:1:²",
        "h:1:0:pw:ns:ssl",
        'h:"unterminated',
        'h:"a"b',
    ],
)
def test_redis_sources(source: Optional[str]) -> None:
    with pytest.raises(ConfigError, match=r"^--token-plugin TokenRedis: ") as info:
        load_plugin("token", "TokenRedis", source)
    assert "\n" not in str(info.value)


def test_redis_defaults() -> None:
    plugin = load_plugin("token", "TokenRedis", "redis.example")
    assert isinstance(plugin, wm.TokenRedis)
    assert (plugin._address, plugin._db, plugin._password, plugin._key_prefix) == (
        ("redis.example", 6379),
        0,
        None,
        "",
    )


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters='":')), min_size=1, max_size=6))
def test_source_fields_round_trip(fields: List[str]) -> None:
    assert wm._split_source_fields(":".join(fields)) == fields
    assert wm._split_source_fields(":".join(f'"{f}"' for f in fields)) == fields


@given(st.text())
def test_source_fields_parse_or_raise_value_error(text: str) -> None:
    try:
        wm._split_source_fields(text)
    except ValueError:
        pass


# --- JWTTokenApi ---

HMAC_KEY = b"0123456789abcdef0123456789abcdef"
HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


@pytest.fixture
def no_jwcrypto(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a host without jwcrypto, even if this one has it (and imported it already)."""
    for name in ("jwcrypto", "jwcrypto.jwk", "jwcrypto.jwe", "jwcrypto.jws", "jwcrypto.jwt"):
        monkeypatch.setitem(sys.modules, name, None)


def make_jwt(claims: object, key: bytes = HMAC_KEY, alg: str = "HS256", **header: object) -> str:
    head = b64url(json.dumps({"alg": alg, "typ": "JWT", **header}).encode())
    body = b64url(json.dumps(claims).encode())
    digest = hmac.new(key, f"{head}.{body}".encode(), HASHES.get(alg, hashlib.sha256)).digest()
    return f"{head}.{body}.{b64url(digest)}"


@pytest.fixture
def hmac_key_file(tmp_path: Path) -> str:
    path = tmp_path / "jwt.key"
    path.write_text(b64url(HMAC_KEY) + "\n")  # base64url, as upstream's jwcrypto reads it
    return str(path)


@pytest.mark.parametrize("alg", sorted(HASHES))
def test_jwt_valid_tokens(alg: str, hmac_key_file: str) -> None:
    plugin = load_plugin("token", "JWTTokenApi", hmac_key_file)
    now = time.time()
    claims = {"host": "10.0.0.1", "port": 5900, "nbf": now - 10, "exp": now + 60}
    assert lookup_target(plugin, make_jwt(claims, alg=alg)) == Target("10.0.0.1", 5900)
    assert lookup_target(plugin, make_jwt({"host": "h", "port": "1"}, alg=alg)) == Target("h", 1)


def test_jwt_key_file_reads_like_upstream(tmp_path: Path) -> None:
    # Upstream's test key: its HMAC key is this text decoded as base64url.
    text = "secret_sauce_secret_sauce_secret_sauce_secret_sauce"
    (tmp_path / "symmetric.key").write_text(text)
    plugin = load_plugin("token", "JWTTokenApi", str(tmp_path / "symmetric.key"))
    key = base64.urlsafe_b64decode(text + "=")
    assert lookup_target(plugin, make_jwt({"host": "h", "port": 1}, key=key)) == Target("h", 1)
    error = refusal(
        lambda: lookup_target(plugin, make_jwt({"host": "h", "port": 1}, key=text.encode()))
    )
    assert error.status == 403


def forged_tokens() -> Dict[str, str]:
    good = make_jwt({"host": "h", "port": 1})
    head, body, signature = good.split(".")
    other_body = b64url(json.dumps({"host": "evil", "port": 22}).encode())
    return {
        "bad signature": make_jwt({"host": "h", "port": 1}, key=b"another key"),
        "swapped claims": f"{head}.{other_body}.{signature}",
        "no signature": f"{head}.{body}.",
        "alg none": f"{b64url(json.dumps({'alg': 'none'}).encode())}.{body}.",
        "alg RS256": make_jwt({"host": "h", "port": 1}, alg="RS256"),
        "alg missing": f"{b64url(b'{}')}.{body}.{signature}",
        "crit header": make_jwt({"host": "h", "port": 1}, crit=["exp"]),
        "two parts": f"{head}.{body}",
        "four parts": f"{good}.x",
        "not base64": f"{head}.{body}.!!!",
        "header not json": f"{b64url(b'nope')}.{body}.{signature}",
        "header a list": make_jwt({"host": "h"}).replace(head, b64url(b"[1]"), 1),
        "claims a list": make_jwt([1, 2]),
        "exp not a number": make_jwt({"host": "h", "port": 1, "exp": "tomorrow"}),
        "exp NaN": make_jwt({"host": "h", "port": 1, "exp": math.nan}),
        "nbf true": make_jwt({"host": "h", "port": 1, "nbf": True}),
        "non-ascii": good + "é",
        "empty": "",
        "encrypted": "a.b.c.d.e",
    }


@pytest.mark.parametrize(("name", "token"), sorted(forged_tokens().items()))
@pytest.mark.usefixtures("no_jwcrypto")
def test_jwt_invalid_tokens_are_403(name: str, token: str, hmac_key_file: str) -> None:
    plugin = load_plugin("token", "JWTTokenApi", hmac_key_file)
    error = refusal(plugin.lookup, token)
    assert (error.status, error.reason) == (403, "Invalid token"), name


def test_jwt_time_claims(hmac_key_file: str, caplog: pytest.LogCaptureFixture) -> None:
    plugin = load_plugin("token", "JWTTokenApi", hmac_key_file)
    now = time.time()
    expired = refusal(
        lambda: lookup_target(plugin, make_jwt({"host": "h", "port": 1, "exp": now - 1}))
    )
    early = refusal(
        lambda: lookup_target(plugin, make_jwt({"host": "h", "port": 1, "nbf": now + 60}))
    )
    assert (expired.status, expired.reason) == (403, "Token expired")
    assert (early.status, early.reason) == (403, "Token not yet valid")
    assert [r.getMessage().rsplit(": ", 1)[1] for r in warnings_of(caplog)] == [
        "token expired",
        "token not yet valid",
    ]


def test_jwt_without_a_usable_target_is_400(hmac_key_file: str) -> None:
    plugin = load_plugin("token", "JWTTokenApi", hmac_key_file)
    for claims in ({"host": "h"}, {"port": 1}, {"host": "h", "port": "x"}, {"host": 1, "port": 1}):
        assert refusal(lookup_target, plugin, make_jwt(claims)).status == 400


@pytest.mark.usefixtures("no_jwcrypto")
def test_jwt_encrypted_tokens_without_jwcrypto_say_why(
    hmac_key_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    plugin = load_plugin("token", "JWTTokenApi", hmac_key_file)
    assert refusal(lookup_target, plugin, "h.k.iv.c.t").status == 403
    (record,) = warnings_of(caplog)
    assert "jwcrypto" in record.getMessage()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not base64url!", "base64url"),
        (b"", "empty"),
        (b"\xff\xfe", "base64url"),
        (b"-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----\n", "jwcrypto"),
    ],
)
@pytest.mark.usefixtures("no_jwcrypto")
def test_jwt_key_files(content: bytes, message: str, tmp_path: Path) -> None:
    (tmp_path / "key").write_bytes(content)
    with pytest.raises(ConfigError, match=rf"^--token-plugin JWTTokenApi: .*{message}"):
        load_plugin("token", "JWTTokenApi", str(tmp_path / "key"))
    with pytest.raises(ConfigError, match=r"^--token-plugin JWTTokenApi: --token-source: key file"):
        load_plugin("token", "JWTTokenApi", str(tmp_path))  # a directory is no key file


def write_key(path: Path, key: bytes) -> None:
    """Replace the key file as careful tools do: a new inode, whatever the clock."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(b64url(key) + "\n")
    os.replace(str(temporary), str(path))


OTHER_KEY = b"another key, thirty-two bytes..."
CLAIMS = {"host": "h", "port": 1}


def test_jwt_key_file_is_read_again_when_it_changes(
    tmp_path: Path, source_log: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jwt.key"
    write_key(path, HMAC_KEY)
    plugin = load_plugin("token", "JWTTokenApi", str(path))
    assert lookup_target(plugin, make_jwt(CLAIMS)) == Target("h", 1)
    write_key(path, OTHER_KEY)
    assert lookup_target(plugin, make_jwt(CLAIMS, key=OTHER_KEY)) == Target("h", 1)
    assert refusal(lookup_target, plugin, make_jwt(CLAIMS)).status == 403
    path.write_text(b64url(HMAC_KEY) + "\n")  # rewritten in place: same inode
    touch_newer(path)
    assert lookup_target(plugin, make_jwt(CLAIMS)) == Target("h", 1)
    assert refusal(lookup_target, plugin, make_jwt(CLAIMS, key=OTHER_KEY)).status == 403
    assert source_messages(source_log, path) == []  # the key was always usable


def test_jwt_key_file_missing_or_broken_refuses_every_token_until_it_is_good(
    tmp_path: Path, source_log: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "jwt.key"
    plugin = load_plugin("token", "JWTTokenApi", str(path))
    for _ in range(3):
        assert refusal(lookup_target, plugin, make_jwt(CLAIMS)).status == 404
    write_key(path, HMAC_KEY)
    assert lookup_target(plugin, make_jwt(CLAIMS)) == Target("h", 1)
    broken = path.with_name("broken")
    broken.write_text("not base64url!\n")
    os.replace(str(broken), str(path))
    for _ in range(3):  # not the last good key: it may be the one being withdrawn
        assert refusal(lookup_target, plugin, make_jwt(CLAIMS)).status == 404
    write_key(path, HMAC_KEY)
    assert lookup_target(plugin, make_jwt(CLAIMS)) == Target("h", 1)
    path.unlink()
    assert refusal(lookup_target, plugin, make_jwt(CLAIMS)).status == 404
    assert source_messages(source_log, path) == [
        f"JWTTokenApi: {path} does not exist yet; lookups find no token until it does",
        f"JWTTokenApi: {path} is usable now",
        f"JWTTokenApi: {path} is unusable, lookups find no token until it is fixed: "
        "an HMAC secret must be written in base64url",
        f"JWTTokenApi: {path} is usable now",
        f"JWTTokenApi: {path} no longer exists; lookups find no token until it is back",
    ]


def test_jwt_key_rotation_under_concurrent_lookups(tmp_path: Path) -> None:
    """Every lookup checks a token against one whole key, old or new, never a mix."""
    path = tmp_path / "jwt.key"
    keys = [HMAC_KEY, OTHER_KEY]
    write_key(path, keys[0])
    plugin = load_plugin("token", "JWTTokenApi", str(path))
    tokens = [make_jwt({"host": "h", "port": n + 1}, key=key) for n, key in enumerate(keys)]
    seen: List[int] = []

    def look_up_both() -> None:
        for token in tokens:
            try:
                seen.append(lookup_target(plugin, token).port)
            except HandshakeError as exc:
                if exc.status != 403:  # the other key's token: refused, as it should be
                    raise

    def rotate() -> None:
        for generation in range(40):
            write_key(path, keys[generation % 2])

    errors = errors_of_lookups_during(look_up_both, rotate)
    assert not errors
    assert set(seen) <= {1, 2}
    assert lookup_target(plugin, tokens[1]).port == 2  # generation 39 wrote the second key
    assert refusal(lookup_target, plugin, tokens[0]).status == 403


class TestJWTWithJwcrypto:
    """PEM keys and encrypted tokens, when the optional jwcrypto is installed."""

    @pytest.fixture
    def jose(self) -> Any:
        pytest.importorskip("jwcrypto", reason="jwcrypto (optional) is not installed")
        return types.SimpleNamespace(
            **{name: importlib.import_module("jwcrypto." + name) for name in ("jwe", "jwk", "jwt")}
        )

    def rsa_key_files(self, tmp_path: Path, jose: Any) -> Tuple[Any, str, str]:
        key = jose.jwk.JWK.generate(kty="RSA", size=2048)
        (tmp_path / "private.pem").write_bytes(key.export_to_pem(private_key=True, password=None))
        (tmp_path / "public.pem").write_bytes(key.export_to_pem())
        return key, str(tmp_path / "private.pem"), str(tmp_path / "public.pem")

    def test_rsa_signed_and_encrypted(self, tmp_path: Path, jose: Any) -> None:
        key, private_pem, public_pem = self.rsa_key_files(tmp_path, jose)
        signed = jose.jwt.JWT(header={"alg": "RS256"}, claims={"host": "h", "port": "5900"})
        signed.make_signed_token(key)
        token = signed.serialize()
        assert lookup_target(load_plugin("token", "JWTTokenApi", public_pem), token) == Target(
            "h", 5900
        )
        encrypted = jose.jwt.JWT(header={"alg": "RSA-OAEP", "enc": "A256CBC-HS512"}, claims=token)
        encrypted.make_encrypted_token(key)
        private = load_plugin("token", "JWTTokenApi", private_pem)
        assert lookup_target(private, encrypted.serialize()) == Target("h", 5900)
        # An HMAC token keyed with the public key's text must not pass (algorithm confusion).
        confused = make_jwt({"host": "h", "port": 1}, key=Path(public_pem).read_bytes())
        assert refusal(lookup_target, private, confused).status == 403

    def test_encrypted_payload_must_be_signed(self, tmp_path: Path, jose: Any) -> None:
        key, private_pem, _ = self.rsa_key_files(tmp_path, jose)
        header = json.dumps({"alg": "RSA-OAEP", "enc": "A256GCM"})
        envelope = jose.jwe.JWE(b'{"host": "h", "port": 1}', header)
        envelope.add_recipient(key)
        plugin = load_plugin("token", "JWTTokenApi", private_pem)
        assert refusal(lookup_target, plugin, envelope.serialize(compact=True)).status == 403

    def test_hmac_key_decrypts_direct_encryption(self, hmac_key_file: str, jose: Any) -> None:
        key = jose.jwk.JWK(kty="oct", k=b64url(HMAC_KEY))
        inner = make_jwt({"host": "h", "port": 2})
        encrypted = jose.jwt.JWT(header={"alg": "dir", "enc": "A256GCM"}, claims=inner)
        encrypted.make_encrypted_token(key)
        plugin = load_plugin("token", "JWTTokenApi", hmac_key_file)
        assert lookup_target(plugin, encrypted.serialize()) == Target("h", 2)


# --- auth plugins ---


def test_basic_http_auth(caplog: pytest.LogCaptureFixture) -> None:
    plugin = load_plugin("auth", "BasicHTTPAuth", "alice:pa:ss wörd")
    check_auth(plugin, headers_of(basic_auth("alice:pa:ss wörd".encode())), None)
    check_auth(plugin, headers_of(basic_auth("alice:pa:ss wörd".encode("latin-1"))), None)
    check_auth(plugin, headers_of(basic_auth(b"alice:pa:ss w\xc3\xb6rd", scheme="bAsIc")), None)
    challenge = {"WWW-Authenticate": 'Basic realm="Websockify"'}
    for header in (
        [],
        [basic_auth(b"alice:wrong")],
        [basic_auth(b"bob:pa:ss w\xc3\xb6rd")],
        [basic_auth(b"alice:")],
    ):
        answer = refusal(check_auth, plugin, headers_of(*header), None)
        assert (answer.status, answer.headers) == (401, challenge)
    for malformed in (
        "Authorization: Bearer abc",
        "Authorization: Basic",
        "Authorization: Basic !!!!",
        "Authorization: Basic YWxpY2U=",  # "alice": no colon
        "Authorization: Basic YWxpY2U6cGFzcw",  # no padding
        "Authorization: Basicxyz",
    ):
        answer = refusal(check_auth, plugin, headers_of(malformed), None)
        assert (answer.status, answer.headers) == (403, {}), malformed
    assert not any(r.exc_info for r in caplog.records)
    assert all("pa:ss" not in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("source", [None, "", "no-colon"])
def test_basic_http_auth_sources(source: Optional[str]) -> None:
    with pytest.raises(ConfigError, match=r"^--auth-plugin BasicHTTPAuth: "):
        load_plugin("auth", "BasicHTTPAuth", source)


def test_expect_origin() -> None:
    plugin = load_plugin("auth", "ExpectOrigin", "https://a.example  http://b.example:8080")
    check_auth(plugin, headers_of("Origin: https://a.example"), None)
    check_auth(plugin, headers_of("Origin: HTTP://B.example:8080"), None)
    for header in (
        [],
        ["Origin: https://evil.example"],
        ["Origin: https://a.example.evil"],
        ["Origin: null"],
    ):
        answer = refusal(check_auth, plugin, headers_of(*header), None)
        assert (answer.status, answer.reason) == (403, "Invalid Origin")


def test_client_cert_cn_auth() -> None:
    plugin = load_plugin("auth", "ClientCertCNAuth", "alice bob")
    check_auth(plugin, headers_of("SSL_CLIENT_S_DN_CN: bob"), None)
    for header in ([], ["SSL_CLIENT_S_DN_CN: mallory"], ["SSL_CLIENT_S_DN_CN: alice bob"]):
        assert refusal(check_auth, plugin, headers_of(*header), None).status == 403


@pytest.mark.parametrize("name", ["ExpectOrigin", "ClientCertCNAuth"])
@pytest.mark.parametrize("source", [None, "", "   "])
def test_allow_lists_must_not_be_empty(name: str, source: Optional[str]) -> None:
    with pytest.raises(ConfigError, match=rf"^--auth-plugin {name}: "):
        load_plugin("auth", name, source)


# --- load_plugin ---


@pytest.fixture
def clean_imports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """tmp_path on sys.path; modules imported and aliases installed are dropped afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    try:
        yield tmp_path
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]


@pytest.mark.parametrize(
    ("kind", "name", "cls"),
    [
        ("token", "TokenFile", wm.TokenFile),
        ("token", "websockify.token_plugins.TokenFile", wm.TokenFile),
        ("token", "websockify.token_plugins.ReadOnlyTokenFile", wm.ReadOnlyTokenFile),
        ("token", "BasePlugin", wm.BaseTokenPlugin),
        ("token", "websockify_min.TokenFile", wm.TokenFile),
        ("auth", "BasicHTTPAuth", wm.BasicHTTPAuth),
        ("auth", "websockify.auth_plugins.BasicHTTPAuth", wm.BasicHTTPAuth),
        ("auth", "websockify.auth_plugins.BasePlugin", wm.BaseAuthPlugin),
    ],
)
def test_builtin_names(
    kind: str, name: str, cls: type, tmp_path: Path, clean_imports: Path
) -> None:
    (tmp_path / "tokens").write_text("vm1: h:1\n")
    source = str(tmp_path / "tokens") if kind == "token" else "user:pass"
    assert type(load_plugin(kind, name, source)) is cls


USER_PLUGINS = """
import websockify_min
from websockify.token_plugins import BasePlugin
from websockify.auth_plugins import AuthenticationError, BasePlugin as AuthBase


class Upper(BasePlugin):
    def lookup(self, token):
        return [self.source, token.upper()]


class Fussy(AuthBase):
    def authenticate(self, headers, target_host, target_port):
        if headers.get("X-Let-Me-In") != self.source:
            raise AuthenticationError(response_code=418, response_msg="No tea")


class Subclassed(websockify_min.TokenFile):
    pass


class NoMethod:
    def __init__(self, src):
        pass


def factory(src):
    return Upper("from-factory")


class Exits(BasePlugin):
    def __init__(self, src):
        raise SystemExit("missing module")


class Raises(BasePlugin):
    def __init__(self, src):
        raise RuntimeError("bad source:\\n" + str(src))
"""


def test_user_plugins_written_for_upstream(clean_imports: Path) -> None:
    (clean_imports / "my_plugins.py").write_text(USER_PLUGINS)
    upper = load_plugin("token", "my_plugins.Upper", "unix_socket")
    assert lookup_target(upper, "/run/x") == Target("unix_socket", 0, "/RUN/X")
    assert lookup_target(load_plugin("token", "my_plugins.factory", None), "1") == Target(
        "from-factory", 1
    )
    fussy = load_plugin("auth", "my_plugins.Fussy", "please")
    check_auth(fussy, headers_of("X-Let-Me-In: please"), None)
    answer = refusal(check_auth, fussy, headers_of(), None)
    assert (answer.status, answer.reason) == (418, "No tea")
    # The aliases are our classes, not copies.
    assert sys.modules["websockify.token_plugins"].BasePlugin is wm.BaseTokenPlugin


def test_a_real_websockify_package_is_used_as_is(clean_imports: Path) -> None:
    package = clean_imports / "websockify"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "token_plugins.py").write_text(
        "class BasePlugin:\n    def __init__(self, src):\n        self.source = src\n"
    )
    (clean_imports / "theirs.py").write_text(
        "from websockify.token_plugins import BasePlugin\n"
        "class Fixed(BasePlugin):\n    def lookup(self, token):\n        return ('real', 1)\n"
    )
    plugin = load_plugin("token", "theirs.Fixed", None)
    assert lookup_target(plugin, "t") == Target("real", 1)
    assert sys.modules["websockify.token_plugins"].__file__ == str(package / "token_plugins.py")
    # ... while upstream's names for the built-ins still mean ours.
    assert type(load_plugin("auth", "websockify.auth_plugins.ExpectOrigin", "x")) is wm.ExpectOrigin


@pytest.mark.parametrize(
    ("kind", "name", "source", "message"),
    [
        (
            "token",
            "NoSuchPlugin",
            None,
            r"^--token-plugin: unknown plugin 'NoSuchPlugin' \(built in: ",
        ),
        ("auth", "TokenFile", None, r"^--auth-plugin: TokenFile is for --token-plugin$"),
        ("token", "BasicHTTPAuth", None, r"^--token-plugin: BasicHTTPAuth is for --auth-plugin$"),
        ("token", "", None, r"^--token-plugin: '' is not a class name"),
        ("token", "my_plugins..Upper", None, r"is not a class name"),
        ("token", "../evil.Class", None, r"is not a class name"),
        ("token", "no_such_module.Cls", None, r"^--token-plugin no_such_module.Cls: cannot import"),
        (
            "token",
            "my_plugins.Missing",
            None,
            r"^--token-plugin my_plugins.Missing: my_plugins has no",
        ),
        (
            "token",
            "my_plugins.NoMethod",
            None,
            r"^--token-plugin my_plugins.NoMethod: has no lookup\(\)",
        ),
        (
            "auth",
            "my_plugins.Upper",
            "x",
            r"^--auth-plugin my_plugins.Upper: has no authenticate\(\)",
        ),
        (
            "token",
            "my_plugins.Exits",
            None,
            r"^--token-plugin my_plugins.Exits: SystemExit: missing",
        ),
        (
            "token",
            "my_plugins.Raises",
            "s",
            r"^--token-plugin my_plugins.Raises: RuntimeError: bad source: s$",
        ),
        (
            "token",
            "broken_plugins.X",
            None,
            r"^--token-plugin broken_plugins.X: cannot import broken_plugins: ",
        ),
        ("token", "exiting_plugins.X", None, r"cannot import exiting_plugins: SystemExit"),
        ("token", "TokenFile", None, r"^--token-plugin TokenFile: needs --token-source"),
        # A source that does not exist yet is no error (see *_missing_at_startup), one of
        # the wrong kind is.
        ("token", "ReadOnlyTokenFile", "", r"needs --token-source"),
        (
            "token",
            "TokenFileName",
            "/dev/null",
            r"^--token-plugin TokenFileName: --token-source '/dev/null' is not a directory$",
        ),
        ("token", "UnixDomainSocketDirectory", None, r"needs --token-source"),
        ("token", "UnixDomainSocketDirectory", "/dev/null", r"is not a directory$"),
        ("token", "TokenJSONFile", "/", r"IsADirectoryError"),
        ("token", "TokenJSONFile", "/dev/null", r"JSONDecodeError"),
        ("token", "JWTTokenApi", None, r"needs --token-source"),
        ("token", "JWTTokenApi", "/", r"--token-source: key file: IsADirectoryError"),
        ("token", "BaseTokenAPI", None, r"needs --token-source"),
    ],
)
def test_every_loading_failure_is_one_config_error_line(
    kind: str, name: str, source: Optional[str], message: str, clean_imports: Path
) -> None:
    (clean_imports / "my_plugins.py").write_text(USER_PLUGINS)
    (clean_imports / "broken_plugins.py").write_text("this is not python\n")
    (clean_imports / "exiting_plugins.py").write_text("raise SystemExit(3)\n")
    with pytest.raises(ConfigError, match=message) as info:
        load_plugin(kind, name, source)
    assert "\n" not in str(info.value)


def test_unknown_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="token"):
        load_plugin("traffic", "TokenFile", None)


def test_user_subclass_of_a_builtin(clean_imports: Path) -> None:
    (clean_imports / "my_plugins.py").write_text(USER_PLUGINS)
    (clean_imports / "tokens").write_text("vm1: h:1\n")
    plugin = load_plugin("token", "my_plugins.Subclassed", str(clean_imports / "tokens"))
    assert lookup_target(plugin, "vm1") == Target("h", 1)


SCRIPT_MODE = r"""
import sys
path, plugins = sys.argv[1:]
sys.path.insert(0, plugins)
source = open(path).read().replace('if __name__ == "__main__":', "if False:")
exec(compile(source, path, "exec"))  # as `python3 websockify_min.py` runs it, in __main__
plugin = load_plugin("token", "refusing.Refusing", None)
try:
    lookup_target(plugin, "t")
except HandshakeError as exc:  # the plugin's class is ours: no second copy of the module
    print(exc.status, sys.modules["websockify_min"] is sys.modules["__main__"])
"""


def test_script_mode_plugins_import_this_module_not_a_copy(tmp_path: Path) -> None:
    (tmp_path / "refusing.py").write_text(
        "import websockify_min\n"
        "class Refusing:\n"
        "    def __init__(self, src): pass\n"
        "    def lookup(self, token):\n"
        "        raise websockify_min.HandshakeError(429, 'Later')\n"
    )
    done = run_captured([sys.executable, "-c", SCRIPT_MODE, wm.__file__, str(tmp_path)])
    assert done.stdout.strip() == "429 True", done.stderr


# --- the parsers of untrusted text: parse or raise ValueError, nothing else ---


@given(st.text())
def test_token_line_parses_or_raises_value_error(line: str) -> None:
    try:
        entry = wm._parse_token_line(line)
    except ValueError:
        return
    if entry is not None:
        token, target = entry
        assert token and token == token.strip() and isinstance(target, Target)


@given(
    st.from_regex(r"[^#\s][^\s]{0,20}", fullmatch=True),
    st.from_regex(r"[a-z0-9.-]{1,20}", fullmatch=True),
    st.integers(1, 65535),
)
def test_token_line_round_trip(token: str, host: str, port: int) -> None:
    assert wm._parse_token_line(f"{token}: {host}:{port}\n") == (token, Target(host, port))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3)
    ),
    max_leaves=10,
)


@given(st.text() | st.builds(json.dumps, json_values))
def test_json_tokens_parse_or_raise_value_error(text: str) -> None:
    try:
        targets, skipped = wm._parse_json_tokens(text)
    except ValueError:
        return
    assert all(isinstance(t, Target) for t in targets.values())
    assert all(isinstance(message, str) for message in skipped)


@given(
    st.dictionaries(
        st.text(), st.text() | json_values | st.builds(dict, host=st.text(), port=json_values)
    )
)
def test_json_token_entries_are_kept_or_reported(entries: Mapping[str, object]) -> None:
    targets, skipped = wm._parse_json_tokens(json.dumps(entries))
    assert len(targets) + len(skipped) == len(entries)


@given(st.text())
def test_basic_header_parses_or_raises_value_error(header: str) -> None:
    try:
        user, password = wm._parse_basic_credentials(header)
    except ValueError:
        return
    assert isinstance(user, bytes) and isinstance(password, bytes)


@given(st.binary().filter(lambda b: b":" not in b), st.binary())
def test_basic_header_round_trip(user: bytes, password: bytes) -> None:
    header = "Basic " + base64.b64encode(user + b":" + password).decode()
    assert wm._parse_basic_credentials(header) == (user, password)


@given(st.text(), st.text() | st.integers() | st.binary() | st.none())
def test_plugin_answers_normalise_or_raise_value_error(host: str, port: object) -> None:
    try:
        target = wm._target_from_result((host, port))
    except ValueError:
        return
    assert isinstance(target, Target)
    assert target.unix_socket is not None or 0 < target.port < 65536


# --- the oldest interpreters ---

OLD_PYTHON_SCRIPT = r"""
import http.client, io, json, os, sys, tempfile
sys.path.insert(0, sys.argv[1])
import websockify_min as wm

directory = tempfile.mkdtemp()
tokens = os.path.join(directory, "tokens")
with open(tokens, "w") as f:
    f.write("vm1: 10.0.0.1:5900\nbad line\n")
with open(tokens + ".json", "w") as f:
    json.dump({"vm2": {"host": "h", "port": 2}}, f)
with open(os.path.join(directory, "key"), "w") as f:
    f.write("c2VjcmV0")
token_file = wm.load_plugin("token", "TokenFile", tokens)
assert wm.lookup_target(token_file, "vm1") == wm.Target("10.0.0.1", 5900)
json_file = wm.load_plugin("token", "TokenJSONFile", tokens + ".json")
assert wm.lookup_target(json_file, "vm2").port == 2
jwt = wm.load_plugin("token", "JWTTokenApi", os.path.join(directory, "key"))
try:
    wm.lookup_target(jwt, "a.b.c")
    raise AssertionError("a forged token passed")
except wm.HandshakeError as exc:
    assert exc.status == 403
auth = wm.load_plugin("auth", "BasicHTTPAuth", "u:p")
headers = http.client.parse_headers(io.BytesIO(b"Authorization: Basic dTpw\r\n\r\n"))
wm.check_auth(auth, headers, wm.Target("h", 1))
assert wm.token_from_request("token=x", None, False) == "x"
print("ok")
"""


def old_interpreters() -> List[str]:
    if shutil.which("pyenv") is None:
        return []
    root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, timeout=30).stdout
    versions = Path(root.strip()) / "versions"
    found = sorted(versions.glob("3.*/bin/python")) if versions.is_dir() else []
    return [str(path) for path in found]


@pytest.mark.parametrize(
    "python", old_interpreters() or [pytest.param("", marks=pytest.mark.skip("no pyenv"))]
)
def test_plugins_work_on_every_installed_interpreter(python: str) -> None:
    repo = str(Path(wm.__file__).resolve().parent)
    done = run_captured([python, "-c", OLD_PYTHON_SCRIPT, repo])
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
