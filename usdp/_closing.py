"""Closing one connection: our EOF, ``close`` and its background delivery, the teardown.

TCP's ``close`` returns at once and the kernel keeps delivering; usdp does that in the
process: a closed connection becomes an *orphan* (``_orphans``) that the completion thread
drives until our EOF is delivered, the peer is gone, or its background time runs out
(then it is aborted). The teardown itself runs on the completion thread and never waits
behind a user call. That state machine is a job of its own, apart from the data path in
``_endpoint``, which composes this class and delegates ``shutdown_write`` and ``close``.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

from usdp import _cm, _orphans
from usdp._connection import Connection
from usdp._engine import Engine
from usdp._errors import UsdpError
from usdp._progress import progress
from usdp._readiness import Readiness
from usdp._sendpath import SendPath
from usdp._ticker import LivenessTicker
from usdp._verbs import QPResources
from usdp._zcopy import Zcopy

log = logging.getLogger("usdp")


class Closer:
    """The closing half of one connection (see the module docstring).

    Args:
        res, conn, sendpath, engine, zcopy, ticker, cmid, channel: the connection's parts.
        abort: sends ABORT and latches the error (owner).
        update_readiness: sets the readiness fd from the connection's state (owner).
        repost: re-posts the receive slots that consumed bytes freed (owner).
        release_views: drops the endpoint's views of the receive slots (teardown).
        readiness: the readiness fd, if one was made.
        peer_gone: True once the CM reported the peer gone.
    """

    def __init__(self, res: QPResources, conn: Connection, sendpath: SendPath,
                 engine: Engine, zcopy: Zcopy, ticker: LivenessTicker, cmid: Any,
                 channel: _cm.Channel, *, abort: Callable[[], None],
                 update_readiness: Callable[[], None], repost: Callable[[], None],
                 release_views: Callable[[], None],
                 readiness: Callable[[], Readiness | None],
                 peer_gone: Callable[[], bool]) -> None:
        self.res, self.conn, self.sp, self.engine = res, conn, sendpath, engine
        self.zc, self.ticker, self.cmid, self.channel = zcopy, ticker, cmid, channel
        self.lock = engine.lock
        self._abort, self._update_readiness, self._repost = abort, update_readiness, repost
        self._release_views, self._readiness, self._peer_gone = \
            release_views, readiness, peer_gone
        self.closing = False  # close() was called: user calls fail with EBADF
        self.closed = False  # torn down (``destroy`` ran)
        self.orphaned = False  # closed by the user, still delivering (see ``close``)
        self.orphan_deadline = 0.0
        self.eof_pending = False  # shutdown(SHUT_WR) waits for the cork to go first

    # ------------------------------------------------------------------ our EOF

    def shutdown_write_owned(self) -> None:
        """``shutdown(SHUT_WR)`` (owner): see ``Endpoint.shutdown_write``."""
        if self.conn.error is not None or self._peer_gone():
            return
        self.eof_pending = True
        self.advance_eof()

    def advance_eof(self) -> None:
        """Post the cork, then queue DISCONN behind it, as far as credits allow (owner)."""
        if self.sp.cork is not None and not self.sp.flush_cork(force=True):
            return  # corked bytes go before our EOF: wait for a credit
        self.eof_pending = False
        try:
            self.conn.shutdown_write()
        except UsdpError:
            return
        self.sp.send_control()

    def eof_done(self) -> bool:
        """Our EOF is posted and every send has completed (or the connection broke)."""
        return (not self.eof_pending and not self.conn.disconn_pending
                and not self.sp.inflight) \
            or self.conn.error is not None or self._peer_gone() or self.closed

    def _wait_quiet(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait for ``predicate``; False on timeout instead of raising (close paths)."""
        try:
            self.engine.wait(predicate, timeout, "close")
        except (TimeoutError, BlockingIOError):
            return False
        return True

    # ------------------------------------------------------------------ close

    def close(self, linger: float | None, background: float) -> None:
        """``Endpoint.close`` (see there): abort, linger, or orphan, then tear down."""
        with self.lock:
            if self.closing or self.closed:
                return
            self.closing = True
            healthy = self.conn.error is None and not self._peer_gone()
            if healthy and (linger == 0 or self.conn.zcopy_outstanding):
                self._abort()
                healthy = False
            elif healthy:
                self.shutdown_write_owned()
                if linger:
                    self._wait_quiet(self.eof_done, linger)
            if healthy and not self.eof_done():
                self.orphaned = True
                self.orphan_deadline = time.monotonic() + background
                _orphans.add(self, self.orphan_deadline)
                # A weak reference: a timer must not keep a torn-down connection's
                # objects alive until its deadline (``_orphans`` holds it meanwhile).
                ref = weakref.ref(self)
                progress().schedule(self.orphan_deadline, lambda: _expire(ref))
                log.debug("qp%d: closed; delivering the rest in the background",
                          self.res.qp_num)
                return  # the leave hook arms now (eager): completions drive the rest
        try:
            progress().call(self.destroy)
        except TimeoutError:
            # The teardown stays queued; close() itself must not fail for it (nothing the
            # caller could do), but a completion thread this busy or stuck is worth a log.
            log.warning("qp%d: close: the completion thread has not run the teardown "
                        "within 30 s; it stays queued", self.res.qp_num)

    def orphan_step(self) -> None:
        """A closed connection after a drain (owner, mostly the completion thread): drop
        what the peer sent (nobody will read it, and its credits must flow back so that
        it can take our EOF), and tear down once our EOF is delivered or the peer gone."""
        if self.conn.readable and not self.conn.head_is_remote:
            self.conn.consume(self.conn.readable)
            self._repost()
            self.sp.send_control()
        if self.eof_done():
            self.orphaned = False
            progress().schedule(time.monotonic(), self.destroy)

    def orphan_expired(self) -> None:
        """Completion thread: the background delivery ran out of time: abort."""
        if self.closed or not self.orphaned:
            return
        if not self.lock.lock(timeout=0):
            progress().schedule(time.monotonic() + 0.01, self.orphan_expired)
            return
        try:
            log.warning("qp%d: closed connection still undelivered after its background "
                        "time; aborting it (the peer does not read)", self.res.qp_num)
            self._abort()
            self.orphaned = False
        finally:
            self.lock.unlock()
        self.destroy()

    def destroy(self) -> None:
        """On the completion thread: unregister, disconnect, free everything.

        Never waits behind a user call: a thread still inside (one woken by ``close`` on
        its way out) makes it try again a moment later.
        """
        if self.closed:
            return
        if not self.lock.lock(timeout=0):
            progress().schedule(time.monotonic() + 0.002, self.destroy)
            return
        try:
            self.closed = True
            self.engine.closed = True
            self.orphaned = False
            try:
                self.cmid.disconnect()
            except Exception:
                pass  # already disconnected by the peer
            self.res.to_error()
            readiness = self._readiness()
            if readiness is not None:
                readiness.set(True, True)
        finally:
            self.lock.unlock()
        p = progress()
        self.ticker.stop()
        for fd in (self.res.send_fd, self.res.recv_fd, self.channel.fd):
            p.unregister(fd)
        self._release_views()
        self.sp.release_views()
        self.zc.close()
        slow = _SlowSteps(self.res.qp_num)
        self.res.close()
        slow.done("destroying the QP, CQs and rings")
        try:
            self.cmid.close()
        except Exception as exc:
            log.debug("closing the CM id: %s", exc)
        slow.done("destroying the CM id")
        self.channel.close()
        readiness = self._readiness()
        if readiness is not None:
            readiness.close()
        _orphans.discard(self)


class _SlowSteps:
    """Logs a teardown step that blocked the completion thread for long (kernel calls:
    rxe waits for its tasks, the CM for its MADs), so that a stall names its step."""

    SLOW: float = 2.0

    def __init__(self, qp_num: int) -> None:
        self.qp_num, self.since = qp_num, time.monotonic()

    def done(self, step: str) -> None:
        now = time.monotonic()
        if now - self.since > self.SLOW:
            log.warning("qp%d: teardown: %s took %.1f s", self.qp_num, step, now - self.since)
        self.since = now


def _expire(ref: weakref.ref[Closer]) -> None:
    """A closed connection's background time ran out (if it still exists)."""
    closer = ref()
    if closer is not None:
        closer.orphan_expired()
