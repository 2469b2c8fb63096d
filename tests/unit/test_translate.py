"""Error translation, all in usdp._errors: pyverbs exceptions, work completions, CM events,
rejects, a missing pyverbs and a missing device, each to the right class with a message
that names the step."""

from __future__ import annotations

import errno
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

import usdp
from usdp import _errors
from usdp._errors import (
    NO_DEVICE_HINT,
    ConnectionRefused,
    ConnectionReset,
    DeviceError,
    HandshakeError,
    RejectReason,
    RemoteAccessError,
    Timeout,
    UsdpError,
    from_cm_event,
    from_pyverbs,
    from_reject,
    from_wc,
    no_pyverbs,
    with_context,
)
from usdp._wire import Reject, error_from_reject

HAVE_PYVERBS = importlib.util.find_spec("pyverbs") is not None
ROOT = Path(__file__).resolve().parents[2]


class FakePyverbsError(Exception):
    """Shaped as pyverbs' PyverbsError: a message and the C call's errno in error_code."""

    def __init__(self, msg: str, error_code: int) -> None:
        super().__init__(msg)
        self.error_code = error_code


# ------------------------------------------------------------------ from_pyverbs


@pytest.mark.parametrize(("code", "cls", "err"), [
    (errno.EADDRINUSE, usdp.AddressInUse, errno.EADDRINUSE),
    (errno.ETIMEDOUT, Timeout, errno.ETIMEDOUT),
    (errno.EACCES, UsdpError, errno.EACCES),
    (0, UsdpError, errno.EIO),  # pyverbs had no errno: EIO, not a bogus 0
    (-1, UsdpError, errno.EIO),
])
def test_from_pyverbs_keeps_the_errno(code: int, cls: type[UsdpError], err: int) -> None:
    exc = from_pyverbs(FakePyverbsError("Failed to do it", code), "bind 1.2.3.4:7")
    assert type(exc) is cls
    assert exc.errno == err
    assert exc.strerror == "bind 1.2.3.4:7: Failed to do it"


def test_from_pyverbs_enomem_points_at_memlock() -> None:
    exc = from_pyverbs(FakePyverbsError("Failed to register a MR", errno.ENOMEM),
                       "registering a buffer ring")
    assert exc.errno == errno.ENOMEM and "RLIMIT_MEMLOCK" in str(exc)
    assert "ulimit -l" in str(exc)


def test_from_pyverbs_without_error_code_is_eio() -> None:
    exc = from_pyverbs(ValueError("odd"), "step")
    assert type(exc) is UsdpError and exc.errno == errno.EIO


def test_from_pyverbs_enodev_says_how_to_get_a_device() -> None:
    exc = from_pyverbs(FakePyverbsError("Failed to create CMEventChannel. Errno: 19", 19),
                       "connect to 10.0.0.1:7000: open the RDMA connection manager")
    assert isinstance(exc, DeviceError) and exc.errno == errno.ENODEV
    assert exc.strerror is not None
    assert exc.strerror.startswith("connect to 10.0.0.1:7000: open the RDMA connection")
    for fix in ("rdma link add rxe0 type rxe netdev", "modprobe rdma_rxe", "scripts/rxe-vm"):
        assert fix in exc.strerror


def test_no_pyverbs_names_the_package() -> None:
    exc = no_pyverbs(ModuleNotFoundError("No module named 'pyverbs'"))
    assert isinstance(exc, DeviceError) and exc.errno == errno.ENODEV
    assert "python3-pyverbs" in str(exc) and "No module named 'pyverbs'" in str(exc)


# ------------------------------------------------------------------ from_wc


