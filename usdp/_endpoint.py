"""One established usdp connection: verbs resources + sans-I/O ``Connection`` + ``ConnLock``.

This is where the pieces meet. Every access to the ``Connection`` and to the rings happens
while owning the connection's ``ConnLock``: user calls take it in process context, the
completion thread (``_progress``) takes it through the BH path, or only marks a CQ pending
when a user call owns it, in which case the user's unlock drains.

``drain`` is the one routine that empties a CQ. For each flagged CQ it polls until empty,
re-arms (``req_notify``), and polls once more: a completion that slipped in between the
last poll and the arm would otherwise wait for an event that will never come. Only the
owner of the lock drains, so a completion is never processed twice; a deferred event's
flag is consumed exactly once under the lock's mutex, and the CQ stays un-armed until that
drain, so none is lost.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import pyverbs.enums as e

from usdp import _cm
from usdp._connection import MAX_ZCOPY, Connection, State
from usdp._errors import (
    BrokenPipe,
    ConnectionReset,
    ProtocolError,
    RemoteAccessError,
    Timeout,
    UsdpError,
    WouldBlock,
)
from usdp._liveness import AckWatch, Verdict
from usdp._lock import ConnLock, CqPend
from usdp._progress import progress
from usdp._verbs import (
    READ_WR_ID,
    WC_FLUSH,
    WC_SUCCESS,
    QPResources,
    Ring,
    UserMR,
)
from usdp._wire import HEADER_SIZE, Header, Params, pack_header_into

log = logging.getLogger("usdp")

#: A recv_into buffer at least this big is registered and RDMA-read into directly;
#: smaller reads go through a bounce buffer (registration costs more than the copy).
DIRECT_READ_MIN = 64 * 1024
BOUNCE_SIZE = 1 << 20
POLL_BUDGET = 16  # completions per poll call (the kernel's own CQ poller uses 16)
_PEER_GONE_EVENTS = frozenset({
    _cm.EV.RDMA_CM_EVENT_DISCONNECTED, _cm.EV.RDMA_CM_EVENT_DEVICE_REMOVAL,
    _cm.EV.RDMA_CM_EVENT_CONNECT_ERROR, _cm.EV.RDMA_CM_EVENT_UNREACHABLE,
    _cm.EV.RDMA_CM_EVENT_REJECTED,
})
SEND = CqPend.SEND_CQ_PEND
RECV = CqPend.RECV_CQ_PEND


@dataclass
class EndpointStats:
    """Progress-engine counters (see ``SdpSocket.stats``)."""

    cq_polls: int = 0
    completions: int = 0
    recv_completions: int = 0
    send_completions: int = 0
    cm_events: int = 0
    zcopy_sends: int = 0
    zcopy_bytes_out: int = 0
    zcopy_reads: int = 0
    staged_frames: int = 0  # DATA frames filled while out of credits, posted later


class Readiness:
    """A real fd whose poll state follows the socket, for select/selectors/asyncio.

    One end of a Unix socketpair. *Readable* is made by writing a byte from the other end
    and cleared by reading it back. *Writable* is cleared by filling our send buffer (a
    stream socketpair stops being writable when the peer's queue holds our sndbuf's worth)
    and restored by draining the other end. Only state changes cost system calls.
    """

    def __init__(self) -> None:
        self.ours, self.other = socket.socketpair()
        for s in (self.ours, self.other):
            s.setblocking(False)
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # kernel minimum
        self.readable = False
        self.writable = True

    def fileno(self) -> int:
        return self.ours.fileno()

    def set(self, readable: bool, writable: bool) -> None:
        if readable != self.readable:
            if readable:
                self.other.send(b"r")
            else:
                _drain_socket(self.ours)
            self.readable = readable
        if writable != self.writable:
            if writable:
                _drain_socket(self.other)
            else:
                try:
                    while True:
                        self.ours.send(b"\0" * 4096)
                except BlockingIOError:
                    pass
            self.writable = writable

    def close(self) -> None:
        self.ours.close()
        self.other.close()


def _drain_socket(s: socket.socket) -> None:
    try:
        while s.recv(65536):
            pass
    except BlockingIOError:
        pass


class Endpoint:
    """An established connection's data path."""

    def __init__(self, cmid: Any, channel: _cm.Channel, res: QPResources, params: Params,
                 *, defer: bool = True, signal_every: int = 8,
                 zcopy_threshold: int = 0, ack_timeout: float = 0.0) -> None:
        self.cmid, self.channel, self.res = cmid, channel, res
        self.zcopy_threshold = zcopy_threshold if params.zcopy else 0
        self._read_status: int | None = None  # of the outstanding RDMA read, once done
        self.liveness = AckWatch(time.monotonic(), ack_timeout)  # see _tick
        self._ticking = False
        self._bounce: Ring | None = None
        self.conn = Connection(params)
        self.lock = ConnLock(self._drain, defer=defer, name=f"qp{res.qp_num}")
        self.stats = EndpointStats()
        self.free_send: deque[int] = deque(range(res.send_ring.count))
        self.inflight: deque[int] = deque()
        self.signal_every = max(1, min(signal_every, res.send_ring.count))
        self._unsignaled = 0
        self._stage: int | None = None  # a send slot holding DATA bytes not yet posted
        self._stage_len = 0
        self.peer_gone = False  # CM DISCONNECTED seen
        self._cm_gone_pending = False  # ... and not yet handled by a drain
        self.closing = False
        self.closed = False
        self.readiness: Readiness | None = None
        self._rsize = res.recv_ring.size
        self._ssize = res.send_ring.size
        self._rview = res.recv_ring.view
        self._sview = res.send_ring.view

    # ------------------------------------------------------------------ start / stop

    def start(self) -> None:
        """Arm both CQs, drain whatever already arrived, and hand the fds to the BH."""
        p = progress()
        with self.lock:
            self.res.send_cq.req_notify()
            self.res.recv_cq.req_notify()
            self._drain(SEND | RECV)
        p.register(self.res.send_fd, lambda: self._on_comp_event(SEND))
        p.register(self.res.recv_fd, lambda: self._on_comp_event(RECV))
        p.register(self.channel.fd, self._on_cm_event)
        self._update_ticker()

    def _on_comp_event(self, flag: CqPend) -> None:
        """BH: a completion channel fired (runs on the completion thread)."""
        if self.closed:
            return
        self.res.take_event(send=flag is SEND)
        # bh_event + drain + bh_unlock; if the drain raises, the flag is pending again.
        self.lock.bh_handle(flag, timeout=5.0)

    def _on_cm_event(self) -> None:
        """BH: the connection's own CM channel fired (DISCONNECTED, mostly)."""
        if self.closed:
            return
        ev = self.channel.get(0)
        self.stats.cm_events += 1
        if ev.type in _PEER_GONE_EVENTS:
            # The BH never sleeps behind a user call: record the event and go through the
            # lock's BH path for both CQs. Whoever drains (now, or the owner's unlock)
            # takes the completions still in the CQs first, then handles the disconnect.
            self._cm_gone_pending = True
            self.lock.bh_handle(SEND | RECV, timeout=5.0)
        else:
            log.debug("qp%d: CM event %s ignored", self.res.qp_num, ev.name)

    def _handle_peer_gone(self) -> None:
        """The peer disconnected (owner only, after both CQs were drained)."""
        self._cm_gone_pending = False
        self.peer_gone = True
        peer_closed = self.conn.state in (State.RD_CLOSED, State.CLOSED)
        if not self.closing and not self.conn.eof and self.conn.error is None \
                and not peer_closed:
            self.conn.fail(ConnectionReset(errno.ECONNRESET,
                                           "connection reset: peer disconnected"))
        self.res.to_error()

    # ------------------------------------------------------------------ draining

    def _drain(self, flags: CqPend) -> None:
        """Poll, re-arm, poll again (called only by the lock's owner)."""
        if self.closed:
            return
        # Send CQ first: when the QP fails, the cause (retries exhausted, a remote access
        # error on an RDMA read) is a send-queue completion, and the receive queue only
        # shows the flushes that follow; the first error latched is the one reported.
        if flags & SEND:
            self._drain_cq(self.res.send_cq, self._on_send_wc)
        if flags & RECV:
            self._drain_cq(self.res.recv_cq, self._on_recv_wc)
        if self._cm_gone_pending:
            self._handle_peer_gone()
        if self._stage is not None:
            self._flush_stage()  # posts only if a credit allows (never after an error)
        self._send_control()
        self._update_readiness()

    def _drain_cq(self, cq: Any, handle: Any) -> None:
        poll = self.res.poll
        st = self.stats
        while True:
            wcs = poll(cq, POLL_BUDGET)
            st.cq_polls += 1
            if len(wcs) < POLL_BUDGET:
                cq.req_notify()
                more = poll(cq, POLL_BUDGET)  # close the poll/arm race
                st.cq_polls += 1
                wcs.extend(more)
                if not more:
                    for wc in wcs:
                        handle(wc)
                    st.completions += len(wcs)
                    return
            for wc in wcs:
                handle(wc)
            st.completions += len(wcs)

    def _on_recv_wc(self, wc: Any) -> None:
        self.stats.recv_completions += 1
        if wc.status != WC_SUCCESS:
            if wc.status == WC_FLUSH:
                self._on_flush()
            else:
                self._fail(ConnectionReset(errno.ECONNRESET,
                                           f"receive failed (wc status {wc.status})"))
            return
        if self.conn.error is not None:
            return
        self.liveness.heard(time.monotonic())
        slot = wc.wr_id
        base = slot * self._rsize
        try:
            self.conn.on_frame(slot, self._rview[base : base + wc.byte_len])
        except ProtocolError as exc:
            log.error("qp%d: protocol error from peer, aborting the connection: %s",
                      self.res.qp_num, exc)
            self.abort()
            return
        self._repost()

    def _repost(self) -> None:
        free = self.conn.take_free_slots()
        if not free:
            return
        posted = 0
        try:
            for slot in free:
                self.res.post_recv(slot)
                posted += 1
        finally:
            self.conn.recv_reposted(posted)

    def _on_send_wc(self, wc: Any) -> None:
        self.stats.send_completions += 1
        self.liveness.completed(time.monotonic())
        if wc.wr_id == READ_WR_ID:
            self._read_status = wc.status
            if wc.status != WC_SUCCESS:
                self._fail(self._read_error(wc.status))
            return
        if wc.status == WC_FLUSH:
            self._on_flush()
        elif wc.status == e.IBV_WC_RETRY_EXC_ERR:
            # As a reset (the documented outcome of a dead peer), with the real reason.
            self._fail(ConnectionReset(errno.ECONNRESET, "connection reset: transport retries "
                                       "exhausted (peer or link down, or heavy loss or "
                                       "reordering on the link)"))
        elif wc.status != WC_SUCCESS:
            self._fail(ConnectionReset(errno.ECONNRESET,
                                       f"send failed (wc status {wc.status})"))
        # Sends complete in order: this one frees every unsignaled slot before it too.
        slot = wc.wr_id
        inflight = self.inflight
        while inflight:
            s = inflight.popleft()
            self.free_send.append(s)
            if s == slot:
                break

    def _on_flush(self) -> None:
        """A flushed WR is a consequence: the QP went to error for a reason found elsewhere
        (a send-queue completion, a CM disconnect, our own close). Look for the cause in
        the send CQ before calling it a reset, so the error reported is the real one."""
        if self.conn.error is not None or self.closing or self.peer_gone:
            return
        self._drain_cq(self.res.send_cq, self._on_send_wc)
        if self.conn.error is None and not self.peer_gone:
            self._fail(ConnectionReset(errno.ECONNRESET,
                                       "connection reset: the queue pair failed"))

    # ------------------------------------------------------------------ keepalive, watchdog

    def set_keepalive(self, interval: float) -> None:
        """Probe the peer after ``interval`` seconds of silence (0 turns it off)."""
        self.liveness.keepalive = interval
        self._update_ticker()

    def set_ack_timeout(self, seconds: float) -> None:
        """Declare the peer dead when a send stays unacknowledged this long (0: never)."""
        self.liveness.ack_timeout = seconds
        self._update_ticker()

    def _update_ticker(self) -> None:
        want = self.liveness.active and not self.closed
        if want != self._ticking:
            self._ticking = want
            if want:
                progress().add_ticker(self._tick)
            else:
                progress().remove_ticker(self._tick)

    def _tick(self, now: float) -> None:
        """Completion thread, every TICK: act on the liveness verdict (``_liveness``).

        DEAD fails the connection with ECONNRESET, waking every waiter; PROBE posts a
        signaled KEEPALIVE, unless credits or send slots lack (then the last send before
        they ran out was signaled, so the watchdog already covers it). Takes the
        connection only if nobody holds it: a user call in progress means traffic.
        """
        if self.closed or self.conn.error is not None or self.peer_gone:
            self._ticking = False
            progress().remove_ticker(self._tick)
            return
        verdict = self.liveness.check(now)
        if verdict is Verdict.OK or not self.lock.lock(timeout=0):
            return
        try:
            if verdict is Verdict.DEAD:
                self._fail(ConnectionReset(
                    errno.ECONNRESET, f"connection reset: no acknowledgement from the peer "
                    f"for {self.liveness.ack_timeout:g} s (peer or link down)"))
                self._update_readiness()
                return
            h = self.conn.keepalive_header() if self.free_send else None
            if h is not None:
                self.liveness.probed(now)
                self._post_frame(h, None, signal=True)
        except UsdpError as exc:
            self._fail(exc)
        finally:
            self.lock.unlock()

    def _fail(self, exc: UsdpError) -> None:
        log.debug("qp%d: %s", self.res.qp_num, exc)
        self.conn.fail(exc)
        self.res.to_error()

    # ------------------------------------------------------------------ sending

    def _post_frame(self, h: Header, payload: memoryview | None, *, signal: bool = False) -> None:
        slot = self.free_send.popleft()
        base = slot * self._ssize
        sview = self._sview
        pack_header_into(sview, base, h)
        n = HEADER_SIZE
        if payload is not None:
            n += len(payload)
            sview[base + HEADER_SIZE : base + n] = payload
        self._post_slot(slot, n, signal)

    def _post_slot(self, slot: int, n: int, signal: bool) -> None:
        """Post send slot ``slot`` (header and payload in place, ``n`` bytes)."""
        self._unsignaled += 1
        # Also signal the last send before a wait for slots or credits, so the watchdog
        # (_tick) covers a sender blocked behind a dead peer.
        signaled = signal or self._unsignaled >= self.signal_every or not self.free_send \
            or not self.conn.data_credit_ok()
        self.liveness.posted(time.monotonic(), signaled)
        if signaled:
            self._unsignaled = 0
        self.inflight.append(slot)
        try:
            self.res.post_send(slot, n, signaled)
        except UsdpError as exc:
            self.inflight.pop()
            self.free_send.appendleft(slot)
            self.liveness.unposted(signaled)
            self._fail(exc)
            raise

    def _send_control(self) -> None:
        """Send queued DISCONN / credit updates while a send slot is free."""
        while self.free_send and self.conn.error is None:
            frame = self.conn.next_control_frame()
            if frame is None:
                return
            h, payload = frame
            self._post_frame(h, memoryview(payload) if payload else None, signal=True)

    def writable(self) -> bool:
        """``send_some`` would take bytes now: to post (a credit and a slot), or to stage
        (a spare slot, or room left in the staged frame)."""
        if self._stage is not None:
            return self._stage_len < self.conn.max_payload
        return len(self.free_send) >= 2 or (bool(self.free_send) and self.conn.data_credit_ok())

    def can_take(self, nbytes: int) -> bool:
        """A blocking ``send_some`` of ``nbytes`` would take bytes now (see send_some)."""
        credit = self.conn.data_credit_ok()
        if self._stage is not None:
            return self._stage_len < self.conn.max_payload or credit
        if credit and self.free_send:
            return True
        return nbytes < self.conn.max_payload and len(self.free_send) >= 2

    def _flush_stage(self) -> None:
        """Post the staged DATA frame once a credit allows (owner only)."""
        slot = self._stage
        if slot is None or not self.conn.data_credit_ok():
            return
        self._stage = None
        n = self._stage_len
        base = slot * self._ssize
        pack_header_into(self._sview, base, self.conn.data_header(n))
        self._post_slot(slot, HEADER_SIZE + n, False)
        self.stats.staged_frames += 1

    def send_some(self, data: memoryview, timeout: float | None = None) -> int:
        """Post as much of ``data`` as credits and buffers allow now (owner only).

        At or above the zero-copy threshold the bytes are not copied: they are advertised
        (SrcAvail) and this returns once the peer has RDMA-read them (``timeout``).
        """
        # Not for non-blocking calls: a zero-copy send must wait for the peer's read.
        if self.zcopy_threshold and len(data) >= self.zcopy_threshold and timeout != 0.0:
            if self._stage is not None:  # staged bytes go first: the stream stays in order
                self.wait(lambda: self._stage is None or self.conn.error is not None
                          or self.peer_gone, timeout, "send")
                self.check_send()
            return self._send_zcopy(data, timeout)
        sent = 0
        maxp = self.conn.max_payload
        self._flush_stage()
        conn, free = self.conn, self.free_send
        if self._stage is None:
            while sent < len(data) and free and conn.data_credit_ok():
                n = min(maxp, len(data) - sent)
                self._post_frame(conn.data_header(n), data[sent : sent + n])
                sent += n
        # Out of credits with less than a frame to go: copy it into one staged frame, which
        # the drain that brings a credit posts (SDP's BCopy: a send returns once its bytes
        # are buffered). Small sends behind a full window then share frames instead of a
        # credit each. Whole frames of a blocking call just wait for credits; a
        # non-blocking call stages one frame (its readiness said writable). One slot stays
        # free for control frames.
        if sent < len(data) and conn.error is None \
                and (self._stage is not None or len(data) - sent < maxp or timeout == 0.0):
            if self._stage is None and len(free) >= 2:
                self._stage, self._stage_len = free.popleft(), 0
            if self._stage is not None:
                n = min(maxp - self._stage_len, len(data) - sent)
                if n > 0:
                    pos = self._stage * self._ssize + HEADER_SIZE + self._stage_len
                    self._sview[pos : pos + n] = data[sent : sent + n]
                    self._stage_len += n
                    sent += n
        if sent:
            self._send_control()
            self._update_readiness()
        return sent

    def _send_zcopy(self, data: memoryview, timeout: float | None) -> int:
        """SrcAvail -> the peer's RDMA read -> RdmaRdCompl; the buffer is ours again after.

        The registration with remote-read rights lives exactly as long as the transfer: the
        rkey is dead once this returns. A peer that does not answer within ``timeout``
        gets the connection aborted (the stream cannot be resumed consistently).
        """
        n = min(len(data), MAX_ZCOPY)
        mr = UserMR(self.res.dev, data[:n], e.IBV_ACCESS_REMOTE_READ)
        try:
            h, payload = self.conn.src_avail_frame(n, mr.rkey, mr.addr)
            self._post_frame(h, memoryview(payload), signal=True)
            self.stats.zcopy_sends += 1
            done = self.lock.wait(lambda: not self.conn.zcopy_outstanding
                                  or self.conn.error is not None or self.peer_gone, timeout)
            if not done:
                self._fail(Timeout(errno.ETIMEDOUT, "zero-copy send: the peer did not read "
                                   "the advertised buffer in time; connection aborted"))
                self.abort()
            self.check_send()
            if self.conn.zcopy_outstanding:
                raise BrokenPipe(errno.EPIPE, "peer disconnected during a zero-copy send")
            self.stats.zcopy_bytes_out += n
            return n
        finally:
            mr.close()

    def wait_writable(self, timeout: float | None, what: str, nbytes: int = 1) -> None:
        """Owner waits until ``send_some`` of ``nbytes`` can take bytes; raises the
        socket's errors. A wait caused by missing credits counts one credit stall."""
        self.check_send()
        ready = self.writable if timeout == 0.0 else lambda: self.can_take(nbytes)
        if self.free_send and not ready():
            self.conn.can_send_data()  # counts the stall
        self.wait(lambda: ready() or self.conn.error is not None or self.peer_gone,
                  timeout, what)
        self.check_send()
        if self.peer_gone:
            raise BrokenPipe(errno.EPIPE, "Broken pipe (peer disconnected)")

    def check_send(self) -> None:
        err = self.conn.error
        if err is not None:
            raise err
        if self.closing:
            raise BrokenPipe(errno.EPIPE, "socket is closing")

    # ------------------------------------------------------------------ receiving

    def recv_into(self, out: memoryview, timeout: float | None = None) -> int:
        """Copy queued bytes into ``out`` (owner only); 0 means EOF if ``conn.eof``."""
        if self.conn.head_is_remote:
            return self._recv_remote(out)
        chunks = self.conn.consume(len(out))
        pos = 0
        rview, rsize = self._rview, self._rsize
        for c in chunks:
            src = c.slot * rsize + c.offset
            out[pos : pos + c.length] = rview[src : src + c.length]
            pos += c.length
        if chunks:
            self._repost()
            self._send_control()
            self._update_readiness()
        return pos

    def _recv_remote(self, out: memoryview) -> int:
        """RDMA-read advertised bytes: straight into ``out`` when it is large, else through
        a registered bounce buffer and one copy."""
        direct = len(out) >= DIRECT_READ_MIN
        want = len(out) if direct else min(len(out), BOUNCE_SIZE)
        chunk = self.conn.consume_remote(want)
        assert chunk is not None
        dest: UserMR | None = None
        if direct:
            # Registered for this read only: a cached registration would have to keep the
            # caller's buffer exported (pinned), and a bytearray could then not be resized.
            dest = UserMR(self.res.dev, out[: chunk.length], e.IBV_ACCESS_LOCAL_WRITE)
            laddr, lkey = dest.addr, dest.lkey
        else:
            if self._bounce is None:
                self._bounce = Ring(self.res.dev, 1, BOUNCE_SIZE, e.IBV_ACCESS_LOCAL_WRITE)
            laddr, lkey = self._bounce.addr, self._bounce.lkey
        # The read itself is bounded by the watchdog (ack_timeout), not by the socket
        # timeout (which may be 0 for a non-blocking recv that found these bytes "ready").
        try:
            self.rdma_read(laddr, chunk.length, lkey, chunk.rkey, chunk.vaddr, None)
        finally:
            if dest is not None:
                dest.close()
        if not direct:
            assert self._bounce is not None
            out[: chunk.length] = self._bounce.view[: chunk.length]
        self.conn.remote_read_done(chunk)
        self.stats.zcopy_reads += 1
        self._send_control()
        self._update_readiness()
        return chunk.length

    def rdma_read(self, laddr: int, length: int, lkey: int, rkey: int, raddr: int,
                  timeout: float | None) -> None:
        """One RDMA read, waited for (owner only); failures latch and raise."""
        self._read_status = None
        self.res.post_read(laddr, length, lkey, rkey, raddr)
        self.liveness.posted(time.monotonic(), True)
        ok = self.lock.wait(lambda: self._read_status is not None
                            or self.conn.error is not None, timeout)
        if ok and self._read_status == WC_SUCCESS:
            return
        if self.conn.error is None:
            self._fail(Timeout(errno.ETIMEDOUT, "RDMA read timed out"))
        assert self.conn.error is not None
        raise self.conn.error

    def _read_error(self, status: int) -> UsdpError:
        exc: UsdpError
        if status == e.IBV_WC_REM_ACCESS_ERR:
            exc = RemoteAccessError(errno.EREMOTEIO, "RDMA read of the peer's advertised "
                                    "buffer failed: remote access error (bad rkey, address "
                                    "or length)")
        else:
            exc = ConnectionReset(errno.ECONNRESET, f"RDMA read failed (wc status {status})")
        log.error("qp%d: %s", self.res.qp_num, exc)
        return exc

    def recv_ready(self) -> bool:
        return self.conn.readable > 0 or self.conn.eof or self.conn.error is not None \
            or self.peer_gone

    # ------------------------------------------------------------------ waiting

    def wait(self, predicate: Any, timeout: float | None, what: str) -> None:
        """Owner waits (lock released meanwhile) until predicate; errors per socket rules."""
        if timeout == 0.0:
            if not predicate():
                raise WouldBlock(errno.EAGAIN, f"{what} would block")
            return
        if not self.lock.wait(predicate, timeout):
            raise Timeout(errno.ETIMEDOUT, f"timed out: {what}")

    # ------------------------------------------------------------------ readiness

    def readiness_fd(self) -> int:
        if self.readiness is None:
            with self.lock:
                self.readiness = Readiness()
                self._update_readiness()
        return self.readiness.fileno()

    def _update_readiness(self) -> None:
        r = self.readiness
        if r is None:
            return
        broken = self.conn.error is not None or self.peer_gone
        r.set(self.recv_ready() or broken, broken or self.writable())

    # ------------------------------------------------------------------ closing

    def shutdown_write(self, timeout: float | None) -> None:
        """Queue DISCONN (our EOF to the peer) and wait until it is posted."""
        if self.conn.error is not None or self.peer_gone:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._stage is not None:  # staged bytes go before our EOF
            self.lock.wait(lambda: self._stage is None or self.conn.error is not None
                           or self.peer_gone, timeout)
            if self._stage is not None:
                return
        try:
            self.conn.shutdown_write()
        except UsdpError:
            return
        self._send_control()
        self.lock.wait(lambda: not self.conn.disconn_pending or self.conn.error is not None
                       or self.peer_gone, None if deadline is None
                       else max(0.0, deadline - time.monotonic()))

    def abort(self) -> None:
        """Send ABORT (best effort) and latch the error (owner only)."""
        h = self.conn.abort_header()
        if h is not None and self.free_send:
            with contextlib.suppress(UsdpError):
                self._post_frame(h, None, signal=True)
        self._update_readiness()

    def close(self, linger: float) -> None:
        """Orderly close: DISCONN, wait for our sends to complete (bounded), tear down."""
        with self.lock:
            if self.closed:
                return
            if self.conn.error is None and not self.peer_gone:
                self.shutdown_write(linger)
                # Every posted send must complete before the QP goes, or queued bytes die
                # (the last frame, DISCONN, is always signaled, so inflight empties).
                self.lock.wait(lambda: not self.inflight or self.conn.error is not None
                               or self.peer_gone, linger)
            self.closing = True
        progress().call(self._destroy)

    def _destroy(self) -> None:
        """On the completion thread: unregister, disconnect, free everything."""
        if self.closed:
            return
        p = progress()
        p.remove_ticker(self._tick)
        for fd in (self.res.send_fd, self.res.recv_fd, self.channel.fd):
            p.unregister(fd)
        with self.lock:
            self.closed = True
            try:
                self.cmid.disconnect()
            except Exception:
                pass  # already disconnected by the peer
            self.res.to_error()
            if self.readiness is not None:
                self.readiness.set(True, True)
        self._rview = self._sview = memoryview(b"")
        if self._bounce is not None:
            self._bounce.close()
        self.res.close()
        try:
            self.cmid.close()
        except Exception as exc:
            log.debug("closing the CM id: %s", exc)
        self.channel.close()
        if self.readiness is not None:
            self.readiness.close()

    # ------------------------------------------------------------------ MSG_PEEK

    def peek_into(self, out: memoryview) -> int:
        """Copy queued bytes into ``out`` without consuming them (owner only; MSG_PEEK).

        Only bytes in our receive slots can be peeked. When the next bytes are behind a
        zero-copy SrcAvail (in the peer's memory, read by the RDMA read that consumes them)
        this raises EOPNOTSUPP rather than return 0, which would read as EOF; bytes before
        a SrcAvail are peeked as usual.
        """
        if self.conn.head_is_remote:
            raise UsdpError(errno.EOPNOTSUPP, "MSG_PEEK cannot look at zero-copy data "
                            "(the next bytes are still in the peer's memory)")
        pos = 0
        rview, rsize = self._rview, self._rsize
        for c in self.conn.peek(len(out)):
            src = c.slot * rsize + c.offset
            out[pos : pos + c.length] = rview[src : src + c.length]
            pos += c.length
        return pos
