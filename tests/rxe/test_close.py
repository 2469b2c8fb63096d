"""close() and shutdown() as TCP programs rely on them (issue 11, items 2 and 4).

``close()`` never waits by default: what was taken is delivered in the background, then
our EOF, and the reader gets every byte before EOF. ``SO_LINGER`` on with 0 s aborts
(a reset at the peer, as a TCP RST); on with N s blocks until the delivery is done (or N
s). A thread blocked in ``recv``/``send``/``sendall``/a zero-copy send of a socket that
another thread closes wakes up with EBADF; ``shutdown(SHUT_RD)`` wakes a reader with
``b""``. Every wait is on an event with a generous deadline; no assertion on timing.
"""

from __future__ import annotations

import errno
import hashlib
import socket as stdsocket
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest

import usdp
from tests.rxe.helpers import TIMEOUT, client, server, wait_for
from tests.rxe.test_resources import _settled_snapshot, _warm_up
from usdp import _orphans

pytestmark = pytest.mark.rxe

#: A small window, so that a few sends fill it and the last ones wait for the reader.
SMALL = usdp.Options(recv_bufs=4, recv_buf_size=8192, send_bufs=4)


def _fill_window(s: usdp.SdpSocket, chunk: int = 4096) -> bytes:
    """Non-blocking sends until the socket takes no more; returns what it took."""
    taken = bytearray()
    n = 0
    while True:
        block = bytes([n % 251]) * chunk
        try:
            k = s.send(block, stdsocket.MSG_DONTWAIT)
        except BlockingIOError:
            return bytes(taken)
        taken += block[:k]
        n += 1
        assert len(taken) < 64 << 20, "the window never filled"


def _read_all(conn: usdp.SdpSocket) -> tuple[bytes, BaseException | None]:
    """Read until EOF or an error: what arrived, and the error if any."""
    got = bytearray()
    try:
        while chunk := conn.recv(65536):
            got += chunk
    except OSError as exc:
        return bytes(got), exc
    return bytes(got), None


def _in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a thread; the list gets its result or its exception."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:
            out.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _wait_blocked(s: usdp.SdpSocket, t: threading.Thread) -> None:
    """Until the thread ``t`` sleeps inside a call on ``s`` (its CQs armed for it)."""
    ep = s._ep
    assert ep is not None
    wait_for(lambda: ep.engine.stats.sleeps >= 1 or not t.is_alive(),
             "the thread to block")


# ------------------------------------------------------------------ item 2: close()


def test_close_returns_at_once_and_a_slow_reader_gets_every_byte(host_a: str,
                                                                 port: int) -> None:
    """The peer reads only after our close() returned: our window is full and our EOF
    needs a credit that only its reading gives back. close() must not wait for that;
    the bytes and then EOF arrive in the background, never a reset."""
    closed = threading.Event()
    result: list[tuple[bytes, BaseException | None]] = []

    def late_reader(conn: usdp.SdpSocket) -> None:
        assert closed.wait(TIMEOUT), "close() blocked on a peer that is not reading"
        result.append(_read_all(conn))

    with server(host_a, port, late_reader, options=SMALL) as errors:
        s = client(host_a, port, SMALL)
        taken = _fill_window(s)
        s.close()  # returns although DISCONN has no credit yet
        closed.set()
    assert not errors, errors
    got, err = result[0]
    assert err is None, f"the reader got {err!r} instead of EOF"
    assert hashlib.sha256(got).digest() == hashlib.sha256(taken).digest()
    assert _orphans.wait_all(TIMEOUT), "the closed connection was never torn down"


