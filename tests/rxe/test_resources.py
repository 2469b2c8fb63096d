"""Resource exhaustion (issue 6): receivers that never read, and thousands of open/close
cycles. Each test measures the process's fds and its RDMA objects (QPs, CQs, MRs, PDs,
CM ids, as the kernel's resource tracking counts them) before and after: every one must
be back at its baseline.
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import socket as stdsocket
import threading
import time

import usdp
from tests.rxe.helpers import TIMEOUT, client, server, settled
from usdp import _orphans
from usdp._engine import _wake_fd
from usdptools.testbed.rxe import rdma_resources


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _fd_kinds() -> collections.Counter[str]:
    """What the process's fds are, by kind (``anon_inode:[eventfd]``, ``socket:``,
    ``/dev/infiniband/uverbs0``...; inode numbers dropped)."""
    kinds: collections.Counter[str] = collections.Counter()
    for name in os.listdir("/proc/self/fd"):
        try:
            kinds[re.sub(r"\[\d+\]$", "", os.readlink(f"/proc/self/fd/{name}"))] += 1
        except OSError:
            pass  # listdir's own fd, closed by now
    return kinds


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _snapshot() -> dict[str, int]:
    return {"fd": _fd_count(), **rdma_resources()}


def _settled_snapshot(deadline: float = 120.0) -> dict[str, int]:
    """A snapshot once the counts stop changing: connections of an earlier test (their
    peers' teardown, a lingering close) may still be going away. Three equal readings
    in a row, with a generous bound; the last reading is returned either way, and the
    test's own comparison then tells a leak from a slow teardown."""
    return settled(_snapshot, 0.5, deadline)


def _warm_up(host: str, port: int) -> None:
    """The device context, PD and completion thread stay for the process's lifetime."""
    with server(host, port, lambda c: None) as errors, client(host, port) as s:
        assert s.recv(1) == b""
    assert not errors, errors


def test_receivers_that_never_read_bound_the_senders(host_a: str, port: int) -> None:
    """Many connections whose receiver never reads: each sender stops once the peer's
    window is full (no unbounded buffering, no error, no watchdog reset while the peer is
    alive), every queued byte arrives intact once the receiver reads, and closing all of
    them returns every fd and RDMA object."""
    conns = 24
    opts = usdp.Options(ack_timeout=1.0)  # would reset a stalled-but-alive peer if wrong
    _warm_up(host_a, port + 1)
    _wake_fd()  # this thread's wake fd (kept for its lifetime) is part of the baseline
    base = _settled_snapshot()
    lst = usdp.SdpSocket(options=opts)
    lst.bind((host_a, port))
    lst.listen()
    lst.settimeout(TIMEOUT)
    clients: list[usdp.SdpSocket] = []
    accepted: list[usdp.SdpSocket] = []
    try:
        acceptor = threading.Thread(
            target=lambda: accepted.extend(lst.accept()[0] for _ in range(conns)))
        acceptor.start()
        for _ in range(conns):
            clients.append(client(host_a, port, opts))
        acceptor.join(TIMEOUT)
        assert len(accepted) == conns
        during = _snapshot()
        chunk = os.urandom(256 << 10)
        queued: list[bytes] = []
        for c in clients:
            c.setblocking(False)
            parts: list[bytes] = []
            while True:
                try:
                    n = c.send(chunk)
                except BlockingIOError:
                    break
                parts.append(chunk[:n])
            queued.append(b"".join(parts))
        # Each sender holds at most the peer's window (recv_bufs frames) plus one staged
        # frame: bounded, whatever the caller tries to send.
        window = opts.recv_bufs * opts.recv_buf_size
        sizes = [len(q) for q in queued]
        assert all(0 < n <= window + opts.recv_buf_size for n in sizes), sizes
        # Stalled but alive, for longer than ack_timeout: no reset on either side.
        probe = clients[0]
        probe.settimeout(3 * opts.ack_timeout)
        t0 = time.monotonic()
        try:
            probe.recv(1)
            raise AssertionError("the receiver sent something")
        except TimeoutError:
            pass
        assert time.monotonic() - t0 >= 3 * opts.ack_timeout - 0.1
        assert all(c.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_ERROR) == 0 for c in clients)
        # The receivers read at last: everything queued arrives, in order.
        for q, a in zip(queued, accepted, strict=True):
            a.settimeout(TIMEOUT)
            got = bytearray()
            while len(got) < len(q):
                data = a.recv(len(q) - len(got))
                assert data
                got += data
            assert hashlib.sha256(got).digest() == hashlib.sha256(q).digest()
    finally:
        for s in clients + accepted:
            s.close()
        lst.close()
    # close() returns at once; the connections finish delivering in the background.
    assert _orphans.wait_all(TIMEOUT), "closed connections never went away"
    after = _settled_snapshot()
    print(f"\n{conns} never-reading receivers: queued {min(sizes)}-{max(sizes)} B each "
          f"(window {window} B); resources {base} -> during {during} -> after {after}")
    assert during["qp"] - base["qp"] == 2 * conns and during["cm_id"] > base["cm_id"]
    assert after == base


def test_open_close_cycles_release_everything(host_a: str, port: int) -> None:
    cycles = int(os.environ.get("USDP_CYCLES", "1000"))
    opts = usdp.Options(recv_bufs=8, recv_buf_size=8192, send_bufs=8)

    def one_byte(conn: usdp.SdpSocket) -> None:
        assert conn.recv(1) == b"x"

    def run(count: int) -> None:
        with server(host_a, port, one_byte, count=count, options=opts) as errors:
            for _ in range(count):
                with client(host_a, port, opts) as s:
                    s.sendall(b"x")
        assert not errors, errors

    run(20)  # warm up: the device context, the completion thread, allocator pools
    # A thread that ever slept on a connection keeps one eventfd for its lifetime (the
    # engine's wake fd, per thread, not per connection): make sure ours exists.
    _wake_fd()
    base, rss, base_kinds = _settled_snapshot(), _rss_kib(), _fd_kinds()
    t0 = time.monotonic()
    run(cycles)
    secs = time.monotonic() - t0
    assert _orphans.wait_all(TIMEOUT), "closed connections never went away"
    after, rss_after, after_kinds = _settled_snapshot(), _rss_kib(), _fd_kinds()
    print(f"\n{cycles} open/close cycles in {secs:.1f} s: {base} -> {after}, RSS {rss} -> "
          f"{rss_after} KiB ({(rss_after - rss) / cycles:.2f} KiB per cycle)")
    # Verbs objects exactly back; fds never above the baseline (a leak over 1000 cycles
    # would add hundreds), and none of a new kind.
    assert {k: v for k, v in after.items() if k != "fd"} == \
        {k: v for k, v in base.items() if k != "fd"}
    assert after["fd"] <= base["fd"], (base, after)
    assert not after_kinds - base_kinds, (base_kinds, after_kinds)
    # Fewer is allowed only for eventfds: the wake fds (one per thread that ever slept on
    # a connection, freed with the thread's thread-local state) of warm-up threads that
    # the baseline still saw. Any other fd gone would be one usdp closed twice.
    gone = base_kinds - after_kinds
    assert set(gone) <= {"anon_inode:[eventfd]"}, gone
    assert threading.active_count() < 20
    assert rss_after - rss < 20 * 1024  # KiB; pyverbs 44 leaks ~16 B per send WR
