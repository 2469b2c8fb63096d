"""RDMA connection manager: resolve, connect, listen, accept, with the GIL free.

pyverbs 44's CM calls block with the GIL held and ``CMEvent`` hides which id an event is
for, its status, and the ids' addresses. So:

* every wait is a ``poll`` on the event channel's fd (not ``select``, which fails for fds
  above 1023) (found by ``_fdfind``), after which
  ``CMEvent(channel)`` returns at once;
* an accepted id is moved onto its own event channel with librdmacm's
  ``rdma_migrate_id`` (not wrapped by pyverbs): otherwise its DISCONNECTED event would
  arrive on the listener's channel with no way to tell whose it is;
* the event's ``status`` and the ids' addresses are read from the C structs with ctypes
  (layouts of rdma-core 44 on x86_64, guarded by a size check on pyverbs' objects).
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import select
import socket
import time
from dataclasses import dataclass
from typing import Any

from usdp._errors import (
    Timeout,
    UsdpError,
    WouldBlock,
    error_from_errno,
    from_cm_event,
    from_pyverbs,
)
from usdp._fdfind import CM_CHANNEL, create_with_fd
from usdp._verbs import RETRY_CNT, RNR_RETRY, importing_pyverbs

with importing_pyverbs():
    import pyverbs.cm_enums as ce
    from pyverbs.cmid import CMID, AddrInfo, CMEvent, CMEventChannel, ConnParam
    from pyverbs.pyverbs_error import PyverbsError

EV = ce  # event type constants: EV.RDMA_CM_EVENT_*

_librdmacm = ctypes.CDLL("librdmacm.so.1", use_errno=True)
_librdmacm.rdma_migrate_id.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_librdmacm.rdma_bind_addr.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
# pyverbs objects with a vtable keep their C pointer right after it (see docs/design.md).
_CPTR_OFFSET = 40
if CMID.__basicsize__ != 80 or CMEvent.__basicsize__ != 48:  # pragma: no cover
    raise ImportError("unexpected pyverbs object layout: usdp supports rdma-core 44's pyverbs")


def _cptr(obj: Any) -> int:
    value = ctypes.c_void_p.from_address(id(obj) + _CPTR_OFFSET).value
    if not value:
        raise OSError(errno.EBADF, f"{type(obj).__name__} has no C object")
    return value


class _EventC(ctypes.Structure):
    _fields_ = [("id", ctypes.c_void_p), ("listen_id", ctypes.c_void_p),
                ("event", ctypes.c_int), ("status", ctypes.c_int)]


#: A socket address as Python's socket module gives it: (host, port) for AF_INET,
#: (host, port, flowinfo, scope_id) for AF_INET6.
SockAddr = tuple[Any, ...]


def _sockaddr(p: int) -> SockAddr:
    fam = ctypes.c_uint16.from_address(p).value
    port = socket.ntohs(ctypes.c_uint16.from_address(p + 2).value)
    if fam == socket.AF_INET:
        return socket.inet_ntop(fam, ctypes.string_at(p + 4, 4)), port
    if fam == socket.AF_INET6:
        flow = socket.ntohl(ctypes.c_uint32.from_address(p + 4).value)
        scope = ctypes.c_uint32.from_address(p + 24).value
        return socket.inet_ntop(fam, ctypes.string_at(p + 8, 16)), port, flow, scope
    return "", port


def local_addr(cmid: CMID) -> SockAddr:
    """The id's bound address (rdma_cm_id.route.addr.src_addr)."""
    return _sockaddr(_cptr(cmid) + 32)


def peer_addr(cmid: CMID) -> SockAddr:
    """The id's peer address (rdma_cm_id.route.addr.dst_addr)."""
    return _sockaddr(_cptr(cmid) + 160)


def _sockaddr_bytes(family: int, host: str, port: int) -> bytes:
    """A C ``sockaddr_in``/``sockaddr_in6`` for ``rdma_bind_addr``."""
    fam = family.to_bytes(2, "little")  # sa_family_t is host order (x86_64)
    if family == socket.AF_INET:
        return fam + port.to_bytes(2, "big") + socket.inet_pton(family, host) + bytes(8)
    return (fam + port.to_bytes(2, "big") + bytes(4) + socket.inet_pton(family, host)
            + bytes(4))


@dataclass(frozen=True)
class Event:
    """A CM event, copied out and acknowledged (except CONNECT_REQUEST's raw event)."""

    type: int
    status: int
    private_data: bytes
    raw: Any = None  # the un-acked CMEvent, for CONNECT_REQUEST only

    @property
    def name(self) -> str:
        for k in dir(ce):
            if k.startswith("RDMA_CM_EVENT_") and getattr(ce, k) == self.type:
                return k.removeprefix("RDMA_CM_EVENT_")
        return str(self.type)


def wait_readable(fd: int, timeout: float | None) -> bool:
    """Whether ``fd`` becomes readable within ``timeout`` seconds (None: forever).

    ``poll``, not ``select``: ``select`` raises ValueError for an fd above 1023, which a
    process with a few hundred connections reaches.
    """
    p = select.poll()
    p.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
    while True:
        try:
            return bool(p.poll(ms))
        except InterruptedError:  # pragma: no cover - PEP 475 retries already
            continue


