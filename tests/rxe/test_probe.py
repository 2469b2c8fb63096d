"""The credit-free liveness probe (issue 11, item 5): a sender blocked on credits notices
a dead peer, and does not mistake a live peer that does not read for a dead one.

A sender out of credits has nothing outstanding once the peer's HCA acknowledged its last
frame, and a KEEPALIVE frame would need a credit. TCP's persist timer probes a zero
window; usdp posts a one-byte RDMA READ (``_verbs.PROBE_WR_ID``), which the peer's HCA
answers without a receive buffer, and the ack watchdog declares the peer dead when one
stays unanswered for ``ack_timeout``.
"""

from __future__ import annotations

import hashlib
import os
import socket as stdsocket
import threading
import time
from collections.abc import Callable

import pytest

import usdp
from tests.rxe.conftest import HostB
from tests.rxe.helpers import client, connect_b, server, wait_for
from usdp._liveness import AckWatch

TIMEOUT = 120.0


def _blocked_for_credits(s: usdp.SdpSocket) -> bool:
    """The sender waits for credits and its last frame is acknowledged: the case where
    nothing outstanding could tell the watchdog anything."""
    ep = s._ep
    assert ep is not None
    # No credit comes back while the peer does not read: once stalled, it stays so.
    return s.stats()["credit_stalls"] > 0 and ep.liveness.outstanding == 0


class _Sender:
    """``sendall(data)`` in a thread; records the error and when it came."""

    def __init__(self, s: usdp.SdpSocket, data: bytes) -> None:
        self.error: BaseException | None = None
        self.done_at = 0.0
        self.thread = threading.Thread(target=self._run, args=(s, data))
        self.thread.start()

    def _run(self, s: usdp.SdpSocket, data: bytes) -> None:
        try:
            s.sendall(data)
        except BaseException as exc:
            self.error = exc
        self.done_at = time.monotonic()


def _late_reader(data: bytes, go: threading.Event,
                 got: list[str]) -> Callable[[usdp.SdpSocket], None]:
    """A server handler that reads nothing until ``go``, then reads ``len(data)`` bytes
    and records their SHA-256 in ``got``."""

    def read(conn: usdp.SdpSocket) -> None:
        conn.settimeout(TIMEOUT)
        assert go.wait(TIMEOUT)
        h = hashlib.sha256()
        n = 0
        buf = bytearray(1 << 20)
        while n < len(data):
            k = conn.recv_into(buf)
            assert k, f"EOF after {n} bytes"
            h.update(memoryview(buf)[:k])
            n += k
        got.append(h.hexdigest())

    return read


def test_a_live_peer_that_does_not_read_is_probed_not_declared_dead(host_a: str,
                                                                    port: int) -> None:
    """One host: the server does not read, the client's sendall runs out of credits and
    is probed (one-byte RDMA READs, answered by the server's HCA) for several probe
    intervals without being declared dead; then the server reads and every byte arrives
    intact, and both close cleanly."""
    ack_timeout = 2.0  # probe interval min(1 s, ack_timeout / 2)
    data = os.urandom(4 << 20)  # far more than the server's ring (1 MiB) and ours hold
    go = threading.Event()
    got: list[str] = []

    late_reader = _late_reader(data, go, got)

    with server(host_a, port, late_reader) as errors, \
            client(host_a, port, usdp.Options(ack_timeout=ack_timeout)) as s:
        s.settimeout(None)  # only the watchdog could end the sendall while stalled
        sender = _Sender(s, data)
        try:
            wait_for(lambda: _blocked_for_credits(s), "the sendall to block on credits",
                     timeout=TIMEOUT)
            before = s.stats()["probes"]
            wait_for(lambda: s.stats()["probes"] >= before + 4 or not sender.thread.is_alive(),
                      "four probes of the stalled sender", timeout=TIMEOUT)
            assert sender.thread.is_alive() and sender.error is None, sender.error
            assert s.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_ERROR) == 0
        finally:
            go.set()
            sender.thread.join(TIMEOUT)
        assert not sender.thread.is_alive()
        assert sender.error is None, repr(sender.error)
        st = s.stats()
        print(f"\nstalled sender: {st['probes']} probes, {st['credit_stalls']} credit "
              f"stalls, {st['frames_out']} frames")
        assert st["probes"] >= 4
    assert not errors, errors
    assert got == [hashlib.sha256(data).hexdigest()]


