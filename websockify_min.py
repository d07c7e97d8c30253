"""WebSocket-to-TCP proxy, websockify-compatible, in one stdlib-only file.

Usage:
    python3 websockify_min.py [options] [source_addr:]source_port target_addr:target_port
    python3 websockify_min.py [options] --token-plugin CLASS [source_addr:]source_port
    python3 websockify_min.py [options] --unix-target FILE [source_addr:]source_port
    python3 websockify_min.py [options] [source_addr:]source_port -- WRAP_COMMAND_LINE

One thread runs a ``selectors`` loop that owns every socket; anything that may
block (name resolution, plugin calls) runs in a small worker pool.

Sections: 1 Header 2 Errors 3 Masking 4 HTTP 5 Frames 6 Plugins 7 Static
8 Loop 9 Stream 10 Session 11 Server 12 CLI 13 main
"""

# === 1. Header ===

import base64
import enum
import hashlib
import hmac
import http.client
import importlib
import importlib.util
import json
import logging
import math
import os
import re
import socket
import stat
import sys
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
from typing import (
    TYPE_CHECKING,
    Any,
    BinaryIO,
    Callable,
    Dict,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Union,
    cast,
    overload,
)

__version__ = "0.1.0"

__all__ = (
    "AuthPlugin",
    "AuthenticationError",
    "BaseAuthPlugin",
    "BaseTokenAPI",
    "BaseTokenPlugin",
    "BasicHTTPAuth",
    "ClientCertCNAuth",
    "ConfigError",
    "ExpectOrigin",
    "HandshakeError",
    "JSONTokenApi",
    "JWTTokenApi",
    "ProtocolError",
    "ReadOnlyTokenFile",
    "Target",
    "TokenFile",
    "TokenFileName",
    "TokenJSONFile",
    "TokenPlugin",
    "TokenRedis",
    "UnixDomainSocketDirectory",
    "check_auth",
    "load_plugin",
    "lookup_target",
    "main",
    "token_from_request",
)

Buffer = Union[bytes, bytearray, memoryview]


class CloseCode(enum.IntEnum):
    """RFC 6455 section 7.4.1 status codes that the proxy sends."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011


# === 2. Errors ===


class HandshakeError(Exception):
    """The HTTP request cannot be served; answer with *status* and close."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str] = {}) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers)


class ProtocolError(Exception):
    """The peer broke RFC 6455; send a close frame with *close_code*."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(close_code, reason)
        self.close_code = close_code
        self.reason = reason


class AuthenticationError(Exception):
    """Raised by auth plugins to refuse a client (upstream's signature)."""

    def __init__(
        self,
        log_msg: Optional[str] = None,
        response_code: int = 403,
        response_headers: Optional[Mapping[str, str]] = None,
        response_msg: Optional[str] = None,
    ) -> None:
        self.code = response_code
        self.headers = dict(response_headers or {})
        self.msg = response_msg
        if log_msg is None:
            log_msg = response_msg
        super().__init__(f"{self.code} {log_msg}")


class ConfigError(Exception):
    """A startup mistake: reported as one line on stderr, exit status 2."""


# === 3. Masking ===

# === 4. HTTP (sans-IO) ===

# === 5. WebSocket frames (sans-IO) ===

# === 6. Plugins ===
#
# Token plugins turn the client's token into a target; auth plugins allow or
# refuse a client. Both keep upstream's duck-typed interfaces, so plugins
# written for websockify load unchanged. Every plugin method runs in a worker
# thread, never on the loop: it may block (always with a timeout) and must be
# thread-safe.

_log = logging.getLogger("websockify_min")

# Upstream's HTTP token plugins wait 5 s for their service; Redis gets the same.
_TOKEN_SERVICE_TIMEOUT = 5.0
# A target is a few dozen bytes; a bigger answer from a service or a
# TokenFileName file is a mistake, and reading it whole would cost memory.
_MAX_TARGET_BYTES = 64 * 1024
# The host upstream's plugins return when the "port" is a unix socket path.
_UNIX_SOCKET_HOST = "unix_socket"

if TYPE_CHECKING:
    from typing import Literal, Protocol

    class TokenPlugin(Protocol):
        """What ``--token-plugin`` loads: ``lookup`` returns (host, port) or None."""

        def lookup(self, token: str) -> Optional[Sequence[object]]: ...

    class AuthPlugin(Protocol):
        """What ``--auth-plugin`` loads: ``authenticate`` returns or raises."""

        def authenticate(
            self,
            headers: http.client.HTTPMessage,
            target_host: Optional[str],
            target_port: Union[int, str, None],
        ) -> None: ...

else:
    TokenPlugin = AuthPlugin = object


class Target(NamedTuple):
    """Where a client is proxied to: a TCP host and port, or a unix socket."""

    host: str  # "unix_socket" (upstream's marker) when unix_socket is set
    port: int  # 0 when unix_socket is set
    unix_socket: Optional[str] = None

    def __str__(self) -> str:
        if self.unix_socket is not None:
            return f"unix socket {self.unix_socket}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


class _TokenRefused(HandshakeError):
    """A built-in token plugin refuses: *reason* goes to the client, *detail* to the log."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(status, reason)
        self.detail = detail


def _brief(value: object, limit: int = 60) -> str:
    """repr() of untrusted *value*, cut short: log lines stay one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(exc: BaseException) -> str:
    """An exception as one bounded line, without a traceback."""
    text = " ".join(str(exc).split())
    name = type(exc).__name__
    return f"{name}: {text}"[:300] if text else name


def _loads_json(text: str) -> Any:
    """json.loads that fails only with ValueError (deep nesting raises RecursionError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


# --- targets ---

_PORT_DIGITS = re.compile(r"[0-9]{1,5}")
# Whitespace, controls, brackets and slashes never occur in a host name or an
# address, and a host containing them would be a parsing accident.
_BAD_HOST_CHARS = re.compile(r"[\s\x00-\x1f\x7f\[\]/]")


def _make_target(host: str, port: object) -> Target:
    """A TCP target from *host* and *port* (int, or decimal digits in str or bytes).

    Raises ValueError. ``[v6addr]`` loses its brackets."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or len(host) > 255 or _BAD_HOST_CHARS.search(host):
        raise ValueError(f"invalid host {_brief(host)}")
    if isinstance(port, bytes):  # upstream's BaseTokenAPI returns the port as bytes
        port = port.decode("ascii", "replace")
    if isinstance(port, str) and _PORT_DIGITS.fullmatch(port):
        port = int(port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"invalid port {_brief(port)}")
    return Target(host, port)


def _make_unix_target(path: object) -> Target:
    """A unix socket target; raises ValueError unless *path* is a usable path."""
    if isinstance(path, os.PathLike):  # upstream's UnixDomainSocketDirectory returns a Path
        path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, str) or not path or "\x00" in path:
        raise ValueError(f"invalid unix socket path {_brief(path)}")
    return Target(_UNIX_SOCKET_HOST, 0, path)


