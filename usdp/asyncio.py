"""asyncio over usdp: the protocol/transport level, streams and TLS, on RDMA.

``create_connection``/``create_server`` are ``loop.create_connection``/``loop.create_server``
for usdp: real ``asyncio.Transport``s (``usdp._aio_transport``) driven by the event loop's
selector on each SdpSocket's readiness fd (readable when data, EOF or an error waits;
writable when a send would take bytes), so a connection costs no thread. Only the client's
connection setup (address and route resolution, the Hello handshake: several round trips)
runs in the loop's default executor. ``open_connection``/``start_server`` are the stdlib's
streams on top, as in asyncio. ``ssl=`` takes an ``ssl.SSLContext`` everywhere and runs
the stdlib's own TLS protocol over the usdp transport.

Needs a selector event loop (the default on Unix); uvloop and the proactor are refused.

    reader, writer = await usdp.asyncio.open_connection("198.18.0.1", 7000)
"""

from __future__ import annotations

import asyncio
import logging
import socket as _socketmod
import ssl as _ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar

from usdp._aio_transport import SdpServer, SdpTransport, make_transport
from usdp._config import Options
from usdp._patch import _hook_asyncio_sendfile
from usdp._socket import SdpSocket

__all__ = ["SdpServer", "SdpTransport", "create_connection", "create_server",
           "open_connection", "start_server"]

log = logging.getLogger("usdp")
_DEFAULT_LIMIT = 2 ** 16  # asyncio.streams' own default
ClientConnectedCb = Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                             Awaitable[None] | None]
_P = TypeVar("_P", bound=asyncio.BaseProtocol)


def _loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.get_running_loop()
    if not isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        raise TypeError(f"usdp.asyncio needs a selector event loop, not {type(loop).__name__}")
    _hook_asyncio_sendfile()  # loop.sock_sendfile(an SdpSocket) must not os.sendfile
    return loop


def _family(host: str | None, family: int) -> int:
    if family:
        return family
    return _socketmod.AF_INET6 if host and ":" in host else _socketmod.AF_INET


def _client_ssl(ssl: _ssl.SSLContext | bool | None, server_hostname: str | None,
                ssl_handshake_timeout: float | None) -> _ssl.SSLContext | None:
    """Check the TLS arguments as loop.create_connection does; ``ssl=True`` is a default
    context (certificates and host name checked)."""
    if not ssl:
        if server_hostname is not None:
            raise ValueError("server_hostname is only meaningful with ssl")
        if ssl_handshake_timeout is not None:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        return None
    if ssl is True:
        return _ssl.create_default_context()
    if not isinstance(ssl, _ssl.SSLContext):
        raise TypeError(f"ssl must be an ssl.SSLContext or True, not {type(ssl).__name__}")
    return ssl


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int,
                   options: Options | None, timeout: float | None, family: int,
                   local_addr: tuple[str, int] | None) -> SdpSocket:
    """A connected, non-blocking SdpSocket; the setup runs in the default executor."""
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
    except asyncio.CancelledError:
        raise
    except BaseException:
        sock.close()
        raise
    return sock


async def create_connection(protocol_factory: Callable[[], _P], host: str, port: int, *,
                            ssl: _ssl.SSLContext | bool | None = None,
                            server_hostname: str | None = None,
                            ssl_handshake_timeout: float | None = None,
                            options: Options | None = None, timeout: float | None = None,
                            family: int = 0, local_addr: tuple[str, int] | None = None,
                            ) -> tuple[asyncio.Transport, _P]:
    """Connect over RDMA; like ``loop.create_connection`` (``timeout`` bounds the setup).

    With ``ssl``, the host name checked is ``server_hostname``, else ``host`` ("" skips
    the check, as in asyncio); the call returns once the TLS handshake is done.
    """
    loop = _loop()
    sslcontext = _client_ssl(ssl, server_hostname, ssl_handshake_timeout)
    sock = await _connect(loop, host, port, options, timeout, family, local_addr)
    waiter: asyncio.Future[None] = loop.create_future()
    try:
        protocol = protocol_factory()
        hostname = host if server_hostname is None else server_hostname
        transport = make_transport(loop, sock, protocol, waiter, sslcontext,
                                   server_hostname=hostname or None,
                                   ssl_handshake_timeout=ssl_handshake_timeout)
    except BaseException:
        sock.close()
        raise
    try:
        await waiter
    except BaseException:
        transport.close()
        raise
    log.info("asyncio -> %s:%d over sdp%s", host, port, " with tls" if sslcontext else "")
    return transport, protocol


async def create_server(protocol_factory: Callable[[], asyncio.BaseProtocol], host: str,
                        port: int, *, ssl: _ssl.SSLContext | None = None, backlog: int = 128,
                        options: Options | None = None, family: int = 0,
                        ssl_handshake_timeout: float | None = None,
                        start_serving: bool = True) -> SdpServer:
    """Listen over RDMA; like ``loop.create_server`` (one address). The server has
    ``asyncio.Server``'s interface; its ``sockets`` are the SdpSocket listener."""
    loop = _loop()
    if ssl is not None and not isinstance(ssl, _ssl.SSLContext):
        raise TypeError(f"ssl must be an ssl.SSLContext, not {type(ssl).__name__}")
    if ssl_handshake_timeout is not None and ssl is None:
        raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
    lst = SdpSocket(_family(host, family), options=options)
    try:
        lst.bind((host, port))
        lst.listen(backlog)
        lst.setblocking(False)
        server = SdpServer(loop, lst, protocol_factory, ssl, backlog, ssl_handshake_timeout)
        if start_serving:
            await server.start_serving()
    except BaseException:
        lst.close()
        raise
    return server


async def open_connection(host: str, port: int, *, limit: int = _DEFAULT_LIMIT,
                          ssl: _ssl.SSLContext | bool | None = None,
                          server_hostname: str | None = None,
                          ssl_handshake_timeout: float | None = None,
                          options: Options | None = None, timeout: float | None = None,
                          family: int = 0, local_addr: tuple[str, int] | None = None,
                          ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect over RDMA; like ``asyncio.open_connection`` (``timeout`` bounds the setup)."""
    loop = _loop()
    reader = asyncio.StreamReader(limit=limit, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport, _ = await create_connection(
        lambda: protocol, host, port, ssl=ssl, server_hostname=server_hostname,
        ssl_handshake_timeout=ssl_handshake_timeout, options=options, timeout=timeout,
        family=family, local_addr=local_addr)
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


async def start_server(client_connected_cb: ClientConnectedCb, host: str, port: int, *,
                       limit: int = _DEFAULT_LIMIT, ssl: _ssl.SSLContext | None = None,
                       ssl_handshake_timeout: float | None = None,
                       options: Options | None = None, family: int = 0,
                       backlog: int = 100, start_serving: bool = True) -> SdpServer:
    """Listen over RDMA; like ``asyncio.start_server`` (one address)."""
    loop = _loop()

    def factory() -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, client_connected_cb, loop=loop)

    return await create_server(factory, host, port, ssl=ssl, backlog=backlog,
                               options=options, family=family,
                               ssl_handshake_timeout=ssl_handshake_timeout,
                               start_serving=start_serving)
