"""Non-blocking I/O on one connected ``SdpSocket`` from an asyncio loop, without a thread.

The socket's readiness fd (``fileno()``) is level-triggered: readable while data, EOF or
an error waits, writable while a credit and a send slot are free. A call is tried first;
only when it would block does the task wait on the fd (``add_reader``/``add_writer``), so
a stream that keeps up costs no event-loop round trip at all.

Reads go through a small scratch buffer (small frames and preludes arrive in one call)
but land straight in the caller's buffer when at least a scratch's worth is still
wanted: a large frame is received into its final memory.

Not thread-safe; one reading task and one writing task at a time (dask's Comm contract).
"""

from __future__ import annotations

import asyncio
from typing import Any

from usdp._socket import SdpSocket

SCRATCH = 64 * 1024


class StreamClosed(ConnectionError):
    """The stream was closed locally, or the peer closed it (EOF)."""


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AsyncSdp:
    """One connected, non-blocking ``SdpSocket`` driven by the running loop."""

    def __init__(self, sock: SdpSocket, loop: asyncio.AbstractEventLoop) -> None:
        sock.setblocking(False)
        self.sock: SdpSocket | None = sock
        self.loop = loop
        self.fd = sock.fileno()
        self._waiters: dict[bool, asyncio.Future[None]] = {}
        self._scratch = bytearray(SCRATCH)
        self._view = memoryview(self._scratch)
        self._start = self._end = 0

    # ------------------------------------------------------------------ waiting

    def _live(self) -> SdpSocket:
        if self.sock is None:
            raise StreamClosed("stream is closed")
        return self.sock

    async def _ready(self, write: bool) -> None:
        """Wait until the readiness fd says the call may go on (or the stream closes)."""
        self._live()
        fut: asyncio.Future[None] = self.loop.create_future()
        if write:
            self.loop.add_writer(self.fd, _wake, fut)
        else:
            self.loop.add_reader(self.fd, _wake, fut)
        self._waiters[write] = fut
        try:
            await fut
        finally:
            if self._waiters.get(write) is fut:
                del self._waiters[write]
                self._unwatch(write)

    def _unwatch(self, write: bool) -> None:
        if write:
            self.loop.remove_writer(self.fd)
        else:
            self.loop.remove_reader(self.fd)

    def detach(self) -> SdpSocket | None:
        """Stop watching the fd, fail pending waits, and hand back the socket to close.
        Synchronous, so that ``Comm.abort`` can call it."""
        sock, self.sock = self.sock, None
        waiters, self._waiters = self._waiters, {}
        for write, fut in waiters.items():
            self._unwatch(write)
            if not fut.done():
                fut.set_exception(StreamClosed("stream closed while waiting"))
        return sock

    # ------------------------------------------------------------------ writing

    async def send_all(self, data: memoryview) -> None:
        """Send every byte of ``data`` (a byte-format memoryview), from its own memory."""
        pos, n = 0, len(data)
        while pos < n:
            try:
                pos += self._live().send(data[pos:])
                if pos == n:
                    return
            except BlockingIOError:
                pass
            await self._ready(True)

    # ------------------------------------------------------------------ reading

    async def _recv(self, out: memoryview) -> int:
        while True:
            try:
                got = self._live().recv_into(out)
            except BlockingIOError:
                await self._ready(False)
                continue
            if not got:
                raise StreamClosed("connection closed by the peer (EOF)")
            return got

    async def read_exact_into(self, out: memoryview) -> None:
        """Fill ``out`` (a byte-format memoryview) from the stream."""
        n = len(out)
        pos = min(n, self._end - self._start)
        if pos:
            out[:pos] = self._view[self._start : self._start + pos]
            self._start += pos
        while pos < n:
            if n - pos >= SCRATCH:
                pos += await self._recv(out[pos:])
                continue
            got = await self._recv(self._view)
            k = min(got, n - pos)
            out[pos : pos + k] = self._view[:k]
            self._start, self._end = k, got
            pos += k

    async def read_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        if n:
            await self.read_exact_into(memoryview(buf))
        return buf


def close_quietly(sock: Any) -> None:
    """Close a socket, ignoring errors (the peer may be long gone)."""
    try:
        sock.close()
    except OSError:
        pass