@pytest.mark.parametrize(("status", "cls", "err", "words"), [
    (12, ConnectionReset, errno.ECONNRESET, "transport retries exhausted"),
    (13, ConnectionReset, errno.ECONNRESET, "RNR retries exhausted"),
    (5, ConnectionReset, errno.ECONNRESET, "flushed"),
    (10, RemoteAccessError, errno.EREMOTEIO, "remote access error"),
    (1, ConnectionReset, errno.ECONNRESET, "LOC_LEN_ERR (1)"),
    (4, ConnectionReset, errno.ECONNRESET, "LOC_PROT_ERR (4)"),
    (99, ConnectionReset, errno.ECONNRESET, "unknown (99)"),
])
def test_from_wc(status: int, cls: type[UsdpError], err: int, words: str) -> None:
    exc = from_wc(status, "send")
    assert type(exc) is cls and exc.errno == err
    assert "send failed" in str(exc) and words in str(exc)


def test_from_wc_of_success_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="successful"):
        from_wc(0, "send")


@pytest.mark.skipif(not HAVE_PYVERBS, reason="pyverbs not installed: nothing to compare with")
def test_wc_status_and_cm_event_numbers_match_pyverbs() -> None:
    import pyverbs.cm_enums as ce
    import pyverbs.enums as e

    for value, name in _errors.WC_STATUS_NAMES.items():
        assert getattr(e, f"IBV_WC_{name}") == value, name
    for value, name in _errors.CM_EVENT_NAMES.items():
        assert getattr(ce, f"RDMA_CM_EVENT_{name}") == value, name


# ------------------------------------------------------------------ from_cm_event


@pytest.mark.parametrize(("event", "cls", "err"), [
    (1, usdp.UsdpError, errno.EHOSTUNREACH),  # ADDR_ERROR
    (3, usdp.UsdpError, errno.ENETUNREACH),  # ROUTE_ERROR
    (6, ConnectionRefused, errno.ECONNREFUSED),  # CONNECT_ERROR
    (7, usdp.UsdpError, errno.EHOSTUNREACH),  # UNREACHABLE
    (8, ConnectionRefused, errno.ECONNREFUSED),  # REJECTED
    (10, ConnectionReset, errno.ECONNRESET),  # DISCONNECTED
    (11, DeviceError, errno.ENODEV),  # DEVICE_REMOVAL
    (9, usdp.ProtocolError, errno.EPROTO),  # ESTABLISHED where it makes no sense
])
def test_from_cm_event(event: int, cls: type[UsdpError], err: int) -> None:
    exc = from_cm_event(event, -errno.ETIMEDOUT, "connect to 10.0.0.1:7000: resolve address")
    assert type(exc) is cls and exc.errno == err
    name = _errors.CM_EVENT_NAMES[event]
    assert str(exc).startswith(f"[Errno {err}] connect to 10.0.0.1:7000: resolve address: "
                               f"{name} (status -110: {os.strerror(errno.ETIMEDOUT)})")


def test_from_cm_event_positive_status_and_unknown_event() -> None:
    exc = from_cm_event(77, 28, "connect to h:1")
    assert exc.errno == errno.EPROTO and "event 77 (status 28)" in str(exc)


# ------------------------------------------------------------------ from_reject


def test_from_reject_none_is_refused_like_tcp() -> None:
    exc = from_reject(None, "", "connect to 10.0.0.1:7000")
    assert isinstance(exc, ConnectionRefusedError)
    assert "connect to 10.0.0.1:7000: connection refused" in str(exc)
    assert "not usdp" in str(exc)


@pytest.mark.parametrize("reason", list(RejectReason))
def test_from_reject_reasons(reason: RejectReason) -> None:
    exc = from_reject(reason, "why", "connect to h:1")
    if reason in (RejectReason.BACKLOG, RejectReason.NO_RESOURCES, RejectReason.SHUTDOWN):
        assert type(exc) is ConnectionRefused
    else:
        assert isinstance(exc, HandshakeError) and exc.reason is reason
    assert str(exc).endswith(f"connect to h:1: connection rejected: {reason.name} (why)")


def test_wire_reject_goes_through_from_reject() -> None:
    exc = error_from_reject(Reject(RejectReason.VERSION, "v2").encode(), "connect to h:1")
    assert isinstance(exc, HandshakeError) and exc.reason is RejectReason.VERSION
    assert "connect to h:1: connection rejected: VERSION (v2)" in str(exc)
    assert usdp._wire.RejectReason is RejectReason  # re-exported, one enum


