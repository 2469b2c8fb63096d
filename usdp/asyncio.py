"""asyncio streams over usdp: the stdlib's ``StreamReader``/``StreamWriter`` on RDMA.

The data path is the selector event loop's own socket transport, driven by the
SdpSocket's readiness fd (``fileno()``: readable when data, EOF or an error waits; writable
when a credit and a send buffer are free), so a connection costs no thread. Only the
client's connection setup (address and route resolution, the Hello handshake: several
round trips) runs in the loop's default executor. A listener's handshake is local work
(no round trip: it does not wait for the peer's RTU) and runs on the loop.

Needs a selector event loop (the default on Unix); uvloop and the proactor are refused.

    reader, writer = await usdp.asyncio.open_connection("198.18.0.1", 7000)
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket as _socketmod
from collections.abc import Awaitable, Callable
from typing import Any

from usdp._config import Options
from usdp._errors import UsdpError
from usdp._socket import SdpSocket

__all__ = ["open_connection", "start_server"]

log = logging.getLogger("usdp")
_DEFAULT_LIMIT = 2 ** 16  # asyncio.streams' own default
ClientConnectedCb = Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                             Awaitable[None] | None]


def _loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.get_running_loop()
    if not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        raise TypeError(f"usdp.asyncio needs a selector event loop, not {type(loop).__name__}")
    return loop


def _family(host: str | None, family: int) -> int:
    if family:
        return family
    return _socketmod.AF_INET6 if host and ":" in host else _socketmod.AF_INET


async def open_connection(host: str, port: int, *, limit: int = _DEFAULT_LIMIT,
                          options: Options | None = None, timeout: float | None = None,
                          family: int = 0, local_addr: tuple[str, int] | None = None,
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect over RDMA; like ``asyncio.open_connection`` (``timeout`` bounds the setup)."""
    loop = _loop()
    sock = SdpSocket(_family(host, family), options=options)
    try:
        if timeout is not None:
            sock.settimeout(timeout)
        if local_addr is not None:
            sock.bind(local_addr)
        setup = loop.run_in_executor(None, sock.connect, (host, port))
        try:
            await asyncio.shield(setup)
        except asyncio.CancelledError:
            # The handshake thread cannot be interrupted: close once it is done.
            setup.add_done_callback(lambda _f: sock.close())
            raise
        sock.setblocking(False)
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        duck: Any = sock  # a socket.socket look-alike, which is all the transport uses
        transport, _ = await loop.connect_accepted_socket(lambda: protocol, duck)
    except asyncio.CancelledError:
        raise
    except BaseException:
        sock.close()
        raise
    log.info("asyncio -> %s:%d over sdp", host, port)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


class _Listener(SdpSocket):
    """An SdpSocket listener for asyncio's accept loop: a failed handshake becomes
    ``ConnectionAbortedError``, which asyncio skips, instead of an error that would be
    reported as a crash of the accept callback."""

    def accept(self) -> tuple[SdpSocket, Any]:
        try:
            conn, addr = super().accept()
        except BlockingIOError:
            raise
        except UsdpError as exc:
            log.warning("asyncio listener: connection attempt failed: %s", exc)
            raise ConnectionAbortedError(errno.ECONNABORTED, str(exc)) from exc
        log.info("asyncio accepted %s:%d over sdp", addr[0], addr[1])
        return conn, addr


async def start_server(client_connected_cb: ClientConnectedCb, host: str, port: int, *,
                       limit: int = _DEFAULT_LIMIT, options: Options | None = None,
                       family: int = 0, backlog: int = 100,
                       start_serving: bool = True) -> asyncio.Server:
    """Listen over RDMA; like ``asyncio.start_server`` (one address, the stdlib's Server)."""
    loop = _loop()
    lst = _Listener(_family(host, family), options=options)
    try:
        lst.bind((host, port))
        lst.listen(backlog)
        lst.setblocking(False)
    except BaseException:
        lst.close()
        raise

    def factory() -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    duck: Any = lst  # a socket.socket look-alike, which is all the server uses
    try:
        return await loop.create_server(factory, sock=duck, backlog=backlog,
                                        start_serving=start_serving)
    except BaseException:
        lst.close()
        raise