def _parse_target(text: str) -> Target:
    """``host:port``, ``[v6addr]:port`` or ``unix_socket:/path``; raises ValueError."""
    if text.startswith(_UNIX_SOCKET_HOST + ":"):
        return _make_unix_target(text[len(_UNIX_SOCKET_HOST) + 1 :])
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError(f"expected host:port, got {_brief(text)}")
    return _make_target(host, port)


def _target_from_result(result: object) -> Target:
    """Normalise what a token plugin's ``lookup()`` returned; raises ValueError."""
    if isinstance(result, Target):
        if result.unix_socket is not None:
            return _make_unix_target(result.unix_socket)
        return _make_target(result.host, result.port)
    if not isinstance(result, (list, tuple)) or len(result) != 2:
        raise ValueError(f"expected (host, port), got {_brief(result)}")
    host, port = result
    if isinstance(host, bytes):
        host = host.decode("utf-8")
    if not isinstance(host, str):
        raise ValueError(f"invalid host {_brief(host)}")
    if host == _UNIX_SOCKET_HOST:
        return _make_unix_target(port)
    return _make_target(host, port)


def _target_from_json(value: object) -> Target:
    """``"host:port"``, ``{"host": h, "port": p}`` or ``{"host": "h:p"}``; raises ValueError."""
    if isinstance(value, str):
        return _parse_target(value)
    if isinstance(value, dict) and "host" in value:
        host = value["host"]
        if "port" in value:
            return _target_from_result((host, value["port"]))
        if isinstance(host, str):
            return _parse_target(host)
    raise ValueError('expected "host:port" or {"host": ..., "port": ...}')


def _as_pair(target: Target) -> Tuple[str, Union[int, str]]:
    """A target in upstream's ``lookup()`` shape, which plugin subclasses expect."""
    if target.unix_socket is not None:
        return (_UNIX_SOCKET_HOST, target.unix_socket)
    return (target.host, target.port)


# --- parsers of untrusted text (each raises ValueError and nothing else) ---

_TOKEN_SEPARATOR = re.compile(r":\s")


def _parse_token_line(line: str) -> Optional[Tuple[str, Target]]:
    """One line of a token file: ``token: host:port``.

    None for a blank line or a ``#`` comment; ValueError for anything else
    that is not an entry. The token ends at the first colon followed by
    whitespace (as upstream splits), so a token may itself contain colons."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    separator = _TOKEN_SEPARATOR.search(line)
    if separator is None or separator.start() == 0:
        raise ValueError("expected 'token: host:port'")
    target = line[separator.end() :].strip()
    if not target or any(char.isspace() for char in target):
        raise ValueError("expected 'token: host:port'")
    return line[: separator.start()], _parse_target(target)


def _parse_json_tokens(text: str) -> Tuple[Dict[str, Target], List[str]]:
    """A JSON token file: an object mapping tokens to targets.

    Returns the targets and one message per entry that was skipped as
    invalid. Raises ValueError when *text* is not a JSON object at all."""
    data = _loads_json(text)
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object mapping tokens to targets")
    targets: Dict[str, Target] = {}
    skipped: List[str] = []
    for number, (token, value) in enumerate(data.items(), 1):
        try:
            targets[token] = _target_from_json(value)
        except ValueError as exc:
            # The position, not the token: tokens are secrets and logs are not.
            skipped.append(f"entry {number}: {exc}")
    return targets, skipped


def _parse_basic_credentials(header: str) -> Tuple[bytes, bytes]:
    """``Basic base64(user:password)`` from an Authorization header, as bytes.

    Raises ValueError for another scheme, invalid base64 or a missing colon.
    The scheme is case-insensitive (RFC 7235 section 2.1)."""
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "basic":
        raise ValueError("not Basic authentication")
    decoded = base64.b64decode(credentials.strip(), validate=True)  # binascii.Error is a ValueError
    user, colon, password = decoded.partition(b":")
    if not colon:
        raise ValueError("no colon between user and password")
    return user, password


def _split_source_fields(source: str) -> List[str]:
    """Split at ':' like upstream's TokenRedis; a field in double quotes may hold ':'.

    Raises ValueError for an unterminated quote or text after a closing quote."""
    fields: List[str] = []
    pos = 0
    while True:
        if source.startswith('"', pos):
            end = source.find('"', pos + 1)
            if end < 0:
                raise ValueError("unterminated quote")
            fields.append(source[pos + 1 : end])
            pos = end + 1
            if pos < len(source) and source[pos] != ":":
                raise ValueError("a closing quote must end its field")
        else:
            end = source.find(":", pos)
            end = len(source) if end < 0 else end
            fields.append(source[pos:end])
            pos = end
        if pos >= len(source):
            return fields
        pos += 1  # the ':' between fields


_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _b64url_decode(text: str) -> bytes:
    """Unpadded base64url (RFC 7515 section 2), strictly; raises ValueError."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- shared pieces of the built-ins ---


def _source_text(src: Optional[str], flag: str, what: str) -> str:
    if not src:
        raise ConfigError(f"needs {flag} ({what})")
    return src


def _source_directory(src: Optional[str], what: str) -> str:
    """The real path of the directory named by --token-source; ConfigError if it is not one."""
    path = os.path.realpath(_source_text(src, "--token-source", what))
    if not os.path.isdir(path):
        raise ConfigError(f"--token-source {src!r} is not a directory")
    return path


