"""The ``usdp://`` backend for dask.distributed: connector, listener, address handling.

Connection setup on the client side (route resolution and the Hello handshake: several
round trips) runs in the loop's default executor, as ``usdp.asyncio`` does; a listener's
accept is local work and runs on the loop, driven by the listening socket's CM event fd.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed.comm.addressing import parse_host_port, unparse_host_port
from distributed.comm.core import BaseListener, Connector
from distributed.comm.registry import Backend
from distributed.comm.utils import ensure_concrete_host
from distributed.utils import ensure_ip, get_ip

from usdp._socket import SdpSocket
from usdp.dask._comm import USDPComm
from usdp.dask._stream import close_quietly

log = logging.getLogger("usdp.dask")
PREFIX = "usdp://"
_TCP_USER_TIMEOUT: int = getattr(socket, "TCP_USER_TIMEOUT", 18)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _check_encryption(address: str, connection_args: dict[str, Any]) -> None:
    if connection_args.get("require_encryption"):
        raise RuntimeError("encryption required by Dask configuration, refusing "
                           f"communication from/to {PREFIX + address!r} (usdp:// is "
                           "not encrypted)")


def _prepare(sock: SdpSocket) -> None:
    """As tcp:// does: keepalive probes find a dead peer on an idle connection, and
    TCP_USER_TIMEOUT (here: how long a send may go unacknowledged) is dask's
    ``distributed.comm.timeouts.tcp`` (30 s), not usdp's 5 s default, which a busy
    (emulated) host can exceed while dask processes start."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.tcp"), "seconds")
    sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, int(timeout * 1000))


class USDPConnector(Connector):
    """Opens ``usdp://host:port`` connections."""

    async def connect(self, address: str, deserialize: bool = True,
                      **connection_args: Any) -> USDPComm:
        _check_encryption(address, connection_args)
        host, port = parse_host_port(address)
        loop = asyncio.get_running_loop()
        sock = SdpSocket(_family(host))
        setup = loop.run_in_executor(None, sock.connect, (host, port))
        try:
            await asyncio.shield(setup)
        except asyncio.CancelledError:
            # dask's connect timeout cancels us; the handshake thread cannot be
            # interrupted, so the socket is closed once it is done.
            setup.add_done_callback(lambda _f: close_quietly(sock))
            raise
        except BaseException:
            close_quietly(sock)
            raise
        try:
            _prepare(sock)
            local = PREFIX + unparse_host_port(*sock.getsockname()[:2])
            comm = USDPComm(sock, local, PREFIX + address, deserialize)
        except BaseException:
            close_quietly(sock)
            raise
        log.debug("connected %s -> %s", local, address)
        return comm


class USDPListener(BaseListener):
    """Listens on ``usdp://host:port`` and hands each connection to dask."""

    prefix = PREFIX  # the Worker reads it to build its address

    def __init__(self, address: str, comm_handler: Any, deserialize: bool = True,
                 allow_offload: bool = True, default_host: str | None = None,
                 default_port: int = 0, **connection_args: Any) -> None:
        super().__init__()
        _check_encryption(address, connection_args)
        self.ip, self.port = parse_host_port(address, default_port)
        self.default_host = default_host
        self.comm_handler = comm_handler
        self.deserialize = deserialize
        self.allow_offload = allow_offload
        self._sock: SdpSocket | None = None
        self._bound: tuple[str, int] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        host = self.ip or "0.0.0.0"
        sock = SdpSocket(_family(host))
        try:
            sock.bind((host, self.port))
            sock.listen(int(dask.config.get("distributed.comm.socket-backlog")))
            sock.setblocking(False)
            self._bound = sock.getsockname()[:2]
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(sock.fileno(), self._on_readable)
        except BaseException:
            close_quietly(sock)
            raise
        self._sock = sock
        log.debug("listening on %s", self.listen_address)

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            close_quietly(sock)

    def _on_readable(self) -> None:
        """Accept every pending connection (level-triggered CM event fd)."""
        while self._sock is not None:
            try:
                conn, addr = self._sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError as exc:  # a client that failed its handshake
                log.warning("listener %s: %s", self.listen_address, exc)
                continue
            except OSError as exc:
                log.error("listener %s: accept failed: %s", self.listen_address, exc)
                return
            assert self._loop is not None
            task = self._loop.create_task(self._handle(conn, addr))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, conn: SdpSocket, addr: tuple[Any, ...]) -> None:
        peer = PREFIX + unparse_host_port(*addr[:2])
        try:
            _prepare(conn)
            local = PREFIX + unparse_host_port(*conn.getsockname()[:2])
            comm = USDPComm(conn, local, peer, self.deserialize)
        except BaseException:
            close_quietly(conn)
            raise
        if self._sock is None:
            # stop() came between accept and now: drop it, or the client would wait
            # forever in dask's (deliberately untimed) handshake.
            comm.abort()
            return
        comm.allow_offload = self.allow_offload
        log.debug("incoming connection from %s to %s", peer, local)
        try:
            await self.on_connection(comm)
        except OSError:  # CommClosedError is one
            log.info("connection from %s closed before the handshake completed", peer)
            return
        await self.comm_handler(comm)

    def get_host_port(self) -> tuple[str, int]:
        if self._bound is None:
            raise ValueError("invalid operation on a usdp listener that is not started")
        return self._bound[0], int(self._bound[1])

    @property
    def listen_address(self) -> str:
        return PREFIX + unparse_host_port(*self.get_host_port())

    @property
    def contact_address(self) -> str:
        host, port = self.get_host_port()
        host = ensure_concrete_host(host, default_host=self.default_host)
        return PREFIX + unparse_host_port(host, port)


class USDPBackend(Backend):
    """``usdp://host:port``: registered through the ``distributed.comm.backends`` entry
    point, so any dask process that has usdp installed can use it."""

    def get_connector(self) -> USDPConnector:
        return USDPConnector()

    def get_listener(self, loc: str, handle_comm: Any, deserialize: bool,
                     **connection_args: Any) -> USDPListener:
        return USDPListener(loc, handle_comm, deserialize, **connection_args)

    def get_address_host(self, loc: str) -> str:
        return str(parse_host_port(loc)[0])

    def get_address_host_port(self, loc: str) -> tuple[str, int]:
        host, port = parse_host_port(loc)
        return str(host), int(port)

    def resolve_address(self, loc: str) -> str:
        host, port = parse_host_port(loc)
        return unparse_host_port(ensure_ip(host), port)

    def get_local_address_for(self, loc: str) -> str:
        host = ensure_ip(parse_host_port(loc)[0])
        return unparse_host_port(get_ip(host), None)


__all__ = ["PREFIX", "USDPBackend", "USDPConnector", "USDPListener"]
