"""usdp: a userspace SDP-like stream transport over RDMA, behind a ``socket.socket`` API.

>>> import usdp
>>> with usdp.create_connection(("198.18.0.1", 7000)) as s:   # doctest: +SKIP
...     s.sendall(b"hello")

``import usdp`` does not import pyverbs: that happens on the first RDMA connect or listen
(``usdp._verbs``/``usdp._cm``), and a Python without pyverbs gets a :class:`DeviceError`
there that says to install Debian's ``python3-pyverbs``.
"""

from __future__ import annotations

from importlib import metadata as _metadata

from usdp import asyncio
from usdp._config import Options
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
)
from usdp._patch import HybridSocket, is_patched, patch, transport_of, unpatch
from usdp._rules import Rules, RulesError
from usdp._rules import load as load_rules
from usdp._rules import parse as parse_rules
from usdp._socket import (
    AF_INET_SDP,
    SHUT_RD,
    SHUT_RDWR,
    SHUT_WR,
    SdpSocket,
    create_connection,
    socket,
)


def _version() -> str:
    # One source of truth, pyproject.toml's version, as the installed metadata has it; a
    # checkout used without installing (PYTHONPATH=.) has no metadata.
    try:
        return _metadata.version("usdp")
    except _metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _version()

__all__ = [
    "AF_INET_SDP",
    "SHUT_RD",
    "SHUT_RDWR",
    "SHUT_WR",
    "AddressInUse",
    "AlreadyConnected",
    "BrokenPipe",
    "ConnectionAborted",
    "ConnectionRefused",
    "ConnectionReset",
    "DeviceError",
    "HandshakeError",
    "HybridSocket",
    "InvalidArgument",
    "NotConnected",
    "Options",
    "ProtocolError",
    "RejectReason",
    "RemoteAccessError",
    "Rules",
    "RulesError",
    "SdpSocket",
    "Timeout",
    "UsdpError",
    "WouldBlock",
    "__version__",
    "asyncio",
    "create_connection",
    "is_patched",
    "load_rules",
    "parse_rules",
    "patch",
    "socket",
    "transport_of",
    "unpatch",
]
