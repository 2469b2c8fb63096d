"""``usdp.patch()``: unmodified socket programs get RDMA where the rules say so.

What libsdp did with ``LD_PRELOAD``, done to Python's ``socket`` module: ``socket.socket``
becomes :class:`HybridSocket`. Because ``socket.create_connection``,
``socket.create_server`` and ``socket.socket.accept`` look the class up in the module's
globals at call time, they, and everything built on them (socketserver, http.server,
http.client, urllib, asyncio's selector loop), go through it without further patching.

A :class:`HybridSocket` *is* a kernel TCP socket (a subclass of ``socket.socket``): when
the rules say TCP, every call is the stdlib's own and nothing is lost. The transport is
decided per operation, from the rules (``usdp._rules``):

* ``connect(addr)``: the client rule for (program, address, port). ``sdp`` connects an
  :class:`~usdp.SdpSocket` and delegates the data path to it; ``both`` tries that first,
  bounded by the rules' ``rdma-timeout``, and on any failure (no device, no route,
  refused, not usdp, timeout) connects the kernel socket instead.
* ``listen()``: the server rule for the bound address. ``sdp`` listens on RDMA only, ``both``
  on RDMA and TCP at once: ``fileno()`` is then an epoll fd holding both listeners (one fd
  that is readable when either is, so ``selectors``-based servers need no change) and
  ``accept()`` takes whichever connection is ready first.

A non-blocking ``connect`` (asyncio's ``sock_connect``) that may use SDP runs the RDMA
setup in a thread and raises ``BlockingIOError`` (EINPROGRESS) at once, like a kernel
socket; ``getsockopt(SO_ERROR)`` reports the outcome once it is known (EINPROGRESS until
then), and a ``both`` rule that falls back hands over to the kernel's own non-blocking
connect.

Options set before the decision (timeouts, ``setsockopt``) are applied to the kernel socket
at once, as usual, and replayed on the SdpSocket when one is made. Accepted RDMA
connections are plain :class:`~usdp.SdpSocket` objects. Every connection logs, on the
``usdp`` logger at INFO, which transport it got (``sdp`` or ``tcp``, the rules' words, as
:func:`transport_of` says) and which rule decided it.

A socket is in one state at a time (``HybridSocket._usdp_state``): undecided, connecting
(non-blocking SDP setup under way, or failed), connected over ``sdp`` or ``tcp``, or
listening in a mode (``sdp``, ``tcp`` or ``both``). Errors raised here are usdp's
``OSError`` subclasses, as everywhere; the kernel socket's own errors pass through.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import socket as _socketmod
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from usdp import _rules
from usdp._config import Options
from usdp._errors import Timeout, UsdpError, WouldBlock, error_from_errno
from usdp._socket import AF_INET_SDP, SdpSocket

log = logging.getLogger("usdp")

_RealSocket = _socketmod.socket
# A socket made with AF_INET_SDP while patched always uses RDMA, whatever the rules say.
_INET = (_socketmod.AF_INET, _socketmod.AF_INET6)
_TYPE_FLAGS = getattr(_socketmod, "SOCK_NONBLOCK", 0) | getattr(_socketmod, "SOCK_CLOEXEC", 0)

#: A connection's transport, in the rules' words: ``sdp`` (RDMA) or ``tcp`` (the kernel).
Transport = Literal["sdp", "tcp"]
_MIN_RDMA_BACKLOG = 128
_ROLE_LOG = {"sdp": "sdp", "tcp": "tcp", "both": "sdp+tcp"}


class _PatchState:
    """What ``patch()`` set up; one per process, like the patch itself."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.patched = False
        self.rules = _rules.Rules()
        self.program = "python"
        self.options: Options | None = None


_state = _PatchState()


# ---------------------------------------------------------------------- a socket's state
#
#   Undecided --connect, blocking--------------------------------> Connected(sdp | tcp)
#       |      --connect, non-blocking, rule not tcp--> Connecting --(thread)--^
#       |                                                   (or stays, failed: err)
#       +------ --listen-------------------------------------------> Listening(sdp|tcp|both)


