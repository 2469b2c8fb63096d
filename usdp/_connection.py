"""Sans-I/O usdp connection: credits, sequence numbers, the receive queue and the stream state.

Theory of operation
===================

Like h11's ``Connection``, this class contains no networking code at all. It never touches
verbs, threads or locks. The I/O layer (which owns the QP, the registered receive ring and
the send buffers, and serialises every call into this object) feeds it receive completions
and asks it for headers to send. In return it gets events and byte ranges to copy. This is
what makes the hard part, flow control, testable with two objects and a deque.

Receive ring and credits
------------------------
Each side owns a ring of ``local_recv_bufs`` receive buffers ("slots"), all posted before the
handshake, so each side starts with ``peer_recv_bufs`` send credits: one credit is one
buffer the peer is known to have posted. Every frame spends one credit. A credit comes back
only when the receiver has *re-posted* the buffer the frame landed in, and then only as
``bufs`` in the next header it sends. ``bufs`` is incremental: buffers re-posted since the
previous header. A slot that holds DATA stays out of the ring until the application has read
all of it, so a slow reader is what makes the sender stall. The slots of all other frames
are free at once.

The life of a slot on the receiving side::

    posted --on_frame--> held (DATA) --consume--> free --take_free_slots--> reposting
       ^                  (other frames go straight to free)                    |
       +------------------------------- recv_reposted --------------------------+
                                        (now owed to the peer: rx_owed)

We also track ``peer_credits``, our view of the peer's credits: buffers we advertised
(initial ``local_recv_bufs`` plus every ``bufs`` we sent) minus frames received. It never
underestimates the peer's real count, and is exact when nothing is in flight.

Deadlock and ping-pong
----------------------
Credit updates cost credits too, which creates two dangers. **Deadlock**: both sides at zero
credits, each owing the other buffers it cannot return. **Ping-pong**: each side keeps
returning the buffer that the other's last credit update consumed, forever. The rules:

1. DATA, DISCONN and KEEPALIVE need at least two credits. The last credit is reserved for a
   payload-free message that returns credits (SDP rule CA4-82).
2. A credit update is sent when ``rx_owed >= max(1, local_recv_bufs // 2)`` (batching, like
   rsockets' half-ring), or when the peer is at zero credits and we owe it anything
   ("rescue").
3. The last credit is never spent to return a single buffer: that would only hand the
   helplessness back, and two sides doing it would ping-pong forever.
4. While the peer is at zero and we owe it nothing yet (the buffer its update used is
   still being re-posted), DATA/DISCONN/KEEPALIVE need a third credit. We keep the two
   that rule 3 needs to give the buffer back.

Why it holds: a side reaches zero only through a credit update, and by rules 2 and 3
(the threshold is at least 2) that update returns at least two buffers. The other side
then holds at least two and, by rule 4, keeps them until its next frame (DATA carries
``bufs`` too, or the rescue) returns the buffer that the update consumed. So a zero never
lasts, and the two sides are never stuck at the same time. A reader that has drained its
ring owes everything it did not advertise (``rx_owed >= local_recv_bufs - 1``), so rule 2
fires for any writer that waits on it. A credit update leaves its receiver owing one buffer
more, which can trigger at most a rescue, and rule 3 keeps the rescue from being answered.
Update chains therefore stop after a few frames.

The pair tests show what each rule is for. Without rule 4, an application that reads only
after writing everything, facing an eager reader (a case TCP completes), deadlocks. Rule 3
and the rescue never fire between two usdp peers that follow rule 4. They make recovery
immediate, and they keep us safe with a peer that follows only CA4-82 (which allows a
single buffer to be returned with the last credit).

Incoming frames are held to the rules a receiver can prove: a frame needs a credit we
advertised; DATA/DISCONN/KEEPALIVE must leave the sender one (our ``peer_credits`` never
underestimates the sender's own count, so this has no false positives); ``bufs`` may not
return more buffers than the peer has received from us (by its ``mseq_ack``), nor push our
credits above ``peer_recv_bufs``.

Zero-copy
---------
When both Hellos offered ``Features.ZCOPY`` (``Params.zcopy``), a sender may advertise a
registered buffer with :meth:`Connection.src_avail_frame` instead of copying it into DATA
frames. On the receiving side the SrcAvail takes its place in the byte stream: when it
reaches the head, :meth:`Connection.consume_remote` hands out ranges for the I/O layer to
RDMA-read (:meth:`Connection.remote_read_done`), and once all of it is read the answer
(RdmaRdCompl) goes back; the sender sees :class:`ZcopyDone` and may reuse its buffer. One
SrcAvail is outstanding at a time, of at most ``MAX_ZCOPY`` bytes. Only this read-based
flow is implemented; SDP's other zero-copy messages (SinkAvail, RdmaWrCompl, cancels) are
protocol errors.

Errors
------
Any violation raises :class:`ProtocolError` and latches the connection in ERROR. A peer's
ABORT latches :class:`ConnectionReset`, and :meth:`Connection.abort_header` latches
:class:`ConnectionAborted` unless an error came first. After that, every state-changing
call raises the latched exception (h11's ERROR state). The I/O layer reports its own fatal
errors (failed completions, an unexpected CM DISCONNECTED) through
:meth:`Connection.fail`, so they latch the same way.
"""

