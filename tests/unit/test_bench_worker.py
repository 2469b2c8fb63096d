"""The benchmark worker's stream framing: a stream ends on a marked last message, not on
EOF, whatever the chunking (a real socketpair, no device)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from usdptools.bench import worker


class _Dribble:
    """Hands the socket's bytes out in chunks of a fixed odd size (as transports may)."""

    def __init__(self, sock: socket.socket, chunk: int) -> None:
        self.sock, self.chunk = sock, chunk

    def recv_into(self, view: memoryview) -> int:
        return self.sock.recv_into(view[: self.chunk])


@pytest.mark.parametrize(("size", "chunk"), [(64, 4096), (64, 37), (1000, 999), (4096, 1)])
def test_stream_ends_after_the_whole_marked_message(size: int, chunk: int) -> None:
    a, b = socket.socketpair()
    with a, b:
        body = b"\x00" + os.urandom(size - 1)
        # Random payload bytes equal to the marker must not end the stream early.
        body = body[:1] + worker.LAST * min(8, size - 1) + body[1 + min(8, size - 1):]
        msgs = [body] * 20 + [worker.LAST + body[1:]]
        sender = threading.Thread(target=a.sendall, args=(b"".join(msgs) + b"after",))
        sender.start()
        view = memoryview(bytearray(1 << 16))
        assert worker._recv_stream(_Dribble(b, chunk), view, size)
        sender.join(10)
        a.shutdown(socket.SHUT_WR)
        # It stopped reading at the chunk that completed the last message.
        rest = b.recv(1 << 16)
        assert rest == b"after"[len(b"after") - len(rest):]
        assert len(rest) == 5 or chunk > 5


def test_stream_without_its_marker_reports_an_early_eof() -> None:
    a, b = socket.socketpair()
    with b:
        a.sendall(b"\x00" * 640)
        a.close()
        assert not worker._recv_stream(_Dribble(b, 100), memoryview(bytearray(4096)), 64)
