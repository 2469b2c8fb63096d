"""socket.socket semantics that programs rely on (issue 11): connect before accept, the
listener's backlog, a Hello cannot make us pin memory, read-only buffers, recv/send
flags, fds above 1023, fork, ssl wrapping, spurious listener wake-ups.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import select
import socket as stdsocket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import usdp
from tests.rxe.helpers import TIMEOUT, client, recv_exactly, settled
from tests.rxe.rawpeer import RECV_BUFS, SEND_AREA, SLOT, RawPeer
from tests.rxe.test_resources import _settled_snapshot, _warm_up
from usdp import _orphans, _setup
from usdp._wire import Features, HandshakeKind, Hello, RejectReason, decode_reject

CONNECT = 20.0  # a connect must complete without anyone calling accept() meanwhile
SMALL = usdp.Options(recv_bufs=4, recv_buf_size=8192, send_bufs=4)


@contextmanager
def listening(host: str, port: int, backlog: int = 128,
              options: usdp.Options | None = None) -> Iterator[usdp.SdpSocket]:
    lst = usdp.SdpSocket(options=options)
    lst.bind((host, port))
    lst.listen(backlog)
    try:
        yield lst
    finally:
        lst.close()


class Acceptor(threading.Thread):
    """accept() in a thread, so that a test of another item does not depend on item 1."""

    def __init__(self, lst: usdp.SdpSocket) -> None:
        super().__init__()
        self.lst = lst
        self.conn: usdp.SdpSocket | None = None
        lst.settimeout(TIMEOUT)
        self.start()

    def run(self) -> None:
        self.conn, _ = self.lst.accept()

    def result(self) -> usdp.SdpSocket:
        self.join(TIMEOUT)
        assert self.conn is not None
        return self.conn


def connected_pair(host: str, port: int,
                   options: usdp.Options | None = None) -> tuple[usdp.SdpSocket, usdp.SdpSocket,
                                                                 usdp.SdpSocket]:
    lst = usdp.SdpSocket(options=options)
    lst.bind((host, port))
    lst.listen()
    acceptor = Acceptor(lst)
    c = usdp.SdpSocket(options=options)
    c.settimeout(CONNECT)
    c.connect((host, port))
    a = acceptor.result()
    a.settimeout(TIMEOUT)
    return lst, c, a


def readable(fd: int, timeout: float) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(int(timeout * 1000)))


# ---------------------------------------------------------------- item 1: connect first


def test_connect_completes_before_accept_single_thread(host_a: str, port: int) -> None:
    with listening(host_a, port) as lst:
        assert not readable(lst.fileno(), 0)  # nothing waits yet
        c = usdp.SdpSocket()
        c.settimeout(CONNECT)
        c.connect((host_a, port))  # nobody is in accept(): the backlog takes it
        with c:
            assert readable(lst.fileno(), TIMEOUT)  # an established connection waits
            lst.settimeout(0.0)
            a, addr = lst.accept()
            assert addr == c.getsockname()
            assert not readable(lst.fileno(), 0)  # the backlog is empty again
            with pytest.raises(BlockingIOError):
                lst.accept()
            with a:
                a.settimeout(TIMEOUT)
                c.sendall(b"ping" * 1000)
                assert recv_exactly(a, 4000) == b"ping" * 1000
                a.sendall(b"pong" * 1000)
                assert recv_exactly(c, 4000) == b"pong" * 1000


def test_connections_beyond_the_backlog_are_refused(host_a: str, port: int) -> None:
    """backlog 2 (the Listener itself; SdpSocket.listen raises small backlogs to 128, as
    the CM needs): two clients connect without accept, the third gets Reject(BACKLOG) as
    ECONNREFUSED; after one accept there is room again."""
    lst = _setup.Listener((host_a, port), 2, SMALL, stdsocket.AF_INET)
    clients: list[usdp.SdpSocket] = []
    accepted: list[usdp.SdpSocket] = []
    try:
        for _ in range(2):
            clients.append(client(host_a, port, SMALL))
        with pytest.raises(ConnectionRefusedError, match="BACKLOG"):
            client(host_a, port, SMALL)
        ep, _addr = lst.accept(TIMEOUT)
        a = usdp.SdpSocket(options=SMALL)
        a._ep = ep
        accepted.append(a)
        clients.append(client(host_a, port, SMALL))  # room for one more
    finally:
        lst.close()
        for s in clients + accepted:
            s.close()


def test_closing_the_listener_resets_unaccepted_connections(host_a: str, port: int) -> None:
    _warm_up(host_a, port + 1)  # the device context and PD stay for the process
    base = _settled_snapshot()
    clients: list[usdp.SdpSocket] = []
    with listening(host_a, port, options=SMALL):
        for _ in range(3):
            clients.append(client(host_a, port, SMALL))
    # The listener is gone and nobody ever accepted: each client sees a reset (or EOF),
    # promptly, not a hang.
    for c in clients:
        c.settimeout(TIMEOUT)
        try:
            assert c.recv(10) == b""
        except ConnectionError:
            pass
        c.close()
    assert _settled_snapshot() == base


# ---------------------------------------------------------------- item 6: memory


def _mr_bytes() -> int:
    out = subprocess.run(["rdma", "-j", "res", "show", "mr"], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return sum(int(r.get("mrlen", 0)) for r in json.loads(out or "[]") if isinstance(r, dict))


def _big_hello() -> bytes:
    return Hello(HandshakeKind.HELLO, 16, 16 << 20, 16 << 20, Features.ZCOPY).encode()


def test_a_hello_cannot_make_the_server_pin_memory(host_a: str, port: int) -> None:
    """A raw peer asks for 16 x 16 MiB slots: the server registers its own rings only
    (send slots sized by the negotiated frame, at most its own slot size)."""
    opts = usdp.Options()
    own = opts.recv_bufs * opts.recv_buf_size + opts.send_bufs * opts.recv_buf_size
    with listening(host_a, port, options=opts) as lst:
        before = _mr_bytes()
        acceptor = Acceptor(lst)
        raw = RawPeer(host_a, port, hello=_big_hello())
        try:
            assert raw.rejected is None
            with acceptor.result() as a:
                grown = _mr_bytes() - before - (RECV_BUFS * SLOT + SEND_AREA)
                assert 0 < grown <= own, (grown, own)
                a.settimeout(TIMEOUT)
                a.sendall(b"x" * 100)
                f = raw.recv_frame(TIMEOUT)
                assert f is not None and f.endswith(b"x" * 100)
        finally:
            raw.close()


def test_the_registered_memory_budget_refuses_and_releases(host_a: str, port: int) -> None:
    from usdp._budget import BUDGET

    # What a connection reserves at setup: its receive ring (whole, for a peer without
    # GROW, as the raw peer; send slots are registered only when sends need them).
    ring = SMALL.recv_bufs * SMALL.recv_buf_size
    # Earlier tests' closed connections give their rings back when their background
    # delivery ends: the budget in use must be read once they are gone.
    assert _orphans.wait_all(TIMEOUT)
    used = settled(lambda: BUDGET.used, 0.2, TIMEOUT)
    opts = usdp.Options(recv_bufs=4, recv_buf_size=8192, send_bufs=4,
                        mr_budget=used + ring + ring // 2)
    with listening(host_a, port, options=opts) as lst:
        lst.settimeout(TIMEOUT)
        first = RawPeer(host_a, port)
        try:
            assert first.rejected is None
            a, _ = lst.accept()
            second = RawPeer(host_a, port)
            second.close()
            assert second.rejected is not None
            assert decode_reject(second.rejected).reason is RejectReason.NO_RESOURCES
            a.close()  # gives its rings back to the budget, once its EOF is delivered
            assert _orphans.wait_all(TIMEOUT)
            third = RawPeer(host_a, port)
            try:
                assert third.rejected is None
                lst.accept()[0].close()
            finally:
                third.close()
        finally:
            first.close()


def _vmsize() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmSize")


def test_a_failed_ring_allocation_is_refused_with_no_resources(host_a: str, port: int) -> None:
    """Registration failing for lack of memory (here the ring's mmap, under an address
    space limit; as root RLIMIT_MEMLOCK does not bind) answers Reject(NO_RESOURCES), not a
    silently closed CM id, and leaks nothing."""
    _warm_up(host_a, port + 1)
    base = _settled_snapshot()
    # A usdp client lets the ring grow, so the server maps only its first 4 slots at
    # setup: 4 x 16 MiB (the largest slots) to exceed the address-space limit below.
    big = usdp.Options(recv_bufs=16, recv_buf_size=16 << 20, mr_budget=1 << 40)
    with listening(host_a, port, options=big):
        c = usdp.SdpSocket(options=SMALL)
        c.settimeout(CONNECT)
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (_vmsize() + (32 << 20), hard))
        try:
            with pytest.raises(ConnectionRefusedError, match="NO_RESOURCES"):
                c.connect((host_a, port))  # the server's 64 MiB first segment cannot be mapped
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
            c.close()
    assert _settled_snapshot() == base


# ---------------------------------------------------------------- item 7: read-only buffer


def test_recv_into_a_read_only_buffer_consumes_nothing(host_a: str, port: int) -> None:
    lst, c, a = connected_pair(host_a, port)
    with lst, c, a:
        c.sendall(b"hello")
        assert readable(a.fileno(), TIMEOUT)
        with pytest.raises(TypeError, match="read-write"):
            a.recv_into(b"12345")
        with pytest.raises(TypeError):
            a.recv_into(memoryview(bytearray(5)).toreadonly())
        assert recv_exactly(a, 5) == b"hello"


# ---------------------------------------------------------------- item 9: flags


def test_msg_peek_leaves_the_data_queued(host_a: str, port: int) -> None:
    lst, c, a = connected_pair(host_a, port)
    with lst, c, a:
        c.sendall(b"abcdef")
        assert readable(a.fileno(), TIMEOUT)
        assert a.recv(3, stdsocket.MSG_PEEK) == b"abc"
        buf = bytearray(10)
        assert a.recv_into(buf, 0, stdsocket.MSG_PEEK) == 6 and buf[:6] == b"abcdef"
        assert a.recv(6, stdsocket.MSG_PEEK | stdsocket.MSG_WAITALL) == b"abcdef"
        assert a.recv(2) == b"ab"
        assert a.recv(10, stdsocket.MSG_PEEK) == b"cdef"
        assert recv_exactly(a, 4) == b"cdef"


def test_msg_waitall_fills_the_buffer_or_stops_at_eof(host_a: str, port: int) -> None:
    lst, c, a = connected_pair(host_a, port)
    with lst, c, a:
        data = os.urandom(1 << 20)

        def send_in_pieces() -> None:
            for i in range(0, len(data), 16384):
                c.sendall(data[i : i + 16384])

        t = threading.Thread(target=send_in_pieces)
        t.start()
        got = a.recv(len(data), stdsocket.MSG_WAITALL)  # one call, many frames
        t.join(TIMEOUT)
        assert got == data
        c.sendall(b"tail")
        c.shutdown(stdsocket.SHUT_WR)
        assert a.recv(100, stdsocket.MSG_WAITALL) == b"tail"  # EOF ends the wait
        assert a.recv(100, stdsocket.MSG_WAITALL) == b""


def test_msg_dontwait_never_blocks(host_a: str, port: int) -> None:
    lst, c, a = connected_pair(host_a, port, SMALL)
    with lst, c, a:
        with pytest.raises(BlockingIOError):
            a.recv(10, stdsocket.MSG_DONTWAIT)  # a blocking socket, nothing queued
        taken = 0
        with pytest.raises(BlockingIOError):
            while True:  # the reader never reads: the window fills
                n = c.send(b"z" * 8192, stdsocket.MSG_DONTWAIT)
                assert n > 0
                taken += n
                assert taken < 64 * 8192, "send with MSG_DONTWAIT never stopped"
        assert recv_exactly(a, taken) == b"z" * taken


def test_unsupported_flags_raise_eopnotsupp(host_a: str, port: int) -> None:
    lst, c, a = connected_pair(host_a, port)
    with lst, c, a:
        for call in (lambda: c.send(b"x", stdsocket.MSG_OOB),
                     lambda: c.sendall(b"x", stdsocket.MSG_OOB),
                     lambda: a.recv(1, stdsocket.MSG_OOB),
                     lambda: a.recv(1, stdsocket.MSG_TRUNC)):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.EOPNOTSUPP
        c.sendall(b"y", stdsocket.MSG_NOSIGNAL)
        assert recv_exactly(a, 1) == b"y"  # nothing went in-band


# ---------------------------------------------------------------- item 11: fds > 1023


def test_connect_and_accept_with_fds_above_1023(host_a: str, port: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    filler: list[int] = []
    try:
        while not filler or filler[-1] < 1100:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        lst, c, a = connected_pair(host_a, port)
        with lst, c, a:
            assert min(lst.fileno(), c.fileno(), a.fileno()) > 1023
            c.sendall(b"high")
            assert recv_exactly(a, 4) == b"high"
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ---------------------------------------------------------------- item 12: fork


def test_fork_child_gets_new_sockets_and_clear_errors(host_a: str, port: int) -> None:
    lst, c, a = connected_pair(host_a, port)
    with lst, c, a:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into pytest
            code = 1
            try:
                os.close(r)
                msgs = []
                try:
                    a.recv(1)
                    msgs.append("inherited recv worked")
                except OSError as exc:
                    if exc.errno != errno.EBADF or "fork" not in str(exc):
                        msgs.append(f"inherited recv: {exc!r}")
                a.close()  # must not touch the parent's connection
                s = usdp.SdpSocket()
                s.settimeout(CONNECT)
                s.connect((host_a, port))  # the parent's listener queues it
                s.sendall(b"from the child")
                if recv_exactly(s, 2) != b"ok":
                    msgs.append("no reply")
                s.close()
                os.write(w, ("\n".join(msgs) or "fine").encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        lst.settimeout(TIMEOUT)
        child_conn, _ = lst.accept()
        with child_conn:
            child_conn.settimeout(TIMEOUT)
            assert recv_exactly(child_conn, 14) == b"from the child"
            child_conn.sendall(b"ok")
            _, status = os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            report = f.read().decode()
        assert os.waitstatus_to_exitcode(status) == 0 and report == "fine", report
        # The parent's own connection, used after the child closed its inherited copy.
        c.sendall(b"still here")
        assert recv_exactly(a, 10) == b"still here"
        a.sendall(b"both ways")
        assert recv_exactly(c, 9) == b"both ways"


# ---------------------------------------------------------------- item 13: ssl


def test_ssl_wrap_fails_cleanly_and_keeps_our_fd(host_a: str, port: int) -> None:
    lst, c, a = connected_pair(host_a, port)
    with lst, c, a:
        fd = c.fileno()
        ctx = ssl.create_default_context()
        with pytest.raises(OSError, match=r"usdp\.asyncio") as info:
            ctx.wrap_socket(c, server_hostname="example")  # type: ignore[arg-type]
        assert info.value.errno == errno.EOPNOTSUPP
        srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with pytest.raises(OSError, match=r"usdp\.asyncio"):
            srv_ctx.wrap_socket(a, server_side=True)  # type: ignore[arg-type]
        with open(os.devnull, "rb") as other:  # would take a freed fd number
            assert other.fileno() != fd
        assert stat.S_ISSOCK(os.fstat(fd).st_mode) and c.fileno() == fd
        c.sendall(b"plain")
        assert recv_exactly(a, 5) == b"plain"


# ---------------------------------------------------------------- item 15a: spurious wake


def test_listener_survives_spurious_wakeups(host_a: str, port: int) -> None:
    with listening(host_a, port) as lst:
        listener = lst._listener
        assert listener is not None
        for _ in range(3):  # the handler runs as if the CM channel were ready: it is not
            listener.poke()
        deadline = time.monotonic() + TIMEOUT
        while listener.spurious_wakeups < 3:  # the pokes may coalesce into fewer runs
            listener.poke()
            assert time.monotonic() < deadline
            threading.Event().wait(0.05)
        lst.settimeout(0.2)
        with pytest.raises(TimeoutError):
            lst.accept()  # a timeout is a timeout, not EAGAIN
        acceptor = Acceptor(lst)
        with client(host_a, port) as c, acceptor.result() as a:
            c.sendall(b"alive")
            assert recv_exactly(a, 5) == b"alive"
