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
import errno
import logging
import time
from collections.abc import Iterator
from typing import Any

from usdp import _cm
from usdp._config import Options
from usdp._endpoint import Endpoint
from usdp._errors import ConnectionAborted, HandshakeError, UsdpError, with_context
from usdp._verbs import QPS_INIT, QPS_RTR, QPS_RTS, Device, QPResources
from usdp._wire import (
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


def _hello(opts: Options, kind: HandshakeKind) -> Hello:
    # Every usdp peer can *receive* zero-copy (it costs nothing until a SrcAvail comes);
    # whether it *sends* that way is its own zcopy_threshold.
    return Hello(kind, opts.recv_bufs, opts.recv_buf_size, opts.recv_buf_size,
                 Features.ZCOPY | Features.SOLICIT)


def _dev_name(cmid: Any) -> str:
    name = cmid.dev_name
    return name.decode() if isinstance(name, bytes) else str(name)


def _resources(cmid: Any, opts: Options, peer_buf_size: int) -> QPResources:
    return QPResources(Device.get(_dev_name(cmid)), recv_count=opts.recv_bufs,
                       recv_size=opts.recv_buf_size, send_count=opts.send_bufs,
                       send_size=peer_buf_size)


def _post_all(res: QPResources) -> None:
    for slot in range(res.recv_ring.count):
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
            res = _resources(cmid, opts, opts.recv_buf_size)
            res.modify(cmid, QPS_INIT)
            _post_all(res)
        hello = _hello(opts, HandshakeKind.HELLO)
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
    """A bound, listening CM id; ``accept`` completes one handshake at a time."""

    def __init__(self, addr: _cm.SockAddr, backlog: int, opts: Options, family: int) -> None:
        self.opts = opts
        self.chan = _cm.Channel(f"listen on {addr[0]}:{addr[1]}: open the RDMA connection "
                                "manager")
        try:
            self.cmid = _cm.new_id(self.chan)
            _cm.bind_listen(self.cmid, addr, backlog, family)
        except BaseException:
            # The id before its channel: left to the GC, it would be destroyed after the
            # channel and pyverbs would print "Failed to close CMID" (EBADF).
            if getattr(self, "cmid", None) is not None:
                _close_quietly(self.cmid)
            self.chan.close()
            raise
        self.addr = _cm.local_addr(self.cmid)

    def fileno(self) -> int:
        return self.chan.fd

    def accept(self, timeout: float | None) -> tuple[Endpoint, _cm.SockAddr]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ev = self.chan.get(remaining)
            if ev.type != _cm.EV.RDMA_CM_EVENT_CONNECT_REQUEST:
                log.debug("listener: CM event %s ignored", ev.name)
                continue
            try:
                return self._handshake(ev)
            except UsdpError as exc:
                log.warning("listener %s:%d: connection attempt failed: %s",
                            self.addr[0], self.addr[1], exc)
                if timeout == 0.0:
                    # What a non-blocking accept loop (asyncio's) expects for a client
                    # that went away mid-handshake: skip it and go on.
                    raise ConnectionAborted(errno.ECONNABORTED,
                                            f"handshake failed: {exc}") from exc

    def _handshake(self, ev: _cm.Event) -> tuple[Endpoint, _cm.SockAddr]:
        child = _cm.request_id(ev, self.cmid)
        ev.raw.ack_cm_event()
        peer_addr = _cm.peer_addr(child)
        try:
            peer = decode_hello(ev.private_data, expect_kind=HandshakeKind.HELLO)
        except HandshakeError as exc:
            reason = exc.reason or RejectReason.BAD_PARAMS
            log.warning("rejecting %s:%d: %s", peer_addr[0], peer_addr[1], exc)
            try:
                child.reject(Reject(reason, str(exc)[:40]).encode())
            finally:
                _close_quietly(child)
            raise
        chan = _cm.Channel()
        res = None
        try:
            _cm.migrate(child, chan)
            res = _resources(child, self.opts, peer.recv_buf_size)
            res.modify(child, QPS_INIT)
            _post_all(res)
            ack = _hello(self.opts, HandshakeKind.HELLO_ACK)
            params = negotiate(ack, peer)
            res.modify(child, QPS_RTR)
            res.modify(child, QPS_RTS)
            param = _cm.conn_param(res.qp_num, ack.encode(), accept=True)
            child.accept(param)
            # Not waiting for ESTABLISHED (the active side's RTU): our QP is already in
            # RTS, so data may flow; the event arrives on the connection's own channel and
            # a failed handshake (CONNECT_ERROR) resets the connection there. This lets one
            # accept loop take many connections without a round trip each.
            ep = Endpoint(child, chan, res, params, defer=self.opts.defer,
                          signal_every=self.opts.signal_every,
                          zcopy_threshold=self.opts.zcopy_threshold,
                          ack_timeout=self.opts.ack_timeout,
                          busy_poll=self.opts.busy_poll)
            ep.start()
            return ep, peer_addr
        except BaseException:
            if res is not None:
                res.close()
            _close_quietly(child)
            chan.close()
            raise

    def close(self) -> None:
        _close_quietly(self.cmid)
        self.chan.close()


def _close_quietly(cmid: Any) -> None:
    try:
        cmid.close()
    except Exception as exc:
        log.debug("closing a CM id: %s", exc)
