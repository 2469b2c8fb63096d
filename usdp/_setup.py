"""Connection setup: the Hello/HelloAck handshake over RDMA CM, with the verbs resources.

Active side: resolve address and route, create the QP, post every receive, connect with a
Hello in the private data, and on CONNECT_RESPONSE (HelloAck) move the QP to RTS and send
the RTU (``establish``). Passive side: on CONNECT_REQUEST validate the Hello, move the id to
its own event channel, create the QP, post every receive, go to RTS and accept with a
HelloAck; a bad Hello is rejected with a reason the active side turns into an error.
Receives are posted before our Hello/HelloAck leaves, because the buffers it advertises are
the peer's first credits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from usdp import _cm, _fork
from usdp._budget import BUDGET, default_budget
from usdp._config import Options
from usdp._endpoint import Endpoint
from usdp._errors import (
    HandshakeError,
    Timeout,
    UsdpError,
    WouldBlock,
    with_context,
)
from usdp._readiness import Readiness
from usdp._verbs import QPS_INIT, QPS_RTR, QPS_RTS, Device, QPResources
from usdp._wire import (
    HEADER_SIZE,
    MAX_REJECT_TEXT,
    MIN_RECV_BUFS,
    Features,
    HandshakeKind,
    Hello,
    Reject,
    RejectReason,
    decode_hello,
    error_from_reject,
    negotiate,
)

log = logging.getLogger("usdp")


def _hello(opts: Options, kind: HandshakeKind, posted: int) -> Hello:
    """Our Hello: ``posted`` receive slots now (the peer's first credits), growing up to
    ``opts.recv_bufs`` if the peer offers GROW (docs/protocol.md)."""
    # Every usdp peer can *receive* zero-copy (it costs nothing until a SrcAvail comes);
    # whether it *sends* that way is its own zcopy_threshold.
    return Hello(kind, posted, opts.recv_buf_size, opts.recv_buf_size,
                 Features.ZCOPY | Features.SOLICIT | Features.GROW,
                 max_recv_bufs=opts.recv_bufs)


def _offering_probe(hello: Hello, res: QPResources) -> Hello:
    """``hello`` offering our probe page's byte for the peer's liveness probe to read (known
    only once the resources exist)."""
    return dataclasses.replace(hello, probe_rkey=res.probe_rkey, probe_addr=res.probe_addr)


def _dev_name(cmid: Any) -> str:
    name = cmid.dev_name
    return name.decode() if isinstance(name, bytes) else str(name)


class _BudgetedResources(QPResources):
    """QPResources whose rings are counted in the process's registered-memory budget,
    growth included (a refused growth just does not happen); ``close`` (called by the
    endpoint's teardown, or on a failed setup) gives every byte back."""

    def __init__(self, dev: Device, *, nbytes: int, limit: int, recv_count: int,
                 recv_size: int, send_count: int, send_size: int, recv_max: int,
                 send_max: int) -> None:
        self._reserved = nbytes  # before super(): its failure path calls close()
        self._limit = limit
        super().__init__(dev, recv_count=recv_count, recv_size=recv_size,
                         send_count=send_count, send_size=send_size, recv_max=recv_max,
                         send_max=send_max)

    def admit(self, nbytes: int) -> bool:
        try:
            BUDGET.reserve(nbytes, self._limit, "growing a ring")
        except UsdpError:
            return False
        self._reserved += nbytes
        return True

    def unadmit(self, nbytes: int) -> None:
        self._reserved -= nbytes
        BUDGET.release(nbytes)

    def close(self) -> None:
        try:
            super().close()
        finally:
            n, self._reserved = self._reserved, 0
            if n:
                BUDGET.release(n)


#: Receive slots a connection starts with when its ring may grow: the protocol's minimum
#: (``MIN_RECV_BUFS``: data flows with the last credit reserved). 4 x 64 KiB = 256 KiB,
#: and no registered send slot at first (small frames go inline), is what an idle
#: connection pins.
RECV_INITIAL = MIN_RECV_BUFS


def _resources(cmid: Any, opts: Options, send_size: int, what: str, *,
               recv_initial: int) -> QPResources:
    """Our rings, sized by our own Options: receive slots of ``opts.recv_buf_size`` and
    send slots of ``send_size``, the largest frame we will send (negotiated, so at most our
    own slot size whatever the peer's Hello claims). They start with ``recv_initial``
    receive slots and no registered send slot, and may grow to ``opts.recv_bufs`` and
    ``opts.send_bufs`` (the QP and CQs are sized for that at once).

    Raises:
        UsdpError: ENOBUFS if the budget (``Options.mr_budget``) would be exceeded, or the
            verbs error (ENOMEM, RLIMIT_MEMLOCK) of a failed registration.
    """
    dev = Device.get(_dev_name(cmid))
    recv_initial = min(recv_initial, opts.recv_bufs)
    nbytes = recv_initial * opts.recv_buf_size
    limit = opts.mr_budget or default_budget()
    BUDGET.reserve(nbytes, limit, what)
    # On failure QPResources' constructor closes what it made, which releases the bytes.
    return _BudgetedResources(dev, nbytes=nbytes, limit=limit, recv_count=recv_initial,
                              recv_size=opts.recv_buf_size, send_count=0,
                              send_size=send_size, recv_max=opts.recv_bufs,
                              send_max=opts.send_bufs)


def _post_all(res: QPResources) -> None:
    for slot in range(res.recv_slots):
        res.post_recv(slot)


def connect(dst: _cm.SockAddr, src: str | None, opts: Options,
            timeout: float | None) -> Endpoint:
    """Open a connection to a usdp listener at ``dst``.

    Every error names ``host:port`` and the failing step: resolve address, resolve route,
    create the queue pair, connect, handshake.
    """
    step = opts.handshake_timeout if timeout is None else timeout
    deadline = time.monotonic() + step
    at = f"{dst[0]}:{dst[1]}"
    chan = _cm.Channel(f"connect to {at}: open the RDMA connection manager")
    cmid = None
    res = None
    try:
        cmid = _cm.new_id(chan)
        _cm.resolve(cmid, chan, dst, src, deadline)
        # Send slots must hold our largest frame. We learn the peer's slot size only from
        # the HelloAck, but negotiate() caps frames at min(peer slot, our max_msg), and
        # our max_msg is our own slot size: that bound is known now.
        with _step(f"connect to {at}: create the queue pair"):
            # We learn only from the HelloAck whether the server lets our ring grow: start
            # small (an older server then keeps us at RECV_INITIAL slots).
            res = _resources(cmid, opts, opts.recv_buf_size, f"connecting to {at}",
                             recv_initial=RECV_INITIAL)
            res.modify(cmid, QPS_INIT)
            _post_all(res)
        hello = _offering_probe(_hello(opts, HandshakeKind.HELLO, res.recv_slots), res)
        param = _cm.conn_param(res.qp_num, hello.encode(), accept=False)
        _cm.cm_call(f"connect to {at}", cmid.connect, param)
        ev = _cm.expect(chan, None, deadline, f"connect to {at}")
        if ev.type == _cm.EV.RDMA_CM_EVENT_REJECTED:
            raise error_from_reject(ev.private_data, f"connect to {at}")
        if ev.type != _cm.EV.RDMA_CM_EVENT_CONNECT_RESPONSE:
            raise _cm.event_error(ev, f"connect to {at}")
        with _step(f"connect to {at}: handshake"):
            peer = decode_hello(ev.private_data, expect_kind=HandshakeKind.HELLO_ACK)
            params = negotiate(hello, peer)
            res.modify(cmid, QPS_RTR)
            res.modify(cmid, QPS_RTS)
            _cm.cm_call("establish", cmid.establish)
        ep = Endpoint(cmid, chan, res, params, defer=opts.defer, signal_every=opts.signal_every,
                      zcopy_threshold=opts.zcopy_threshold, ack_timeout=opts.ack_timeout,
                      busy_poll=opts.busy_poll)
        ep.start()
        _fork.track(ep)
        return ep
    except BaseException:
        if res is not None:
            res.close()
        if cmid is not None:
            with contextlib.suppress(Exception):
                cmid.close()
        chan.close()
        raise


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """Errors raised inside name the step (and host:port) they happened in."""
    try:
        yield
    except UsdpError as exc:
        raise with_context(exc, what) from exc


class Listener:
    """A bound, listening CM id that completes handshakes in the background.

    As a TCP listener: a thread of the listener's own answers each Hello as it arrives,
    up to ``backlog`` established connections waiting for ``accept``; a client therefore
    connects before the server calls ``accept()``. Not the completion thread: a burst of
    handshakes (rings to map and register, QP transitions) would hold up every
    connection's completions, and the ack watchdog would then take that delay for a dead
    peer. Beyond the backlog a Hello gets ``Reject(BACKLOG)`` (the client
    sees ECONNREFUSED). ``fileno()`` is readable exactly while an established connection
    waits. ``close`` aborts the connections nobody accepted (their clients see a reset).
    """

    def __init__(self, addr: _cm.SockAddr, backlog: int, opts: Options, family: int) -> None:
        self.opts = opts
        self.backlog = max(1, backlog)
        self._cond = threading.Condition()
        self._queue: deque[tuple[Endpoint, _cm.SockAddr]] = deque()
        self._closed = False
        self.spurious_wakeups = 0  # readiness of the CM channel with no event behind it
        self.chan = _cm.Channel(f"listen on {addr[0]}:{addr[1]}: open the RDMA "
                                "connection manager")
        self.cmid: Any = None
        try:
            self.cmid = _cm.new_id(self.chan)
            _cm.bind_listen(self.cmid, addr, backlog, family)
            self.addr = _cm.local_addr(self.cmid)
            self.readiness = Readiness()
        except BaseException:
            # The id before its channel: left to the GC, it would be destroyed after the
            # channel and pyverbs would print "Failed to close CMID" (EBADF).
            if self.cmid is not None:
                _close_quietly(self.cmid)
            self.chan.close()
            raise
        self.readiness.set(False, False)  # a listener is never writable, as TCP's
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        _fork.track(self)
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"usdp-listen-{self.addr[1]}")
        self._thread.start()

    def fileno(self) -> int:
        return self.readiness.fileno()

    def _where(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    # ------------------------------------------------------------------ listener thread

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.chan.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            for fd, _mask in poller.poll():
                cmds = b""
                if fd != self.chan.fd:
                    with contextlib.suppress(BlockingIOError):
                        cmds = os.read(self._wake_r, 64)
                    if b"s" in cmds:
                        return
                if fd == self.chan.fd or b"p" in cmds:  # poke(): as if it were ready
                    try:
                        self._on_cm_ready()
                    except Exception:  # the listener itself must never stop
                        log.exception("listener %s: CM event handling failed", self._where())

    def poke(self) -> None:
        """Run the event handler once on the listener thread, whether or not an event is
        pending: a spurious wake-up on demand (tests)."""
        os.write(self._wake_w, b"p")

    def _on_cm_ready(self) -> None:
        """The CM channel is readable (listener thread): take every pending event.

        A wake-up with nothing behind it (the fd raced another reader, or the kernel
        reported readiness early) is counted and ignored: it must never end the listener.
        """
        while True:
            try:
                ev = self.chan.get(0)
            except WouldBlock:
                self.spurious_wakeups += 1
                return
            if ev.type != _cm.EV.RDMA_CM_EVENT_CONNECT_REQUEST:
                log.debug("listener %s: CM event %s ignored", self._where(), ev.name)
                continue
            try:
                self._on_request(ev)
            except Exception:  # one client's failure must not stop the listener
                log.exception("listener %s: handling a connection request failed",
                              self._where())

    def _on_request(self, ev: _cm.Event) -> None:
        from pyverbs.cmid import CMID

        try:
            child = CMID(creator=ev.raw, listen_id=self.cmid)
        finally:
            ev.raw.ack_cm_event()
        with self._cond:
            full = len(self._queue) >= self.backlog
        if full:
            peer_addr = _cm.peer_addr(child)
            log.warning("listener %s: backlog of %d full, refusing %s:%d", self._where(),
                        self.backlog, peer_addr[0], peer_addr[1])
            _reject(child, RejectReason.BACKLOG, "backlog full")
            return
        try:
            ep, addr = self._handshake(child, ev.private_data)
        except UsdpError as exc:
            log.warning("listener %s: connection attempt failed: %s", self._where(), exc)
            return
        with self._cond:
            self._queue.append((ep, addr))
            self._update_locked()
            self._cond.notify()

    def _handshake(self, child: Any, private_data: bytes) -> tuple[Endpoint, _cm.SockAddr]:
        """Validate the Hello, build our resources, accept (closes ``child`` on failure)."""
        peer_addr = _cm.peer_addr(child)
        who = f"{peer_addr[0]}:{peer_addr[1]}"
        try:
            peer = decode_hello(private_data, expect_kind=HandshakeKind.HELLO)
            # A client that lets our ring grow gets a small one first; an older client
            # gets the whole ring at once, as before.
            initial = RECV_INITIAL if peer.features & Features.GROW else self.opts.recv_bufs
            initial = min(initial, self.opts.recv_bufs)
            ack = _hello(self.opts, HandshakeKind.HELLO_ACK, initial)
            params = negotiate(ack, peer)
        except HandshakeError as exc:
            log.warning("rejecting %s: %s", who, exc)
            _reject(child, exc.reason or RejectReason.BAD_PARAMS, str(exc))
            raise
        chan = _cm.Channel()
        res = None
        try:
            # Send slots hold our largest frame, as negotiated: the peer's recv_buf_size
            # counts only up to our own slot size (issue 11, item 6).
            try:
                res = _resources(child, self.opts, params.max_payload + HEADER_SIZE,
                                 f"accepting {who} on {self._where()}",
                                 recv_initial=initial)
            except OSError as exc:  # the budget, or mmap/ibv_reg_mr (ENOMEM, MEMLOCK)
                log.warning("refusing %s: %s", who, exc)
                _reject(child, RejectReason.NO_RESOURCES, "no resources")
                child = None
                if isinstance(exc, UsdpError):
                    raise
                raise UsdpError(exc.errno or errno.ENOMEM,
                                f"accepting {who} on {self._where()}: {exc}") from exc
            _cm.migrate(child, chan)
            res.modify(child, QPS_INIT)
            _post_all(res)
            res.modify(child, QPS_RTR)
            res.modify(child, QPS_RTS)
            ack = _offering_probe(ack, res)
            param = _cm.conn_param(res.qp_num, ack.encode(), accept=True)
            child.accept(param)
            # Not waiting for ESTABLISHED (the active side's RTU): our QP is already in
            # RTS, so data may flow; the event arrives on the connection's own channel and
            # a failed handshake (CONNECT_ERROR) resets the connection there.
            ep = Endpoint(child, chan, res, params, defer=self.opts.defer,
                          signal_every=self.opts.signal_every,
                          zcopy_threshold=self.opts.zcopy_threshold,
                          ack_timeout=self.opts.ack_timeout,
                          busy_poll=self.opts.busy_poll)
            ep.start()
            _fork.track(ep)
            return ep, peer_addr
        except BaseException:
            if res is not None:
                res.close()
            if child is not None:
                _close_quietly(child)
            chan.close()
            raise

    def _update_locked(self) -> None:
        self.readiness.set(bool(self._queue) or self._closed, False)

    # ------------------------------------------------------------------ user calls

    def accept(self, timeout: float | None) -> tuple[Endpoint, _cm.SockAddr]:
        """Pop an established connection, waiting up to ``timeout`` (None: forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._queue:
                if self._closed:
                    raise UsdpError(errno.EBADF, f"listener {self._where()} is closed")
                if timeout == 0.0:
                    raise WouldBlock(errno.EAGAIN,
                                     f"accept on {self._where()}: no connection waiting")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Timeout(errno.ETIMEDOUT, f"timed out: accept on {self._where()}")
                self._cond.wait(remaining)
            item = self._queue.popleft()
            self._update_locked()
            return item

    def pending(self) -> int:
        """Established connections waiting for ``accept``."""
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        """Stop listening; connections nobody accepted are aborted (a reset, as TCP's)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        os.write(self._wake_w, b"s")
        if threading.current_thread() is not self._thread:
            self._thread.join()  # no handler runs after this
        with self._cond:
            queued = list(self._queue)
            self._queue.clear()
        for ep, _addr in queued:
            _abort(ep)
        _close_quietly(self.cmid)
        self.chan.close()
        self.readiness.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


def _reject(child: Any, reason: RejectReason, text: str) -> None:
    try:
        child.reject(Reject(reason, text[:MAX_REJECT_TEXT]).encode())
    except Exception as exc:
        log.debug("rejecting a connection request: %s", exc)
    finally:
        _close_quietly(child)


def _abort(ep: Endpoint) -> None:
    """Abort a connection nobody accepted: ABORT to the peer, then tear down."""
    try:
        with ep.lock:
            ep.abort()
        ep.close(0.0)
    except Exception as exc:
        log.debug("aborting an unaccepted connection: %s", exc)


def _close_quietly(cmid: Any) -> None:
    try:
        cmid.close()
    except Exception as exc:
        log.debug("closing a CM id: %s", exc)