from __future__ import annotations

import errno
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Final

from usdp._errors import (
    BrokenPipe,
    ConnectionAborted,
    ConnectionReset,
    ProtocolError,
    UsdpError,
    WouldBlock,
)
from usdp._wire import (
    HEADER_SIZE,
    NO_SEQ,
    Buffer,
    Flags,
    Header,
    Mid,
    Params,
    RdmaCompl,
    SrcAvail,
    decode_header,
    decode_rdma_compl,
    decode_src_avail,
)

__all__ = [
    "MAX_ZCOPY",
    "Chunk",
    "Connection",
    "CreditsReturned",
    "DataReceived",
    "Event",
    "PeerAborted",
    "PeerClosed",
    "RemoteChunk",
    "State",
    "Stats",
    "ZcopyDone",
    "recv_growth",
]

_U32: Final = 0xFFFF_FFFF
_NO_FLAGS: Final = Flags(0)

# SDP's zero-copy message ids. Only _ZCOPY_SUPPORTED below is implemented (read zero-copy);
# the rest are a protocol error from any peer.
_ZCOPY: Final = frozenset(
    {
        Mid.SRC_AVAIL,
        Mid.SINK_AVAIL,
        Mid.RDMA_RD_COMPL,
        Mid.RDMA_WR_COMPL,
        Mid.MODE_CHANGE,
        Mid.SEND_SM,
        Mid.SRC_AVAIL_CANCEL,
        Mid.SINK_AVAIL_CANCEL,
        Mid.SINK_CANCEL_ACK,
    }
)
# The zero-copy messages implemented, when both sides offered Features.ZCOPY.
_ZCOPY_SUPPORTED: Final = frozenset({Mid.SRC_AVAIL, Mid.RDMA_RD_COMPL})
#: Largest transfer one SrcAvail may advertise (a bound on what a peer can make us read).
MAX_ZCOPY: Final = 1 << 30
# What a peer may still send after its DISCONN: it keeps reading, so it returns credits
# and finishes zero-copy reads of our data.
_AFTER_DISCONN: Final = frozenset({Mid.CREDIT_UPDATE, Mid.KEEPALIVE, Mid.ABORT,
                                   Mid.RDMA_RD_COMPL})
# Frames allowed to spend the sender's last credit (rule 1; ABORT is best effort).
_LAST_CREDIT_OK: Final = frozenset({Mid.CREDIT_UPDATE, Mid.ABORT})

# Slot states in Connection._slots.
_POSTED: Final = 0  # posted to the QP, or handed out by take_free_slots for re-posting
_HELD: Final = 1  # holds unread DATA
_FREE: Final = 2  # done with, waiting in take_free_slots()


class State(Enum):
    """Stream state, as the application sees it."""

    OPEN = "open"
    WR_CLOSED = "wr_closed"  # shutdown_write() called: we write no more
    RD_CLOSED = "rd_closed"  # the peer's DISCONN arrived: EOF once the queue is read
    CLOSED = "closed"  # both
    ABORTED = "aborted"  # ABORT sent or received
    ERROR = "error"  # protocol violation, or a fatal I/O error reported via fail()


@dataclass(frozen=True, slots=True)
class DataReceived:
    """``nbytes`` more bytes are readable."""

    nbytes: int


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer sent DISCONN: once the queued data is read, reads return EOF."""


@dataclass(frozen=True, slots=True)
class PeerAborted:
    """The peer sent ABORT: the connection is reset and queued data is dropped."""


@dataclass(frozen=True, slots=True)
class CreditsReturned:
    """The peer re-posted ``n`` buffers: blocked writers may proceed."""

    n: int


@dataclass(frozen=True, slots=True)
class ZcopyDone:
    """The peer finished RDMA-reading our advertised buffer: it may be reused."""

    length: int


Event = DataReceived | PeerClosed | PeerAborted | CreditsReturned | ZcopyDone


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes ``[offset, offset + length)`` of receive slot ``slot``, to copy to the reader.

    ``frees_slot`` says this chunk finishes the slot (it will come out of
    :meth:`Connection.take_free_slots`); it is informational.
    """

    slot: int
    offset: int
    length: int
    frees_slot: bool


