"""``SdpSocket``: a ``socket.socket`` look-alike over RDMA, thin on top of ``_setup`` and
``_endpoint``.

Blocking rules follow ``socket.socket``: the default timeout (``socket.getdefaulttimeout``)
applies; a timeout of 0 is non-blocking (``BlockingIOError``, errno EAGAIN); a positive one
raises ``TimeoutError`` (errno ETIMEDOUT). Every error is an ``OSError`` with a real errno
(see ``usdp._errors``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import socket as _stdsocket
import struct as _struct
import sys
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from usdp import _fork
from usdp._config import KEEPALIVE_DEFAULT, Options
from usdp._errors import (
    AlreadyConnected,
    BrokenPipe,
    DeviceError,
    InvalidArgument,
    NotConnected,
    UsdpError,
    error_from_errno,
    with_context,
)

if TYPE_CHECKING:  # imported when first used: they need pyverbs (see _load_rdma)
    from usdp import _setup
    from usdp._endpoint import Endpoint


def _load_rdma(what: str) -> None:
    """Import ``usdp._setup`` (and with it pyverbs) on the first connect or listen.

    ``import usdp`` does not need pyverbs: the pure modules, the rules and the drop-in's
    TCP side work without it. Without pyverbs, this raises a :class:`DeviceError`
    naming ``what`` (the step and address) and the fix.
    """
    try:
        import usdp._setup  # noqa: F401
    except DeviceError as exc:
        raise with_context(exc, what) from exc


#: The address family number the SDP kernel module used, for code that asks for SDP by name.
AF_INET_SDP = 27
SHUT_RD, SHUT_WR, SHUT_RDWR = _stdsocket.SHUT_RD, _stdsocket.SHUT_WR, _stdsocket.SHUT_RDWR
#: Linux's TCP_USER_TIMEOUT (ms): here, how long a send may go unacknowledged by the peer.
_TCP_USER_TIMEOUT: int = getattr(_stdsocket, "TCP_USER_TIMEOUT", 18)
#: Linux's SO_BUSY_POLL (microseconds): here, the most a blocking call busy-polls.
_SO_BUSY_POLL: int = getattr(_stdsocket, "SO_BUSY_POLL", 46)
_Address = tuple[Any, ...]  # (host, port) or, for AF_INET6, (host, port, flow, scope)
_MSG_PEEK: int = _stdsocket.MSG_PEEK
_MSG_WAITALL: int = _stdsocket.MSG_WAITALL
_MSG_DONTWAIT: int = _stdsocket.MSG_DONTWAIT
_RECV_FLAGS = _MSG_PEEK | _MSG_WAITALL | _MSG_DONTWAIT
# MSG_NOSIGNAL: usdp never raises SIGPIPE anyway; MSG_MORE: a hint TCP may ignore too.
_SEND_FLAGS = _MSG_DONTWAIT | _stdsocket.MSG_NOSIGNAL | getattr(_stdsocket, "MSG_MORE", 0)


def _writable_view(buffer: Any) -> memoryview:
    """A writable byte view of ``buffer``; TypeError (as socket.recv_into) if read-only."""
    mv = memoryview(buffer)
    if mv.readonly:
        raise TypeError("recv_into() argument 'buffer' must be read-write bytes-like object, "
                        f"not {type(buffer).__name__}")
    return mv.cast("B")


class SdpSocket:
    """A SOCK_STREAM socket whose bytes travel over an RDMA RC queue pair."""

    def __init__(self, family: int = _stdsocket.AF_INET, type: int = _stdsocket.SOCK_STREAM,
                 proto: int = 0, *, options: Options | None = None) -> None:
        if family == AF_INET_SDP:
            family = _stdsocket.AF_INET  # SDP's own family number means "IPv4, over SDP"
        if family not in (_stdsocket.AF_INET, _stdsocket.AF_INET6):
            raise InvalidArgument(errno.EAFNOSUPPORT, "usdp supports AF_INET and AF_INET6")
        if type & ~(_stdsocket.SOCK_NONBLOCK | _stdsocket.SOCK_CLOEXEC) \
                != _stdsocket.SOCK_STREAM:
            raise InvalidArgument(errno.EPROTOTYPE, "usdp sockets are SOCK_STREAM only")
        self.family, self.type, self.proto = family, _stdsocket.SOCK_STREAM, proto
        self._opts = options or Options.from_env()
        self._timeout: float | None = _stdsocket.getdefaulttimeout()
        if type & _stdsocket.SOCK_NONBLOCK:
            self._timeout = 0.0
        self._bound: _Address | None = None
        self._listener: _setup.Listener | None = None
        self._ep: Endpoint | None = None
        self._peer: _Address | None = None
        self._rd_shut = False
        self._wr_shut = False
        self._so_linger: float | None = None  # SO_LINGER: None off, else seconds
        self._closed = False
        self._io_refs = 0
        self._sockopts: dict[tuple[int, int], int] = {}
        self._close_lock = threading.Lock()
        self._fork_gen = _fork.generation  # see _check_open and usdp._fork

    # ------------------------------------------------------------------ misc

    def __repr__(self) -> str:
        if self._closed:
            return "<usdp.SdpSocket [closed]>"
        parts = [f"fd={self._fileno_or_neg()}"]
        with contextlib.suppress(OSError):
            parts.append(f"laddr={self.getsockname()}")
        if self._peer:
            parts.append(f"raddr={self._peer}")
        return f"<usdp.SdpSocket {' '.join(parts)}>"

    def _fileno_or_neg(self) -> int:
        try:
            return self.fileno()
        except OSError:
            return -1

    def __enter__(self) -> SdpSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise error_from_errno(errno.EBADF, "Bad file descriptor (socket is closed)")
        if self._fork_gen != _fork.generation:
            raise _fork.inherited_error()

    def _connected(self) -> Endpoint:
        self._check_open()
        if self._ep is None:
            raise NotConnected(errno.ENOTCONN, "Transport endpoint is not connected")
        return self._ep

    # ------------------------------------------------------------------ timeouts

    def settimeout(self, value: float | None) -> None:
        if value is not None:
            value = float(value)
            if value < 0:
                raise ValueError("Timeout value out of range")
        self._timeout = value

    def gettimeout(self) -> float | None:
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def getblocking(self) -> bool:
        return self._timeout != 0.0

    # ------------------------------------------------------------------ addresses

    def bind(self, address: _Address) -> None:
        self._check_open()
        if self._bound is not None:
            raise InvalidArgument(errno.EINVAL, "socket is already bound")
        self._bound = (address[0], int(address[1]))

    def getsockname(self) -> _Address:
        self._check_open()
        if self._listener is not None:
            return self._listener.addr
        if self._ep is not None:
            from usdp._cm import local_addr

            return local_addr(self._ep.cmid)
        if self._bound is not None:
            return self._bound
        return ("0.0.0.0", 0)

    def getpeername(self) -> _Address:
        self._connected()
        assert self._peer is not None
        return self._peer

    # ------------------------------------------------------------------ server side

    def listen(self, backlog: int = 128) -> None:
        self._check_open()
        if self._ep is not None:
            raise AlreadyConnected(errno.EISCONN, "socket is connected")
        if self._listener is not None:
            return
        if self._bound is None:
            raise InvalidArgument(errno.EINVAL, "bind() a concrete address before listen()")
        # RDMA CM drops connection requests beyond the backlog and the client's CM retries
        # only after seconds (TCP: 1 s), so a small backlog (socketserver's 5) stalls
        # bursts of clients: never go below 128.
        _load_rdma(f"listen on {self._bound[0]}:{self._bound[1]}")
        from usdp._setup import Listener

        self._listener = Listener(self._bound, max(backlog, 128), self._opts, self.family)

    def accept(self) -> tuple[SdpSocket, _Address]:
        """Wait for a connection; returns ``(SdpSocket, (host, port))``."""
        self._check_open()
        if self._listener is None:
            raise InvalidArgument(errno.EINVAL, "accept() on a socket that is not listening")
        ep, addr = self._listener.accept(self._timeout)
        s = SdpSocket(self.family, options=self._opts)
        s._ep, s._peer = ep, addr
        s._apply_options(ep)
        # As socket.socket: an accepted socket is blocking, or has the default timeout.
        s._timeout = _stdsocket.getdefaulttimeout()
        return s, addr

    # ------------------------------------------------------------------ client side

    def connect(self, address: _Address) -> None:
        self._check_open()
        if self._ep is not None:
            raise AlreadyConnected(errno.EISCONN, "socket is already connected")
        if self._listener is not None:
            raise InvalidArgument(errno.EINVAL, "socket is listening")
        host, port = address[0], int(address[1])
        src = self._bound[0] if self._bound else None
        _load_rdma(f"connect to {host}:{port}")
        from usdp._cm import peer_addr
        from usdp._setup import connect

        self._ep = connect((host, port), src, self._opts,
                           self._timeout if self._timeout else None)
        self._peer = peer_addr(self._ep.cmid)
        self._apply_options(self._ep)

    def _apply_options(self, ep: Endpoint) -> None:
        """Socket options set before the connection existed."""
        if self._opts.keepalive:
            ep.set_keepalive(self._opts.keepalive)
        if self._opts.nodelay:
            ep.set_nodelay(True)
        ep.set_busy_poll(self._opts.busy_poll)

    def connect_ex(self, address: _Address) -> int:
        try:
            self.connect(address)
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    # ------------------------------------------------------------------ data

    def send(self, data: Any, flags: int = 0) -> int:
        """Send some of ``data``; returns how many bytes were taken (at least 1)."""
        timeout = self._send_timeout(flags)
        ep, mv = self._send_target(data)
        if not mv:
            return 0
        return ep.send(mv, timeout)

    def sendall(self, data: Any, flags: int = 0) -> None:
        """Send all of ``data``."""
        timeout = self._send_timeout(flags)
        ep, mv = self._send_target(data)
        ep.sendall(mv, timeout)

    def _send_target(self, data: Any) -> tuple[Endpoint, memoryview]:
        ep = self._connected()
        if self._wr_shut:
            raise BrokenPipe(errno.EPIPE, "Broken pipe (write side shut down)")
        return ep, memoryview(data).cast("B")

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        buf = bytearray(bufsize)
        n = self.recv_into(buf, bufsize, flags)
        del buf[n:]
        return bytes(buf)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """As ``socket.recv_into``, with MSG_PEEK, MSG_WAITALL and MSG_DONTWAIT."""
        ep = self._connected()
        mv = _writable_view(buffer)  # before anything is consumed, as the stdlib checks
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        if nbytes > len(mv):
            raise ValueError("buffer too small for requested bytes")
        if nbytes:
            mv = mv[:nbytes]
        timeout = self._recv_timeout(flags)
        if not mv:
            return 0
        if flags & _MSG_PEEK:
            return self._recv_peek(ep, mv, timeout, bool(flags & _MSG_WAITALL))
        if flags & _MSG_WAITALL and timeout != 0.0:
            return self._recv_all(ep, mv, timeout)
        return self._recv_some(ep, mv, timeout)

    def _recv_some(self, ep: Endpoint, mv: memoryview, timeout: float | None) -> int:
        return ep.recv_into(mv, timeout)

    # ------------------------------------------------------------------ scatter/gather, sendfile
    # Built only on send/recv_into/sendall above, so they follow whatever is beneath.

    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0,
                address: Any = None) -> int:
        """Gather send: like one ``send()`` of the buffers joined (returns how many bytes
        were taken, from the front). Small buffers are joined so they share a frame;
        large ones go as they are. No ancillary data: a stream over RDMA has none."""
        if any(True for _ in ancdata):
            raise InvalidArgument(errno.EOPNOTSUPP, "sendmsg: usdp sockets carry no "
                                  "ancillary data (SCM_RIGHTS and the like need a Unix socket)")
        if address is not None:
            raise AlreadyConnected(errno.EISCONN, "sendmsg: an address on a connected "
                                   "stream socket")
        sent = 0
        for chunk in _gather(buffers):
            try:
                n = self.send(chunk, flags)
            except (BlockingIOError, TimeoutError):
                if sent:
                    return sent  # what was taken so far, as a short send
                raise
            sent += n
            if n < len(chunk):
                break
        return sent

    def recvmsg(self, bufsize: int, ancbufsize: int = 0,
                flags: int = 0) -> tuple[bytes, list[Any], int, Any]:
        """``(data, [], 0, None)``: like ``recv()``; there is never ancillary data."""
        _check_ancbufsize(ancbufsize)
        return self.recv(bufsize, flags), [], 0, None

    def recvmsg_into(self, buffers: Any, ancbufsize: int = 0,
                     flags: int = 0) -> tuple[int, list[Any], int, Any]:
        """Scatter receive: fills the buffers in order; ``(nbytes, [], 0, None)``."""
        _check_ancbufsize(ancbufsize)
        views = [memoryview(b).cast("B") for b in buffers]
        if len(views) == 1:
            return self.recv_into(views[0], 0, flags), [], 0, None
        # One receive for all (what is there now, as a kernel socket gives), then spread:
        # a receive per buffer could block after the first one is full.
        tmp = bytearray(sum(len(v) for v in views))
        n = self.recv_into(tmp, 0, flags)
        done = 0
        for v in views:
            take = min(len(v), n - done)
            if take <= 0:
                break
            v[:take] = tmp[done:done + take]
            done += take
        return n, [], 0, None

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """Send a file (binary mode, from ``offset``, ``count`` bytes or to its end); like
        ``socket.socket.sendfile``: returns the bytes sent and leaves the file position
        after them. RDMA has no os.sendfile: the file is read in chunks and sendall()ed."""
        if "b" not in getattr(file, "mode", "b"):
            raise ValueError("file should be opened in binary mode")
        if count is not None:
            if not isinstance(count, int):
                raise TypeError(f"count must be a positive integer (got {count!r})")
            if count <= 0:
                raise ValueError(f"count must be a positive integer (got {count!r})")
        if self._timeout == 0.0:
            raise ValueError("non-blocking sockets are not supported")
        if offset:
            file.seek(offset)
        chunk = bytearray(_SENDFILE_CHUNK)
        view = memoryview(chunk)
        sent = 0
        try:
            while count is None or sent < count:
                want = len(chunk) if count is None else min(len(chunk), count - sent)
                if hasattr(file, "readinto"):
                    n = file.readinto(view[:want])
                    data: Any = view[:n]
                else:
                    data = file.read(want)
                    n = len(data)
                if not n:
                    break
                self.sendall(data)
                sent += n
            return sent
        finally:
            if sent > 0 and hasattr(file, "seek"):
                file.seek(offset + sent)

    def _recv_all(self, ep: Endpoint, mv: memoryview, timeout: float | None) -> int:
        """MSG_WAITALL: loop until ``mv`` is full, EOF, or an error or timeout; as Linux,
        bytes already copied are returned and the error is left for the next call."""
        deadline = None if timeout is None else time.monotonic() + timeout
        got = 0
        while got < len(mv):
            # Never 0 once the deadline passed: 0 would mean non-blocking (EAGAIN).
            left = None if deadline is None else max(1e-6, deadline - time.monotonic())
            try:
                n = self._recv_some(ep, mv[got:], left)
            except OSError:
                if got:
                    return got
                raise
            if n == 0:
                break
            got += n
        return got

    def _recv_peek(self, ep: Endpoint, mv: memoryview, timeout: float | None,
                   waitall: bool) -> int:
        """MSG_PEEK: copy queued bytes without consuming them (with MSG_WAITALL, wait until
        ``len(mv)`` bytes are queued, or EOF/error)."""
        return ep.peek(mv, timeout, waitall=waitall)

    def _recv_timeout(self, flags: int) -> float | None:
        if flags & ~_RECV_FLAGS:
            raise UsdpError(errno.EOPNOTSUPP, f"recv flags {flags & ~_RECV_FLAGS:#x} not "
                            "supported by usdp (MSG_PEEK, MSG_WAITALL, MSG_DONTWAIT are)")
        return 0.0 if flags & _MSG_DONTWAIT else self._timeout

    def _send_timeout(self, flags: int) -> float | None:
        if flags & ~_SEND_FLAGS:
            raise UsdpError(errno.EOPNOTSUPP, f"send flags {flags & ~_SEND_FLAGS:#x} not "
                            "supported by usdp (MSG_DONTWAIT, MSG_NOSIGNAL, MSG_MORE are)")
        return 0.0 if flags & _MSG_DONTWAIT else self._timeout

    def makefile(self, mode: str = "r", buffering: int | None = None, *,
                 encoding: str | None = None, errors: str | None = None,
                 newline: str | None = None) -> Any:
        """A file object on the socket, as ``socket.socket.makefile`` gives."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        writing, reading = "w" in mode, "r" in mode or "w" not in mode
        rawmode = ("r" if reading else "") + ("w" if writing else "")
        raw = _SocketIO(self, rawmode)
        self._io_refs += 1
        if buffering is None:
            buffering = -1
        if buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if "b" not in mode:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buf: io.BufferedIOBase
        if reading and writing:
            buf = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buf = io.BufferedReader(raw, buffering)
        else:
            buf = io.BufferedWriter(raw, buffering)
        if "b" in mode:
            return buf
        text = io.TextIOWrapper(buf, encoding, errors, newline)  # type: ignore[type-var]
        text.mode = mode  # type: ignore[misc]
        return text

    def _decref_socketios(self) -> None:
        if self._io_refs > 0:
            self._io_refs -= 1
        if self._closed:
            self.close()

    # ------------------------------------------------------------------ shutdown/close

    def shutdown(self, how: int) -> None:
        ep = self._connected()
        if how not in (SHUT_RD, SHUT_WR, SHUT_RDWR):
            raise InvalidArgument(errno.EINVAL, "Invalid argument")
        if how in (SHUT_RD, SHUT_RDWR) and not self._rd_shut:
            self._rd_shut = True
            ep.shutdown_read()
        if how in (SHUT_WR, SHUT_RDWR) and not self._wr_shut:
            self._wr_shut = True
            ep.shutdown_write()

    def close(self) -> None:
        if self._fork_gen != _fork.generation:
            # Inherited across fork: the RDMA resources are the parent's (usdp._fork
            # pinned them); closing here only forgets them, as close() of a dup'ed fd.
            self._closed = True
            self._ep = self._listener = None
            return
        with self._close_lock:
            if self._closed and self._ep is None and self._listener is None:
                return
            self._closed = True
            if self._io_refs > 0:
                return  # makefile() objects still open: close when the last goes
            ep, self._ep = self._ep, None
            lst, self._listener = self._listener, None
        if ep is not None:
            ep.close(self._so_linger, self._opts.linger)
        if lst is not None:
            lst.close()

    def detach(self) -> int:
        raise UsdpError(errno.EOPNOTSUPP, "an RDMA socket has no kernel fd to detach")

    # ------------------------------------------------------------------ readiness & options

    def fileno(self) -> int:
        """A real fd: readable when data/EOF/error is pending (or, listening, a connection
        request); writable when a credit and a send buffer are free."""
        self._check_open()
        if self._listener is not None:
            return self._listener.fileno()
        if self._ep is not None:
            return self._ep.fileno()
        return -1

    def setsockopt(self, level: int, optname: int, value: Any, optlen: int | None = None) -> None:
        self._check_open()
        if level == _stdsocket.SOL_SOCKET and optname == _stdsocket.SO_RCVBUF:
            if self._ep is None:
                self._opts = self._opts.with_rcvbuf(int(value))
            return
        if level == _stdsocket.SOL_SOCKET and optname == _stdsocket.SO_SNDBUF:
            if self._ep is None:
                self._opts = self._opts.with_sndbuf(int(value))
            return
        if level == _stdsocket.SOL_SOCKET and optname == _stdsocket.SO_KEEPALIVE:
            interval = KEEPALIVE_DEFAULT if int(value) else 0.0
            self._opts = replace(self._opts, keepalive=interval)
            if self._ep is not None:
                self._ep.set_keepalive(interval)
            return
        if level == _stdsocket.IPPROTO_TCP and optname == _TCP_USER_TIMEOUT:
            seconds = max(0, int(value)) / 1000.0
            self._opts = replace(self._opts, ack_timeout=seconds)
            if self._ep is not None:
                self._ep.set_ack_timeout(seconds)
            return
        if level == _stdsocket.IPPROTO_TCP and optname == _stdsocket.TCP_NODELAY:
            self._opts = replace(self._opts, nodelay=bool(int(value)))
            if self._ep is not None:
                self._ep.set_nodelay(self._opts.nodelay)
            return
        if level == _stdsocket.SOL_SOCKET and optname == _SO_BUSY_POLL:
            self._opts = replace(self._opts, busy_poll=max(0, int(value)) / 1e6)
            if self._ep is not None:
                self._ep.set_busy_poll(self._opts.busy_poll)
            return
        if level == _stdsocket.SOL_SOCKET and optname == _stdsocket.SO_LINGER:
            self._so_linger = _parse_linger(value)
            return
        # Accepted for compatibility; address reuse is the CM's business.
        self._sockopts[(level, optname)] = int(value) if not isinstance(value, bytes) else 0

    def getsockopt(self, level: int, optname: int, buflen: int | None = None) -> int | bytes:
        self._check_open()
        if level == _stdsocket.SOL_SOCKET and optname == _stdsocket.SO_TYPE:
            _refuse_ssl_wrap()
        if level == _stdsocket.SOL_SOCKET:
            if optname == _stdsocket.SO_RCVBUF:
                return self._opts.recv_bufs * self._opts.recv_buf_size
            if optname == _stdsocket.SO_SNDBUF:
                return self._opts.send_bufs * self._opts.recv_buf_size
            if optname == _stdsocket.SO_KEEPALIVE:
                return int(self._opts.keepalive > 0)
            if optname == _stdsocket.SO_TYPE:
                return _stdsocket.SOCK_STREAM
            if optname == _stdsocket.SO_ERROR:
                err = self._ep.error if self._ep is not None else None
                return (err.errno or 0) if err is not None else 0
        if level == _stdsocket.IPPROTO_TCP and optname == _TCP_USER_TIMEOUT:
            return round(self._opts.ack_timeout * 1000)
        if level == _stdsocket.IPPROTO_TCP and optname == _stdsocket.TCP_NODELAY:
            return int(self._opts.nodelay)
        if level == _stdsocket.SOL_SOCKET and optname == _SO_BUSY_POLL:
            return round(self._opts.busy_poll * 1e6)
        if level == _stdsocket.SOL_SOCKET and optname == _stdsocket.SO_LINGER:
            on, secs = self._so_linger is not None, round(self._so_linger or 0)
            return _struct.pack("ii", on, secs) if buflen else int(on)
        return self._sockopts.get((level, optname), 0)

    def stats(self) -> dict[str, int]:
        """Counters of the progress engine, the lock and the protocol."""
        return self._connected().stats()