def test_many_closes_in_a_row_deliver_everything(host_a: str, port: int) -> None:
    """Connections that send and close at once, many in a row: each reader gets every
    byte and EOF; none is left delivering afterwards, and every resource comes back."""
    _warm_up(host_a, port + 1)
    base = _settled_snapshot()
    conns = 20
    received: list[tuple[bytes, BaseException | None]] = []

    with server(host_a, port, lambda c: received.append(_read_all(c)), count=conns) as errors:
        for i in range(conns):
            with client(host_a, port) as s:
                s.sendall(bytes([i]) * (100_000 + i))
    assert not errors, errors
    assert sorted((len(g), e) for g, e in received) == [
        (100_000 + i, None) for i in range(conns)]
    assert all(g == bytes([g[0]]) * len(g) for g, _ in received)
    assert _orphans.wait_all(TIMEOUT)
    after = _settled_snapshot()
    assert after["fd"] <= base["fd"] and {k: v for k, v in after.items() if k != "fd"} \
        == {k: v for k, v in base.items() if k != "fd"}, (base, after)


def test_so_linger_zero_aborts_like_a_reset(host_a: str, port: int) -> None:
    """SO_LINGER on with 0 s: close() aborts; the peer gets the bytes that had arrived,
    then ECONNRESET, never a clean EOF."""
    result: list[tuple[bytes, BaseException | None]] = []
    sent = threading.Event()

    def reader(conn: usdp.SdpSocket) -> None:
        assert sent.wait(TIMEOUT)
        result.append(_read_all(conn))

    with server(host_a, port, reader) as errors:
        s = client(host_a, port)
        s.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 0))
        assert struct.unpack("ii", s.getsockopt(  # type: ignore[arg-type]
            stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, 8)) == (1, 0)
        s.sendall(b"x" * 1000)
        s.close()
        sent.set()
    assert not errors, errors
    got, err = result[0]
    assert isinstance(err, ConnectionError), (len(got), err)
    assert err.errno in (errno.ECONNRESET, errno.ECONNABORTED), err
    assert got == b"x" * len(got)  # a prefix of what was sent, nothing else
    assert _orphans.count() == 0  # an abort never lingers


def test_so_linger_positive_blocks_until_delivered(host_a: str, port: int) -> None:
    """SO_LINGER on with N s: close() returns only once our EOF went out, which here
    needs the peer to read first (so it cannot return before the reader was let go)."""
    go = threading.Event()
    result: list[tuple[bytes, BaseException | None]] = []

    def late_reader(conn: usdp.SdpSocket) -> None:
        assert go.wait(TIMEOUT)
        result.append(_read_all(conn))

    with server(host_a, port, late_reader, options=SMALL) as errors:
        s = client(host_a, port, SMALL)
        s.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER,
                     struct.pack("ii", 1, int(TIMEOUT)))
        taken = _fill_window(s)
        releaser = threading.Timer(0.5, go.set)  # lets close() block first
        releaser.start()
        s.close()
        assert go.is_set(), "close() returned before our EOF could be delivered"
        releaser.join()
    assert not errors, errors
    got, err = result[0]
    assert err is None and got == taken


def test_so_linger_option_round_trips_and_rejects_garbage(host_a: str, port: int) -> None:
    with client_and_server(host_a, port) as s:
        assert s.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER) == 0
        s.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 1, 7))
        assert s.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, 8) \
            == struct.pack("ii", 1, 7)
        with pytest.raises(OSError) as info:
            s.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, b"\x01")
        assert info.value.errno == errno.EINVAL
        s.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER, struct.pack("ii", 0, 0))
        assert s.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_LINGER) == 0


def _drain(conn: usdp.SdpSocket) -> None:
    _read_all(conn)


class client_and_server:
    """An echo server and a connected client, both closed on exit."""

    def __init__(self, host: str, port: int) -> None:
        self._server = server(host, port, _drain)
        self._host, self._port = host, port

    def __enter__(self) -> usdp.SdpSocket:
        self._errors = self._server.__enter__()
        self._sock = client(self._host, self._port)
        return self._sock

    def __exit__(self, *exc: object) -> None:
        self._sock.close()
        self._server.__exit__(None, None, None)
        assert not self._errors, self._errors


