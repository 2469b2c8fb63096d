"""The liveness ticker of one connection: acts, every TICK, on ``AckWatch``'s verdicts.

``_liveness.AckWatch`` decides (pure, unit-tested): OK, PROBE or DEAD. Acting on a verdict
needs the connection: the completion thread's ticker takes its ``ConnLock`` (only if
nobody holds it), polls the CQs, posts the probe (a KEEPALIVE frame or the one-byte
RDMA READ) or fails the connection. That is a job of its own, apart from the data path in
``_endpoint``, which composes this class and turns it on and off (``update``).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from usdp import _cm
from usdp._connection import Connection
from usdp._engine import Engine
from usdp._errors import ConnectionReset, UsdpError
from usdp._liveness import AckWatch, Probe, Verdict
from usdp._progress import progress
from usdp._sendpath import SendPath
from usdp._verbs import QPResources


class LivenessTicker:
    """Probes a silent or stalled peer and declares a dead one dead (see the module doc).

    Args:
        res, conn, sendpath, engine, liveness, cmid: the connection's parts (``cmid``
            only names the peer in the DEAD error).
        fail: latches a fatal error (and moves the QP to error).
        broken: True once the connection can carry nothing more (the ticker stops).
        closed: True once the connection is torn down.
        send_waits: user calls waiting for the peer to let them send.
        eof_pending: our EOF waits behind the cork (queued, as a corked send is).
        on_dead: run (owner) after DEAD failed the connection: readiness, a closed
            connection's background delivery.
    """

    def __init__(self, res: QPResources, conn: Connection, sendpath: SendPath,
                 engine: Engine, liveness: AckWatch, cmid: Any, *,
                 fail: Callable[[UsdpError], None], broken: Callable[[], bool],
                 closed: Callable[[], bool], send_waits: Callable[[], int],
                 eof_pending: Callable[[], bool], on_dead: Callable[[], None]) -> None:
        self.res, self.conn, self.sp, self.engine = res, conn, sendpath, engine
        self.liveness, self.cmid = liveness, cmid
        self._fail, self._broken, self._closed = fail, broken, closed
        self._send_waits, self._eof_pending, self._on_dead = send_waits, eof_pending, on_dead
        self.ticking = False
        self.probing = False  # the READ probe is posted and not completed
        self.probes = 0  # READ probes posted (stats: "probes")

    def set_keepalive(self, interval: float) -> None:
        """Probe the peer after ``interval`` seconds of silence (0 turns it off)."""
        self.liveness.keepalive = interval
        self.update()

    def set_ack_timeout(self, seconds: float) -> None:
        """Declare the peer dead when a send stays unacknowledged this long (0: never)."""
        self.liveness.ack_timeout = seconds
        self.update()

    def update(self) -> None:
        """Tick while the watchdog or keepalive is on and the connection is not torn down."""
        want = self.liveness.active and not self._closed()
        if want != self.ticking:
            self.ticking = want
            if want:
                progress().add_ticker(self.tick)
            else:
                progress().remove_ticker(self.tick)

    def stop(self) -> None:
        """The connection is torn down: no more ticks."""
        progress().remove_ticker(self.tick)

    def _stalled(self) -> bool:
        """A sender waits for the peer: credits, the peer's read of a zero-copy buffer
        (nothing of ours is outstanding then either), or data queued without a credit."""
        conn = self.conn
        queued = self.sp.cork is not None or self._eof_pending() or conn.disconn_pending
        return self._send_waits() > 0 or conn.zcopy_outstanding \
            or (queued and not conn.data_credit_ok())

    def tick(self, now: float) -> None:
        """Completion thread, every TICK: act on the liveness verdict (``_liveness``).

        DEAD fails the connection with ECONNRESET, waking every waiter. PROBE posts a
        signaled KEEPALIVE frame if a credit and a send slot allow and no sender is
        stalled, else the credit-free one-byte RDMA READ (``_liveness.probe_means``).
        A sender waiting for credits or for the peer's read of a zero-copy buffer, or
        data queued without a credit, is "stalled": probed every ``probe_interval``
        (TCP's persist timer), so a peer that died after acknowledging our last frame is
        still found. Takes the connection only if nobody
        holds it: a user call in progress means traffic; while a READ probe is out it
        does so every tick, to poll its completion (nobody arms the send CQ for it).
        """
        if self._broken():
            self.ticking = False
            progress().remove_ticker(self.tick)
            return
        lv, conn, sp, lock = self.liveness, self.conn, self.sp, self.engine.lock
        lv.stalled = self._stalled()  # unlocked: a hint, judged again below as the owner
        verdict = lv.check(now)
        if (verdict is Verdict.OK and not self.probing) or not lock.lock(timeout=0):
            return
        try:
            # Completions may sit unpolled in an un-armed CQ (the owner polls, and nobody
            # was inside): look before judging the peer.
            self.engine.poll_all()
            lv.stalled = self._stalled()
            verdict = lv.check(now)
            if verdict is Verdict.OK or conn.error is not None:
                return
            if verdict is Verdict.DEAD:
                try:
                    host, port = _cm.peer_addr(self.cmid)[:2]
                    peer = f"{host}:{port}"
                except Exception:
                    peer = "the peer"
                self._fail(ConnectionReset(
                    errno.ECONNRESET, f"connection reset: no acknowledgement from the peer "
                    f"({peer}) for {lv.ack_timeout:g} s (peer or link down"
                    f"{'; a liveness probe went unanswered' if self.probing else ''})"))
                self._on_dead()
                return
            lv.probed(now)
            means = lv.probe_means(frame_ok=sp.has_slot() and conn.data_credit_ok())
            h = conn.keepalive_header() if means is Probe.FRAME else None
            if h is not None:
                sp.post_frame(h, None, control=True)
            elif means is Probe.READ and not self.probing:
                lv.posted(now, signaled=True)
                self.probing = True
                self.probes += 1
                try:
                    self.res.post_probe()
                except UsdpError:
                    self.probing = False
                    lv.unposted(signaled=True)
                    raise
        except UsdpError as exc:
            self._fail(exc)
        finally:
            lock.unlock()