def _parse_linger(value: Any) -> float | None:
    """``SO_LINGER``'s ``struct linger`` (``struct.pack("ii", onoff, seconds)``) or an int
    (``onoff`` alone, 0 s): None when off, else the seconds ``close`` may block."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) < 8:
            raise InvalidArgument(errno.EINVAL, "SO_LINGER needs struct linger (8 bytes)")
        on, secs = _struct.unpack("ii", bytes(value[:8]))
    else:
        on, secs = int(value), 0
    if secs < 0:
        raise InvalidArgument(errno.EINVAL, "SO_LINGER: negative seconds")
    return float(secs) if on else None


def _refuse_ssl_wrap() -> None:
    """Refuse ``ssl`` wrapping before it touches any fd.

    ``SSLSocket._create`` asks ``getsockopt(SO_TYPE)`` first, then wraps ``fileno()`` in a
    kernel socket object and calls ``detach()``; that fails (usdp has no kernel socket to
    give), and the half-built SSLSocket would then close usdp's readiness fd, whose number
    a later file could reuse. So the first call fails instead, while nothing is touched.
    """
    caller = sys._getframe(2)
    if caller.f_globals.get("__name__") == "ssl":
        raise UsdpError(errno.EOPNOTSUPP, "ssl cannot wrap a usdp socket (TLS needs a kernel "
                        "socket; usdp has none): for TLS over RDMA use usdp.asyncio with "
                        "ssl=, or TLS over TCP")


class _SocketIO(io.RawIOBase):
    """Raw I/O on an SdpSocket (what ``socket.SocketIO`` is for ``socket.socket``)."""

    def __init__(self, sock: SdpSocket, mode: str) -> None:
        super().__init__()
        self._sock = sock
        self._mode = mode
        self._reading = "r" in mode
        self._writing = "w" in mode

    def readinto(self, b: Any) -> int:
        return self._sock.recv_into(b)

    def write(self, b: Any) -> int:
        return self._sock.send(b)

    def readable(self) -> bool:
        return self._reading

    def writable(self) -> bool:
        return self._writing

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self._sock._decref_socketios()


def socket(family: int = _stdsocket.AF_INET, type: int = _stdsocket.SOCK_STREAM,
           proto: int = 0) -> SdpSocket:
    """Like ``socket.socket``, for SOCK_STREAM over RDMA."""
    return SdpSocket(family, type, proto)


def create_connection(address: _Address, timeout: float | None = None,
                      source_address: _Address | None = None) -> SdpSocket:
    """Like ``socket.create_connection``."""
    s = SdpSocket()
    try:
        if timeout is not None:
            s.settimeout(timeout)
        if source_address:
            s.bind(source_address)
        s.connect(address)
    except BaseException:
        s.close()
        raise
    return s


#: sendfile() reads the file in chunks of this size.
_SENDFILE_CHUNK = 256 * 1024
#: sendmsg() joins buffers smaller than this into shared chunks of up to _GATHER_JOIN.
_GATHER_SMALL = 16 * 1024
_GATHER_JOIN = 64 * 1024


def _gather(buffers: Any) -> list[memoryview]:
    """sendmsg's buffers as send() chunks: small neighbours joined (one frame instead of
    one each), large ones as they are (no copy)."""
    out: list[memoryview] = []
    small: list[memoryview] = []
    size = 0
    for b in buffers:
        v = memoryview(b).cast("B")
        if small and (len(v) >= _GATHER_SMALL or size + len(v) > _GATHER_JOIN):
            out.append(memoryview(b"".join(small)) if len(small) > 1 else small[0])
            small, size = [], 0
        if len(v) >= _GATHER_SMALL:
            out.append(v)
        elif v:
            small.append(v)
            size += len(v)
    if small:
        out.append(memoryview(b"".join(small)) if len(small) > 1 else small[0])
    return out


def _check_ancbufsize(ancbufsize: int) -> None:
    if ancbufsize < 0:
        raise ValueError("negative buffer size in recvmsg")
