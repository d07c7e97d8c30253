"""The TCP target behind every proxy in the benchmark: sink, source and echo on one port.

Run as its own process (``python targets.py``): prints the port it listens on, then serves
until killed. One selectors loop, large buffers, no per-byte work, so that it costs the
same whichever proxy is in front of it.
"""

import selectors
import socket
import sys
import zlib
from typing import Optional

from wire import HEADER, REPLY, parse_header, pattern_at

RECV_SIZE = 1 << 20
SEND_SIZE = 256 * 1024


class Conn:
    __slots__ = ("count", "crc", "head", "length", "mode", "out", "sent", "sock", "verify")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.head = b""
        self.mode: Optional[bytes] = None
        self.verify = False
        self.length = 0
        self.count = 0
        self.crc = 0
        self.sent = 0
        self.out = b""


class Targets:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.buffer = bytearray(RECV_SIZE)
        self.view = memoryview(self.buffer)

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def serve(self) -> None:
        while True:
            for key, events in self.sel.select():
                conn = key.data
                if conn is None:
                    self.accept()
                    continue
                try:
                    if events & selectors.EVENT_WRITE:
                        self.write(conn)
                    if events & selectors.EVENT_READ and conn.sock.fileno() >= 0:
                        self.read(conn)
                except OSError:
                    self.close(conn)

    def accept(self) -> None:
        for _ in range(256):
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError:  # out of descriptors: let the client time out
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sel.register(sock, selectors.EVENT_READ, Conn(sock))

    def close(self, conn: Conn) -> None:
        if conn.sock.fileno() >= 0:
            self.sel.unregister(conn.sock)
            conn.sock.close()

    def read(self, conn: Conn) -> None:
        try:
            size = conn.sock.recv_into(self.buffer)
        except BlockingIOError:
            return
        if not size:
            self.close(conn)
            return
        data = self.view[:size]
        if conn.mode is None:
            need = HEADER.size - len(conn.head)
            conn.head += bytes(data[:need])
            data = data[need:]
            if len(conn.head) < HEADER.size:
                return
            conn.mode, conn.verify, conn.length = parse_header(conn.head)
            if conn.mode == b"D":
                self.sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
                return
        if conn.mode == b"U":
            conn.count += len(data)
            if conn.verify:
                conn.crc = zlib.crc32(data, conn.crc)
            if conn.count >= conn.length and not conn.out and len(data):
                self.send(conn, REPLY.pack(conn.count, conn.crc))
        elif conn.mode == b"E" and data:
            self.send(conn, bytes(data))
        # "D": once sent, wait for the client to close

    def send(self, conn: Conn, data: bytes) -> None:
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            conn.out = data[sent:]
            self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def write(self, conn: Conn) -> None:
        if conn.mode == b"D" and conn.sent < conn.length:
            size = min(SEND_SIZE, conn.length - conn.sent)
            try:
                conn.sent += conn.sock.send(pattern_at(conn.sent, size))
            except BlockingIOError:
                return
            if conn.sent >= conn.length:
                self.sel.modify(conn.sock, selectors.EVENT_READ, conn)
            return
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except BlockingIOError:
                return
            conn.out = conn.out[sent:]
        if not conn.out:
            self.sel.modify(conn.sock, selectors.EVENT_READ, conn)


def main() -> None:
    targets = Targets()
    print(targets.port, flush=True)
    sys.stdout.close()
    targets.serve()


if __name__ == "__main__":
    main()
