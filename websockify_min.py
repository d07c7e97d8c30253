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

import enum
import sys
from typing import Mapping, Optional, Union

__version__ = "0.1.0"

__all__ = (
    "AuthenticationError",
    "ConfigError",
    "HandshakeError",
    "ProtocolError",
    "main",
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