def _is_plain_file_name(name: str) -> bool:
    """True for a name that can only mean a file directly inside a directory."""
    if not name or name in (".", "..") or "/" in name or "\x00" in name:
        return False
    if os.altsep is not None and os.altsep in name:
        return False
    try:
        return len(os.fsencode(name)) <= 255  # NAME_MAX; longer names only make OSErrors
    except UnicodeEncodeError:
        return False


def _path_in_directory(directory: str, token: str, plugin: str) -> str:
    """The real path the *token* names inside *directory* (a real path).

    Raises _TokenRefused when the token is not a plain file name, or names a
    symlink that leads out of the directory."""
    if not _is_plain_file_name(token):
        raise _TokenRefused(400, "Invalid token", f"{plugin}: token is not a plain file name")
    path = os.path.realpath(os.path.join(directory, token))
    if os.path.commonpath([directory, path]) != directory:
        raise _TokenRefused(400, "Invalid token", f"{plugin}: token leads out of {directory}")
    return path


def _invalid_target(plugin: str, detail: object) -> _TokenRefused:
    return _TokenRefused(400, "Invalid target for token", f"{plugin}: invalid target: {detail}")


# --- token plugins ---


class BaseTokenPlugin:
    """Base of token plugins (upstream's ``websockify.token_plugins.BasePlugin``)."""

    def __init__(self, src: Optional[str] = None) -> None:
        self.source = src

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        """(host, port) for *token*, or None when the token is unknown."""
        return None


class ReadOnlyTokenFile(BaseTokenPlugin):
    """Lines ``token: host:port`` in a file, or in every file of a directory; read once.

    In a directory, hidden files and editor backups (``name~``) are skipped
    and files are read in name order, so a later file wins a duplicate token.
    Malformed lines are logged and skipped."""

    def __init__(self, src: Optional[str]) -> None:
        super().__init__(src)
        what = "a token file or a directory of token files"
        # Absolute, so that daemonizing (which changes directory) changes nothing.
        self._path = os.path.abspath(_source_text(src, "--token-source", what))
        if not os.path.exists(self._path):
            raise ConfigError(f"--token-source {src!r} does not exist")
        self._reported: Set[str] = set()
        self._report_lock = threading.Lock()
        self._targets = self._read_targets()

    def _token_files(self) -> List[str]:
        if not os.path.isdir(self._path):
            return [self._path]
        names = sorted(os.listdir(self._path))
        paths = [os.path.join(self._path, n) for n in names if n[0] != "." and n[-1] != "~"]
        return [path for path in paths if os.path.isfile(path)]

    def _read_targets(self) -> Dict[str, Target]:
        targets: Dict[str, Target] = {}
        for path in self._token_files():
            skipped = []
            try:
                with open(path, encoding="utf-8", errors="replace") as lines:
                    for number, line in enumerate(lines, 1):
                        try:
                            entry = _parse_token_line(line)
                        except ValueError as exc:
                            skipped.append(f"{path} line {number}: {exc}")
                            continue
                        if entry is not None:
                            targets[entry[0]] = entry[1]
            except FileNotFoundError:
                if path == self._path:
                    raise
                continue  # removed from the directory since it was listed
            self._report(skipped)
        return targets

    def _report(self, skipped: List[str]) -> None:
        """Log each skipped line once, however often the file is re-read."""
        with self._report_lock:
            new = [message for message in skipped if message not in self._reported]
            self._reported.update(new)
        for message in new:
            _log.warning("%s: skipped %s", type(self).__name__, message)

    def _current_targets(self) -> Dict[str, Target]:
        return self._targets

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        target = self._current_targets().get(token)
        return None if target is None else _as_pair(target)


class TokenFile(ReadOnlyTokenFile):
    """Like ReadOnlyTokenFile, but re-read on every lookup, so edits apply at once."""

    def _current_targets(self) -> Dict[str, Target]:
        return self._read_targets()


class TokenFileName(BaseTokenPlugin):
    """A directory where the file named after the token holds ``host:port``."""

    def __init__(self, src: Optional[str]) -> None:
        super().__init__(src)
        self._directory = _source_directory(src, "a directory of token files")

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        path = _path_in_directory(self._directory, token, "TokenFileName")
        try:
            # O_NONBLOCK: opening a FIFO someone left there must not hang the worker.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory, FIFO, device...
                return None
            data = os.read(fd, _MAX_TARGET_BYTES + 1)  # a regular file: all of it, up to n
        finally:
            os.close(fd)
        if len(data) > _MAX_TARGET_BYTES:
            raise _invalid_target("TokenFileName", f"{path} is too large")
        try:
            return _as_pair(_parse_target(data.decode("utf-8").strip()))
        except ValueError as exc:
            raise _invalid_target("TokenFileName", f"{path}: {exc}") from None


class UnixDomainSocketDirectory(BaseTokenPlugin):
    """A directory where the token names a unix socket to connect to."""

    def __init__(self, src: Optional[str]) -> None:
        super().__init__(src)
        self._directory = _source_directory(src, "a directory of unix sockets")

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        path = _path_in_directory(self._directory, token, "UnixDomainSocketDirectory")
        try:
            mode = os.stat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISSOCK(mode):
            raise _invalid_target("UnixDomainSocketDirectory", f"{path} is not a socket")
        return (_UNIX_SOCKET_HOST, path)