@dataclass(frozen=True, slots=True)
class RemoteChunk:
    """``length`` bytes to RDMA-read from the peer's ``vaddr`` with ``rkey``.

    Call :meth:`Connection.remote_read_done` once the read completed; if ``completes`` is
    nonzero the read finishes that SrcAvail, and only then may RdmaRdCompl (the peer's
    permission to reuse its buffer) go out.
    """

    rkey: int
    vaddr: int
    length: int
    completes: int


@dataclass(slots=True)
class Stats:
    """Counters for diagnostics; they never influence the protocol."""

    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    credit_updates_sent: int = 0
    #: can_send_data() calls that said no for lack of credits.
    credit_stalls: int = 0


class _Segment:
    """Unread DATA payload in one slot; offset/length advance on partial reads."""

    __slots__ = ("length", "offset", "slot")

    def __init__(self, slot: int, offset: int, length: int) -> None:
        self.slot = slot
        self.offset = offset
        self.length = length


class _Remote:
    """An advertised, not yet fully read SrcAvail; offset/length advance as it is read."""

    __slots__ = ("length", "offset", "rkey", "total", "vaddr")

    def __init__(self, rkey: int, vaddr: int, length: int) -> None:
        self.rkey, self.vaddr, self.total = rkey, vaddr, length
        self.offset = 0
        self.length = length


def _proto(msg: str) -> ProtocolError:
    return ProtocolError(errno.EPROTO, msg)


def recv_growth(current: int, maximum: int, peer_credits: int, held: int) -> int:
    """How many receive slots to add now (0: none), asked as slots are re-posted.

    Grow when the peer has spent its last data credit (``peer_credits <= 1``: rule 1 stops
    a sender there, so it sends as fast as we grant) while our reader keeps up (at most
    half the ring still holds unread data: for a slow reader more slots would only pin
    memory for bytes it does not take, as TCP's receive autotuning follows the reader).
    A request/response peer never gets there. Double, up to ``maximum``: a stream from 4
    slots reaches 16 in two steps.
    """
    if current >= maximum or peer_credits > 1 or 2 * held > current:
        return 0
    return min(current, maximum - current)