@pytest.mark.twohost
def test_sendall_blocked_on_credits_fails_when_the_link_goes_down(host_b: HostB,
                                                                   port: int) -> None:
    """Host B accepts and never reads; host A's sendall runs out of credits and its last
    frame is acknowledged (nothing outstanding). Then A's side of the link drops every
    packet: the blocked sendall must fail with ECONNRESET ("no acknowledgement"), within
    ack_timeout plus a probe interval (bounded generously here), not hang."""
    from usdptools.testbed import rxe

    ack_timeout = 2.0
    interval = AckWatch(0.0, ack_timeout).probe_interval  # 1 s
    pid = host_b.spawn([".venv/bin/python", "tests/rxe/peer_idle.py", host_b.addr, str(port),
                        "hold", "600"])
    s = connect_b(host_b, port, usdp.Options(ack_timeout=ack_timeout), TIMEOUT)
    s.settimeout(None)  # only the watchdog can end the sendall below
    sender = _Sender(s, bytes(16 << 20))  # far more than B's ring and ours hold
    try:
        wait_for(lambda: _blocked_for_credits(s), "the sendall to block on credits",
                 timeout=TIMEOUT)
        rxe.netem("eth0", {"loss": 100})  # everything A sends is lost (B's agent uses the
        down = time.monotonic()           # link, so only A's side)
        try:
            sender.thread.join(ack_timeout + interval + 60)
        finally:
            rxe.netem("eth0", None)
        alive = sender.thread.is_alive()
        detect = sender.done_at - down
        print(f"\nblocked sendall, link down: {sender.error!r} after "
              f"{'(still blocked)' if alive else f'{detect:.1f} s'} (ack_timeout "
              f"{ack_timeout} s, probe interval {interval} s); {s.stats()['probes']} probes")
        assert not alive, "the sendall blocked on credits never noticed the dead link"
        assert isinstance(sender.error, ConnectionResetError), repr(sender.error)
        assert "no acknowledgement" in str(sender.error), sender.error
        assert s.stats()["probes"] >= 1
    finally:
        host_b.kill(pid)  # B's CM disconnects: a sendall still blocked ends too
        host_b.wait(pid, 30)
        sender.thread.join(TIMEOUT)
        s.close()


def test_a_zero_copy_send_waiting_for_the_peer_is_probed(host_a: str, port: int) -> None:
    """One host, zero-copy: the server does not read, so the client's SrcAvail waits for
    its RDMA read with nothing of ours outstanding; the client probes meanwhile (not
    declared dead), then the server reads and the bytes arrive intact."""
    opts = usdp.Options(zcopy_threshold=64 * 1024, ack_timeout=2.0)
    data = os.urandom(1 << 20)
    go = threading.Event()
    got: list[str] = []

    late_reader = _late_reader(data, go, got)

    with server(host_a, port, late_reader, options=opts) as errors, \
            client(host_a, port, opts) as s:
        s.settimeout(None)
        ep = s._ep
        assert ep is not None
        sender = _Sender(s, data)
        try:
            wait_for(lambda: s.stats()["zcopy_sends"] >= 1 and ep.liveness.outstanding == 0,
                      "the SrcAvail to be acknowledged", timeout=TIMEOUT)
            before = s.stats()["probes"]
            wait_for(lambda: s.stats()["probes"] >= before + 3 or not sender.thread.is_alive(),
                      "three probes of the waiting zero-copy sender", timeout=TIMEOUT)
            assert sender.thread.is_alive() and sender.error is None, sender.error
        finally:
            go.set()
            sender.thread.join(TIMEOUT)
        assert not sender.thread.is_alive()
        assert sender.error is None, repr(sender.error)
        assert s.stats()["zcopy_bytes_out"] == len(data)
    assert not errors, errors
    assert got == [hashlib.sha256(data).hexdigest()]
