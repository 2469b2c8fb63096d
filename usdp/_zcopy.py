"""Zero-copy transfers of one connection: SrcAvail out, RDMA reads in.

Sending: the caller's buffer is registered with remote-read rights for exactly as long as
the transfer is outstanding, advertised in a SrcAvail, and ours again once the peer's
RdmaRdCompl says it has read it. Receiving: an advertised buffer is RDMA-read straight into
a large ``recv_into`` buffer (registered for that read only) or through a registered bounce
buffer and one copy. Protocol and validation are in ``_connection``; see docs/protocol.md
section 10.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from typing import Any

from usdp._connection import MAX_ZCOPY, Connection
from usdp._errors import BrokenPipe, Timeout, UsdpError, from_wc
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

#: A recv_into buffer at least this big is registered and RDMA-read into directly;
#: smaller reads go through a bounce buffer (registration costs more than the copy).
DIRECT_READ_MIN = 64 * 1024
BOUNCE_SIZE = 1 << 20


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
        self.read_status: int | None = None  # of the outstanding RDMA read, once done
        self.reading = False  # an RDMA read is posted and its completion not yet seen
        self._bounce: Ring | None = None
        self.sends = 0
        self.bytes_out = 0
        self.reads = 0

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

    def recv_remote(self, out: memoryview) -> int:
        """RDMA-read advertised bytes: straight into ``out`` when it is large, else through
        a registered bounce buffer and one copy."""
        direct = len(out) >= DIRECT_READ_MIN
        want = len(out) if direct else min(len(out), BOUNCE_SIZE)
        chunk = self.conn.consume_remote(want)
        assert chunk is not None
        dest: UserMR | None = None
        if direct:
            # Registered for this read only: a cached registration would keep the caller's
            # buffer exported (pinned), and a bytearray could then not be resized.
            dest = UserMR(self.res.dev, out[: chunk.length], ACCESS_LOCAL_WRITE)
            laddr, lkey = dest.addr, dest.lkey
        else:
            if self._bounce is None:
                self._bounce = Ring(self.res.dev, 1, BOUNCE_SIZE, ACCESS_LOCAL_WRITE)
            laddr, lkey = self._bounce.addr, self._bounce.lkey
        # The read is bounded by the watchdog (ack_timeout), not by the socket timeout
        # (which may be 0 for a non-blocking recv that found these bytes "ready").
        try:
            self.rdma_read(laddr, chunk.length, lkey, chunk.rkey, chunk.vaddr, None)
        finally:
            if dest is not None:
                dest.close()
        if not direct:
            assert self._bounce is not None
            out[: chunk.length] = self._bounce.view[: chunk.length]
        self.conn.remote_read_done(chunk)
        self.reads += 1
        return chunk.length

    def rdma_read(self, laddr: int, length: int, lkey: int, rkey: int, raddr: int,
                  timeout: float | None) -> None:
        """One RDMA read, waited for (owner only); failures latch and raise."""
        self.read_status = None
        self.res.post_read(laddr, length, lkey, rkey, raddr)
        self.reading = True
        self.liveness.posted(time.monotonic(), True)
        conn = self.conn
        ok = self._wait(lambda: self.read_status is not None or conn.error is not None,
                        timeout)
        if ok and self.read_status == WC_SUCCESS:
            return
        if conn.error is None:
            self._fail(Timeout(errno.ETIMEDOUT, "RDMA read timed out"))
        assert conn.error is not None
        raise conn.error

    def on_read_wc(self, wc: Any) -> None:
        """The completion of our RDMA read."""
        self.reading = False
        self.read_status = wc.status
        if wc.status != WC_SUCCESS:
            self._fail(self._read_error(wc.status))

    def _read_error(self, status: int) -> UsdpError:
        exc = from_wc(status, "RDMA read of the peer's advertised buffer")
        log.error("qp%d: %s", self.res.qp_num, exc)
        return exc
