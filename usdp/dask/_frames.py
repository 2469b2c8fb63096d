"""The byte layout of one dask message on a usdp stream (sans-I/O: no dask, no verbs).

A message is a prelude, then its frames back to back::

    u64 nframes | u64 length[nframes] | frame 0 | frame 1 | ...

(little-endian). The lengths come first so that the reader can allocate every frame at
its final size and receive straight into it (``recv_into``): a 64 MB numpy frame is
copied once, out of the registered receive slots, and never reassembled.

On the write side, the prelude and the small frames are joined into one buffer (one send
call instead of many: per-call cost dominates below a few tens of KiB), while large
frames are sent as they are, from the caller's memory (a gather write: no concatenation).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

_U64 = struct.Struct("<Q")

#: Frames smaller than this are joined with their neighbours into one send.
GATHER_MIN = 64 * 1024
#: Bounds a corrupt or hostile prelude before anything is allocated.
MAX_FRAMES = 1 << 20
MAX_FRAME_BYTES = 1 << 40

COUNT_SIZE = _U64.size


class FrameError(ValueError):
    """A prelude that no dask peer would send (corrupt stream or a foreign peer)."""


def pack_prelude(lengths: Sequence[int]) -> bytes:
    """``u64 nframes`` then each frame's length."""
    n = len(lengths)
    if n > MAX_FRAMES:
        raise FrameError(f"{n} frames in one message (at most {MAX_FRAMES})")
    return struct.pack(f"<{n + 1}Q", n, *lengths)


def unpack_count(data: bytes | bytearray | memoryview) -> int:
    """The frame count from the first ``COUNT_SIZE`` bytes of a message, checked."""
    (n,) = _U64.unpack(data)
    if n > MAX_FRAMES:
        raise FrameError(f"message announces {n} frames (at most {MAX_FRAMES})")
    return int(n)


def unpack_lengths(data: bytes | bytearray | memoryview, n: int) -> list[int]:
    """The ``n`` frame lengths that follow the count, checked."""
    lengths = list(struct.unpack(f"<{n}Q", data))
    for ln in lengths:
        if ln > MAX_FRAME_BYTES:
            raise FrameError(f"frame of {ln} bytes announced (at most {MAX_FRAME_BYTES})")
    return lengths


def gather(prelude: bytes, frames: Iterable[memoryview],
           small: int = GATHER_MIN) -> list[bytes | memoryview]:
    """The pieces to send, in order: runs of small frames joined (with the prelude in
    front of the first run), each large frame on its own and uncopied. Empty frames
    vanish (their length is in the prelude)."""
    pieces: list[bytes | memoryview] = []
    run: list[bytes | memoryview] = [prelude]
    for f in frames:
        if len(f) >= small:
            if run:
                pieces.append(b"".join(run))
                run = []
            pieces.append(f)
        elif len(f):
            run.append(f)
    if run:
        pieces.append(b"".join(run))
    return pieces
