"""asyncio's transport level over an SdpSocket: ``SdpTransport`` and ``SdpServer``.

The stdlib's selector transport only half fits an RDMA socket: it hands ``fileno()`` to
``os.sendfile`` (which would write the file into the readiness socketpair), and its server
makes the stdlib's transports, not ours. So usdp has its own ``asyncio.Transport``, shaped
like ``selector_events._SelectorSocketTransport``: the loop's ``add_reader``/``add_writer``
on the socket's readiness fd, the socket non-blocking (``recv`` raises BlockingIOError,
``send`` returns partial counts), a queue of unsent chunks with the stdlib's high/low
water marks, and ``BufferedProtocol`` reads straight into the protocol's buffer.

TLS is the stdlib's own ``sslproto.SSLProtocol`` put between this transport and the
application's protocol, as ``loop.start_tls`` and ``loop.create_connection(ssl=...)`` do.

Nothing here touches verbs: any socket with the same non-blocking contract works, which is
what the unit tests use (a kernel socketpair).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import socket as _socketmod
import ssl as _ssl
from asyncio import constants, sslproto, transports
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from usdp._errors import UsdpError

log = logging.getLogger("usdp")

#: The most one read callback takes without a BufferedProtocol (the stdlib's max_size).
MAX_READ = 256 * 1024
#: Queued chunks smaller than this are joined into one send: writelines() of many small
#: pieces would otherwise cost an RDMA frame each.
JOIN_LIMIT = 64 * 1024
#: The stdlib's default high-water mark for transports (low = high // 4).
DEFAULT_HIGH_WATER = 64 * 1024
#: How long the server waits before accepting again after running out of fds or memory.
ACCEPT_RETRY_DELAY = 1.0

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


def water_marks(high: int | None = None, low: int | None = None) -> tuple[int, int]:
    """The (high, low) pair ``set_write_buffer_limits`` settles on, as the stdlib does:
    high defaults to 64 KiB, or to 4 * low when only low is given; low to high // 4."""
    if high is None:
        high = DEFAULT_HIGH_WATER if low is None else 4 * low
    if low is None:
        low = high // 4
    if not high >= low >= 0:
        raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
    return high, low


