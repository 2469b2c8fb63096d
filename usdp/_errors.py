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
"""

from __future__ import annotations

import errno as _errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from usdp._wire import RejectReason

__all__ = [
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
    "RemoteAccessError",
    "Timeout",
    "UsdpError",
    "WouldBlock",
    "error_from_errno",
]


class UsdpError(OSError):
    """Base of every usdp error; an ``OSError`` so socket code handles it unchanged."""


class ProtocolError(UsdpError):
    """The peer sent a malformed or illegal frame (EPROTO).

    Fatal to that one connection only: the receiver aborts it and latches this error.
    """


class HandshakeError(ProtocolError):
    """The connection handshake failed: bad Hello/HelloAck, or a Reject (EPROTO).

    ``reason`` is the :class:`~usdp._wire.RejectReason` that a listener would send back (or
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
