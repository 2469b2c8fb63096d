"""One established usdp connection, behind a narrow API: send, recv_into, close, stats.

This is where the parts of a connection meet:

* ``Connection`` (``_connection``): credits, sequence numbers, the receive queue (pure);
* ``Engine`` (``_engine``): the ``ConnLock`` and who polls, arms and sleeps;
* ``SendPath`` (``_sendpath``): send slots, signaling, solicitation, the cork;
* ``Zcopy`` (``_zcopy``): SrcAvail out, RDMA reads in;
* ``Readiness`` (``_readiness``): the fd that select/selectors/asyncio wait on;
* ``AckWatch`` (``_liveness``): the ack watchdog and keepalive decisions;
* ``LivenessTicker`` (``_ticker``): acts on those decisions every tick (probes, DEAD);
* ``Closer`` (``_closing``): our EOF, ``close``, the background delivery, the teardown.

Every access to the ``Connection`` and the rings happens while owning the connection's
``ConnLock``: user calls take it (``send``, ``recv_into``, ...), the completion thread takes
it through the lock's BH path or, when a user owns the connection or sleeps on it, only
marks a CQ pending for that user to drain. ``SdpSocket`` and ``usdp.asyncio`` use only the
public methods below and never touch the lock or the connection.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any

from usdp import _cm
from usdp._closing import Closer
from usdp._connection import Connection, State
from usdp._engine import BOTH, RECV, SEND, Engine
from usdp._errors import (
    BrokenPipe,
    ConnectionReset,
    ProtocolError,
    UsdpError,
    error_from_errno,
    from_wc,
)
from usdp._liveness import AckWatch
from usdp._progress import progress
from usdp._readiness import Readiness
from usdp._sendpath import SendPath
from usdp._signaling import SignalPolicy
from usdp._ticker import LivenessTicker
from usdp._verbs import PROBE_WR_ID, READ_WR_ID, WC_FLUSH, WC_SUCCESS, QPResources
from usdp._wire import Params
from usdp._zcopy import Zcopy

log = logging.getLogger("usdp")

_PEER_GONE_EVENTS = frozenset({
    _cm.EV.RDMA_CM_EVENT_DISCONNECTED, _cm.EV.RDMA_CM_EVENT_DEVICE_REMOVAL,
    _cm.EV.RDMA_CM_EVENT_CONNECT_ERROR, _cm.EV.RDMA_CM_EVENT_UNREACHABLE,
    _cm.EV.RDMA_CM_EVENT_REJECTED,
})
#: Corked sends between two polls of the CQs by a sending owner (the cork's flush needs
#: the completion of a signaled send; a sender that never waits must look for it).
CORK_POLL_EVERY = 16
#: Default most a wait busy-polls before sleeping (Options.busy_poll).
BUSY_POLL = 0.0002


class Endpoint:
    """An established connection's data path (see the module docstring)."""

    def __init__(self, cmid: Any, channel: _cm.Channel, res: QPResources, params: Params,
                 *, defer: bool = True, signal_every: int = 8,
                 zcopy_threshold: int = 0, ack_timeout: float = 0.0,
                 busy_poll: float = BUSY_POLL) -> None:
        self.cmid, self.channel, self.res = cmid, channel, res
        if params.peer_probe_rkey:  # else a zero-length READ (see Params)
            res.aim_probe(params.peer_probe_rkey, params.peer_probe_addr)
        self.zcopy_threshold = zcopy_threshold if params.zcopy else 0
        self.liveness = AckWatch(time.monotonic(), ack_timeout)  # see LivenessTicker
        self._send_waits = 0  # user calls waiting in _wait_writable (for the peer)
        self.conn = Connection(params)
        policy = SignalPolicy(every=max(1, min(signal_every,
                                               res.send_max + res.inline_slots)))
        self.sp = SendPath(res, self.conn, self.liveness, policy, fail=self._fail,
                           on_flush=self._on_flush)
        self.engine = Engine(
            res, defer=defer, solicited_only=params.solicited, busy_poll=busy_poll,
            on_send_wc=self._on_send_wc, on_recv_wc=self._on_recv_wc, after=self._after,
            send_events_needed=self._send_events_needed,
            sends_outstanding=lambda: self.sp.outstanding() or self.zc.reading,
            eager=lambda: self.readiness is not None or self.closer.orphaned,
            name=f"qp{res.qp_num}")
        self.lock = self.engine.lock
        self.zc = Zcopy(res, self.conn, self.sp, self.liveness,
                        wait=self._wait_bool, fail=self._fail, abort=self.abort,
                        peer_gone=lambda: self.peer_gone or self.closing)
        self.peer_gone = False  # CM DISCONNECTED seen
        self._cm_gone_pending = False  # ... and not yet handled by a drain
        self._flush_pending = False  # a flushed WR seen, its cause not yet judged
        self.rd_shut = False  # shutdown(SHUT_RD): recv returns what is queued, then 0
        self.readiness: Readiness | None = None
        self.ticker = LivenessTicker(
            res, self.conn, self.sp, self.engine, self.liveness, cmid, fail=self._fail,
            broken=self._broken, closed=lambda: self.closed,
            send_waits=lambda: self._send_waits,
            eof_pending=lambda: self.closer.eof_pending, on_dead=self._on_dead)
        self.closer = Closer(
            res, self.conn, self.sp, self.engine, self.zc, self.ticker, cmid, channel,
            abort=self.abort, update_readiness=self._update_readiness, repost=self._repost,
            release_views=self._release_views, readiness=lambda: self.readiness,
            peer_gone=lambda: self.peer_gone)
        self._recv_completions = 0
        self._send_completions = 0
        self._cm_events = 0
        self._corked_sends = 0
        self._sent_since_recv = True  # a user send since the last recv wait
        self._rviews = res.recv_views  # one view per receive slot; grows in place
        self._recv_growable = self.conn.ring_size < self.conn.ring_max

    # ------------------------------------------------------------------ start / stop

    def start(self) -> None:
        """Take whatever already arrived, arm, and hand the fds to the completion thread."""
        p = progress()
        p.register(self.res.send_fd, lambda: self.engine.on_fd(SEND), edge=True)
        p.register(self.res.recv_fd, lambda: self.engine.on_fd(RECV), edge=True)
        p.register(self.channel.fd, self._on_cm_event)
        with self.lock:
            self.engine.poll_all()
        self.ticker.update()

    def _on_cm_event(self) -> None:
        """Completion thread: the connection's own CM channel fired (DISCONNECTED, mostly)."""
        if self.closed:
            return
        ev = self.channel.get(0)
        self._cm_events += 1
        if ev.type in _PEER_GONE_EVENTS:
            # The completion thread never sleeps behind a user call: record the event and
            # go through the lock's BH path for both CQs. Whoever drains (now, the owner's
            # unlock, or a sleeper woken for it) takes the completions still in the CQs
            # first, then handles the disconnect.
            self._cm_gone_pending = True
            self.lock.bh_handle(BOTH, timeout=5.0, wake_sleepers=True)
        else:
            log.debug("qp%d: CM event %s ignored", self.res.qp_num, ev.name)

    def _send_events_needed(self) -> bool:
        """A send completion must wake someone even if nobody is inside: a cork or our
        EOF waits for it, a readiness-fd user may wait for writability, a closed
        connection delivers in the background, or an RDMA read is in flight (a
        non-blocking reader said EAGAIN and waits for its bytes)."""
        return self.sp.needs_completion() or self.closer.eof_pending or self.zc.reading \
            or ((self.readiness is not None or self.closer.orphaned)
                and bool(self.sp.inflight))

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

    # ------------------------------------------------------------------ completions

    def _after(self) -> None:
        """After completions were processed (owner): disconnect, cork, control, readiness."""
        if self.closer.eof_pending:
            self.closer.advance_eof()
        if self._cm_gone_pending:
            # Every frame the peer sent came before its disconnect: take them all (its
            # DISCONN among them) before judging EOF or reset. A drain of one CQ only, or
            # one that ran before the CM event was seen, is not enough.
            self.engine.poll_both()
            self._handle_peer_gone()
        if self._flush_pending:
            self._judge_flush()
        if self.sp.cork is not None:
            self.sp.flush_cork()  # posts only if due and a credit allows (never after an error)
        self.sp.send_control()
        self._update_readiness()
        if self.closer.orphaned:
            self.closer.orphan_step()

    def _on_recv_wc(self, wc: Any) -> None:
        self._recv_completions += 1
        if wc.status != WC_SUCCESS:
            if wc.status == WC_FLUSH:
                self._on_flush()
            else:
                self._fail(from_wc(wc.status, "receive"))
            return
        if self.conn.error is not None:
            return
        self.liveness.heard(time.monotonic())
        slot = wc.wr_id
        try:
            self.conn.on_frame(slot, self._rviews[slot][: wc.byte_len])
        except ProtocolError as exc:
            log.error("qp%d: protocol error from peer, aborting the connection: %s",
                      self.res.qp_num, exc)
            self.abort()
            return
        self._repost()

    def _grow_recv(self) -> None:
        """Register and post more receive slots if the peer is using the whole window
        (``Connection.recv_growth``); they become credits as re-posted slots do. A
        refused growth (budget, registration) is not retried on this connection."""
        want = self.conn.recv_growth()
        if not want:
            return
        slots = self.res.grow_recv(want)
        if slots:
            posted = 0
            try:
                for slot in self.conn.add_recv_slots(len(slots)):
                    self.res.post_recv(slot)
                    posted += 1
            finally:
                self.conn.recv_reposted(posted)
        self._recv_growable = bool(slots) and self.conn.ring_size < self.conn.ring_max

    def _repost(self) -> None:
        if self._recv_growable:
            self._grow_recv()
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
        self._send_completions += 1
        if wc.wr_id == PROBE_WR_ID:
            # The liveness probe: answered by the peer's HCA (SUCCESS). Flushed when the
            # QP went to error for a reason found elsewhere (our close, a reset): never a
            # cause of its own (``_on_flush`` looks for the cause, and says nothing once
            # we are closing). Any other status fails the connection as a send's does
            # (the QP is in error by now anyway), unless an error is latched already.
            self.ticker.probing = False
            self.liveness.completed(time.monotonic())
            if wc.status == WC_FLUSH:
                self._on_flush()
            elif wc.status != WC_SUCCESS and self.conn.error is None and not self.closed:
                self._fail(from_wc(wc.status, "liveness probe (RDMA read)"))
            return
        if wc.wr_id == READ_WR_ID:
            self.liveness.completed(time.monotonic())
            self.zc.on_read_wc(wc)
            return
        self.sp.on_send_wc(wc)

    def _on_flush(self) -> None:
        """A flushed WR is a consequence: the QP went to error for a reason found elsewhere
        (an error completion in either CQ, a CM disconnect, our own close). It is judged
        in ``_after``, once every completion taken from the CQs so far was handled: the
        cause may sit later in the same polled batch, or in the other CQ (a responder-side
        error shows in the receive CQ), and the error reported must be the real one."""
        if self.conn.error is None and not self.closing and not self.peer_gone:
            self._flush_pending = True

    def _judge_flush(self) -> None:
        """No cause seen yet for a flush: look in both CQs, then call it a reset."""
        self._flush_pending = False
        if self.conn.error is not None or self.closing or self.peer_gone:
            return
        self.engine.poll_both()
        self._flush_pending = False
        if self.conn.error is None and not self.peer_gone and not self._cm_gone_pending:
            self._fail(ConnectionReset(errno.ECONNRESET,
                                       "connection reset: the queue pair failed"))

    def _fail(self, exc: UsdpError) -> None:
        log.debug("qp%d: %s", self.res.qp_num, exc)
        self.conn.fail(exc)
        self.res.to_error()

    # ------------------------------------------------------------------ keepalive, watchdog

    def set_keepalive(self, interval: float) -> None:
        """Probe the peer after ``interval`` seconds of silence (0 turns it off)."""
        self.ticker.set_keepalive(interval)

    def set_ack_timeout(self, seconds: float) -> None:
        """Declare the peer dead when a send stays unacknowledged this long (0: never)."""
        self.ticker.set_ack_timeout(seconds)

    def set_nodelay(self, on: bool) -> None:
        """``TCP_NODELAY``: no auto-cork; a cork already open goes out with the next send."""
        self.sp.nodelay = on

    def set_busy_poll(self, seconds: float) -> None:
        """``SO_BUSY_POLL``: the most a blocking call busy-polls before it sleeps."""
        self.engine.busy_poll = max(0.0, seconds)

    def _on_dead(self) -> None:
        """The ticker declared the peer dead and failed the connection (owner)."""
        self._update_readiness()
        if self.closer.orphaned:
            self.closer.orphan_step()

    # ------------------------------------------------------------------ sending

    def send(self, data: memoryview, timeout: float | None) -> int:
        """``socket.send``: take some of ``data``; a blocking call takes at least a byte."""
        with self.lock:
            try:
                while True:
                    self._wait_writable(timeout, "send", len(data))
                    n = self._send_some(data, timeout)
                    if n or timeout == 0.0:
                        return n
            except OSError as exc:
                raise self._closed_instead(exc, "sending") from exc

    def sendall(self, data: memoryview, timeout: float | None) -> None:
        """``socket.sendall``: take all of ``data`` (``timeout`` bounds each wait)."""
        sent = 0
        with self.lock:
            try:
                while sent < len(data):
                    self._wait_writable(timeout, "sendall", len(data) - sent)
                    sent += self._send_some(data[sent:], timeout)
                    if sent < len(data) and self.lock.has_waiters:
                        self.lock.relock()  # SDP_CONN_RELOCK: let a waiting thread in
            except OSError as exc:
                raise self._closed_instead(exc, "sending") from exc

    def _closed_instead(self, exc: OSError, what: str) -> OSError:
        """The error a call gets: EBADF if the socket was closed under it (by another
        thread, as Linux reports a call on a closed fd), else ``exc`` itself."""
        if self.closing and exc.errno != errno.EBADF:
            return error_from_errno(errno.EBADF, f"socket closed while {what}")
        return exc

    def _send_some(self, data: memoryview, timeout: float | None) -> int:
        """Post, cork or zero-copy as much of ``data`` as possible now (owner only)."""
        # Not for non-blocking calls: a zero-copy send must wait for the peer's read.
        if self.zcopy_threshold and len(data) >= self.zcopy_threshold and timeout != 0.0:
            if self.sp.cork is not None:  # corked bytes go first: the stream stays in order
                self.wait(lambda: self.sp.cork is None or self._stopped(), timeout, "send")
                self._check_send()
            # Posting the cork may have spent the credits the SrcAvail needs (likelier
            # with a peer ring that starts small): wait for them and a slot.
            self.wait(lambda: (self.conn.data_credit_ok() and self.sp.has_slot())
                      or self._stopped(), timeout, "send")
            self._check_send()
            return self.zc.send(data, timeout)
        self._sent_since_recv = True
        n = self.sp.send_bcopy(data, timeout == 0.0)
        if self.sp.cork is not None:
            self._corked_sends += 1
            if self._corked_sends % CORK_POLL_EVERY == 0:
                self.engine.poll_all()  # the completion that flushes the cork
        if n:
            self.sp.send_control()
            self._update_readiness()
        return n

    def _wait_writable(self, timeout: float | None, what: str, nbytes: int = 1) -> None:
        """Owner waits until ``_send_some`` of ``nbytes`` can take bytes; raises the
        socket's errors. A wait caused by missing credits counts one credit stall."""
        self._check_send()
        sp = self.sp
        ready = sp.writable if timeout == 0.0 else lambda: sp.can_take(nbytes)
        if ready():
            return
        if sp.has_slot():
            self.conn.can_send_data()  # counts the stall
        # A writer waiting for credits or slots is throughput-bound: it naps. While it
        # waits for the peer, the ticker probes the peer (``LivenessTicker``: stalled).
        self._send_waits += 1
        try:
            self.engine.wait(lambda: ready() or self._stopped(), timeout, what, nap=True)
        finally:
            self._send_waits -= 1
        self._check_send()
        if self.peer_gone:
            raise BrokenPipe(errno.EPIPE, "Broken pipe (peer disconnected)")

    def _broken(self) -> bool:
        """The connection can carry nothing more (error, peer gone, torn down)."""
        return self.conn.error is not None or self.peer_gone or self.closed

    def _stopped(self) -> bool:
        """A user call must stop waiting: the connection broke or the socket was closed."""
        return self.closing or self._broken()

    def _check_send(self) -> None:
        if self.closing:
            raise error_from_errno(errno.EBADF, "socket closed while sending")
        err = self.conn.error
        if err is not None:
            raise err

    # ------------------------------------------------------------------ receiving

    def recv_into(self, out: memoryview, timeout: float | None) -> int:
        """``socket.recv_into``: wait for bytes, EOF or an error; 0 means EOF."""
        with self.lock:
            try:
                if not self._recv_ready():
                    # A reader that sent nothing since its last wait is reading a stream
                    # (throughput: nap); one that did is waiting for a reply (latency: no
                    # nap).
                    nap, self._sent_since_recv = not self._sent_since_recv, False
                    self.engine.wait(self._recv_ready, timeout, "recv", nap=nap)
                if self.closing:
                    raise error_from_errno(errno.EBADF, "socket closed while receiving")
                if self.conn.readable:
                    return self._recv_some(out, timeout)
                return self._recv_end()
            except OSError as exc:
                raise self._closed_instead(exc, "receiving") from exc

    def _recv_end(self) -> int:
        """Nothing queued and the wait is over: 0 (EOF, SHUT_RD) or the latched error."""
        err = self.conn.error
        if err is not None and not self.conn.eof and not self.rd_shut:
            raise err
        return 0  # EOF, shutdown(SHUT_RD), or peer gone after an orderly close

    def _recv_some(self, out: memoryview, timeout: float | None) -> int:
        """Copy queued bytes into ``out`` (owner only). Zero-copy bytes at the head are
        ``Zcopy.recv_remote``'s: with ``timeout`` 0 it raises WouldBlock rather than wait
        for an RDMA read."""
        if self.conn.head_is_remote:
            try:
                n = self.zc.recv_remote(out, timeout)
                self.sp.send_control()  # RdmaRdCompl, once the last read is done
            finally:
                self._update_readiness()
            if n:
                return n
            # Another thread's read took the zero-copy bytes while this one waited.
            self.engine.wait(self._recv_ready, timeout, "recv")
            if self.closing:
                raise error_from_errno(errno.EBADF, "socket closed while receiving")
            if self.conn.head_is_remote:
                return self._recv_some(out, timeout)
            if not self.conn.readable:
                err = self.conn.error
                if err is not None:
                    raise err
                return 0  # EOF
        chunks = self.conn.consume(len(out))
        pos = 0
        rviews = self._rviews
        for c in chunks:
            off = c.offset
            out[pos : pos + c.length] = rviews[c.slot][off : off + c.length]
            pos += c.length
        if chunks:
            self._repost()
            self.sp.send_control()
            self._update_readiness()
        return pos

    def _recv_ready(self) -> bool:
        return self.conn.readable > 0 or self.conn.eof or self.rd_shut or self._stopped()

    # ------------------------------------------------------------------ waiting

    def wait(self, predicate: Any, timeout: float | None, what: str) -> None:
        """Owner waits (polling, then sleeping on the fds) until ``predicate()``; raises
        ``WouldBlock`` (timeout 0) or ``Timeout``."""
        self.engine.wait(predicate, timeout, what)

    def _wait_bool(self, predicate: Any, timeout: float | None) -> bool:
        try:
            self.engine.wait(predicate, timeout, "zero-copy")
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------------ readiness

    def fileno(self) -> int:
        """The readiness fd (created on first use; from then on CQs are armed eagerly)."""
        if self.readiness is None:
            with self.lock:
                self.readiness = Readiness()
                self._update_readiness()
        return self.readiness.fileno()

    def _update_readiness(self) -> None:
        """Set the readiness fd (owner only). Zero-copy bytes that are not here yet do not
        make it readable (a recv would only say EAGAIN, and an event loop would spin):
        their RDMA read is started here, and its completion, which wakes the completion
        thread (``_send_events_needed``), comes back here and turns the fd readable."""
        r = self.readiness
        if r is None:
            return
        broken = self.conn.error is not None or self.peer_gone
        if not broken and not self.closing:
            try:
                self.zc.start_staged_read()
            except UsdpError:
                broken = True  # latched by Zcopy: the next recv raises it
        readable = self._recv_ready() and not self.zc.waiting_on_remote
        r.set(readable or broken, broken or self.sp.writable())

    # ------------------------------------------------------------------ state, stats

    @property
    def error(self) -> UsdpError | None:
        """The latched error (``SO_ERROR``), if any."""
        return self.conn.error

    def stats(self) -> dict[str, int]:
        """Counters of the progress engine, the lock and the protocol."""
        ls = self.lock.stats()
        es = self.engine.stats
        cs = self.conn.stats
        return {
            "channel_events": es.cq_events,
            "bh_events": ls.events,
            "drains_deferred": ls.deferred,
            "drains_bh": ls.bh_drains,
            "drains_unlock": ls.unlock_drains,
            "bh_waits": ls.bh_waits,
            "arms": es.arms,
            "busy_polls": es.busy_polls,
            "sleeps": es.sleeps,
            "naps": es.naps,
            "arm_timers": es.arm_timers,
            "zcopy_sends": self.zc.sends,
            "zcopy_bytes_out": self.zc.bytes_out,
            "zcopy_reads": self.zc.reads,
            "staged_frames": self.sp.cork_frames,
            "local_recv_bufs": self.conn.params.local_recv_bufs,
            "peer_recv_bufs": self.conn.params.peer_recv_bufs,
            # Rings that grow with use (docs/design.md, "Memory per connection").
            "registered_bytes": self.res.registered_bytes,
            "recv_slots": self.conn.ring_size,
            "recv_slots_max": self.conn.ring_max,
            "peer_recv_bufs_max": self.conn.peer_ring_max,
            "send_slots": self.res.send_slots,
            "send_slots_max": self.res.send_max,
            "inline_slots": self.res.inline_slots,
            "cq_polls": es.cq_polls,
            "completions": es.completions,
            "recv_completions": self._recv_completions,
            "send_completions": self._send_completions,
            "cm_events": self._cm_events,
            "credit_stalls": cs.credit_stalls,
            "probes": self.ticker.probes,
            "credit_updates_sent": cs.credit_updates_sent,
            "frames_in": cs.frames_in,
            "frames_out": cs.frames_out,
            "bytes_in": cs.bytes_in,
            "bytes_out": cs.bytes_out,
        }

    # ------------------------------------------------------------------ closing

    def shutdown_write(self) -> None:
        """``shutdown(SHUT_WR)``: our EOF goes to the peer after every byte already taken.

        Never waits, as TCP's does not: corked bytes and DISCONN go out as credits allow,
        posted by whoever drains next (this thread's later calls, or the completion
        thread, which the leave hook arms for it).
        """
        with self.lock:
            self.closer.shutdown_write_owned()

    def abort(self) -> None:
        """Send ABORT (best effort) and latch the error (owner only)."""
        h = self.conn.abort_header()
        if h is not None and self.sp.has_slot():
            try:
                self.sp.post_frame(h, None, control=True)
            except UsdpError:
                pass
        self._update_readiness()

    def shutdown_read(self) -> None:
        """``shutdown(SHUT_RD)``: ``recv`` returns the bytes already queued, then 0 without
        waiting, as Linux's does; a thread blocked in ``recv`` wakes up with 0."""
        with self.lock:
            self.rd_shut = True
            self._update_readiness()

    def close(self, linger: float | None = None, background: float = 30.0) -> None:
        """Close the socket; the connection delivers what was taken, then our EOF.

        As TCP's ``close``, it does not wait by default (``linger`` None, ``SO_LINGER``
        off): the queued bytes and DISCONN go out in the background, the completion thread
        owning the connection until every send has completed or the peer is gone, for at
        most ``background`` seconds (then it is aborted, as Linux kills an orphan socket).
        ``linger`` 0 (``SO_LINGER`` on with 0 s) aborts at once: ABORT, the peer's next
        call sees ECONNRESET, as with a TCP RST. ``linger`` > 0 waits up to that long for
        the delivery, then goes on in the background. Threads blocked in this connection's
        calls wake up with EBADF; a zero-copy send in progress aborts the connection (its
        buffer is the caller's and must not stay exported).
        """
        self.closer.close(linger, background)

    @property
    def closing(self) -> bool:
        """``close`` was called: user calls fail with EBADF."""
        return self.closer.closing

    @property
    def closed(self) -> bool:
        """Torn down (``Closer.destroy`` ran)."""
        return self.closer.closed

    def _release_views(self) -> None:
        self._rviews = []

    # ------------------------------------------------------------------ MSG_PEEK

    def peek(self, out: memoryview, timeout: float | None, *, waitall: bool = False) -> int:
        """``recv(MSG_PEEK)``: wait as ``recv_into`` does (with ``waitall`` until
        ``len(out)`` bytes are queued), then copy without consuming; 0 means EOF."""
        want = len(out)

        def ready() -> bool:
            if waitall:
                return self.conn.readable >= want or self.conn.eof or self.rd_shut \
                    or self._stopped()
            return self._recv_ready()

        with self.lock:
            try:
                self.engine.wait(ready, timeout, "recv")
                if self.closing:
                    raise error_from_errno(errno.EBADF, "socket closed while receiving")
                if self.conn.readable:
                    return self.peek_into(out)
                return self._recv_end()
            except OSError as exc:
                raise self._closed_instead(exc, "receiving") from exc

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
        rviews = self._rviews
        for c in self.conn.peek(len(out)):
            off = c.offset
            out[pos : pos + c.length] = rviews[c.slot][off : off + c.length]
            pos += c.length
        return pos