class Channel:
    """A CM event channel whose fd we can wait on."""

    def __init__(self, what: str = "opening the RDMA connection manager") -> None:
        try:
            self.ch, self.fd = create_with_fd(CMEventChannel, CM_CHANNEL)
        except PyverbsError as exc:
            # ENODEV here (no /dev/infiniband/rdma_cm) is the usual "no RDMA at all".
            raise from_pyverbs(exc, what) from exc

    def readable(self, timeout: float | None) -> bool:
        return wait_readable(self.fd, timeout)

    def get(self, timeout: float | None) -> Event:
        """The next event; ``Timeout`` if none within ``timeout`` seconds."""
        if not self.readable(timeout):
            if timeout == 0:
                raise WouldBlock(errno.EAGAIN, "no connection manager event pending")
            raise Timeout(errno.ETIMEDOUT, "timed out waiting for the connection manager")
        ev = CMEvent(self.ch)
        c = _EventC.from_address(_cptr(ev))
        out = Event(ev.event_type, c.status, bytes(ev.private_data or b""),
                    ev if ev.event_type == ce.RDMA_CM_EVENT_CONNECT_REQUEST else None)
        if out.raw is None:
            ev.ack_cm_event()
        return out

    def close(self) -> None:
        ch, self.ch = self.ch, None
        if ch is not None:
            ch.close()


def new_id(channel: Channel) -> CMID:
    return CMID(creator=channel.ch, port_space=ce.RDMA_PS_TCP)


def request_id(ev: Event, listen_id: CMID) -> CMID:
    """The id of a CONNECT_REQUEST (``ev.raw``, still to be acked) on listener ``listen_id``."""
    return CMID(creator=ev.raw, listen_id=listen_id)


def migrate(cmid: CMID, channel: Channel) -> None:
    """Move ``cmid``'s future events onto ``channel`` (rdma_migrate_id)."""
    if _librdmacm.rdma_migrate_id(_cptr(cmid), _cptr(channel.ch)) != 0:
        err = ctypes.get_errno()
        raise error_from_errno(err, f"rdma_migrate_id: {os.strerror(err)}")


def conn_param(qp_num: int, private_data: bytes, *, accept: bool) -> ConnParam:
    # Responder resources / initiator depth 1: room for one outstanding RDMA read each way
    # (zero-copy uses it); retry counts as in _verbs (which sets them again at RTS).
    p = ConnParam(resources=1, depth=1, retry=RETRY_CNT, rnr_retry=RNR_RETRY, qp_num=qp_num,
                  data_len=196 if accept else 56)
    p.set_private_data(private_data)
    return p


def cm_call(what: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, its ``PyverbsError`` translated (``what``: the step, for the message)."""
    try:
        return fn(*args)
    except PyverbsError as exc:
        raise from_pyverbs(exc, what) from exc


def resolve(cmid: CMID, channel: Channel, dst: tuple[str, int], src: str | None,
            deadline: float | None) -> None:
    """Resolve address and route for an active id (ADDR_RESOLVED, ROUTE_RESOLVED)."""
    at = f"{dst[0]}:{dst[1]}"
    ai = cm_call(f"connect to {at}: resolve address (rdma_getaddrinfo)", AddrInfo, src, dst[0],
                 None, str(dst[1]), ce.RDMA_PS_TCP)
    ms = 2000 if deadline is None else max(1, int(min(2.0, deadline - time.monotonic()) * 1000))
    try:
        cm_call(f"connect to {at}: resolve address", cmid.resolve_addr, ai, ms)
    finally:
        ai.close()  # rdma_freeaddrinfo now: pyverbs 44 objects may not free on GC
    expect(channel, ce.RDMA_CM_EVENT_ADDR_RESOLVED, deadline,
           f"connect to {at}: resolve address (is {dst[0]} on an RDMA device's netdev?)")
    cm_call(f"connect to {at}: resolve route", cmid.resolve_route, ms)
    expect(channel, ce.RDMA_CM_EVENT_ROUTE_RESOLVED, deadline, f"connect to {at}: resolve route")


def event_error(ev: Event, what: str) -> UsdpError:
    """The error for a CM event that is not the one a setup step waited for."""
    return from_cm_event(ev.type, ev.status, what)


def expect(channel: Channel, want: int | None, deadline: float | None, what: str) -> Event:
    """The next event, by ``deadline`` (else :class:`Timeout` naming ``what``); an event
    other than ``want`` (None: any) raises its error."""
    remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
    try:
        ev = channel.get(remaining)
    except (Timeout, WouldBlock) as exc:  # WouldBlock: the deadline had already passed
        raise Timeout(errno.ETIMEDOUT, f"{what}: timed out") from exc
    if want is not None and ev.type != want:
        raise event_error(ev, what)
    return ev


def bind_listen(cmid: CMID, addr: SockAddr, backlog: int, family: int) -> None:
    host, port = addr[0], int(addr[1])
    if host in ("", "0.0.0.0", "::"):
        # pyverbs 44's bind_addr dereferences the (NULL) device of a wildcard-bound id and
        # crashes, so bind through librdmacm directly; listen() itself is safe.
        wild = "::" if family == socket.AF_INET6 else "0.0.0.0"
        sa = ctypes.create_string_buffer(_sockaddr_bytes(family, wild, port), 28)
        if _librdmacm.rdma_bind_addr(_cptr(cmid), sa) != 0:
            err = ctypes.get_errno()
            raise error_from_errno(err, f"bind {wild}:{port}: {os.strerror(err)}")
        cm_call(f"listen on {wild}:{port}", cmid.listen, backlog)
        return
    at = f"{host}:{port}"
    ai = cm_call(f"bind {at}: resolve address (rdma_getaddrinfo; is {host} an address of an "
                 "RDMA device's netdev?)", AddrInfo, host, None, str(port), None,
                 ce.RDMA_PS_TCP, ce.RAI_PASSIVE)
    try:
        cm_call(f"bind {at}", cmid.bind_addr, ai)
    finally:
        ai.close()
    cm_call(f"listen on {at}", cmid.listen, backlog)
