"""The benchmark worker's stream framing: a stream ends on a marked last message, not on
EOF, whatever the chunking (a real socketpair, no device)."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
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


def test_worker_reports_cpu_time_of_both_sides(capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A TCP worker pair on loopback: each result carries the client's and the server's
    CPU time over the timed part (the numbers are not judged, only that they exist); the
    client runs ``--tests`` and then one batch per stdin line (the runner's rounds)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("P:1024\nS:4096 P:64\n"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    common = ["--kind", "tcp", "--host", "127.0.0.1", "--port", port]
    rcs: list[int] = []
    server = threading.Thread(target=lambda: rcs.append(worker.main(
        ["server", *common, "--idle-timeout", "60"])))
    server.start()
    try:
        assert worker.main(["client", *common, "--quit", "--seconds", "0.05",
                            "--tests", "S:64", "--stdin"]) == 0
    finally:
        server.join(60)
    assert rcs == [0]
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["mode"], r["size"]) for r in lines] == [
        ("stream", 64), ("pingpong", 1024), ("stream", 4096), ("pingpong", 64)]
    for r in lines:
        for side in ("client_cpu", "server_cpu"):
            assert set(r[side]) == {"user", "sys"}
            assert min(r[side].values()) >= 0.0
        assert r["n"] > 0
