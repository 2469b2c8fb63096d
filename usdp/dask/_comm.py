"""``USDPComm``: dask's message-oriented ``Comm`` on one usdp connection.

Messages are laid out as in ``_frames``: a prelude with every frame's length, then the
frames. Writing sends large frames from dask's own buffers (no join); reading allocates
each frame at its final size (``host_array``, writable, as tcp:// gives) and receives
into it.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

import dask.config
from dask.utils import parse_bytes
from distributed.comm.core import Comm, CommClosedError
from distributed.comm.utils import from_frames, to_frames
from distributed.protocol.utils import host_array
from distributed.utils import ensure_memoryview

from usdp._socket import SdpSocket
from usdp.dask._frames import (
    COUNT_SIZE,
    FrameError,
    gather,
    pack_prelude,
    unpack_count,
    unpack_lengths,
)
from usdp.dask._stream import AsyncSdp, close_quietly

log = logging.getLogger("usdp.dask")


def _close_in_background(sock: SdpSocket) -> None:
    """Close without blocking the loop: an orderly close waits (bounded by the socket's
    linger) for the last sends to be acknowledged by the peer."""
    try:
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, close_quietly, sock)
    except RuntimeError:  # no running loop, or its executor is shut down
        close_quietly(sock)


class USDPComm(Comm):
    """An established usdp connection carrying dask messages."""

    #: Frames larger than this are split by dask's serializer (as for tcp://).
    max_shard_size = parse_bytes(dask.config.get("distributed.comm.shard"))

    def __init__(self, sock: SdpSocket, local_addr: str, peer_addr: str,
                 deserialize: bool = True) -> None:
        super().__init__(deserialize=deserialize)
        self._local_addr = local_addr
        self._peer_addr = peer_addr
        self._stream: AsyncSdp | None = AsyncSdp(sock, asyncio.get_running_loop())
        self._write_lock = asyncio.Lock()
        # A comm dropped without close() must not keep its QP and buffers alive.
        self._finalizer = weakref.finalize(self, close_quietly, sock)
        self._finalizer.atexit = False

    @property
    def local_address(self) -> str:
        return self._local_addr

    @property
    def peer_address(self) -> str:
        return self._peer_addr

    def _live(self) -> AsyncSdp:
        if self._stream is None:
            raise CommClosedError(f"in {self}: comm is closed")
        return self._stream

    def _closed_error(self, step: str, exc: BaseException) -> CommClosedError:
        self.abort()
        return CommClosedError(f"in {self} ({step}): {type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ read

    async def read(self, deserializers: Any = None) -> Any:
        stream = self._live()
        try:
            count = unpack_count(await stream.read_exact(COUNT_SIZE))
            lengths = unpack_lengths(await stream.read_exact(count * COUNT_SIZE), count)
            frames: list[memoryview] = []
            for n in lengths:
                frame = host_array(n)
                if n:
                    await stream.read_exact_into(frame)
                frames.append(frame)
        except (OSError, FrameError) as exc:
            # A stream cut mid-message cannot be resumed: the comm is done.
            raise self._closed_error("read", exc) from exc
        except BaseException:
            self.abort()  # e.g. cancelled mid-message: what was read is unknown
            raise
        try:
            return await from_frames(frames, deserialize=self.deserialize,
                                     deserializers=deserializers,
                                     allow_offload=self.allow_offload)
        except EOFError as exc:
            raise self._closed_error("read: truncated message", exc) from exc

    # ------------------------------------------------------------------ write

    async def write(self, msg: Any, serializers: Any = None,
                    on_error: str | None = "message") -> int:
        self._live()
        frames = await to_frames(
            msg, allow_offload=self.allow_offload, serializers=serializers,
            on_error=on_error,
            context={"sender": self.local_info, "recipient": self.remote_info,
                     **self.handshake_options},
            frame_split_size=self.max_shard_size)
        views = [ensure_memoryview(f) for f in frames]
        prelude = pack_prelude([len(v) for v in views])
        async with self._write_lock:
            stream = self._live()
            try:
                for piece in gather(prelude, views):
                    await stream.send_all(memoryview(piece))
            except OSError as exc:
                raise self._closed_error("write", exc) from exc
            except BaseException:
                self.abort()  # partly sent: the stream is no longer in step
                raise
        return len(prelude) + sum(len(v) for v in views)

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        sock = stream.detach()
        self._finalizer.detach()
        if sock is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, close_quietly, sock)
            except RuntimeError:
                close_quietly(sock)

    def abort(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        sock = stream.detach()
        self._finalizer.detach()
        if sock is not None:
            _close_in_background(sock)

    def closed(self) -> bool:
        return self._stream is None