class SdpTransport(transports._FlowControlMixin):
    """An ``asyncio.Transport`` on a connected, non-blocking SdpSocket."""

    #: loop.start_tls() may wrap it; loop.sendfile() reads the file and write()s it.
    _start_tls_compatible: ClassVar[bool] = True
    _sendfile_compatible: ClassVar[constants._SendfileMode] = constants._SendfileMode.FALLBACK

    _loop: asyncio.AbstractEventLoop
    _protocol_paused: bool  # read by asyncio's sendfile fallback

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: Any,
                 protocol: asyncio.BaseProtocol, waiter: asyncio.Future[None] | None = None,
                 server: SdpServer | None = None) -> None:
        super().__init__(None, loop)
        self._loop = loop
        self._sock = sock
        self._fd: int = sock.fileno()
        self._info: dict[str, Any] = {"socket": sock}
        for key, getter in (("sockname", sock.getsockname), ("peername", sock.getpeername)):
            try:
                self._info[key] = getter()
            except OSError:
                self._info[key] = None
        self._protocol = protocol
        self._buffered = False
        self.set_protocol(protocol)
        self._server = server
        self._buffer: collections.deque[memoryview] = collections.deque()
        self._buffer_size = 0
        self._high_water, self._low_water = water_marks()
        self._protocol_paused = False
        self._conn_lost = 0
        self._closing = False
        self._paused = False  # pause_reading()
        self._eof_seen = False  # the peer's EOF was delivered: never read again
        self._eof = False  # write_eof() called
        self._background: asyncio.Future[Any] | None = None  # shutdown/close off the loop
        if server is not None:
            server._attach(self)
        loop.call_soon(self._protocol.connection_made, self)
        loop.call_soon(self._add_reader)
        if waiter is not None:
            loop.call_soon(_set_result_unless_cancelled, waiter)

    def __repr__(self) -> str:
        state = "closed" if self._conn_lost else "closing" if self._closing else "open"
        return (f"<usdp.SdpTransport fd={self._fd} {state} peer={self._info['peername']} "
                f"buffered={self._buffer_size}>")

    # ------------------------------------------------------------------ BaseTransport

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._info.get(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; the queued bytes still go out, then connection_lost(None)."""
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        if not self._buffer:
            self._conn_lost += 1
            self._loop.remove_writer(self._fd)
            self._loop.call_soon(self._call_connection_lost, None)

    def abort(self) -> None:
        """Drop the queued bytes and close at once."""
        self._force_close(None)

    # ------------------------------------------------------------------ reading

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    def pause_reading(self) -> None:
        if self._closing or self._paused:
            return
        self._paused = True
        self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if self._closing or not self._paused:
            return
        self._paused = False
        self._add_reader()

    def _add_reader(self) -> None:
        if not self._paused and not self._closing and not self._eof_seen:
            self._loop.add_reader(self._fd, self._read_ready)

    def _read_ready(self) -> None:
        if self._conn_lost:
            return
        if self._buffered:
            self._read_into_buffer()
        else:
            self._read_bytes()

    def _read_into_buffer(self) -> None:
        proto: Any = self._protocol  # a BufferedProtocol
        try:
            buf = proto.get_buffer(-1)
            if not len(buf):
                raise RuntimeError("get_buffer() returned an empty buffer")
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.get_buffer() call failed.")
            return
        try:
            n = self._sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on usdp transport")
            return
        if not n:
            self._on_eof()
            return
        try:
            proto.buffer_updated(n)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")

    def _read_bytes(self) -> None:
        try:
            data = self._sock.recv(MAX_READ)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal read error on usdp transport")
            return
        if not data:
            self._on_eof()
            return
        proto: Any = self._protocol
        try:
            proto.data_received(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")

    def _on_eof(self) -> None:
        # The readiness fd stays readable at EOF: stop watching it whatever happens next.
        self._eof_seen = True
        self._loop.remove_reader(self._fd)
        proto: Any = self._protocol
        try:
            keep_open = proto.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:  # a true return keeps our write side open (half-close)
            self.close()

    # ------------------------------------------------------------------ writing

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, "
                            f"not {type(data).__name__!r}")
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        view = memoryview(data).cast("B")
        if not view:
            return
        if self._conn_lost:
            if self._conn_lost >= constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                log.warning("usdp transport: write() on a lost connection")
            self._conn_lost += 1
            return
        if not self._buffer:
            try:  # nothing queued: try to send at once
                n = self._sock.send(view)
            except (BlockingIOError, InterruptedError):
                n = 0
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on usdp transport")
                return
            if n == len(view):
                return
            view = view[n:]
            self._loop.add_writer(self._fd, self._write_ready)
        if not isinstance(view.obj, bytes):
            view = memoryview(bytes(view))  # the caller may reuse a mutable buffer
        self._buffer.append(view)
        self._buffer_size += len(view)
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        pieces = [memoryview(d).cast("B") for d in list_of_data]
        if sum(len(p) for p in pieces) <= JOIN_LIMIT:
            self.write(b"".join(pieces))  # one frame for many small pieces
            return
        for p in pieces:  # large pieces are queued as they are, without a join copy
            self.write(p)

    def write_eof(self) -> None:
        if self._closing or self._eof:
            return
        self._eof = True
        if not self._buffer:
            self._shutdown_write()

    def can_write_eof(self) -> bool:
        return True

    def _shutdown_write(self) -> None:
        self._off_loop(self._sock.shutdown, _socketmod.SHUT_WR)

    def _off_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a socket call that may wait for the peer off the event loop.

        shutdown(SHUT_WR) and close() post our EOF after any staged bytes, and both need a
        credit, which comes back only when the peer's application reads. That peer may be
        served by this very loop: waiting here would deadlock it (until the linger time
        runs out and the staged bytes are lost). A kernel socket's close does not wait
        either; the socket finishes in the loop's default executor.
        """
        prev = self._background
        if prev is not None and not prev.done():  # one at a time: close after shutdown
            prev.add_done_callback(lambda _f: self._off_loop(fn, *args))
            return
        try:
            fut = self._background = self._loop.run_in_executor(None, fn, *args)
        except RuntimeError:  # the loop's executor is already shut down
            try:
                fn(*args)
            except OSError as exc:
                log.debug("%r: %s: %s", self, getattr(fn, "__name__", fn), exc)
            return
        fut.add_done_callback(self._log_background_error)

    def _log_background_error(self, fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is not None:
            log.debug("%r: closing: %s", self, fut.exception())

    def _head(self) -> memoryview:
        """The next chunk to send; small queued chunks are joined first (up to JOIN_LIMIT)."""
        head = self._buffer[0]
        if len(self._buffer) == 1 or len(head) >= JOIN_LIMIT:
            return head
        parts: list[memoryview] = []
        size = 0
        while self._buffer and size + len(self._buffer[0]) <= JOIN_LIMIT:
            p = self._buffer.popleft()
            parts.append(p)
            size += len(p)
        joined = memoryview(b"".join(parts)) if len(parts) > 1 else parts[0]
        self._buffer.appendleft(joined)
        return joined

    def _write_ready(self) -> None:
        if self._conn_lost:
            return
        try:
            while self._buffer:
                head = self._head()
                n = self._sock.send(head)
                self._buffer_size -= n
                if n < len(head):
                    self._buffer[0] = head[n:]
                    break
                self._buffer.popleft()
        except (BlockingIOError, InterruptedError):
            pass
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.remove_writer(self._fd)
            self._buffer.clear()
            self._buffer_size = 0
            self._fatal_error(exc, "Fatal write error on usdp transport")
            return
        self._maybe_resume_protocol()
        if not self._buffer:
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._conn_lost += 1
                self._call_connection_lost(None)
            elif self._eof:
                self._shutdown_write()

    # ------------------------------------------------------------------ flow control

    def get_write_buffer_size(self) -> int:
        return self._buffer_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low_water, self._high_water

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high_water, self._low_water = water_marks(high, low)
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self) -> None:
        if self._buffer_size <= self._high_water or self._protocol_paused:
            return
        self._protocol_paused = True
        self._call_protocol("pause_writing")

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self._buffer_size <= self._low_water:
            self._protocol_paused = False
            self._call_protocol("resume_writing")

    def _call_protocol(self, method: str) -> None:
        try:
            getattr(self._protocol, method)()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler({
                "message": f"protocol.{method}() failed", "exception": exc,
                "transport": self, "protocol": self._protocol})

    # ------------------------------------------------------------------ errors, teardown

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        if isinstance(exc, OSError):
            log.debug("%r: %s: %s", self, message, exc)
        else:
            self._loop.call_exception_handler({
                "message": message, "exception": exc, "transport": self,
                "protocol": self._protocol})
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        """Close now, queued bytes dropped (also asyncio's SSL protocol calls this)."""
        if self._conn_lost:
            return
        if self._buffer:
            self._buffer.clear()
            self._buffer_size = 0
            self._loop.remove_writer(self._fd)
        if not self._closing:
            self._closing = True
            self._loop.remove_reader(self._fd)
        self._conn_lost += 1
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        proto: Any = self._protocol
        try:
            proto.connection_lost(exc)
        finally:
            self._off_loop(self._sock.close)
            server, self._server = self._server, None
            if server is not None:
                server._detach(self)


def _set_result_unless_cancelled(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.set_result(None)


def make_transport(loop: asyncio.AbstractEventLoop, sock: Any,
                   protocol: asyncio.BaseProtocol, waiter: asyncio.Future[None],
                   sslcontext: _ssl.SSLContext | None, *, server_side: bool = False,
                   server_hostname: str | None = None,
                   ssl_handshake_timeout: float | None = None,
                   server: SdpServer | None = None) -> asyncio.Transport:
    """The transport the application's protocol sees: ours, or TLS (the stdlib's
    SSLProtocol between ours and the protocol). ``waiter`` is done when the protocol's
    connection_made has run (after the TLS handshake, with TLS)."""
    if sslcontext is None:
        return SdpTransport(loop, sock, protocol, waiter, server)
    tls = sslproto.SSLProtocol(loop, protocol, sslcontext, waiter, server_side,
                               server_hostname,
                               ssl_handshake_timeout=ssl_handshake_timeout)  # type: ignore[arg-type]
    SdpTransport(loop, sock, tls, None, server)
    return tls._app_transport


class SdpServer(asyncio.AbstractServer):
    """``asyncio.Server``'s interface on one usdp listener, making ``SdpTransport``s."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listener: Any,
                 protocol_factory: ProtocolFactory, sslcontext: _ssl.SSLContext | None,
                 backlog: int, ssl_handshake_timeout: float | None) -> None:
        self._loop = loop
        self._listener: Any = listener
        self._factory = protocol_factory
        self._ssl = sslcontext
        self._backlog = backlog
        self._ssl_handshake_timeout = ssl_handshake_timeout
        self._serving = False
        self._serving_forever_fut: asyncio.Future[None] | None = None
        self._transports: set[SdpTransport] = set()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._waiters: list[asyncio.Future[None]] = []

    def __repr__(self) -> str:
        return f"<usdp.SdpServer sockets={self.sockets!r}>"

    @property
    def sockets(self) -> tuple[Any, ...]:
        return () if self._listener is None else (self._listener,)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        self._start()
        await asyncio.sleep(0)

    def _start(self) -> None:
        if self._serving or self._listener is None:
            return
        self._serving = True
        self._loop.add_reader(self._listener.fileno(), self._accept_ready)

    def _accept_ready(self) -> None:
        for _ in range(self._backlog):
            if self._listener is None:
                return
            try:
                conn, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds or memory: stop accepting for a while (as asyncio does).
                    log.error("usdp server %s: accept failed, retrying in %.0f s: %s",
                              self._listener, ACCEPT_RETRY_DELAY, exc)
                    self._loop.remove_reader(self._listener.fileno())
                    self._serving = False
                    self._loop.call_later(ACCEPT_RETRY_DELAY, self._start)
                    return
                if isinstance(exc, UsdpError):  # one failed handshake: skip that request
                    log.warning("usdp server: connection attempt failed: %s", exc)
                    continue
                raise
            log.info("asyncio accepted %s:%d over sdp", addr[0], addr[1])
            self._accepted(conn)

    def _accepted(self, conn: Any) -> None:
        try:
            conn.setblocking(False)
            protocol = self._factory()
            waiter: asyncio.Future[None] = self._loop.create_future()
            make_transport(self._loop, conn, protocol, waiter, self._ssl, server_side=True,
                           ssl_handshake_timeout=self._ssl_handshake_timeout, server=self)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            log.error("usdp server: setting up an accepted connection failed: %r", exc)
            conn.close()
            return
        if self._ssl is not None:  # a failed handshake is the peer's problem, not ours
            task = self._loop.create_task(self._handshake(waiter))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, waiter: asyncio.Future[None]) -> None:
        try:
            await waiter
        except (ConnectionError, _ssl.SSLError, TimeoutError, OSError) as exc:
            log.warning("usdp server: TLS handshake failed: %r", exc)

    def _attach(self, transport: SdpTransport) -> None:
        self._transports.add(transport)

    def _detach(self, transport: SdpTransport) -> None:
        self._transports.discard(transport)
        self._wake_waiters()

    def _wake_waiters(self) -> None:
        if self._listener is not None or self._transports:
            return
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def close(self) -> None:
        """Stop listening; connections already made go on (wait_closed() waits for them)."""
        lst, self._listener = self._listener, None
        if lst is None:
            return
        if self._serving:
            self._loop.remove_reader(lst.fileno())
        self._serving = False
        lst.close()
        fut = self._serving_forever_fut
        if fut is not None and not fut.done():
            fut.cancel()
            self._serving_forever_fut = None
        self._wake_waiters()

    def close_clients(self) -> None:
        for t in list(self._transports):
            t.close()

    def abort_clients(self) -> None:
        for t in list(self._transports):
            t.abort()

    async def wait_closed(self) -> None:
        """Wait until close() was called and every connection it made has gone."""
        if self._listener is None and not self._transports:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        await waiter

    async def serve_forever(self) -> None:
        if self._serving_forever_fut is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if self._listener is None:
            raise RuntimeError(f"server {self!r} is closed")
        self._start()
        self._serving_forever_fut = self._loop.create_future()
        try:
            await self._serving_forever_fut
        except asyncio.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._serving_forever_fut = None