@dataclass(frozen=True)
class _Undecided:
    """No connect() or listen() yet: a plain kernel socket, which records what must be
    replayed on an RDMA socket if one is made."""

    forced: bool = False  # made as AF_INET_SDP: sdp whatever the rules say
    sockopts: tuple[tuple[Any, ...], ...] = ()  # setsockopt() arguments, in order


@dataclass
class _Connecting:
    """A non-blocking connect (asyncio's ``sock_connect``) whose SDP setup runs in a
    thread. Success moves the socket on to :class:`_Connected`; a failure stays here,
    with ``err`` for ``SO_ERROR`` (reported once, as the kernel does) and for every later
    ``connect()``."""

    done: threading.Event = field(default_factory=threading.Event)
    err: int = 0
    reported: bool = False  # SO_ERROR said it already: the next read gives 0


@dataclass(frozen=True)
class _Connected:
    """Connected (or, for tcp, connecting in the kernel) over one transport."""

    transport: Transport
    sdp: SdpSocket | None = None  # the RDMA connection when transport is sdp


@dataclass(frozen=True)
class _Listening:
    """Listening by a server rule: on RDMA (``sdp``), the kernel (``tcp``) or ``both``.

    With RDMA in the mode the kernel fd stays non-blocking (accept() must not block on one
    listener while the other has a connection) and the user's timeout lives here.
    """

    mode: _rules.Use
    sdp: SdpSocket | None = None  # the RDMA listener unless mode is tcp
    poll: select.epoll | None = None  # both listeners, for fileno(), when mode is both
    timeout: float | None = None

    @property
    def rdma(self) -> bool:
        return self.mode != "tcp"


_SockState = _Undecided | _Connecting | _Connected | _Listening


def _program_name() -> str:
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    return os.path.basename(argv0)


def _hybrid_wanted(family: int, type: int, fileno: Any) -> bool:
    if fileno is not None:
        return False  # accept(), dup(), socketpair(), fromfd(): a kernel socket exists
    if family not in (-1, AF_INET_SDP, *_INET):
        return False
    return type == -1 or (type & ~_TYPE_FLAGS) == _socketmod.SOCK_STREAM


class _Meta(type):
    """Keeps ``isinstance(s, socket.socket)`` true, while patched, for kernel sockets made
    before the patch or by ``accept()`` (which are not HybridSockets)."""

    def __instancecheck__(cls, obj: Any) -> bool:
        if cls is HybridSocket and isinstance(obj, _RealSocket):
            return True
        return type.__instancecheck__(cls, obj)

    def __subclasscheck__(cls, sub: Any) -> bool:
        if cls is HybridSocket and isinstance(sub, type) and issubclass(sub, _RealSocket):
            return True
        return type.__subclasscheck__(cls, sub)


def _is_hybrid(obj: Any) -> bool:
    return type.__instancecheck__(HybridSocket, obj)


