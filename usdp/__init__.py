"""usdp: a userspace SDP-like stream transport over RDMA, behind a ``socket.socket`` API.

>>> import usdp
>>> with usdp.create_connection(("198.18.0.1", 7000)) as s:   # doctest: +SKIP
...     s.sendall(b"hello")
"""

from __future__ import annotations

import logging as _logging

# pyverbs' import runs logging.basicConfig(level=INFO): undo that on the user's behalf.
_root = _logging.getLogger()
_root_state = (list(_root.handlers), _root.level)
import pyverbs.base  # noqa: E402, F401

for _h in _root.handlers[:]:
    if _h not in _root_state[0]:
        _root.removeHandler(_h)
_root.setLevel(_root_state[1])

from usdp._config import Options  # noqa: E402
from usdp._errors import (  # noqa: E402
    BrokenPipe,
    ConnectionAborted,
    ConnectionRefused,
    ConnectionReset,
    DeviceError,
    HandshakeError,
    NotConnected,
    ProtocolError,
    RemoteAccessError,
    Timeout,
    UsdpError,
    WouldBlock,
)
from usdp._socket import (  # noqa: E402
    AF_INET_SDP,
    SHUT_RD,
    SHUT_RDWR,
    SHUT_WR,
    SdpSocket,
    create_connection,
    socket,
)

__all__ = [
    "AF_INET_SDP",
    "SHUT_RD",
    "SHUT_RDWR",
    "SHUT_WR",
    "BrokenPipe",
    "ConnectionAborted",
    "ConnectionRefused",
    "ConnectionReset",
    "DeviceError",
    "HandshakeError",
    "NotConnected",
    "Options",
    "ProtocolError",
    "RemoteAccessError",
    "SdpSocket",
    "Timeout",
    "UsdpError",
    "WouldBlock",
    "create_connection",
    "socket",
]

from usdp import asyncio  # noqa: E402
from usdp._patch import HybridSocket, is_patched, patch, transport_of, unpatch  # noqa: E402
from usdp._rules import Rules, RulesError  # noqa: E402
from usdp._rules import load as load_rules  # noqa: E402
from usdp._rules import parse as parse_rules  # noqa: E402

__all__ += [
    "HybridSocket",
    "Rules",
    "RulesError",
    "asyncio",
    "is_patched",
    "load_rules",
    "parse_rules",
    "patch",
    "transport_of",
    "unpatch",
]
