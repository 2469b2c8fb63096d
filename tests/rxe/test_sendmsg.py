"""SdpSocket.sendmsg/recvmsg/recvmsg_into (scatter-gather, no ancillary data) and sendfile
on rxe, directly and through the drop-in (HybridSocket forwards them)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import random
import socket
import tempfile
import threading
from typing import Any

import pytest

import usdp
from tests.rxe.helpers import TIMEOUT, client, server

SMALL = usdp.Options(recv_bufs=8, recv_buf_size=8192, send_bufs=8)


def _sendmsg_all(s: Any, buffers: list[Any]) -> int:
    """Loop on sendmsg's short counts, as callers must (it is a gather send())."""
    views = [memoryview(b).cast("B") for b in buffers]
    total = calls = 0
    while views:
        n = s.sendmsg(views)
        calls += 1
        total += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return calls


def _recvmsg_into_exactly(s: Any, sizes: list[int]) -> list[bytearray]:
    bufs = [bytearray(n) for n in sizes]
    views = [memoryview(b) for b in bufs]
    while views:
        n, anc, flags, addr = s.recvmsg_into(views)
        assert n > 0 and anc == [] and flags == 0 and addr is None
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return bufs


def test_sendmsg_and_recvmsg_into_scatter_gather(host_a: str, port: int) -> None:
    rng = random.Random(7)
    sizes = [1, 3, 100, 5000, 16383, 16384, 70000, 7, 1 << 20, 2, 300_000, 9]
    sizes += [rng.randrange(1, 40_000) for _ in range(30)]
    data = [rng.randbytes(n) for n in sizes]
    total = sum(sizes)
    cuts = sorted(rng.sample(range(1, total), 40))
    recv_sizes = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    got: list[bytes] = []

    def handler(conn: usdp.SdpSocket) -> None:
        got.append(b"".join(_recvmsg_into_exactly(conn, recv_sizes)))
        while True:
            msg, anc, flags, addr = conn.recvmsg(100)
            assert (anc, flags, addr) == ([], 0, None)
            if not msg:
                break
            got.append(msg)

    with server(host_a, port, handler, options=SMALL) as errors, \
            client(host_a, port, SMALL) as s:
        calls = _sendmsg_all(s, [bytearray(d) for d in data[:6]] + data[6:])
        s.sendmsg([b"!", b"", b"end"])
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""
    assert not errors, errors
    stream = b"".join(data) + b"!end"
    joined = b"".join(got)
    assert hashlib.sha256(joined).digest() == hashlib.sha256(stream).digest()
    assert calls >= 1


def test_sendmsg_refuses_ancillary_data_and_addresses(host_a: str, port: int) -> None:
    with server(host_a, port, lambda c: None) as errors, client(host_a, port) as s:
        with pytest.raises(OSError) as info:
            s.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, b"\0\0\0\0")])
        assert info.value.errno == errno.EOPNOTSUPP and "ancillary" in str(info.value)
        with pytest.raises(OSError) as info:
            s.sendmsg([b"x"], (), 0, (host_a, port))
        assert info.value.errno == errno.EISCONN
        with pytest.raises(ValueError):
            s.recvmsg(10, -1)
        assert s.sendmsg([]) == 0
    assert not errors, errors


def test_nonblocking_sendmsg_takes_what_fits(host_a: str, port: int) -> None:
    release = threading.Event()
    received: list[int] = []

    def handler(conn: usdp.SdpSocket) -> None:
        release.wait(TIMEOUT)
        received.append(len(recv_all(conn)))

    with server(host_a, port, handler, options=SMALL) as errors, \
            client(host_a, port, SMALL) as s:
        s.setblocking(False)
        sent = 0
        big = [bytes(100_000), bytes(200_000)]
        with pytest.raises(BlockingIOError):  # the window fills, then nothing fits
            for _ in range(1000):
                n = s.sendmsg(big)
                assert 0 < n <= 300_000
                sent += n
        release.set()
        s.setblocking(True)
        s.shutdown(socket.SHUT_WR)
        assert s.recv(1) == b""
    assert not errors, errors
    assert received == [sent] and sent > 0


