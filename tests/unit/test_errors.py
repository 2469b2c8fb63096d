"""The exception tree: builtin compatibility, errnos, str(), pickling, errno mapping."""

from __future__ import annotations

import errno
import pickle

import pytest

from usdp._errors import (
    AddressInUse,
    AlreadyConnected,
    BrokenPipe,
    ConnectionAborted,
    ConnectionRefused,
    ConnectionReset,
    DeviceError,
    HandshakeError,
    InvalidArgument,
    NotConnected,
    ProtocolError,
    RejectReason,
    RemoteAccessError,
    Timeout,
    UsdpError,
    WouldBlock,
    error_from_errno,
)

# (class, errno it is raised with, builtin it must also be).
CASES: list[tuple[type[UsdpError], int, type[OSError]]] = [
    (ProtocolError, errno.EPROTO, OSError),
    (HandshakeError, errno.EPROTO, OSError),
    (DeviceError, errno.ENODEV, OSError),
    (RemoteAccessError, errno.EREMOTEIO, OSError),
    (ConnectionRefused, errno.ECONNREFUSED, ConnectionRefusedError),
    (ConnectionReset, errno.ECONNRESET, ConnectionResetError),
    (ConnectionAborted, errno.ECONNABORTED, ConnectionAbortedError),
    (BrokenPipe, errno.EPIPE, BrokenPipeError),
    (Timeout, errno.ETIMEDOUT, TimeoutError),
    (WouldBlock, errno.EAGAIN, BlockingIOError),
    (NotConnected, errno.ENOTCONN, OSError),
    (AddressInUse, errno.EADDRINUSE, OSError),
    (AlreadyConnected, errno.EISCONN, OSError),
    (InvalidArgument, errno.EINVAL, OSError),
]


@pytest.mark.parametrize(("cls", "err", "builtin"), CASES)
def test_class_is_its_builtin_and_keeps_errno(
    cls: type[UsdpError], err: int, builtin: type[OSError]
) -> None:
    exc = cls(err, "boom")
    assert type(exc) is cls
    assert isinstance(exc, UsdpError)
    assert isinstance(exc, OSError)
    assert isinstance(exc, builtin)
    assert exc.errno == err
    assert exc.strerror == "boom"
    assert str(exc) == f"[Errno {err}] boom"
    with pytest.raises(builtin):
        raise exc


@pytest.mark.parametrize(("cls", "err", "builtin"), CASES)
def test_error_from_errno_picks_the_class(
    cls: type[UsdpError], err: int, builtin: type[OSError]
) -> None:
    exc = error_from_errno(err, "msg")
    expected = ProtocolError if cls is HandshakeError else cls
    assert type(exc) is expected
    assert exc.errno == err
    assert isinstance(exc, builtin)


def test_error_from_errno_falls_back_to_base() -> None:
    exc = error_from_errno(errno.EIO, "disk on fire")
    assert type(exc) is UsdpError
    assert exc.errno == errno.EIO
    assert str(exc) == f"[Errno {errno.EIO}] disk on fire"


def test_error_from_errno_aliases() -> None:
    assert type(error_from_errno(errno.EWOULDBLOCK, "x")) is WouldBlock
    assert type(error_from_errno(errno.EINPROGRESS, "x")) is WouldBlock
    assert type(error_from_errno(errno.ESHUTDOWN, "x")) is BrokenPipe


def test_oserror_remapping_does_not_apply_to_subclasses() -> None:
    # The trap error_from_errno exists for: only OSError itself remaps by errno.
    assert type(OSError(errno.ECONNREFUSED, "x")) is ConnectionRefusedError
    assert type(UsdpError(errno.ECONNREFUSED, "x")) is UsdpError
    assert not isinstance(UsdpError(errno.ECONNREFUSED, "x"), ConnectionRefusedError)


def test_connection_refused_example_from_the_brief() -> None:
    exc = ConnectionRefused(errno.ECONNREFUSED, "x")
    assert isinstance(exc, ConnectionRefusedError)
    assert exc.errno == errno.ECONNREFUSED == 111
    assert str(exc) == "[Errno 111] x"


def test_handshake_error_reason() -> None:
    exc = HandshakeError(errno.EPROTO, "bad version", reason=RejectReason.VERSION)
    assert isinstance(exc, ProtocolError)
    assert exc.reason is RejectReason.VERSION
    assert exc.errno == errno.EPROTO
    assert str(exc) == f"[Errno {errno.EPROTO}] bad version"
    assert HandshakeError(errno.EPROTO, "x").reason is None


@pytest.mark.parametrize(("cls", "err", "builtin"), CASES)
def test_pickle_round_trip(cls: type[UsdpError], err: int, builtin: type[OSError]) -> None:
    exc = cls(err, "m")
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is cls
    assert (back.errno, back.strerror) == (err, "m")


def test_pickle_keeps_handshake_reason() -> None:
    exc = HandshakeError(errno.EPROTO, "m", reason=RejectReason.NOT_USDP)
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is HandshakeError
    assert back.reason is RejectReason.NOT_USDP
