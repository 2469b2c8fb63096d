"""Zero-copy transfers of one connection: SrcAvail out, RDMA reads in.

Sending: the caller's buffer is registered with remote-read rights for exactly as long as
the transfer is outstanding, advertised in a SrcAvail, and ours again once the peer's
RdmaRdCompl says it has read it. Receiving: an advertised buffer is RDMA-read straight into
a large ``recv_into`` buffer (registered for that call only) or through a registered bounce
buffer and one copy, in READs of at most ``READ_CHUNK`` (the ack watchdog sees each one
complete). A non-blocking receive never waits for a read: it posts one into the bounce
buffer and says EAGAIN; the completion makes the bytes ready. Protocol and validation are
in ``_connection``; see docs/protocol.md section 10.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from usdp._connection import MAX_ZCOPY, Connection, RemoteChunk
from usdp._errors import BrokenPipe, Timeout, UsdpError, WouldBlock, from_wc
from usdp._liveness import AckWatch
from usdp._sendpath import SendPath
from usdp._verbs import (
    ACCESS_LOCAL_WRITE,
    ACCESS_REMOTE_READ,
    WC_SUCCESS,
    QPResources,
    Ring,
    UserMR,
)

log = logging.getLogger("usdp")

#: A recv_into buffer at least this big is registered and RDMA-read into directly by a
#: blocking call; smaller reads, and every non-blocking one, go through the bounce buffer
#: (registration costs more than the copy; a direct read would have to be waited for).
DIRECT_READ_MIN = 64 * 1024
#: Most bytes one RDMA READ work request asks for. The ack watchdog judges the peer by
#: send-queue progress, and a READ completes only once all its bytes arrived: one READ of
#: a whole SrcAvail (up to 1 GiB) would take longer than ack_timeout at rxe speeds and get
#: a live peer declared dead. Each chunk's completion counts as progress; 1 MiB keeps the
#: per-READ overhead small next to the copy and completes in milliseconds even on rxe.
READ_CHUNK = 1 << 20
#: RDMA reads a blocking direct read keeps posted: the next one is queued on the QP
#: while this thread handles the last completion (the CM's initiator depth is 1, so the
#: HCA still runs them one after the other).
READS_IN_FLIGHT = 2
#: The registered buffer that small and non-blocking reads land in: one READ_CHUNK.
BOUNCE_SIZE = READ_CHUNK


class Zcopy:
    """The zero-copy half of one connection (owner only, like everything in the data path).

    Args:
        res, conn, sendpath, liveness: the connection's parts.
        wait: ``wait(predicate, timeout)``, the engine's wait returning False on timeout.
        fail: latches a fatal error.
        abort: sends ABORT and latches.
        peer_gone: True once the CM reported the peer gone.
    """

    def __init__(self, res: QPResources, conn: Connection, sendpath: SendPath,
                 liveness: AckWatch, *, wait: Callable[[Callable[[], bool], float | None], bool],
                 fail: Callable[[UsdpError], None], abort: Callable[[], None],
                 peer_gone: Callable[[], bool]) -> None:
        self.res, self.conn, self.sendpath, self.liveness = res, conn, sendpath, liveness
        self._wait, self._fail, self._abort, self._peer_gone = wait, fail, abort, peer_gone
        self.read_status: int | None = None  # of the last RDMA read, once done
        # RDMA reads posted and not completed, in order (RC completes them in order):
        # what each reads, and whether into the bounce buffer (else a caller's buffer).
        self._inflight: deque[tuple[RemoteChunk, bool]] = deque()
        self._direct = False  # a blocking direct read (several chunks) is under way
        self._staged_off = self._staged_end = 0  # read bounce bytes not yet handed out
        self._bounce: Ring | None = None
        self.sends = 0
        self.bytes_out = 0
        self.reads = 0  # RDMA READ work requests posted

    def close(self) -> None:
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None

    def send(self, data: memoryview, timeout: float | None) -> int:
        """SrcAvail -> the peer's RDMA read -> RdmaRdCompl; the buffer is ours again after.

        A peer that does not answer within ``timeout`` gets the connection aborted (the
        stream cannot be resumed consistently: there is no SrcAvailCancel).
        """
        n = min(len(data), MAX_ZCOPY)
        mr = UserMR(self.res.dev, data[:n], ACCESS_REMOTE_READ)
        conn = self.conn
        try:
            h, payload = conn.src_avail_frame(n, mr.rkey, mr.addr)
            self.sendpath.post_frame(h, memoryview(payload), control=True)
            self.sends += 1
            done = self._wait(lambda: not conn.zcopy_outstanding or conn.error is not None
                              or self._peer_gone(), timeout)
            if not done:
                self._fail(Timeout(errno.ETIMEDOUT, "zero-copy send: the peer did not read "
                                   "the advertised buffer in time; connection aborted"))
                self._abort()
            if conn.error is not None:
                raise conn.error
            if conn.zcopy_outstanding:
                raise BrokenPipe(errno.EPIPE, "peer disconnected during a zero-copy send")
            self.bytes_out += n
            return n
        finally:
            mr.close()

    # ------------------------------------------------------------------ receiving

    @property
    def reading(self) -> bool:
        """An RDMA read is posted and its completion not yet seen."""
        return bool(self._inflight)

    @property
    def _staging(self) -> bool:
        """The read in flight reads into the bounce buffer."""
        return bool(self._inflight) and self._inflight[-1][1]

    @property
    def staged(self) -> int:
        """Bytes read into the bounce buffer and not yet handed out (they are next)."""
        return self._staged_end - self._staged_off

    @property
    def waiting_on_remote(self) -> bool:
        """The next bytes are zero-copy ones that are not here yet: unread, or being read.
        A readiness fd must not report them readable (a non-blocking recv would only get
        EAGAIN, and an event loop would spin)."""
        return self.conn.head_is_remote and not self.staged

    def recv_remote(self, out: memoryview, timeout: float | None) -> int:
        """Hand out the zero-copy bytes at the head of the stream (owner only).

        Staged bytes (already read into the bounce buffer) go first. Otherwise a large
        ``out`` of a blocking call is RDMA-read into directly, ``READ_CHUNK`` per read;
        anything else is read into the bounce buffer and copied. A non-blocking call
        (``timeout`` 0) never waits for a read: it posts one if none is in flight and
        raises ``WouldBlock``; the completion makes the bytes ready for a later call.
        A blocking call waits for its reads as long as the watchdog (ack_timeout) allows,
        not the socket timeout: bytes taken from the stream cannot be put back. Returns 0
        only if the head of the stream is no longer zero-copy (another thread read it).
        """
        if self._direct or (self.reading and not self._staging):
            # Another thread's direct read: it let go of the connection while it waits.
            if timeout == 0.0:
                raise WouldBlock(errno.EAGAIN, "recv would block: another thread is "
                                 "RDMA-reading zero-copy bytes")
            self._wait(lambda: not (self._direct or self.reading)
                       or self.conn.error is not None, None)
        if self.conn.error is not None:
            raise self.conn.error
        if not self.conn.head_is_remote:
            return 0  # that thread took them all: what follows is not zero-copy
        if self.staged:
            return self._take_staged(out)
        if not self.reading and (timeout == 0.0 or len(out) < DIRECT_READ_MIN):
            self.start_staged_read()
        if self.reading:
            if not self._staging:
                raise UsdpError(errno.EBUSY, "an RDMA read is already in progress")
            if timeout == 0.0:
                if not self._poll_read():
                    raise WouldBlock(errno.EAGAIN, "recv would block: zero-copy bytes are "
                                     "being RDMA-read from the peer")
            else:
                self._wait_read(None)
            self._check_read()
            return self._take_staged(out)
        return self._read_direct(out)

    def start_staged_read(self) -> bool:
        """Post an RDMA read of the next zero-copy bytes (at most ``BOUNCE_SIZE``) into
        the bounce buffer, unless one is in flight, staged bytes wait, a direct read is
        under way or the head of the stream is not a SrcAvail. Never waits. True if
        posted. Used by non-blocking receives and, with a readiness fd, as soon as a
        SrcAvail reaches the head (so the fd turns readable when the bytes are here)."""
        conn = self.conn
        if self.reading or self.staged or self._direct or conn.error is not None \
                or conn.held or not conn.remote_available:
            return False
        chunk = conn.consume_remote(BOUNCE_SIZE, hold=True)
        assert chunk is not None
        if self._bounce is None:
            self._bounce = Ring(self.res.dev, 1, BOUNCE_SIZE, ACCESS_LOCAL_WRITE)
        self._staged_off = self._staged_end = 0
        self._post_read(self._bounce.addr, chunk.length, self._bounce.lkey, chunk, True)
        return True

    def _take_staged(self, out: memoryview) -> int:
        assert self._bounce is not None
        n = min(len(out), self.staged)
        off = self._staged_off
        out[:n] = self._bounce.view[off : off + n]
        self._staged_off = off + n
        self.conn.release_held(n)
        return n

    def _read_direct(self, out: memoryview) -> int:
        """RDMA-read straight into ``out`` (blocking), in ``READ_CHUNK`` reads with up to
        ``READS_IN_FLIGHT`` posted at once, so the next one starts without waiting for
        this thread to see the last one complete."""
        conn = self.conn
        n = min(len(out), conn.remote_available)
        # Registered for this call only: a cached registration would keep the caller's
        # buffer exported (pinned), and a bytearray could then not be resized.
        dest = UserMR(self.res.dev, out[:n], ACCESS_LOCAL_WRITE)
        self._direct = True
        inflight = self._inflight
        try:
            posted = 0
            while True:
                while len(inflight) < READS_IN_FLIGHT and posted < n:
                    chunk = conn.consume_remote(min(READ_CHUNK, n - posted))
                    assert chunk is not None
                    self._post_read(dest.addr + posted, chunk.length, dest.lkey, chunk, False)
                    posted += chunk.length
                if not inflight:
                    break
                self._wait(self._one_completes(), None)
                self._check_read()
        finally:
            self._direct = False
            dest.close()
        return n

    def _one_completes(self) -> Callable[[], bool]:
        """A wait predicate: one more of the reads in flight has completed (or failed)."""
        k, inflight, conn = len(self._inflight), self._inflight, self.conn
        return lambda: len(inflight) < k or conn.error is not None

    def rdma_read(self, laddr: int, length: int, lkey: int, rkey: int, raddr: int,
                  timeout: float | None) -> None:
        """One RDMA read of raw addresses, waited for (owner only; tests use it to read
        outside what was advertised); failures latch and raise."""
        self._post_read(laddr, length, lkey, RemoteChunk(rkey, raddr, length, 0), False)
        self._wait_read(timeout)
        self._check_read()

    def _post_read(self, laddr: int, length: int, lkey: int, chunk: RemoteChunk,
                   staging: bool) -> None:
        """Post one RDMA read of ``chunk``; its completion is :meth:`on_read_wc`. A post
        that fails latches: the bytes are already taken from the stream."""
        self.read_status = None
        try:
            self.res.post_read(laddr, length, lkey, chunk.rkey, chunk.vaddr)
        except UsdpError as exc:
            self._fail(exc)
            raise
        self._inflight.append((chunk, staging))
        self.reads += 1
        self.liveness.posted(time.monotonic(), True)

    def _poll_read(self) -> bool:
        """Look once (a poll, no wait) whether the read in flight has completed."""
        try:
            return self._wait(self._read_over, 0.0)
        except BlockingIOError:
            return False

    def _wait_read(self, timeout: float | None) -> None:
        if not self._wait(self._read_over, timeout) and self.conn.error is None:
            self._fail(Timeout(errno.ETIMEDOUT, "RDMA read timed out"))

    def _read_over(self) -> bool:
        return not self.reading or self.conn.error is not None

    def _check_read(self) -> None:
        """Raise the latched error unless the last read succeeded."""
        err = self.conn.error
        if err is not None:
            raise err
        if self.read_status != WC_SUCCESS:  # pragma: no cover - a failure latches
            raise UsdpError(errno.EIO, "RDMA read failed")

    def on_read_wc(self, wc: Any) -> None:
        """The completion of our RDMA read (on whichever thread drains the send CQ)."""
        self.read_status = wc.status
        if not self._inflight:  # pragma: no cover - every READ completion was posted
            return
        chunk, staging = self._inflight.popleft()
        if wc.status != WC_SUCCESS:
            self._fail(self._read_error(wc.status))
            return
        self.conn.remote_read_done(chunk)  # RdmaRdCompl may go once the last is read
        if staging:
            self._staged_off, self._staged_end = 0, chunk.length

    def _read_error(self, status: int) -> UsdpError:
        exc = from_wc(status, "RDMA read of the peer's advertised buffer")
        log.error("qp%d: %s", self.res.qp_num, exc)
        return exc