class Connection:
    """The protocol state of one established usdp connection.

    Receive path, per completion: :meth:`on_frame`. Per read: :meth:`consume`, copy the
    chunks out, then re-post :meth:`take_free_slots` and report them with
    :meth:`recv_reposted`. Send path: :meth:`can_send_data` / :meth:`data_header` for data,
    then drain :meth:`next_control` for credit updates and DISCONN. The caller serialises
    all calls.
    """

    def __init__(self, params: Params) -> None:
        self.params: Final = params
        self.stats: Final = Stats()
        # Send side.
        self._tx_credits = params.peer_recv_bufs  # the peer pre-posted its whole ring
        self._tx_seq = 0  # mseq of our next frame
        self._peer_acked = NO_SEQ  # last mseq_ack received
        self._acked_total = 0  # our frames the peer says it has received
        self._returned_total = 0  # sum of bufs received
        # Receive side.
        self._rx_seq = 0  # mseq expected next
        self._rx_owed = 0  # re-posted buffers not yet advertised
        self._peer_credits = params.local_recv_bufs  # our view of the peer's credits
        self._threshold = max(1, params.local_recv_bufs // 2)
        self._slots = bytearray(params.local_recv_bufs)  # _POSTED/_HELD/_FREE per slot
        self._ring_max = params.local_max_recv_bufs or params.local_recv_bufs
        self._held_slots = 0  # slots holding unread DATA
        # The peer's ring may grow: the most credits we can hold, and how many credits
        # beyond the frames we sent it may return (its new slots).
        self._peer_max = params.peer_max_recv_bufs or params.peer_recv_bufs
        self._grow_allowance = self._peer_max - params.peer_recv_bufs
        self._segments: deque[_Segment | _Remote] = deque()
        self._readable = 0
        self._free: list[int] = []
        self._reposting = 0  # slots handed out by take_free_slots, not yet recv_reposted
        # Stream state.
        self._rd_closed = False
        self._wr_shut = False
        self._disconn_pending = False
        self._disconn_sent = False
        self._abort_sent = False
        self._error: UsdpError | None = None
        self._terminal: State | None = None
        # Zero-copy.
        self._zc_outstanding: int | None = None  # our SrcAvail's length, until RdmaRdCompl
        self._remote_unanswered = False  # a peer SrcAvail not yet answered by RdmaRdCompl
        self._rdcompl_ready: deque[int] = deque()  # fully read, RdmaRdCompl may go out
        self._held = 0  # remote bytes taken with hold=True, not yet handed to the application

    # ------------------------------------------------------------------ state

    @property
    def state(self) -> State:
        if self._terminal is not None:
            return self._terminal
        if self._rd_closed and self._wr_shut:
            return State.CLOSED
        if self._wr_shut:
            return State.WR_CLOSED
        if self._rd_closed:
            return State.RD_CLOSED
        return State.OPEN

    @property
    def error(self) -> UsdpError | None:
        """The latched exception, or None while the connection is healthy."""
        return self._error

    @property
    def readable(self) -> int:
        """Bytes queued for the application."""
        return self._readable

    @property
    def eof(self) -> bool:
        """The peer closed its write side and every byte before that was read."""
        return self._rd_closed and self._readable == 0 and self._error is None

    @property
    def max_payload(self) -> int:
        """Largest payload :meth:`data_header` accepts."""
        return self.params.max_payload

    @property
    def tx_credits(self) -> int:
        """Frames we may still send: peer buffers known to be posted."""
        return self._tx_credits

    @property
    def rx_owed(self) -> int:
        """Buffers re-posted but not yet advertised to the peer."""
        return self._rx_owed

    @property
    def peer_credits(self) -> int:
        """Our upper bound on the peer's credits (exact when nothing is in flight)."""
        return self._peer_credits

    @property
    def disconn_pending(self) -> bool:
        """shutdown_write() was called but DISCONN has not gone out (waiting for credits)."""
        return self._disconn_pending

    def fail(self, exc: UsdpError) -> None:
        """Latch a fatal error found by the I/O layer; later calls raise ``exc``.

        For failed work completions, an RDMA CM DISCONNECTED without a prior DISCONN
        (:class:`ConnectionReset`), and the like. The first latched error wins.
        """
        if self._error is None:
            self._error = exc
            self._terminal = State.ERROR

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    # ---------------------------------------------------------------- receive

    def on_frame(self, slot: int, frame: Buffer) -> list[Event]:
        """Process one receive completion: ``frame`` is exactly the bytes received in ``slot``.

        The connection keeps only ``(slot, offset, length)``, never ``frame`` itself. DATA
        keeps the slot until it is consumed; any other frame frees it at once (see
        :meth:`take_free_slots`).

        Raises:
            ProtocolError: the frame is malformed or illegal here; the error is latched.
            UsdpError: an error latched earlier.
            ValueError: ``slot`` is not a posted slot (an I/O-layer bug; not latched).
        """
        self._raise_if_failed()
        if not 0 <= slot < len(self._slots) or self._slots[slot] != _POSTED:
            raise ValueError(f"completion for slot {slot}, which is not posted")
        try:
            return self._on_frame(slot, frame)
        except ProtocolError as exc:
            self.fail(exc)
            raise

    def _on_frame(self, slot: int, frame: Buffer) -> list[Event]:
        h = decode_header(frame, max_frame=self.params.max_recv_frame)
        mid = h.mid
        if h.mseq != self._rx_seq:
            why = ""
            if h.mseq == (self._rx_seq - 1) & 0xFFFFFFFF:
                # rxe has been seen to deliver one SEND twice under packet duplication.
                why = " (a repeat of the previous message: replayed by the peer or " \
                      "delivered twice by the transport)"
            raise _proto(f"{mid.name} has mseq {h.mseq}, expected {self._rx_seq}{why}")
        if mid in _ZCOPY and not (self.params.zcopy and mid in _ZCOPY_SUPPORTED):
            raise _proto(f"{mid.name} but zero-copy was not negotiated")
        src_avail = self._check_zcopy(mid, h, frame)
        # Credits the peer spent on this frame.
        if self._peer_credits < 1:
            raise _proto(f"{mid.name} sent without a credit")
        if self._peer_credits < 2 and mid not in _LAST_CREDIT_OK:
            raise _proto(f"{mid.name} spent the sender's last credit (reserved, CA4-82)")
        if mid is Mid.CREDIT_UPDATE and h.bufs == 0:
            raise _proto("CREDIT_UPDATE returning no credits")
        # Acknowledgement: monotonic, and never beyond what we sent.
        advance = (h.mseq_ack - self._peer_acked) & _U32
        unacked = (self._tx_seq - 1 - self._peer_acked) & _U32
        if advance > unacked:
            raise _proto(
                f"{mid.name} acks mseq {h.mseq_ack}; last acked {self._peer_acked}, "
                f"last sent {(self._tx_seq - 1) & _U32}"
            )
        acked_total = self._acked_total + advance
        # Credits the peer returns.
        if h.bufs:
            if self._tx_credits + h.bufs > self._peer_max:
                raise _proto(
                    f"credit overflow: {self._tx_credits} + {h.bufs} returned > "
                    f"{self._peer_max} peer buffers"
                )
            if self._returned_total + h.bufs > acked_total + self._grow_allowance:
                raise _proto(
                    f"{h.bufs} buffers returned, but only {acked_total - self._returned_total}"
                    " of our frames were received and not yet returned"
                    + (f" (+{self._grow_allowance} for ring growth)"
                       if self._grow_allowance else "")
                )
        if self._rd_closed and mid not in _AFTER_DISCONN:
            raise _proto(f"{mid.name} after DISCONN")

        # Valid: commit.
        self._rx_seq = (self._rx_seq + 1) & _U32
        self._peer_credits -= 1
        self._peer_acked = h.mseq_ack
        self._acked_total = acked_total
        self._returned_total += h.bufs
        self._tx_credits += h.bufs
        self.stats.frames_in += 1
        events: list[Event] = []
        if h.bufs:
            events.append(CreditsReturned(h.bufs))
        if mid is Mid.DATA:
            n = h.length - HEADER_SIZE
            self._held_slots += 1
            self._slots[slot] = _HELD
            self._segments.append(_Segment(slot, HEADER_SIZE, n))
            self._readable += n
            self.stats.bytes_in += n
            events.append(DataReceived(n))
            return events
        self._release(slot)
        if src_avail is not None:
            self._segments.append(_Remote(src_avail.rkey, src_avail.vaddr, src_avail.length))
            self._remote_unanswered = True
            self._readable += src_avail.length
            self.stats.bytes_in += src_avail.length
            events.append(DataReceived(src_avail.length))
        elif mid is Mid.RDMA_RD_COMPL:
            events.append(ZcopyDone(self._zc_outstanding or 0))
            self._zc_outstanding = None
        if mid is Mid.DISCONN:
            self._rd_closed = True
            events.append(PeerClosed())
        elif mid is Mid.ABORT:
            self._error = ConnectionReset(errno.ECONNRESET, "connection reset by peer (ABORT)")
            self._terminal = State.ABORTED
            self._drop_queue()
            events.append(PeerAborted())
        return events

    def _check_zcopy(self, mid: Mid, h: Header, frame: Buffer) -> SrcAvail | None:
        """Validate a SrcAvail or RdmaRdCompl before anything is committed."""
        if mid is Mid.SRC_AVAIL:
            if h.length != HEADER_SIZE + SrcAvail.SIZE:
                raise _proto("SrcAvail with inline data is not supported")
            sa = decode_src_avail(memoryview(frame)[HEADER_SIZE : h.length])
            if sa.length > MAX_ZCOPY:
                raise _proto(f"SrcAvail of {sa.length} bytes exceeds {MAX_ZCOPY}")
            if self._remote_unanswered:
                raise _proto("SrcAvail while the previous one is unanswered")
            return sa
        if mid is Mid.RDMA_RD_COMPL:
            rc = decode_rdma_compl(memoryview(frame)[HEADER_SIZE : h.length])
            if self._zc_outstanding is None:
                raise _proto("RdmaRdCompl without an outstanding SrcAvail")
            if rc.length != self._zc_outstanding:
                raise _proto(f"RdmaRdCompl for {rc.length} bytes, advertised "
                             f"{self._zc_outstanding}")
        return None

    def _release(self, slot: int) -> None:
        self._slots[slot] = _FREE
        self._free.append(slot)

    def _drop_queue(self) -> None:
        while self._segments:
            seg = self._segments.popleft()
            if isinstance(seg, _Segment):
                self._held_slots -= 1
                self._release(seg.slot)
        self._readable = 0
        self._held = 0

    def consume(self, n: int) -> list[Chunk]:
        """Take up to ``n`` queued bytes, in order, as byte ranges of receive slots.

        Copy every chunk out before re-posting what :meth:`take_free_slots` returns. A
        partial read leaves the rest of a segment queued. Returns [] when nothing is queued
        (then :attr:`eof` tells EOF from "would block").

        Raises:
            UsdpError: the latched error (after an abort, queued data is gone).
            ValueError: ``n`` is negative.
        """
        self._raise_if_failed()
        if n < 0:
            raise ValueError(f"consume({n})")
        chunks: list[Chunk] = []
        if self._held:
            return chunks  # held zero-copy bytes come first (release_held)
        segments = self._segments
        while n > 0 and segments:
            seg = segments[0]
            if isinstance(seg, _Remote):
                break  # zero-copy bytes come through consume_remote()
            if n >= seg.length:
                segments.popleft()
                chunks.append(Chunk(seg.slot, seg.offset, seg.length, True))
                self._held_slots -= 1
                self._release(seg.slot)
                n -= seg.length
                self._readable -= seg.length
            else:
                chunks.append(Chunk(seg.slot, seg.offset, n, False))
                seg.offset += n
                seg.length -= n
                self._readable -= n
                n = 0
        return chunks

    def peek(self, n: int) -> list[Chunk]:
        """The chunks :meth:`consume` would return for ``n``, without consuming (MSG_PEEK).

        Stops at a SrcAvail: those bytes are in the peer's memory, not in a receive slot,
        and reading them is what consumes them.

        Raises:
            UsdpError: the latched error. ValueError: ``n`` is negative.
        """
        self._raise_if_failed()
        if n < 0:
            raise ValueError(f"peek({n})")
        chunks: list[Chunk] = []
        if self._held:
            return chunks
        for seg in self._segments:
            if n <= 0 or isinstance(seg, _Remote):
                break
            take = min(n, seg.length)
            chunks.append(Chunk(seg.slot, seg.offset, take, False))
            n -= take
        return chunks

    @property
    def head_is_remote(self) -> bool:
        """The next unread bytes are zero-copy bytes: in the peer's memory (a SrcAvail, read
        with :meth:`consume_remote`) or held by the I/O layer (:meth:`release_held`)."""
        return bool(self._held) or (bool(self._segments)
                                    and isinstance(self._segments[0], _Remote))

    @property
    def remote_available(self) -> int:
        """Bytes of the SrcAvail at the head of the stream not yet taken by
        :meth:`consume_remote` (0 if the head is not a SrcAvail)."""
        seg = self._segments[0] if self._segments else None
        return seg.length if isinstance(seg, _Remote) else 0

    @property
    def held(self) -> int:
        """Bytes taken with ``consume_remote(hold=True)`` and not yet released."""
        return self._held

    def consume_remote(self, n: int, *, hold: bool = False) -> RemoteChunk | None:
        """Take up to ``n`` bytes of the SrcAvail at the head of the stream, to RDMA-read.

        Returns None if the head is not a SrcAvail. The I/O layer must read them before
        handing out later bytes, and report the read with :meth:`remote_read_done`.
        Without ``hold`` the bytes count as read now (they go straight to the caller's
        buffer). With ``hold`` (a read into a staging buffer, finished later) they stay
        counted in :attr:`readable`, and :meth:`consume` gives nothing, until they are
        handed out with :meth:`release_held`, so readiness and EOF stay right meanwhile.

        Raises:
            UsdpError: the latched error.
            ValueError: bytes are held and ``hold`` is false (they would be overtaken).
        """
        self._raise_if_failed()
        if n <= 0 or not self.remote_available:
            return None
        if self._held and not hold:
            raise ValueError("held zero-copy bytes must be released before reading on")
        seg = self._segments[0]
        assert isinstance(seg, _Remote)
        take = min(n, seg.length)
        chunk = RemoteChunk(seg.rkey, seg.vaddr + seg.offset, take,
                            seg.total if take == seg.length else 0)
        seg.offset += take
        seg.length -= take
        if hold:
            self._held += take
        else:
            self._readable -= take
        if seg.length == 0:
            self._segments.popleft()
        return chunk

    def release_held(self, n: int) -> None:
        """``n`` held bytes (see :meth:`consume_remote`) were handed to the application."""
        if not 0 <= n <= self._held:
            raise ValueError(f"release_held({n}) with {self._held} held")
        self._held -= n
        self._readable -= n

    def remote_read_done(self, chunk: RemoteChunk) -> None:
        """The RDMA read of ``chunk`` completed; a finished SrcAvail may now be answered."""
        if chunk.completes:
            self._rdcompl_ready.append(chunk.completes)

    @property
    def zcopy_outstanding(self) -> bool:
        """Our SrcAvail has not been answered yet (the buffer is still the peer's to read)."""
        return self._zc_outstanding is not None

    def src_avail_frame(self, length: int, rkey: int, vaddr: int) -> tuple[Header, bytes]:
        """Advertise ``length`` bytes at ``vaddr`` for the peer to RDMA-read.

        One at a time: wait for :class:`ZcopyDone` (``zcopy_outstanding`` false) first.

        Raises:
            UsdpError: the latched error. BrokenPipe: write side shut down.
            WouldBlock: no credits. ValueError: zero-copy not negotiated, one outstanding,
            or a length out of 1..MAX_ZCOPY.
        """
        self._raise_if_failed()
        if self._wr_shut:
            raise BrokenPipe(errno.EPIPE, "write side already shut down")
        if not self.params.zcopy or self._zc_outstanding is not None:
            raise ValueError("zero-copy not negotiated, or a SrcAvail is outstanding")
        if not 1 <= length <= MAX_ZCOPY:
            raise ValueError(f"SrcAvail of {length} bytes, allowed 1..{MAX_ZCOPY}")
        if not self._nonupdate_ok():
            raise WouldBlock(errno.EAGAIN, "no send credits")
        self._zc_outstanding = length
        self.stats.bytes_out += length
        return self._issue(Mid.SRC_AVAIL, SrcAvail.SIZE), SrcAvail(length, rkey, vaddr).encode()

    def take_free_slots(self) -> list[int]:
        """Slots to re-post now: consumed DATA slots and slots of all other frames.

        The one place the I/O layer learns what to re-post. Re-post them, then call
        :meth:`recv_reposted`. Works in any state.
        """
        free, self._free = self._free, []
        for slot in free:
            self._slots[slot] = _POSTED
        self._reposting += len(free)
        return free

    def recv_reposted(self, count: int) -> None:
        """``count`` slots from :meth:`take_free_slots` are posted again.

        Only now are they owed to the peer: a buffer advertised before it is posted could
        draw an RNR NAK.

        Raises:
            ValueError: more slots than were handed out.
        """
        if not 0 <= count <= self._reposting:
            raise ValueError(f"recv_reposted({count}) with {self._reposting} slots handed out")
        self._reposting -= count
        self._rx_owed += count

    # ------------------------------------------------------------------- ring growth

    @property
    def ring_size(self) -> int:
        """Receive slots we have now (they grow with use, up to ``ring_max``)."""
        return len(self._slots)

    @property
    def ring_max(self) -> int:
        """The most receive slots our ring may have (the peer accepts their credits)."""
        return self._ring_max

    @property
    def peer_ring_max(self) -> int:
        """The most receive slots the peer's ring may have: the most credits we can hold."""
        return self._peer_max

    def recv_growth(self) -> int:
        """Receive slots worth adding now (see :func:`recv_growth`); call it whenever
        slots are about to be re-posted (after a read, after a frame)."""
        if len(self._slots) >= self._ring_max or self._error is not None \
                or self._rd_closed:
            return 0
        return recv_growth(len(self._slots), self._ring_max, self._peer_credits, self._held_slots)

    def add_recv_slots(self, count: int) -> list[int]:
        """The I/O layer registered ``count`` more receive slots: their numbers. Post
        them, then report them with :meth:`recv_reposted`: from then on they are owed
        to the peer, exactly as re-posted slots, so they become credits through the
        normal credit-update rules (the batching threshold follows the ring's size).

        Raises:
            ValueError: the ring would exceed ``ring_max``.
        """
        first = len(self._slots)
        if count < 0 or first + count > self._ring_max:
            raise ValueError(f"add_recv_slots({count}) to {first} slots, max {self._ring_max}")
        self._slots.extend(bytes(count))  # _POSTED: handed out for posting
        self._reposting += count
        self._threshold = max(1, len(self._slots) // 2)
        return list(range(first, first + count))

    # ------------------------------------------------------------------- send

    def _nonupdate_ok(self) -> bool:
        """Rules 1 and 4: may we spend a credit on something that is not a credit update?"""
        need = 3 if self._peer_credits == 0 and self._rx_owed == 0 else 2
        return self._tx_credits >= need

    def data_credit_ok(self) -> bool:
        """True if :meth:`data_header` would succeed now; counts nothing (for polling)."""
        return self._error is None and not self._wr_shut and self._nonupdate_ok()

    def can_send_data(self) -> bool:
        """True if :meth:`data_header` would succeed now (counts a stall when credits lack)."""
        if self._error is not None or self._wr_shut:
            return False
        if self._nonupdate_ok():
            return True
        self.stats.credit_stalls += 1
        return False

    def data_header(self, payload_len: int) -> Header:
        """Spend a credit on a DATA frame of ``payload_len`` bytes; return its header.

        The header also returns ``rx_owed`` credits and acks the last frame received. The
        I/O layer must post the frame (header + payload) before any later header it gets
        from this object, because sequence numbers are assigned here.

        Raises:
            UsdpError: the latched error.
            BrokenPipe: after :meth:`shutdown_write`.
            WouldBlock: not enough credits (check :meth:`can_send_data` first).
            ValueError: ``payload_len`` not in ``1..max_payload``.
        """
        self._raise_if_failed()
        if self._wr_shut:
            raise BrokenPipe(errno.EPIPE, "write side already shut down")
        if not 1 <= payload_len <= self.params.max_payload:
            raise ValueError(f"payload of {payload_len} bytes, allowed 1..{self.max_payload}")
        if not self._nonupdate_ok():
            raise WouldBlock(errno.EAGAIN, "no send credits")
        self.stats.bytes_out += payload_len
        return self._issue(Mid.DATA, payload_len)

    def shutdown_write(self) -> None:
        """Close our write side: later data raises BrokenPipe, and DISCONN is queued.

        Call it only once the I/O layer has no data of its own left to send: the DISCONN
        may come out of the next :meth:`next_control` call. Idempotent.

        Raises:
            UsdpError: the latched error.
        """
        self._raise_if_failed()
        if not self._wr_shut:
            self._wr_shut = True
            self._disconn_pending = True

    def credit_update_due(self) -> bool:
        """Rules 2 and 3: should a credit-only update go out now?"""
        if self._error is not None or (self._rd_closed and self._disconn_sent):
            return False  # both directions done: nobody needs credits any more
        owed, credits = self._rx_owed, self._tx_credits
        if owed == 0 or credits == 0:
            return False
        if owed < self._threshold and self._peer_credits != 0:
            return False
        return credits >= 2 or owed >= 2

    def next_control(self) -> Header | None:
        """The next payload-free frame to send now (a queued DISCONN, else a credit update).

        Call it after every event that can change credits: after :meth:`on_frame`,
        :meth:`recv_reposted` and sending data. Keep calling until it returns None.
        Returns None once an error is latched. (With zero-copy, use
        :meth:`next_control_frame`, which also gives RdmaRdCompl and its payload.)
        """
        frame = self.next_control_frame()
        if frame is None:
            return None
        assert not frame[1], "a control frame with payload: use next_control_frame()"
        return frame[0]

    def next_control_frame(self) -> tuple[Header, bytes] | None:
        """The next control frame and its payload: RdmaRdCompl, DISCONN, credit update."""
        if self._error is not None:
            return None
        if self._rdcompl_ready and self._nonupdate_ok():
            length = self._rdcompl_ready.popleft()
            if not self._segments or not isinstance(self._segments[0], _Remote):
                self._remote_unanswered = False
            return self._issue(Mid.RDMA_RD_COMPL, RdmaCompl.SIZE), RdmaCompl(length).encode()
        h = self._next_plain_control()
        return None if h is None else (h, b"")

    def _next_plain_control(self) -> Header | None:
        if self._disconn_pending and self._nonupdate_ok():
            self._disconn_pending = False
            self._disconn_sent = True
            return self._issue(Mid.DISCONN, 0)
        if self.credit_update_due():
            self.stats.credit_updates_sent += 1
            return self._issue(Mid.CREDIT_UPDATE, 0)
        return None

    def keepalive_header(self) -> Header | None:
        """A KEEPALIVE to probe an idle peer, or None if credits do not allow one now."""
        if self._error is not None or not self._nonupdate_ok():
            return None
        return self._issue(Mid.KEEPALIVE, 0)

    def abort_header(self) -> Header | None:
        """Abort the connection; return an ABORT to send, best effort.

        Latches :class:`ConnectionAborted` unless an error is already latched (e.g. the
        ProtocolError that made us abort). Returns None if an ABORT was already issued or
        there is no credit; then tear down the CM connection, which the peer also sees as
        a reset.
        """
        if self._error is None:
            self._error = ConnectionAborted(errno.ECONNABORTED, "connection aborted")
            self._terminal = State.ABORTED
        self._disconn_pending = False
        if self._abort_sent or self._tx_credits < 1:
            self._abort_sent = True
            return None
        self._abort_sent = True
        return self._issue(Mid.ABORT, 0)

    def _issue(self, mid: Mid, payload_len: int) -> Header:
        bufs, self._rx_owed = self._rx_owed, 0
        self._peer_credits += bufs
        h = Header(
            mid,
            _NO_FLAGS,
            bufs,
            HEADER_SIZE + payload_len,
            self._tx_seq,
            (self._rx_seq - 1) & _U32,
        )
        self._tx_seq = (self._tx_seq + 1) & _U32
        self._tx_credits -= 1
        self.stats.frames_out += 1
        return h