class TokenJSONFile(BaseTokenPlugin):
    """A JSON object mapping tokens to ``"host:port"`` or ``{"host": h, "port": p}``.

    Re-read when the file changes (inode, size, mtime or ctime). A version
    that cannot be read or parsed is logged once and ignored: the last good
    one stays in force, so a typo while editing does not lock everyone out."""

    def __init__(self, src: Optional[str]) -> None:
        super().__init__(src)
        self._path = os.path.abspath(_source_text(src, "--token-source", "a JSON token file"))
        self._lock = threading.Lock()  # one reload at a time
        try:
            self._version: Optional[Tuple[int, int, int, int]] = self._file_version()
            self._targets = self._read_targets()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--token-source {src!r}: {_describe(exc)}") from None

    def _file_version(self) -> Tuple[int, int, int, int]:
        info = os.stat(self._path)
        return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def _read_targets(self) -> Dict[str, Target]:
        with open(self._path, encoding="utf-8-sig") as file:  # -sig: tolerate a BOM
            targets, skipped = _parse_json_tokens(file.read())
        for message in skipped:
            _log.warning("TokenJSONFile: %s: skipped %s", self._path, message)
        return targets

    def _reload_if_changed(self) -> None:
        try:
            version: Optional[Tuple[int, int, int, int]] = self._file_version()
        except OSError:
            version = None
        if version == self._version:
            return
        with self._lock:
            if version == self._version:  # another worker reloaded meanwhile
                return
            self._version = version  # even if it fails: log once per version, not per lookup
            try:
                self._targets = self._read_targets()  # one assignment: readers need no lock
            except (OSError, ValueError) as exc:
                _log.warning(
                    "TokenJSONFile: %s unusable, keeping the previous tokens: %s",
                    self._path,
                    _describe(exc),
                )

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        self._reload_if_changed()
        target = self._targets.get(token)
        return None if target is None else _as_pair(target)


class _TokenAPIResponse:
    """What upstream's ``process_result(resp)`` overrides use of a ``requests`` response."""

    def __init__(self, status_code: int, content: bytes, headers: Mapping[str, str]) -> None:
        self.status_code = status_code
        self.ok = status_code < 400
        self.content = content
        self.headers = headers

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return _loads_json(self.content.decode("utf-8"))