# ------------------------------------------------------------------ item 4: cross-thread


def _peer_holding(host: str, port: int, options: usdp.Options | None = None) -> Any:
    """A server that holds its connection without reading until told to, then drains."""
    release = threading.Event()

    def hold(conn: usdp.SdpSocket) -> None:
        assert release.wait(TIMEOUT)
        _read_all(conn)

    return server(host, port, hold, options=options), release


def test_close_in_another_thread_wakes_a_blocked_recv_with_ebadf(host_a: str,
                                                                 port: int) -> None:
    ctx, release = _peer_holding(host_a, port)
    with ctx as errors:
        s = client(host_a, port)
        t, out = _in_thread(lambda: s.recv(10))
        _wait_blocked(s, t)
        s.close()
        t.join(TIMEOUT)
        assert not t.is_alive(), "recv stayed blocked after close() in another thread"
        release.set()
    assert not errors, errors
    assert isinstance(out[0], OSError) and out[0].errno == errno.EBADF, out


def test_shutdown_rd_wakes_a_blocked_recv_with_eof(host_a: str, port: int) -> None:
    ctx, release = _peer_holding(host_a, port)
    with ctx as errors:
        s = client(host_a, port)
        t, out = _in_thread(lambda: s.recv(10))
        _wait_blocked(s, t)
        s.shutdown(stdsocket.SHUT_RD)
        t.join(TIMEOUT)
        assert not t.is_alive(), "recv stayed blocked after shutdown(SHUT_RD)"
        assert out == [b""]
        assert s.recv(10) == b""  # and every later recv, without waiting
        s.sendall(b"the write side still works")
        s.close()
        release.set()
    assert not errors, errors


def test_close_in_another_thread_wakes_a_blocked_sendall(host_a: str, port: int) -> None:
    ctx, release = _peer_holding(host_a, port, SMALL)
    with ctx as errors:
        s = client(host_a, port, SMALL)
        t, out = _in_thread(lambda: s.sendall(b"y" * (4 << 20)))  # far over the window
        _wait_blocked(s, t)
        s.close()
        t.join(TIMEOUT)
        assert not t.is_alive(), "sendall stayed blocked after close() in another thread"
        release.set()
    assert not errors, errors
    assert isinstance(out[0], OSError) and out[0].errno == errno.EBADF, out


def test_close_in_another_thread_wakes_a_zero_copy_send(host_a: str, port: int) -> None:
    """A zero-copy send waits for the peer's RDMA read; a close() meanwhile wakes it with
    EBADF, aborts the connection (the peer must not read a buffer that is the caller's
    again) and deregisters the buffer: every RDMA object comes back."""
    _warm_up(host_a, port + 1)
    base = _settled_snapshot()
    zc = usdp.Options(zcopy_threshold=64 * 1024)
    ctx, release = _peer_holding(host_a, port, zc)
    with ctx as errors:
        s = client(host_a, port, zc)
        t, out = _in_thread(lambda: s.sendall(b"z" * (1 << 20)))
        _wait_blocked(s, t)
        assert s.stats()["zcopy_sends"] == 1
        s.close()
        t.join(TIMEOUT)
        assert not t.is_alive(), "the zero-copy send stayed blocked after close()"
        release.set()
    assert not errors, errors
    assert isinstance(out[0], OSError) and out[0].errno == errno.EBADF, out
    assert _orphans.wait_all(TIMEOUT)
    after = _settled_snapshot()
    assert {k: v for k, v in after.items() if k != "fd"} \
        == {k: v for k, v in base.items() if k != "fd"}, (base, after)


def test_calls_after_close_raise_ebadf(host_a: str, port: int) -> None:
    with client_and_server(host_a, port) as s:
        pass
    for call in (lambda: s.recv(1), lambda: s.send(b"x"), lambda: s.sendall(b"x"),
                 lambda: s.shutdown(stdsocket.SHUT_RDWR), s.fileno):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBADF
