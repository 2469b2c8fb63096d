"""The usdp exception tree: every error is an ``OSError`` with a real errno.

Theory of operation
===================

usdp poses as ``socket.socket``, so its errors must be what socket code already catches:
``except OSError``, ``except ConnectionResetError``, ``e.errno == errno.EAGAIN``. Each class
therefore derives from :class:`UsdpError` (itself an ``OSError``) *and*, where Python has one,
from the matching builtin subclass, so ``except ConnectionRefusedError`` works on a
:class:`ConnectionRefused`.

One trap shapes this module. ``OSError(errno.ECONNREFUSED, "x")`` returns a
``ConnectionRefusedError``: ``OSError.__new__`` picks the subclass from the errno, but only
when the class being built is ``OSError`` itself. ``UsdpError(errno.ECONNREFUSED, "x")``
stays a plain ``UsdpError``, so nothing here relies on the remapping. Code that only has an
errno (a verbs call, a CM event status) goes through :func:`error_from_errno`, the one place
where errnos become classes.

Who caused an error is said by the class, in the manner of trio:

* the peer broke the protocol: :class:`ProtocolError` / :class:`HandshakeError`;
* the peer or the network ended the connection: :class:`ConnectionReset`,
  :class:`ConnectionRefused`, :class:`Timeout`, :class:`RemoteAccessError`;
* we closed or aborted it ourselves: :class:`BrokenPipe`, :class:`ConnectionAborted`;
* the caller misused the socket: :class:`NotConnected`, :class:`AlreadyConnected`,
  :class:`InvalidArgument`, :class:`AddressInUse`;
* the machine has no usable device: :class:`DeviceError`;
* try again later: :class:`WouldBlock`.

Constructors are ``OSError``'s: ``(errno, strerror)``. ``str()`` therefore reads
``"[Errno 111] connection refused"``, and pickling keeps the class and errno.

Translation
===========
Every foreign failure becomes one of these classes here and nowhere else, with a message
that says what was being done (the caller's ``what``: the step and, where known, host:port):

* :func:`from_pyverbs`: a ``PyverbsError`` from a verbs or CM call (its ``error_code``);
* :func:`from_wc`: a work completion that did not succeed (its ``ibv_wc_status``);
* :func:`from_cm_event`: a CM event other than the one a setup step waited for;
* :func:`from_reject`: a listener's refusal (a usdp :class:`RejectReason`, or none);
* :func:`no_pyverbs`: a Python that cannot import pyverbs at all.

This module imports nothing but the standard library: the numbers it maps (WC statuses, CM
event types) are the C ABI's, which pyverbs' enums mirror (a unit test checks they agree
where pyverbs is installed).
"""

from __future__ import annotations

import errno as _errno
import os as _os
from enum import IntEnum

__all__ = [
    "MEMLOCK_HINT",
    "NO_DEVICE_HINT",
    "AddressInUse",
    "AlreadyConnected",
    "BrokenPipe",
    "ConnectionAborted",
    "ConnectionRefused",
    "ConnectionReset",
    "DeviceError",
    "HandshakeError",
    "InvalidArgument",
    "NotConnected",
    "ProtocolError",
    "RejectReason",
    "RemoteAccessError",
    "Timeout",
    "UsdpError",
    "WouldBlock",
    "error_from_errno",
    "from_cm_event",
    "from_pyverbs",
    "from_reject",
    "from_wc",
    "no_pyverbs",
    "with_context",
]


class RejectReason(IntEnum):
    """Why a listener refused a connection (u16 in the Reject private data, see _wire)."""

    VERSION = 1
    BAD_PARAMS = 2
    NOT_USDP = 3
    BACKLOG = 4
    NO_RESOURCES = 5
    SHUTDOWN = 6


class UsdpError(OSError):
    """Base of every usdp error; an ``OSError`` so socket code handles it unchanged."""


class ProtocolError(UsdpError):
    """The peer sent a malformed or illegal frame (EPROTO).

    Fatal to that one connection only: the receiver aborts it and latches this error.
    """


class HandshakeError(ProtocolError):
    """The connection handshake failed: bad Hello/HelloAck, or a Reject (EPROTO).

    ``reason`` is the :class:`RejectReason` that a listener would send back (or
    did send), or None when no code applies.
    """

    reason: RejectReason | None

    def __init__(self, errno: int, strerror: str, *, reason: RejectReason | None = None) -> None:
        # Overriding __init__ makes OSError parse its arguments here instead of in __new__,
        # which is what lets the keyword through.
        super().__init__(errno, strerror)
        self.reason = reason


class DeviceError(UsdpError):
    """No usable RDMA device or port (ENODEV): the cue for a TCP fallback."""


class RemoteAccessError(UsdpError):
    """A remote-access or transport completion error, e.g. retry exceeded (EREMOTEIO)."""


class ConnectionRefused(UsdpError, ConnectionRefusedError):
    """Nobody listens there, or the listener rejected us (ECONNREFUSED)."""


class ConnectionReset(UsdpError, ConnectionResetError):
    """The peer aborted the connection, or it vanished (ECONNRESET)."""


class ConnectionAborted(UsdpError, ConnectionAbortedError):
    """We aborted the connection ourselves (ECONNABORTED)."""


class BrokenPipe(UsdpError, BrokenPipeError):
    """Write after our own shutdown of the write side (EPIPE)."""


class Timeout(UsdpError, TimeoutError):
    """A deadline passed: connect, CM resolution or a socket timeout (ETIMEDOUT)."""


class WouldBlock(UsdpError, BlockingIOError):
    """A non-blocking call would have to wait, e.g. for send credits (EAGAIN)."""


class NotConnected(UsdpError):
    """The socket is not connected (ENOTCONN)."""


class AddressInUse(UsdpError):
    """bind/listen on an address already taken (EADDRINUSE)."""


class AlreadyConnected(UsdpError):
    """connect() on a connected socket (EISCONN)."""


class InvalidArgument(UsdpError):
    """A bad argument or an operation illegal in this state (EINVAL)."""


_BY_ERRNO: dict[int, type[UsdpError]] = {
    _errno.EPROTO: ProtocolError,
    _errno.ENODEV: DeviceError,
    _errno.EREMOTEIO: RemoteAccessError,
    _errno.ECONNREFUSED: ConnectionRefused,
    _errno.ECONNRESET: ConnectionReset,
    _errno.ECONNABORTED: ConnectionAborted,
    _errno.EPIPE: BrokenPipe,
    # Python's BrokenPipeError covers ESHUTDOWN too; BlockingIOError covers the next four.
    _errno.ESHUTDOWN: BrokenPipe,
    _errno.ETIMEDOUT: Timeout,
    _errno.EAGAIN: WouldBlock,
    _errno.EWOULDBLOCK: WouldBlock,
    _errno.EINPROGRESS: WouldBlock,
    _errno.EALREADY: WouldBlock,
    _errno.ENOTCONN: NotConnected,
    _errno.EADDRINUSE: AddressInUse,
    _errno.EISCONN: AlreadyConnected,
    _errno.EINVAL: InvalidArgument,
}


def error_from_errno(err: int, msg: str) -> UsdpError:
    """Build the usdp error class that matches ``err`` (``UsdpError`` if none does).

    The one place where bare errnos (verbs failures, CM statuses) become classes, because
    ``UsdpError.__new__`` does not remap them the way ``OSError.__new__`` does.
    """
    return _BY_ERRNO.get(err, UsdpError)(err, msg)


# --------------------------------------------------------------------------- translation

#: What to do about a machine without a usable RDMA device: said by every ENODEV.
NO_DEVICE_HINT = (
    "no usable RDMA device: check 'rdma link' (an ACTIVE link is needed); for soft-RoCE "
    "load the module ('modprobe rdma_rxe') and add a link ('rdma link add rxe0 type rxe "
    "netdev <if>'), or, on a kernel without rdma_rxe, run in the test bed (scripts/rxe-vm)"
)


#: What to do when registering memory fails for want of locked-memory allowance.
MEMLOCK_HINT = (
    "registering memory counts against RLIMIT_MEMLOCK: raise it ('ulimit -l unlimited', "
    "LimitMEMLOCK= for a systemd service, memlock in /etc/security/limits.conf) or run "
    "as root"
)


def _with_hint(err: int, msg: str) -> str:
    if err == _errno.ENODEV:
        return f"{msg}; {NO_DEVICE_HINT}"
    if err == _errno.ENOMEM:
        return f"{msg}; {MEMLOCK_HINT}"
    return msg


def from_pyverbs(exc: BaseException, what: str) -> UsdpError:
    """The error for a failed pyverbs call (``PyverbsError``/``PyverbsRDMAError``).

    pyverbs keeps the C call's errno in ``error_code`` (0 or absent when it has none:
    then EIO). ENODEV is a missing device and says how to get one.
    """
    code = getattr(exc, "error_code", None)
    err = code if isinstance(code, int) and code > 0 else _errno.EIO
    return error_from_errno(err, _with_hint(err, f"{what}: {exc}"))


def no_pyverbs(exc: ImportError) -> DeviceError:
    """The error for a Python that cannot import pyverbs (usdp's RDMA half needs it)."""
    return DeviceError(_errno.ENODEV, f"pyverbs cannot be imported ({exc}): install "
                       "Debian's python3-pyverbs (apt-get install python3-pyverbs) and use "
                       "a Python that sees it (a venv made with --system-site-packages; "
                       "PyPI's pyverbs does not work with Debian's libibverbs)")


#: ``enum ibv_wc_status`` (infiniband/verbs.h); pyverbs.enums.IBV_WC_* have these values.
WC_STATUS_NAMES: dict[int, str] = dict(enumerate((
    "SUCCESS", "LOC_LEN_ERR", "LOC_QP_OP_ERR", "LOC_EEC_OP_ERR", "LOC_PROT_ERR",
    "WR_FLUSH_ERR", "MW_BIND_ERR", "BAD_RESP_ERR", "LOC_ACCESS_ERR", "REM_INV_REQ_ERR",
    "REM_ACCESS_ERR", "REM_OP_ERR", "RETRY_EXC_ERR", "RNR_RETRY_EXC_ERR", "LOC_RDD_VIOL_ERR",
    "REM_INV_RD_REQ_ERR", "REM_ABORT_ERR", "INV_EECN_ERR", "INV_EEC_STATE_ERR", "FATAL_ERR",
    "RESP_TIMEOUT_ERR", "GENERAL_ERR", "TM_ERR", "TM_RNDV_INCOMPLETE",
)))
WC_SUCCESS, WC_WR_FLUSH_ERR, WC_REM_ACCESS_ERR, WC_RETRY_EXC_ERR, WC_RNR_RETRY_EXC_ERR = (
    0, 5, 10, 12, 13)


def from_wc(status: int, what: str) -> UsdpError:
    """The error for a work completion with ``status`` (not SUCCESS) of ``what``
    (e.g. ``"send"``, ``"receive"``, ``"RDMA read"``).

    A failed completion ends the connection, so nearly all become a reset: how TCP reports
    a connection the peer or the network broke. A remote access error is the exception:
    the peer advertised memory it does not let us read (:class:`RemoteAccessError`).

    Raises:
        ValueError: for SUCCESS (a caller bug: nothing failed).
    """
    if status == WC_SUCCESS:
        raise ValueError("from_wc() of a successful completion")
    name = WC_STATUS_NAMES.get(status, "unknown")
    if status == WC_REM_ACCESS_ERR:
        return RemoteAccessError(_errno.EREMOTEIO, f"{what} failed: remote access error "
                                 "(bad rkey, address or length)")
    if status == WC_RETRY_EXC_ERR:
        why = ("transport retries exhausted (peer or link down, or heavy loss or "
               "reordering on the link)")
    elif status == WC_RNR_RETRY_EXC_ERR:
        why = "the peer had no receive posted (RNR retries exhausted)"
    elif status == WC_WR_FLUSH_ERR:
        why = "flushed: the queue pair failed"
    else:
        why = f"wc status {name} ({status})"
    return ConnectionReset(_errno.ECONNRESET, f"connection reset: {what} failed: {why}")


#: ``enum rdma_cm_event_type`` (rdma/rdma_cma.h); pyverbs.cm_enums has these values.
CM_EVENT_NAMES: dict[int, str] = dict(enumerate((
    "ADDR_RESOLVED", "ADDR_ERROR", "ROUTE_RESOLVED", "ROUTE_ERROR", "CONNECT_REQUEST",
    "CONNECT_RESPONSE", "CONNECT_ERROR", "UNREACHABLE", "REJECTED", "ESTABLISHED",
    "DISCONNECTED", "DEVICE_REMOVAL", "MULTICAST_JOIN", "MULTICAST_ERROR", "ADDR_CHANGE",
    "TIMEWAIT_EXIT",
)))
_CM_EVENT_ERRNO: dict[int, int] = {
    1: _errno.EHOSTUNREACH,  # ADDR_ERROR: no RDMA device has a route to that address
    3: _errno.ENETUNREACH,  # ROUTE_ERROR
    6: _errno.ECONNREFUSED,  # CONNECT_ERROR
    7: _errno.EHOSTUNREACH,  # UNREACHABLE: no answer from the remote CM
    8: _errno.ECONNREFUSED,  # REJECTED (see from_reject for the private data)
    10: _errno.ECONNRESET,  # DISCONNECTED during setup
    11: _errno.ENODEV,  # DEVICE_REMOVAL
}


def from_cm_event(event_type: int, status: int, what: str) -> UsdpError:
    """The error for a CM event that is not the one a setup step (``what``) waited for.

    The class follows the event; ``status`` (a negative errno for most events, the
    transport's reject code for REJECTED) is kept in the message.
    """
    name = CM_EVENT_NAMES.get(event_type, f"event {event_type}")
    err = _CM_EVENT_ERRNO.get(event_type, _errno.EPROTO)
    detail = f"status {status}"
    if status < 0 and -status in _errno.errorcode:
        detail += f": {_os.strerror(-status)}"
    return error_from_errno(err, _with_hint(err, f"{what}: {name} ({detail})"))


#: Reasons that mean "not now" (like TCP's refused SYN), not "not compatible".
_REFUSED = frozenset({RejectReason.BACKLOG, RejectReason.NO_RESOURCES, RejectReason.SHUTDOWN})


def from_reject(reason: RejectReason | None, text: str = "", what: str = "") -> UsdpError:
    """The error ``connect()`` raises for a listener's refusal.

    ``reason`` None is a reject without a usdp Reject in it: nobody listens on that port,
    or the listener is not usdp; like a TCP RST answering a SYN, :class:`ConnectionRefused`.
    Busy or closing usdp listeners are refused too, so ``except ConnectionRefusedError``
    catches them; a protocol mismatch is a :class:`HandshakeError` carrying the reason.
    """
    prefix = f"{what}: " if what else ""
    if reason is None:
        return ConnectionRefused(_errno.ECONNREFUSED, f"{prefix}connection refused (nothing "
                                 "listens there over RDMA, or the listener is not usdp)")
    msg = f"{prefix}connection rejected: {reason.name}" + (f" ({text})" if text else "")
    if reason in _REFUSED:
        return ConnectionRefused(_errno.ECONNREFUSED, msg)
    return HandshakeError(_errno.EPROTO, msg, reason=reason)


def with_context(exc: UsdpError, what: str) -> UsdpError:
    """``exc`` again (same class, errno and reject reason), its message prefixed by
    ``what``: how a lower layer's error learns the step and address it happened in."""
    msg = f"{what}: {exc.strerror}"
    err = exc.errno if exc.errno is not None else _errno.EIO
    if isinstance(exc, HandshakeError):
        return HandshakeError(err, msg, reason=exc.reason)
    return type(exc)(err, msg)