class BaseTokenAPI(BaseTokenPlugin):
    """GET the source URL with ``%s`` replaced by the token; the body is ``host:port``.

    2xx: the target. 4xx: unknown token. Anything else, or no answer within
    the timeout: the lookup fails (500)."""

    def __init__(self, src: Optional[str]) -> None:
        super().__init__(src)
        url = _source_text(src, "--token-source", "a URL with %s where the token goes")
        if "%s" not in url:
            raise ConfigError(f"--token-source {url!r} has no %s for the token")
        if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
            raise ConfigError(f"--token-source {url!r} is not an http:// or https:// URL")
        self._url = url

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        plugin = type(self).__name__
        url = self._url.replace("%s", urllib.parse.quote(token, safe=""), 1)
        request = urllib.request.Request(
            url, headers={"User-Agent": f"websockify_min/{__version__}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=_TOKEN_SERVICE_TIMEOUT) as answer:
                response = _TokenAPIResponse(
                    answer.getcode(), answer.read(_MAX_TARGET_BYTES + 1), answer.headers
                )
        except urllib.error.HTTPError as exc:
            exc.close()
            if 400 <= exc.code < 500:  # the service refuses this token
                if exc.code != 404:
                    _log.warning("%s: the token service answered %d", plugin, exc.code)
                return None
            raise
        if len(response.content) > _MAX_TARGET_BYTES:
            raise _invalid_target(plugin, "the answer is too large")
        try:
            return self.process_result(response)
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise _invalid_target(plugin, _describe(exc)) from None

    def process_result(self, resp: _TokenAPIResponse) -> Tuple[str, Union[int, str]]:
        """The target in a successful answer; override for other formats."""
        return _as_pair(_parse_target(resp.text.strip()))


class JSONTokenApi(BaseTokenAPI):
    """Like BaseTokenAPI, but the body is JSON: ``{"host": h, "port": p}``."""

    def process_result(self, resp: _TokenAPIResponse) -> Tuple[str, Union[int, str]]:
        return _as_pair(_target_from_json(resp.json()))


class _RedisError(Exception):
    """Redis answered with an error, or not in RESP."""


def _resp_command(*args: str) -> bytes:
    """One command in RESP, the Redis protocol: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode("utf-8", "surrogatepass")
        parts += [b"$%d\r\n" % len(data), data, b"\r\n"]
    return b"".join(parts)


_RESP_LENGTH = re.compile(rb"-1|[0-9]{1,9}")


def _read_resp_reply(replies: BinaryIO) -> Optional[bytes]:
    """One reply to AUTH, SELECT or GET: bytes, or None for a missing key."""
    line = replies.readline(_MAX_TARGET_BYTES)
    if not line.endswith(b"\r\n"):
        raise _RedisError("connection closed, or a reply line too long")
    kind, body = line[:1], line[1:-2]
    if kind == b"-":
        raise _RedisError(body.decode("utf-8", "replace"))
    if kind in (b"+", b":"):
        return body
    if kind == b"$" and _RESP_LENGTH.fullmatch(body):
        length = int(body)
        if length < 0:
            return None
        if length > _MAX_TARGET_BYTES:
            raise _RedisError(f"value of {length} bytes is too large for a target")
        data = replies.read(length + 2)
        if len(data) != length + 2 or not data.endswith(b"\r\n"):
            raise _RedisError("truncated reply")
        return data[:-2]
    raise _RedisError(f"unexpected reply {_brief(line)}")


_DECIMAL = re.compile(r"[0-9]+")  # str.isdigit() also takes digits that int() refuses


class TokenRedis(BaseTokenPlugin):
    """Tokens as keys in Redis; source ``host[:port[:db[:password[:namespace]]]]``.

    Empty fields take their defaults (port 6379, db 0, no password, no
    namespace); a field in double quotes may contain ':'; a password
    ``@/path`` is read from that file. With a namespace the key is
    ``namespace:token``. The value is ``{"host": "h:p"}`` or plain ``h:p``.
    Each lookup opens its own connection, so workers share nothing."""

    def __init__(self, src: Optional[str]) -> None:
        super().__init__(src)
        text = _source_text(src, "--token-source", "host[:port[:db[:password[:namespace]]]]")
        try:
            fields = _split_source_fields(text)
        except ValueError as exc:
            raise ConfigError(f"--token-source: {exc}") from None
        if len(fields) > 5:
            raise ConfigError("--token-source is not host[:port[:db[:password[:namespace]]]]")
        host, port, db, password, namespace = fields + [""] * (5 - len(fields))
        if not host:
            raise ConfigError("--token-source: the Redis host is empty")
        if port and not (_PORT_DIGITS.fullmatch(port) and 0 < int(port) < 65536):
            raise ConfigError(f"--token-source: Redis port {port!r} is not a port number")
        if db and not _DECIMAL.fullmatch(db):
            raise ConfigError(f"--token-source: Redis db {db!r} is not a number")
        if password.startswith("@"):
            try:
                with open(os.path.expanduser(password[1:]), encoding="utf-8") as secret:
                    password = secret.read().rstrip("\r\n")
            except OSError as exc:
                raise ConfigError(
                    f"--token-source: Redis password file: {_describe(exc)}"
                ) from None
        self._address = (host, int(port) if port else 6379)
        self._db = int(db) if db else 0
        self._password = password or None
        self._key_prefix = namespace + ":" if namespace else ""

    def _get(self, key: str) -> Optional[bytes]:
        commands = []
        if self._password is not None:
            commands.append(_resp_command("AUTH", self._password))
        if self._db:
            commands.append(_resp_command("SELECT", str(self._db)))
        commands.append(_resp_command("GET", key))
        # The timeout bounds the connect and every read and write.
        with socket.create_connection(self._address, timeout=_TOKEN_SERVICE_TIMEOUT) as sock:
            sock.sendall(b"".join(commands))  # pipelined: one round trip
            with sock.makefile("rb") as replies:
                for _ in commands:
                    value = _read_resp_reply(replies)  # raises on AUTH or SELECT errors
        return value

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        value = self._get(self._key_prefix + token)
        if value is None:
            return None
        try:
            text = value.decode("utf-8").strip()
            target = (
                _target_from_json(_loads_json(text))
                if text.startswith("{")
                else _parse_target(text)
            )
        except ValueError as exc:
            raise _invalid_target("TokenRedis", exc) from None
        return _as_pair(target)


_JWT_HMAC_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
# Upstream's list; "none" and HMAC never apply to a PEM key (no algorithm confusion).
_JWS_PUBLIC_KEY_ALGS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
)  # fmt: skip
# jwcrypto's defaults less PBES2 (password-based, not key-based); never RSA1_5.
_JWE_ALGS = (
    "RSA-OAEP", "RSA-OAEP-256", "ECDH-ES", "ECDH-ES+A128KW", "ECDH-ES+A192KW", "ECDH-ES+A256KW",
    "A128KW", "A192KW", "A256KW", "A128GCMKW", "A192GCMKW", "A256GCMKW", "dir",
    "A128CBC-HS256", "A192CBC-HS384", "A256CBC-HS512", "A128GCM", "A192GCM", "A256GCM",
)  # fmt: skip


def _import_jwcrypto(module: str) -> Optional[types.ModuleType]:
    """jwcrypto's *module* if that optional package is installed, else None."""
    try:
        return importlib.import_module("jwcrypto." + module)
    except ImportError:
        return None


class JWTTokenApi(BaseTokenPlugin):
    """The token is a JWT whose claims ``host`` and ``port`` name the target.

    Source: a key file. A PEM key (RSA or EC) needs the optional ``jwcrypto``
    package. Anything else is an HMAC secret written, as upstream reads it,
    in base64url (a JWK ``k`` value). HS256/384/512 tokens are checked with
    the standard library; encrypted (JWE) tokens, whose payload must be a
    signed token, need jwcrypto. ``nbf`` and ``exp`` are honoured. Invalid,
    expired or not yet valid tokens are refused with 403."""

    def __init__(self, src: Optional[str]) -> None:
        super().__init__(src)
        path = _source_text(src, "--token-source", "a PEM key or a base64url HMAC secret")
        try:
            with open(path, "rb") as key_file:
                key_data = key_file.read()
        except OSError as exc:
            raise ConfigError(f"--token-source: key file: {_describe(exc)}") from None
        self._hmac_key: Optional[bytes] = None
        self._jwk: Any = None  # jwcrypto's key, when jwcrypto is installed
        jwk = _import_jwcrypto("jwk")
        if key_data.lstrip().startswith(b"-----BEGIN"):
            if jwk is None:
                raise ConfigError(
                    f"{path} is a PEM key, which needs jwcrypto (pip install jwcrypto)"
                )
            try:
                self._jwk = jwk.JWK.from_pem(key_data)
            except Exception as exc:  # jwcrypto and cryptography raise many types
                raise ConfigError(f"{path}: unusable PEM key: {_describe(exc)}") from None
            return
        try:
            secret = key_data.decode("ascii").strip().rstrip("=")
            self._hmac_key = _b64url_decode(secret)
        except ValueError:
            raise ConfigError(f"{path}: an HMAC secret must be written in base64url") from None
        if not self._hmac_key:
            raise ConfigError(f"{path}: the HMAC secret is empty")
        if jwk is not None:  # only for encrypted tokens: HMAC signatures need no jwcrypto
            try:
                self._jwk = jwk.JWK(kty="oct", k=secret)
            except Exception as exc:  # jwcrypto raises many types
                _log.warning("JWTTokenApi: jwcrypto refuses the key: %s", _describe(exc))

    def _decrypt(self, token: str) -> str:
        jwe = _import_jwcrypto("jwe")
        if self._jwk is None or jwe is None:
            raise ValueError("encrypted (JWE) tokens need jwcrypto, which is not installed")
        envelope = jwe.JWE()
        envelope.allowed_algs = list(_JWE_ALGS)
        try:
            envelope.deserialize(token, key=self._jwk)
            return str(envelope.payload.decode("ascii"))
        except Exception as exc:  # jwcrypto raises many types for bad input
            raise ValueError(f"cannot decrypt: {_describe(exc)}") from None

    def _verified_payload(self, token: str) -> bytes:
        """The payload of a compact JWS whose signature checks; raises ValueError."""
        parts = token.split(".")
        if len(parts) != 3:
            raise ValueError("not a compact JWS")
        header = _loads_json(_b64url_decode(parts[0]).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        if "crit" in header:  # RFC 7515 section 4.1.11: unknown extensions must fail
            raise ValueError("critical header extensions are not supported")
        alg = header.get("alg")
        if self._hmac_key is not None:
            hash_function = _JWT_HMAC_HASHES.get(str(alg))
            if hash_function is None:
                raise ValueError(f"algorithm {_brief(alg)} is not allowed with an HMAC key")
            signed = f"{parts[0]}.{parts[1]}".encode("ascii")
            expected = hmac.new(self._hmac_key, signed, hash_function).digest()
            if not hmac.compare_digest(_b64url_decode(parts[2]), expected):
                raise ValueError("bad signature")
            return _b64url_decode(parts[1])
        if alg not in _JWS_PUBLIC_KEY_ALGS:
            raise ValueError(f"algorithm {_brief(alg)} is not allowed with a PEM key")
        jws = _import_jwcrypto("jws")
        assert jws is not None  # a PEM key was only accepted with jwcrypto installed
        signature = jws.JWS()
        signature.allowed_algs = list(_JWS_PUBLIC_KEY_ALGS)
        try:
            signature.deserialize(token)
            signature.verify(self._jwk, alg=alg)
            return bytes(signature.payload)
        except Exception as exc:  # jwcrypto raises many types for bad input
            raise ValueError(f"bad signature: {_describe(exc)}") from None

    def _claims(self, token: str) -> Dict[str, Any]:
        """The claims of a token that decrypts and verifies; raises ValueError."""
        if token.count(".") == 4:  # compact JWE: five parts
            token = self._decrypt(token)
        claims = _loads_json(self._verified_payload(token).decode("utf-8"))
        if not isinstance(claims, dict):
            raise ValueError("the claims are not a JSON object")
        for claim in ("nbf", "exp"):
            value = claims.get(claim, 0)
            # NaN passes every comparison, so only finite numbers count.
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"claim {claim!r} is not a number")
            if not math.isfinite(value):
                raise ValueError(f"claim {claim!r} is not finite")
        return claims

    def lookup(self, token: str) -> Optional[Tuple[str, Union[int, str]]]:
        try:
            claims = self._claims(token)
        except ValueError as exc:
            raise _TokenRefused(403, "Invalid token", f"JWTTokenApi: {exc}") from None
        now = time.time()
        if now < claims.get("nbf", now):
            raise _TokenRefused(403, "Token not yet valid", "JWTTokenApi: token not yet valid")
        if now >= claims.get("exp", math.inf):  # RFC 7519 section 4.1.4: "on or after"
            raise _TokenRefused(403, "Token expired", "JWTTokenApi: token expired")
        try:
            return _as_pair(_target_from_result((claims.get("host"), claims.get("port"))))
        except ValueError as exc:
            raise _invalid_target("JWTTokenApi", exc) from None


# --- auth plugins ---


class BaseAuthPlugin:
    """Base of auth plugins (upstream's ``websockify.auth_plugins.BasePlugin``)."""

    def __init__(self, src: Optional[str] = None) -> None:
        self.source = src

    def authenticate(
        self,
        headers: http.client.HTTPMessage,
        target_host: Optional[str],
        target_port: Union[int, str, None],
    ) -> None:
        """Return to let the client in; raise AuthenticationError to refuse it."""


class _InvalidOriginError(AuthenticationError):
    """Upstream's ``InvalidOriginError``, for plugins that catch or raise it."""

    def __init__(self, expected: Sequence[str], actual: Optional[str]) -> None:
        self.expected_origin = expected
        self.actual_origin = actual
        super().__init__(
            log_msg=f"origin {_brief(actual)} is not one of {' '.join(expected)}",
            response_msg="Invalid Origin",
        )


_BASIC_CHALLENGE = {"WWW-Authenticate": 'Basic realm="Websockify"'}


class BasicHTTPAuth(BaseAuthPlugin):
    """HTTP Basic authentication against one ``user:password`` (the source).

    No credentials or wrong ones: 401 with a Basic challenge. A malformed
    Authorization header (another scheme, bad base64, no colon): 403."""

    def __init__(self, src: Optional[str] = None) -> None:
        super().__init__(src)
        credentials = _source_text(src, "--auth-source", "user:password")
        if ":" not in credentials:
            raise ConfigError("--auth-source must be user:password")
        # Browsers send UTF-8 now, older clients Latin-1: accept either spelling.
        self._accepted = [credentials.encode("utf-8")]
        try:
            self._accepted.append(credentials.encode("latin-1"))
        except UnicodeEncodeError:
            pass

    def authenticate(
        self,
        headers: http.client.HTTPMessage,
        target_host: Optional[str],
        target_port: Union[int, str, None],
    ) -> None:
        header = headers.get("Authorization")
        if header is None:
            raise AuthenticationError(
                log_msg="no credentials", response_code=401, response_headers=_BASIC_CHALLENGE
            )
        try:
            user, password = _parse_basic_credentials(str(header))
        except ValueError as exc:
            raise AuthenticationError(log_msg=f"malformed Authorization header: {exc}") from None
        given = user + b":" + password
        matches = [hmac.compare_digest(given, accepted) for accepted in self._accepted]
        if not any(matches):  # every comparison made: the time says nothing about which
            raise AuthenticationError(
                log_msg=f"wrong credentials for user {_brief(user.decode('utf-8', 'replace'))}",
                response_code=401,
                response_headers=_BASIC_CHALLENGE,
            )


def _source_words(src: Optional[str], what: str) -> List[str]:
    words = _source_text(src, "--auth-source", what).split()
    if not words:
        raise ConfigError(f"--auth-source is empty: it needs {what}")
    return words


class ExpectOrigin(BaseAuthPlugin):
    """Allow only clients whose Origin header is one of the space-separated source.

    Compared without regard to case, as scheme and host are; otherwise 403."""

    def __init__(self, src: Optional[str] = None) -> None:
        super().__init__(src)
        self._allowed = _source_words(src, "space-separated allowed origins")
        self._allowed_lowercase = frozenset(origin.lower() for origin in self._allowed)

    def authenticate(
        self,
        headers: http.client.HTTPMessage,
        target_host: Optional[str],
        target_port: Union[int, str, None],
    ) -> None:
        origin = headers.get("Origin")
        if origin is None or origin.strip().lower() not in self._allowed_lowercase:
            raise _InvalidOriginError(self._allowed, origin)


class ClientCertCNAuth(BaseAuthPlugin):
    """Allow only TLS clients whose certificate CN is one of the space-separated source.

    The proxy passes the verified CN as the ``SSL_CLIENT_S_DN_CN`` header
    (after removing any ``SSL_*`` header the client sent); otherwise 403."""

    def __init__(self, src: Optional[str] = None) -> None:
        super().__init__(src)
        self._allowed = frozenset(_source_words(src, "space-separated allowed common names"))

    def authenticate(
        self,
        headers: http.client.HTTPMessage,
        target_host: Optional[str],
        target_port: Union[int, str, None],
    ) -> None:
        common_name = headers.get("SSL_CLIENT_S_DN_CN")
        if common_name not in self._allowed:
            raise AuthenticationError(
                log_msg=f"client certificate CN {_brief(common_name)} is not allowed"
            )


# --- what the session calls ---


def token_from_request(query: str, host_header: Optional[str], host_token: bool) -> Optional[str]:
    """The token of a request: ``token=`` in *query* (the part after '?'), or with
    *host_token* (``--host-token``) the Host header without its port. None if absent."""
    if host_token:
        host = (host_header or "").strip()
        if host.startswith("["):  # [v6addr]:port
            address, bracket, _ = host[1:].partition("]")
            return address if bracket and address else None
        return host.partition(":")[0] or None
    values = urllib.parse.parse_qs(query.lstrip("?")).get("token")
    if not values:
        return None
    # Upstream drops a trailing newline that some clients leave in the token.
    return values[0].rstrip("\n") or None


def lookup_target(plugin: "TokenPlugin", token: Optional[str]) -> Target:
    """Ask *plugin* where *token* leads. Call from a worker thread: it may block.

    Raises HandshakeError, and nothing else: 400 when *token* is None or
    empty, or the plugin's answer is not a usable target; 404 when the
    plugin does not know the token; 500 when the plugin raises (its
    service is down, or it has a bug); a HandshakeError the plugin raised
    itself (403 for a bad JWT, for one) passes through. Logs one line for
    each refusal."""
    name = type(plugin).__name__
    if not token:
        _log.warning("%s: no token in the request", name)
        raise HandshakeError(400, "Token missing")
    try:
        result = plugin.lookup(token)
    except HandshakeError as exc:
        detail = exc.detail if isinstance(exc, _TokenRefused) else f"{exc.status} {exc.reason}"
        _log.warning("token %s refused: %s", _brief(token), detail)
        raise
    except (Exception, SystemExit) as exc:  # upstream plugins call sys.exit() on errors
        _log.error(
            "token plugin %s failed for token %s: %s",
            name,
            _brief(token),
            _describe(exc),
            exc_info=_log.isEnabledFor(logging.DEBUG),
        )
        raise HandshakeError(500, "Token lookup failed") from None
    if result is None:
        _log.warning("token %s not found by %s", _brief(token), name)
        raise HandshakeError(404, "Token not found")
    try:
        return _target_from_result(result)
    except ValueError as exc:
        _log.warning("token %s: %s returned an invalid target: %s", _brief(token), name, exc)
        raise HandshakeError(400, "Invalid target for token") from None


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # no CR, LF or other controls


def _is_authentication_error(exc: BaseException) -> bool:
    """True for our AuthenticationError and for upstream's, or another copy of
    this module's, which a plugin may import instead: same name, same fields."""
    return any(cls.__name__ == "AuthenticationError" for cls in type(exc).__mro__)


def _refusal_from(exc: BaseException) -> HandshakeError:
    """The HTTP answer an AuthenticationError asks for, made safe to send."""
    status = getattr(exc, "code", 403)
    if not isinstance(status, int) or not 300 <= status <= 599:
        status = 403
    reason = getattr(exc, "msg", None)
    if not isinstance(reason, str) or not reason or not _HEADER_VALUE.fullmatch(reason):
        reason = http.client.responses.get(status, "Forbidden")
    headers = getattr(exc, "headers", None)
    safe_headers = {
        name: value
        for name, value in (headers.items() if isinstance(headers, Mapping) else ())
        if isinstance(name, str)
        and isinstance(value, str)
        and _HEADER_NAME.fullmatch(name)
        and _HEADER_VALUE.fullmatch(value)
    }
    return HandshakeError(status, reason[:200], safe_headers)


def check_auth(
    plugin: "AuthPlugin", headers: http.client.HTTPMessage, target: Optional[Target]
) -> None:
    """Let *plugin* judge a request. Call from a worker thread: it may block.

    Returns to allow. Raises HandshakeError, and nothing else, to refuse: an
    AuthenticationError becomes its code (default 403), message and headers;
    a HandshakeError passes through; any other exception from the plugin
    becomes 500, so a broken plugin keeps clients out and shows in the log.
    The plugin sees the target as upstream's plugins do: (host, port),
    ("unix_socket", path), or (None, None) when there is none yet."""
    target_host: Optional[str] = None
    target_port: Union[int, str, None] = None
    if target is not None:
        target_host, target_port = _as_pair(target)
    try:
        plugin.authenticate(headers=headers, target_host=target_host, target_port=target_port)
    except HandshakeError as exc:
        _log.warning("authentication refused: %d %s", exc.status, exc.reason)
        raise
    except (Exception, SystemExit) as exc:
        if _is_authentication_error(exc):
            refusal = _refusal_from(exc)
            _log.warning("authentication refused: %s", " ".join(str(exc).split()))
            raise refusal from None
        _log.error(
            "auth plugin %s failed: %s",
            type(plugin).__name__,
            _describe(exc),
            exc_info=_log.isEnabledFor(logging.DEBUG),
        )
        raise HandshakeError(500, "Authentication failed") from None


# --- loading ---

_TOKEN_PLUGINS: Dict[str, Callable[[Optional[str]], object]] = {
    "BasePlugin": BaseTokenPlugin,
    "BaseTokenAPI": BaseTokenAPI,
    "JSONTokenApi": JSONTokenApi,
    "JWTTokenApi": JWTTokenApi,
    "ReadOnlyTokenFile": ReadOnlyTokenFile,
    "TokenFile": TokenFile,
    "TokenFileName": TokenFileName,
    "TokenJSONFile": TokenJSONFile,
    "TokenRedis": TokenRedis,
    "UnixDomainSocketDirectory": UnixDomainSocketDirectory,
}
_AUTH_PLUGINS: Dict[str, Callable[[Optional[str]], object]] = {
    "BasePlugin": BaseAuthPlugin,
    "BasicHTTPAuth": BasicHTTPAuth,
    "ClientCertCNAuth": ClientCertCNAuth,
    "ExpectOrigin": ExpectOrigin,
}


class _PluginKind(NamedTuple):
    flag: str
    method: str
    builtins: Dict[str, Callable[[Optional[str]], object]]
    upstream_module: str


_PLUGIN_KINDS = {
    "token": _PluginKind("--token-plugin", "lookup", _TOKEN_PLUGINS, "websockify.token_plugins"),
    "auth": _PluginKind("--auth-plugin", "authenticate", _AUTH_PLUGINS, "websockify.auth_plugins"),
}
_DOTTED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _install_import_aliases() -> None:
    """Let a user's plugin import what plugins written for upstream import.

    When the real websockify package is not installed, ``websockify``,
    ``websockify.token_plugins`` and ``websockify.auth_plugins`` become
    aliases of our classes (BasePlugin, the built-ins, AuthenticationError),
    so ``from websockify.token_plugins import BasePlugin`` works. They stay
    registered: plugins may import them again later, lazily. And when this
    file runs as a script, ``import websockify_min`` gets this module rather
    than a second copy with classes of its own."""
    if __name__ != "websockify_min":
        sys.modules.setdefault("websockify_min", sys.modules[__name__])
    if "websockify" in sys.modules:
        return
    try:
        if importlib.util.find_spec("websockify") is not None:
            return
    except (ImportError, ValueError):
        pass
    package = types.ModuleType("websockify", "websockify_min's aliases for upstream's plugins")
    package.__path__ = []  # a package: submodules come from sys.modules only
    token_plugins = types.ModuleType("websockify.token_plugins")
    vars(token_plugins).update(_TOKEN_PLUGINS)
    auth_plugins = types.ModuleType("websockify.auth_plugins")
    vars(auth_plugins).update(_AUTH_PLUGINS)
    vars(auth_plugins).update(
        AuthenticationError=AuthenticationError, InvalidOriginError=_InvalidOriginError
    )
    vars(package).update(token_plugins=token_plugins, auth_plugins=auth_plugins)
    sys.modules.update(
        {
            "websockify": package,
            "websockify.token_plugins": token_plugins,
            "websockify.auth_plugins": auth_plugins,
        }
    )


def _plugin_factory(kind: _PluginKind, name: str) -> Callable[[Optional[str]], object]:
    """The class *name* means for *kind*; ConfigError naming the flag if none."""
    if not _DOTTED_NAME.fullmatch(name):
        raise ConfigError(f"{kind.flag}: {name!r} is not a class name or a dotted path to one")
    module_name, _, class_name = name.rpartition(".")
    if not module_name:
        factory = kind.builtins.get(name)
        if factory is not None:
            return factory
        for other in _PLUGIN_KINDS.values():
            if name in other.builtins:
                raise ConfigError(f"{kind.flag}: {name} is for {other.flag}")
        known = ", ".join(sorted(kind.builtins))
        raise ConfigError(f"{kind.flag}: unknown plugin {name!r} (built in: {known})")
    for upstream in _PLUGIN_KINDS.values():
        if module_name == upstream.upstream_module and class_name in upstream.builtins:
            return upstream.builtins[class_name]
    _install_import_aliases()
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # the module's own code may fail in any way
        raise ConfigError(
            f"{kind.flag} {name}: cannot import {module_name}: {_describe(exc)}"
        ) from None
    factory = getattr(module, class_name, None)
    if not callable(factory):
        raise ConfigError(f"{kind.flag} {name}: {module_name} has no class {class_name}")
    return cast(Callable[[Optional[str]], object], factory)


@overload
def load_plugin(kind: "Literal['token']", name: str, source: Optional[str]) -> "TokenPlugin": ...
@overload
def load_plugin(kind: "Literal['auth']", name: str, source: Optional[str]) -> "AuthPlugin": ...
@overload
def load_plugin(kind: str, name: str, source: Optional[str]) -> object: ...
def load_plugin(kind: str, name: str, source: Optional[str]) -> Any:
    """Load and construct the ``"token"`` or ``"auth"`` plugin *name* with *source*.

    *name* is a built-in's short name (``TokenFile``), upstream's dotted
    name for it (``websockify.token_plugins.TokenFile``), or any other
    ``package.module.Class``, imported (see _install_import_aliases). Any
    failure (unknown name, import error, constructor error, no ``lookup``
    or ``authenticate`` method) raises ConfigError with one line that names
    the flag. ValueError only for a *kind* that is neither."""
    try:
        plugin_kind = _PLUGIN_KINDS[kind]
    except KeyError:
        raise ValueError(f"plugin kind must be 'token' or 'auth', not {kind!r}") from None
    factory = _plugin_factory(plugin_kind, name)
    try:
        plugin = factory(source)
    except ConfigError as exc:
        raise ConfigError(f"{plugin_kind.flag} {name}: {exc}") from None
    except (Exception, SystemExit) as exc:  # upstream's TokenRedis calls sys.exit()
        raise ConfigError(f"{plugin_kind.flag} {name}: {_describe(exc)}") from None
    if not callable(getattr(plugin, plugin_kind.method, None)):
        raise ConfigError(f"{plugin_kind.flag} {name}: has no {plugin_kind.method}() method")
    return plugin


# === 7. Static files ===

# === 8. Loop ===

# === 9. Stream ===

# === 10. Session ===

# === 11. Server ===

# === 12. Options and CLI ===

# === 13. main ===


def main(argv: Optional[list] = None) -> int:  # type: ignore[type-arg]
    """Run the proxy with *argv* (default: ``sys.argv[1:]``); return the exit status."""
    print("websockify_min: not built yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