class HybridSocket(_RealSocket, metaclass=_Meta):
    """``socket.socket`` while patched: a kernel socket that turns into SDP by the rules.

    Its one piece of state, ``_usdp_state``, is one of :class:`_Undecided`,
    :class:`_Connecting`, :class:`_Connected` or :class:`_Listening`.
    """

    # A class-level default, so a subclass built without our __init__ stays plain TCP.
    _usdp_state: _SockState = _Undecided()

    def __new__(cls, family: int = -1, type: int = -1, proto: int = -1,
                fileno: Any = None) -> Any:
        if cls is HybridSocket and not _hybrid_wanted(family, type, fileno):
            return _RealSocket(family, type, proto, fileno)  # untouched, and not ours
        return super().__new__(cls)

    def __init__(self, family: int = -1, type: int = -1, proto: int = -1,
                 fileno: Any = None) -> None:
        forced = family == AF_INET_SDP
        if forced:
            family = _socketmod.AF_INET
        super().__init__(family, type, proto, fileno)
        self._usdp_state = _Undecided(forced=forced)

    def __repr__(self) -> str:
        base = super().__repr__()
        st = self._usdp_state
        what: str
        if isinstance(st, _Connected):
            what = st.transport
        elif isinstance(st, _Listening):
            what = f"listen:{st.mode}"
        else:
            what = "connecting" if isinstance(st, _Connecting) else "undecided"
        return f"{base[:-1]}, usdp={what}>"

    # ------------------------------------------------------------------ helpers

    def _conn(self) -> SdpSocket | None:
        """The RDMA connection, if this socket connected over SDP."""
        st = self._usdp_state
        return st.sdp if isinstance(st, _Connected) else None

    def _listening_rdma(self) -> _Listening | None:
        st = self._usdp_state
        return st if isinstance(st, _Listening) and st.rdma else None

    def _new_sdp(self, undecided: _Undecided) -> SdpSocket:
        """An SdpSocket with the options set on this socket so far."""
        s = SdpSocket(self.family, options=_state.options)
        for args in undecided.sockopts:
            s.setsockopt(*args)
        return s

    def _decide(self, role: _rules.Role, host: str, port: int) -> _rules.Decision:
        st = self._usdp_state
        if isinstance(st, _Undecided) and st.forced:
            return _rules.Decision("sdp", "AF_INET_SDP")
        return _state.rules.decide(role, _state.program, host, port)

    def _numeric(self, address: Any) -> tuple[str, int]:
        host, port = address[0], int(address[1])
        try:
            _socketmod.inet_pton(self.family, host)
            return host, port
        except (OSError, TypeError):
            pass
        info = _socketmod.getaddrinfo(host, port, self.family, _socketmod.SOCK_STREAM)
        return str(info[0][4][0]), port

    # ------------------------------------------------------------------ client side

    def connect(self, address: Any) -> None:
        """Connect by the client rule; ``both`` falls back to TCP when SDP fails.

        Non-blocking (asyncio's ``sock_connect``): SDP setup runs in a thread and this
        raises ``BlockingIOError`` (EINPROGRESS) like a kernel socket; ``getsockopt(SO_ERROR)``
        then reports the outcome once it is known (see there).
        """
        st = self._usdp_state
        if isinstance(st, _Connecting):
            if not st.done.is_set():
                raise error_from_errno(errno.EALREADY, "Operation already in progress")
            code = st.err or errno.EIO  # done, yet here: it failed
            raise error_from_errno(code, f"connect failed: {os.strerror(code)}")
        if isinstance(st, _Connected) and st.transport == "sdp":
            raise error_from_errno(errno.EISCONN, "socket is already connected (sdp)")
        if isinstance(st, _Listening) and st.mode == "sdp":
            raise error_from_errno(errno.EINVAL, "socket is listening (sdp)")
        if not isinstance(st, _Undecided):
            super().connect(address)  # the kernel's EISCONN/EALREADY/EINVAL, as usual
            return
        host, port = self._numeric(address)
        d = self._decide("client", host, port)
        if d.use != "tcp" and self.gettimeout() == 0.0:
            job = _Connecting()
            self._usdp_state = job
            threading.Thread(target=self._connect_in_background, name="usdp-connect",
                             args=(job, st, address, host, port, d), daemon=True).start()
            raise WouldBlock(errno.EINPROGRESS, "Operation now in progress")
        if d.use != "tcp" and self._connect_sdp(st, host, port, d):
            return
        self._usdp_state = _Connected("tcp")
        log.info("%s -> %s:%d over tcp [%s]", _state.program, host, port, d.where)
        super().connect(address)

    def _connect_sdp(self, undecided: _Undecided, host: str, port: int,
                     d: _rules.Decision) -> bool:
        """True if connected over SDP; False to fall back (``both``); raises (``sdp``)."""
        user_timeout = self.gettimeout()
        s = self._new_sdp(undecided)
        budget = user_timeout if d.use == "sdp" else _state.rules.rdma_timeout
        if user_timeout and budget:
            budget = min(budget, user_timeout)
        try:
            s.settimeout(budget or None)
            s.connect((host, port))
            s.settimeout(user_timeout)
        except OSError as exc:
            s.close()
            if d.use == "sdp":
                raise
            log.info("%s -> %s:%d: sdp failed (%s: %s), falling back to tcp [%s]",
                     _state.program, host, port, type(exc).__name__, exc, d.where)
            return False
        self._usdp_state = _Connected("sdp", s)
        log.info("%s -> %s:%d over sdp [%s]", _state.program, host, port, d.where)
        return True

    def _connect_in_background(self, job: _Connecting, undecided: _Undecided, address: Any,
                               host: str, port: int, d: _rules.Decision) -> None:
        try:
            if not self._connect_sdp(undecided, host, port, d):
                log.info("%s -> %s:%d over tcp [%s]", _state.program, host, port, d.where)
                try:
                    _RealSocket.connect(self, address)  # non-blocking: under way
                except BlockingIOError:
                    pass
                # Only now: until the kernel's connect is under way, SO_ERROR is ours.
                self._usdp_state = _Connected("tcp")
        except OSError as exc:
            job.err = exc.errno or errno.EIO
        except BaseException:  # pragma: no cover - never leave the caller waiting
            job.err = errno.EIO
            raise
        finally:
            job.done.set()

    def connect_ex(self, address: Any) -> int:
        try:
            self.connect(address)
        except _socketmod.gaierror:
            raise
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    # ------------------------------------------------------------------ server side

    def listen(self, backlog: int = min(_socketmod.SOMAXCONN, 128)) -> None:
        """Listen by the server rule for the bound address: SDP, TCP or both at once."""
        st = self._usdp_state
        if isinstance(st, _Listening):
            if st.mode != "sdp":
                super().listen(backlog)
            return
        if not isinstance(st, _Undecided):
            super().listen(backlog)  # the kernel's error for a connected socket
            return
        host, port = super().getsockname()[:2]
        if port == 0:  # listen() without bind(): take a port now, as the kernel would
            super().bind(("::" if self.family == _socketmod.AF_INET6 else "0.0.0.0", 0))
            host, port = super().getsockname()[:2]
        d = self._decide("server", host, port)
        mode = d.use
        sdp = None
        if mode != "tcp":
            sdp = self._new_sdp(st)
            try:
                sdp.bind((host, port))  # the kernel chose the port: RDMA takes the same one
                # A connection request beyond the CM's backlog is dropped and retried only
                # after the CM's response timeout (seconds, where TCP retries a SYN after
                # 1 s): socketserver's listen(5) made 32 clients take 30 s on rxe.
                sdp.listen(max(backlog, _MIN_RDMA_BACKLOG))
                sdp.setblocking(False)
            except OSError as exc:
                sdp.close()
                sdp = None
                if mode == "sdp":
                    raise
                log.warning("%s: no sdp listener on %s:%d (%s); tcp only [%s]",
                            _state.program, host, port, exc, d.where)
                mode = "tcp"
        if mode != "sdp":
            super().listen(backlog)
        timeout, poll = None, None
        if sdp is not None:
            timeout = super().gettimeout()
            super().settimeout(0.0)
        if mode == "both":
            assert sdp is not None
            poll = select.epoll()
            poll.register(sdp.fileno(), select.EPOLLIN)
            poll.register(super().fileno(), select.EPOLLIN)
        self._usdp_state = _Listening(mode, sdp, poll, timeout)
        log.info("%s listening on %s:%d over %s [%s]", _state.program, host, port,
                 _ROLE_LOG[mode], d.where)

    def accept(self) -> tuple[Any, Any]:
        """The next connection: a kernel socket (TCP) or an :class:`SdpSocket` (SDP)."""
        st = self._listening_rdma()
        if st is None:
            conn, addr = super().accept()
            if isinstance(self._usdp_state, _Listening):
                log.info("%s accepted %s over tcp", _state.program, _fmt(addr))
            return conn, addr
        sdp = st.sdp
        assert sdp is not None
        timeout = st.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = select.poll()
        sdp_fd = sdp.fileno()
        poller.register(sdp_fd, select.POLLIN)
        tcp_fd = -1
        if st.mode == "both":
            tcp_fd = super().fileno()
            poller.register(tcp_fd, select.POLLIN)
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = poller.poll(None if remaining is None else math.ceil(remaining * 1000))
            for fd, _ev in ready:
                try:
                    if fd == tcp_fd:
                        conn, addr = super().accept()  # kernel fd is non-blocking
                        log.info("%s accepted %s over tcp", _state.program, _fmt(addr))
                        return conn, addr
                    c, addr = sdp.accept()
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if fd == tcp_fd:
                        raise
                    log.warning("%s: sdp connection attempt failed: %s",
                                _state.program, exc)
                    continue
                c.settimeout(_socketmod.getdefaulttimeout())  # as accept() does for TCP
                log.info("%s accepted %s over sdp", _state.program, _fmt(addr))
                return c, addr
            if not ready and deadline is not None and time.monotonic() >= deadline:
                if timeout == 0.0:
                    raise WouldBlock(errno.EAGAIN, "Resource temporarily unavailable")
                raise Timeout(errno.ETIMEDOUT, "timed out")

    # ------------------------------------------------------------------ readiness, timeouts

    def fileno(self) -> int:
        st = self._usdp_state
        if isinstance(st, _Listening) and st.poll is not None:
            return st.poll.fileno()
        sdp = st.sdp if isinstance(st, _Listening | _Connected) else None
        if sdp is not None and not getattr(self, "_closed", False):
            return sdp.fileno()
        return super().fileno()

    def settimeout(self, value: float | None) -> None:
        st = self._listening_rdma()
        if st is not None:
            super().settimeout(value)  # validates the value as the stdlib does
            super().settimeout(0.0)
            self._usdp_state = replace(st, timeout=value if value is None else float(value))
            return
        super().settimeout(value)
        conn = self._conn()
        if conn is not None:
            conn.settimeout(value)

    def gettimeout(self) -> float | None:
        st = self._listening_rdma()
        return st.timeout if st is not None else super().gettimeout()

    def setblocking(self, flag: bool) -> None:
        self.settimeout(None if flag else 0.0)

    def getblocking(self) -> bool:
        return self.gettimeout() != 0.0

    def setsockopt(self, level: int, optname: int, *value: Any) -> None:
        super().setsockopt(level, optname, *value)
        st = self._usdp_state
        if isinstance(st, _Undecided):
            self._usdp_state = replace(st, sockopts=(*st.sockopts, (level, optname, *value)))
        conn = self._conn()
        if conn is not None:
            conn.setsockopt(level, optname, *value)

    def getsockopt(self, level: int, optname: int, *buflen: Any) -> Any:
        st = self._usdp_state
        if isinstance(st, _Connecting) and (level, optname) == (
                _socketmod.SOL_SOCKET, _socketmod.SO_ERROR):
            # asyncio waits for the kernel fd to be writable, which an unconnected socket
            # is at once, then asks SO_ERROR; BlockingIOError makes it ask again. The short
            # wait keeps that from spinning while the handshake runs.
            if not st.done.wait(0.002):
                raise WouldBlock(errno.EINPROGRESS, "Operation now in progress")
            if self._usdp_state is st:  # failed: report it once, as the kernel does
                err = 0 if st.reported else st.err
                st.reported = True
                return err
            return self.getsockopt(level, optname, *buflen)  # moved on: ask the new state
        conn = self._conn()
        if conn is not None and not buflen:
            return conn.getsockopt(level, optname)
        return super().getsockopt(level, optname, *buflen)

    # ------------------------------------------------------------------ addresses & data

    def getsockname(self) -> Any:
        conn = self._conn()
        return conn.getsockname() if conn is not None else super().getsockname()

    def getpeername(self) -> Any:
        conn = self._conn()
        return conn.getpeername() if conn is not None else super().getpeername()

    def send(self, data: Any, flags: int = 0) -> int:
        conn = self._conn()
        return conn.send(data, flags) if conn is not None else super().send(data, flags)

    def sendall(self, data: Any, flags: int = 0) -> None:
        conn = self._conn()
        if conn is not None:
            conn.sendall(data, flags)
        else:
            super().sendall(data, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        conn = self._conn()
        return conn.recv(bufsize, flags) if conn is not None else super().recv(bufsize, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        conn = self._conn()
        if conn is not None:
            return conn.recv_into(buffer, nbytes, flags)
        return super().recv_into(buffer, nbytes, flags)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        conn = self._conn()
        if conn is not None:  # os.sendfile needs a kernel socket: the SdpSocket reads+sends
            return conn.sendfile(file, offset, count)
        return super().sendfile(file, offset, count)

    # Python 3.12's selector transport writes with sendmsg (gather) when it has queued data.
    def sendmsg(self, buffers: Any, ancdata: Any = (), flags: int = 0,
                address: Any = None) -> int:
        conn = self._conn()
        if conn is not None:
            return conn.sendmsg(buffers, ancdata, flags, address)
        if address is None:
            return super().sendmsg(buffers, ancdata, flags)
        return super().sendmsg(buffers, ancdata, flags, address)

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0) -> Any:
        conn = self._conn()
        if conn is not None:
            return conn.recvmsg(bufsize, ancbufsize, flags)
        return super().recvmsg(bufsize, ancbufsize, flags)

    def recvmsg_into(self, buffers: Any, ancbufsize: int = 0, flags: int = 0) -> Any:
        conn = self._conn()
        if conn is not None:
            return conn.recvmsg_into(buffers, ancbufsize, flags)
        return super().recvmsg_into(buffers, ancbufsize, flags)

    def shutdown(self, how: int) -> None:
        conn = self._conn()
        if conn is not None:
            conn.shutdown(how)
        else:
            super().shutdown(how)

    def _no_rdma(self, what: str) -> None:
        st = self._usdp_state
        if isinstance(st, _Listening | _Connected) and st.sdp is not None:
            raise UsdpError(errno.EOPNOTSUPP, f"{what} is not supported on an SDP socket")

    def detach(self) -> int:
        self._no_rdma("detach()")
        return super().detach()

    def dup(self) -> Any:
        self._no_rdma("dup()")
        return super().dup()

    def _real_close(self, _ss: Any = _socketmod._socket.socket) -> None:  # type: ignore[attr-defined]
        st = self._usdp_state
        if isinstance(st, _Listening):
            if st.poll is not None:
                st.poll.close()
            self._usdp_state = replace(st, sdp=None, poll=None)
        if isinstance(st, _Listening | _Connected) and st.sdp is not None:
            st.sdp.close()
            if isinstance(st, _Connected):
                self._usdp_state = replace(st, sdp=None)
        super()._real_close(_ss)  # type: ignore[misc]


def _fmt(addr: Any) -> str:
    try:
        return f"{addr[0]}:{addr[1]}"
    except (TypeError, IndexError):
        return repr(addr)


def patch(rules: _rules.Rules | str | os.PathLike[str] | None = None, *,
          program: str | None = None, options: Options | None = None) -> None:
    """Make ``socket.socket`` a :class:`HybridSocket` for this process.

    ``rules``: a :class:`~usdp._rules.Rules`, a rules file, or None for ``$USDP_CONFIG``,
    the per-user file, or the built-in default (``both``). ``program`` is the name rules'
    PROGRAM globs match (default: ``sys.argv[0]``'s file name). ``options`` are the
    :class:`~usdp.Options` of every RDMA socket made (default: ``Options.from_env()``).
    Calling it again replaces the rules, program and options.
    """
    loaded = rules if isinstance(rules, _rules.Rules) else _rules.load(rules)
    try:
        import ssl  # noqa: F401  (ssl subclasses socket.socket at import: give it the real one)
    except ImportError:  # pragma: no cover
        pass
    with _state.lock:
        _state.rules = loaded
        _state.program = program or _program_name()
        _state.options = options
        if not _state.patched:
            _socketmod.socket = HybridSocket  # type: ignore[misc]
            _state.patched = True
        _hook_asyncio_sendfile()


def _is_rdma(sock: Any) -> bool:
    return isinstance(sock, SdpSocket) or (_is_hybrid(sock) and sock._conn() is not None)


def _hook_asyncio_sendfile() -> None:
    """Make asyncio's native sendfile decline RDMA sockets, so it falls back to send().

    ``loop.sendfile(transport)`` and ``loop.sock_sendfile(sock)`` on the selector loop call
    ``os.sendfile(sock.fileno(), ...)``; an RDMA socket's fileno() is its readiness fd, so
    the file would go into that socketpair instead of to the peer. Raising
    ``SendfileNotAvailableError`` is asyncio's own way to say "use the fallback" (read the
    file, ``transport.write``/``sock_sendall``). Only RDMA sockets are affected, so the hook
    stays installed after unpatch() (sockets made while patched keep working).
    """
    import asyncio
    from asyncio import unix_events

    cls: Any = unix_events._UnixSelectorEventLoop
    orig = cls._sock_sendfile_native
    if getattr(orig, "_usdp_hook", False):
        return

    async def _sock_sendfile_native(self: Any, sock: Any, file: Any, offset: int,
                                    count: int | None) -> int:
        if _is_rdma(sock):
            raise asyncio.SendfileNotAvailableError(
                "an RDMA socket has no kernel fd for os.sendfile; falling back to send()")
        return await orig(self, sock, file, offset, count)  # type: ignore[no-any-return]

    _sock_sendfile_native._usdp_hook = True  # type: ignore[attr-defined]
    cls._sock_sendfile_native = _sock_sendfile_native


def unpatch() -> None:
    """Give ``socket.socket`` back; sockets already made keep working as they are."""
    with _state.lock:
        if _state.patched:
            _socketmod.socket = _RealSocket  # type: ignore[misc]
            _state.patched = False


def is_patched() -> bool:
    return _state.patched


def transport_of(sock: Any) -> Transport:
    """``"sdp"`` (RDMA) or ``"tcp"``: the transport of a connection (or of a listener that
    uses only one), in the rules' words. Takes a socket, an :class:`SdpSocket`, an asyncio
    transport or StreamWriter, or an ``asyncio.Server``'s ``sockets`` entry.
    """
    extra = getattr(sock, "get_extra_info", None)
    if extra is not None:
        inner = extra("socket")
        if inner is None:
            raise ValueError(f"{sock!r} has no socket")
        sock = inner
    if type(sock).__name__ == "TransportSocket":  # asyncio's wrapper (Server.sockets, extra)
        sock = sock._sock
    if isinstance(sock, SdpSocket):
        return "sdp"
    if _is_hybrid(sock):
        st = sock._usdp_state
        if isinstance(st, _Connected):
            return st.transport
        if isinstance(st, _Listening):
            if st.mode == "both":
                raise ValueError("this listener accepts both sdp and tcp: ask its connections")
            return st.mode
        raise ValueError("the transport is decided at connect() or listen(): not yet")
    if isinstance(sock, _RealSocket):
        if sock.family in _INET and sock.type == _socketmod.SOCK_STREAM:
            return "tcp"
        raise ValueError(f"not an internet stream socket: {sock!r}")
    raise TypeError(f"not a socket: {sock!r}")