def test_with_context_keeps_class_errno_and_reason() -> None:
    inner = HandshakeError(errno.EPROTO, "bad magic", reason=RejectReason.NOT_USDP)
    outer = with_context(inner, "connect to h:1: handshake")
    assert type(outer) is HandshakeError and outer.reason is RejectReason.NOT_USDP
    assert outer.errno == errno.EPROTO
    assert outer.strerror == "connect to h:1: handshake: bad magic"
    reset = with_context(ConnectionReset(errno.ECONNRESET, "x"), "step")
    assert type(reset) is ConnectionReset and str(reset) == "[Errno 104] step: x"


def test_every_error_class_is_exported() -> None:
    classes = {name for name in _errors.__all__
               if isinstance(getattr(_errors, name), type)
               and issubclass(getattr(_errors, name), (UsdpError, RejectReason))}
    assert classes <= set(usdp.__all__)
    assert all(getattr(usdp, name) is getattr(_errors, name) for name in classes)


# ------------------------------------------------------------------ no pyverbs, no device


def _python_without_pyverbs(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where ``import pyverbs`` fails, as it does on a
    Python that does not have it."""
    prelude = "import sys; sys.modules['pyverbs'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + code], cwd=ROOT, text=True,
                          capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_import_usdp_does_not_need_pyverbs() -> None:
    p = _python_without_pyverbs(
        "import usdp, usdp._wire, usdp._connection, usdp._lock, usdp._liveness\n"
        "import usdp._errors, usdp._config, usdp._rules, usdp.asyncio, usdp.run\n"
        "assert usdp.SdpSocket and usdp.create_connection and usdp.patch\n"
        "try:\n"
        "    usdp.create_connection(('10.9.8.7', 7000))\n"
        "except usdp.DeviceError as e:\n"
        "    print(e.errno, e)\n")
    assert p.returncode == 0, p.stderr
    err, _, msg = p.stdout.partition(" ")
    assert int(err) == errno.ENODEV
    assert "connect to 10.9.8.7:7000: pyverbs cannot be imported" in msg
    assert "python3-pyverbs" in msg


@pytest.mark.skipif(not HAVE_PYVERBS, reason="pyverbs not installed: no logging set-up to undo")
def test_loading_pyverbs_leaves_the_root_logger_alone() -> None:
    code = ("import logging, usdp._verbs, usdp._cm\n"
            "r = logging.getLogger(); print(len(r.handlers), r.level)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True,
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["0", str(30)]  # no handler added, still WARNING


@pytest.mark.skipif(Path("/dev/infiniband/rdma_cm").exists(),
                    reason="this machine has an RDMA CM: no missing-device error to see")
def test_connect_without_a_device_says_where_and_how_to_fix() -> None:
    """This host has no RDMA at all (no rdma_cm device, maybe no pyverbs): connecting fails
    at once with ENODEV, naming the address, the step and the fix."""
    with pytest.raises(DeviceError) as info:
        usdp.create_connection(("127.0.0.1", 7000), timeout=30)
    exc = info.value
    assert exc.errno == errno.ENODEV
    assert str(exc).startswith("[Errno 19] connect to 127.0.0.1:7000: ")
    if HAVE_PYVERBS:
        assert "open the RDMA connection manager" in str(exc)
        assert NO_DEVICE_HINT in str(exc)
    else:
        assert "python3-pyverbs" in str(exc)


@pytest.mark.skipif(Path("/dev/infiniband/rdma_cm").exists(),
                    reason="this machine has an RDMA CM: no missing-device error to see")
def test_listen_without_a_device_says_where() -> None:
    s = usdp.SdpSocket()
    s.bind(("127.0.0.1", 7001))
    with pytest.raises(DeviceError, match=r"listen on 127\.0\.0\.1:7001: "):
        s.listen()
    s.close()