def recv_all(conn: usdp.SdpSocket) -> bytes:
    out = bytearray()
    while chunk := conn.recv(1 << 20):
        out += chunk
    return bytes(out)


def test_sendfile_sends_the_file_and_moves_its_position(host_a: str, port: int) -> None:
    content = os.urandom((5 << 20) + 12345)
    got: list[bytes] = []
    with tempfile.TemporaryFile() as f:
        f.write(content)
        with server(host_a, port, lambda c: got.append(recv_all(c))) as errors, \
                client(host_a, port) as s:
            f.seek(0)
            n1 = s.sendfile(f)
            pos1 = f.tell()
            n2 = s.sendfile(f, offset=100, count=1000)
            pos2 = f.tell()
            with pytest.raises(ValueError):
                s.sendfile(f, count=0)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""
    assert not errors, errors
    assert (n1, pos1, n2, pos2) == (len(content), len(content), 1000, 1100)
    assert hashlib.sha256(got[0]).digest() == hashlib.sha256(
        content + content[100:1100]).digest()


def test_dropin_forwards_sendmsg_recvmsg_and_sendfile(host_a: str, port: int) -> None:
    """A patched socket.socket (what Python 3.12's selector transport writes through with
    sendmsg) sends and receives these over RDMA, not the kernel socket."""
    content = os.urandom(1 << 20)
    usdp.patch(usdp.parse_rules("use sdp * * 198.18.0.0/15:*\ndefault tcp\n"), options=SMALL)
    try:
        lst = socket.create_server((host_a, port))
        assert usdp.transport_of(lst) == "sdp"
        result: list[Any] = []

        def serve() -> None:
            conn, _ = lst.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                bufs = _recvmsg_into_exactly(conn, [10, 20, len(content)])
                msg = b""
                while len(msg) < 5:
                    msg += conn.recv(5 - len(msg))
                result.append((bytes(bufs[0]), bytes(bufs[1]), bytes(bufs[2]), msg))
                conn.sendall(b"ack")

        t = threading.Thread(target=serve)
        t.start()
        with tempfile.TemporaryFile() as f, socket.create_connection((host_a, port),
                                                                       TIMEOUT) as s:
            assert isinstance(s, usdp.HybridSocket) and usdp.transport_of(s) == "sdp"
            f.write(content)
            f.seek(0)
            _sendmsg_all(s, [b"0123456789", bytearray(b"a" * 20)])
            assert s.sendfile(f) == len(content)
            s.sendall(b"hello")
            data, anc, flags, addr = s.recvmsg(10)
            assert (data, anc, flags, addr) == (b"ack", [], 0, None)
        t.join(TIMEOUT)
        lst.close()
    finally:
        usdp.unpatch()
    assert result == [(b"0123456789", b"a" * 20, content, b"hello")]


def test_loop_sock_sendfile_on_an_sdp_socket(host_a: str, port: int) -> None:
    """loop.sock_sendfile(SdpSocket): asyncio's native path would os.sendfile into the
    readiness fd; it declines RDMA sockets, so the fallback sends to the peer."""
    content = os.urandom((1 << 20) + 99)
    got: list[bytes] = []

    async def main(f: Any) -> int:
        s = client(host_a, port)
        duck: Any = s  # a socket.socket look-alike
        try:
            s.setblocking(False)
            usdp.asyncio._loop()  # what every usdp.asyncio call does first
            return await asyncio.get_running_loop().sock_sendfile(duck, f, 10,
                                                                   len(content) - 20)
        finally:
            s.setblocking(True)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b""
            s.close()

    with tempfile.TemporaryFile() as f, \
            server(host_a, port, lambda c: got.append(recv_all(c))) as errors:
        f.write(content)
        sent = asyncio.run(asyncio.wait_for(main(f), TIMEOUT))
    assert not errors, errors
    assert sent == len(content) - 20 and got == [content[10:-10]]
