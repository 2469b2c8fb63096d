"""The sans-I/O Connection: unit behaviour, hostile peers, and a ConnectionPair over a fake link.

The pair harness plays the I/O layer for two Connections the way the real one will: each
side owns a ring of receive slots, frames land in posted slots in FIFO order (as on an RC
QP), reads copy chunks out, and freed slots are re-posted (sometimes late, to shake out
ordering assumptions). The link asserts the property verbs would punish with an RNR NAK:
every frame in flight has a posted buffer waiting for it.
"""

from __future__ import annotations

import errno
import random
from collections import deque
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.helpers import U32, Peer, params
from usdp._connection import (
    Chunk,
    Connection,
    CreditsReturned,
    DataReceived,
    PeerAborted,
    PeerClosed,
    State,
    recv_growth,
)
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
    Features,
    Flags,
    HandshakeKind,
    Header,
    Hello,
    Mid,
    SrcAvail,
    encode_header,
    negotiate,
)

# ------------------------------------------------------------------- single connection


def test_initial_state() -> None:
    c = Connection(params(nbufs=8, peer_nbufs=16))
    assert c.state is State.OPEN
    assert c.error is None
    assert (c.tx_credits, c.peer_credits, c.rx_owed, c.readable) == (16, 8, 0, 0)
    assert not c.eof
    assert c.max_payload == 256 - HEADER_SIZE
    assert c.next_control() is None


def test_data_header_fields() -> None:
    c = Connection(params())
    h = c.data_header(100)
    assert h == Header(Mid.DATA, h.flags, 0, HEADER_SIZE + 100, 0, NO_SEQ)
    assert int(h.flags) == 0
    assert c.tx_credits == 7
    assert c.data_header(1).mseq == 1
    assert (c.stats.frames_out, c.stats.bytes_out) == (2, 101)


def test_data_header_argument_checks() -> None:
    c = Connection(params())
    with pytest.raises(ValueError):
        c.data_header(0)
    with pytest.raises(ValueError):
        c.data_header(c.max_payload + 1)
    assert c.stats.frames_out == 0


def test_receive_consume_and_repost_cycle() -> None:
    c = Connection(params())
    p = Peer(c)
    ev = p.send(Mid.DATA, b"hello world")
    assert ev == [DataReceived(11)]
    assert c.readable == 11
    assert c.peer_credits == 7
    assert c.take_free_slots() == []  # DATA holds its slot until read
    assert c.consume(5) == [Chunk(0, HEADER_SIZE, 5, False)]
    assert c.take_free_slots() == []
    assert c.consume(100) == [Chunk(0, HEADER_SIZE + 5, 6, True)]
    assert c.readable == 0
    assert c.consume(10) == []
    assert c.take_free_slots() == [0]
    assert c.rx_owed == 0  # not owed until re-posted
    c.recv_reposted(1)
    assert c.rx_owed == 1
    h = c.data_header(3)
    assert (h.bufs, h.mseq_ack) == (1, 0)
    assert (c.rx_owed, c.peer_credits) == (0, 8)


def test_consume_spans_segments() -> None:
    c = Connection(params())
    p = Peer(c)
    p.send(Mid.DATA, b"aaa")
    p.send(Mid.DATA, b"bbbb")
    p.send(Mid.DATA, b"cc")
    assert c.consume(8) == [
        Chunk(0, HEADER_SIZE, 3, True),
        Chunk(1, HEADER_SIZE, 4, True),
        Chunk(2, HEADER_SIZE, 1, False),
    ]
    assert c.take_free_slots() == [0, 1]
    assert c.consume(0) == []
    with pytest.raises(ValueError):
        c.consume(-1)


def test_non_data_frames_free_their_slot_at_once() -> None:
    c = Connection(params())
    c.data_header(1)
    p = Peer(c)
    ev = p.send(Mid.CREDIT_UPDATE, bufs=1)
    assert ev == [CreditsReturned(1)]
    assert c.tx_credits == 8
    p.send(Mid.KEEPALIVE)
    assert c.take_free_slots() == [0, 1]


def test_recv_reposted_checks_count() -> None:
    c = Connection(params())
    with pytest.raises(ValueError):
        c.recv_reposted(1)
    Peer(c).send(Mid.KEEPALIVE)
    assert c.take_free_slots() == [0]
    c.recv_reposted(0)
    c.recv_reposted(1)
    with pytest.raises(ValueError):
        c.recv_reposted(1)


def test_completion_for_unposted_slot_is_a_local_bug() -> None:
    c = Connection(params())
    p = Peer(c)
    p.send(Mid.DATA, b"x")
    with pytest.raises(ValueError, match="not posted"):
        c.on_frame(0, p.frame(Mid.DATA, b"y"))  # slot 0 still holds data
    with pytest.raises(ValueError):
        c.on_frame(99, p.frame(Mid.DATA, b"y"))
    assert c.error is None  # not latched: it is our bug, not the peer's


def test_credits_reserve_last_for_updates() -> None:
    c = Connection(params(peer_nbufs=4))
    assert c.can_send_data()
    c.data_header(1)
    c.data_header(1)
    c.data_header(1)
    assert c.tx_credits == 1
    assert not c.can_send_data()
    assert c.stats.credit_stalls == 1
    with pytest.raises(WouldBlock) as info:
        c.data_header(1)
    assert info.value.errno == errno.EAGAIN
    assert c.keepalive_header() is None


def test_credit_update_threshold_is_half_the_ring() -> None:
    c = Connection(params(nbufs=8))
    p = Peer(c)
    for i in range(4):
        p.send(Mid.DATA, bytes([i]))
    c.consume(3)
    c.recv_reposted(len(c.take_free_slots()))
    assert (c.rx_owed, c.peer_credits) == (3, 4)
    assert not c.credit_update_due()
    assert c.next_control() is None
    c.consume(1)
    c.recv_reposted(len(c.take_free_slots()))
    assert c.credit_update_due()
    h = c.next_control()
    assert h is not None and h.mid is Mid.CREDIT_UPDATE and h.bufs == 4
    assert h.length == HEADER_SIZE
    assert c.stats.credit_updates_sent == 1
    assert c.next_control() is None


def test_credit_update_when_peer_is_at_zero() -> None:
    c = Connection(params(nbufs=8))
    p = Peer(c)
    for i in range(7):
        p.send(Mid.DATA, bytes([i]))
    c.data_header(1)
    c.data_header(1)
    p.send(Mid.CREDIT_UPDATE, bufs=2)  # the peer's last credit
    assert c.peer_credits == 0
    c.recv_reposted(len(c.take_free_slots()))
    assert c.rx_owed == 1  # below the threshold, but the peer is stuck without it
    h = c.next_control()
    assert h is not None and h.mid is Mid.CREDIT_UPDATE and h.bufs == 1


def test_rule4_keeps_two_credits_to_rescue_a_stuck_peer() -> None:
    c = Connection(params(nbufs=8, peer_nbufs=4))
    p = Peer(c)
    for i in range(7):
        p.send(Mid.DATA, bytes([i]))
    for _ in range(3):
        c.data_header(1)
    p.send(Mid.CREDIT_UPDATE, bufs=1)  # the peer's last credit: it is at zero, we are at 2
    assert (c.tx_credits, c.peer_credits, c.rx_owed) == (2, 0, 0)
    # Data now would leave us unable to rescue it once its slot is re-posted.
    assert not c.can_send_data()
    assert c.next_control() is None
    c.recv_reposted(len(c.take_free_slots()))
    h = c.next_control()
    assert h is not None and h.mid is Mid.CREDIT_UPDATE and h.bufs == 1
    assert c.tx_credits == 1


def test_rule3_last_credit_never_returns_a_single_buffer() -> None:
    c = Connection(params(nbufs=4, peer_nbufs=4))
    p = Peer(c)
    for _ in range(3):
        c.data_header(1)
    for i in range(3):
        p.send(Mid.DATA, bytes([i]))
    c.consume(3)
    c.recv_reposted(len(c.take_free_slots()))
    h = c.next_control()  # threshold reached: the last credit may go, returning three
    assert h is not None and h.bufs == 3 and c.tx_credits == 0
    for i in range(3):
        p.send(Mid.DATA, bytes([i]))
    p.send(Mid.CREDIT_UPDATE, bufs=1)  # the peer's last credit, returning one
    c.recv_reposted(len(c.take_free_slots()))
    assert (c.tx_credits, c.rx_owed, c.peer_credits) == (1, 1, 0)
    # Giving back only the buffer its update used would just hand the problem back.
    assert not c.credit_update_due()
    assert c.next_control() is None
    c.consume(3)
    c.recv_reposted(len(c.take_free_slots()))
    h = c.next_control()
    assert h is not None and h.bufs == 4 and c.tx_credits == 0


def test_shutdown_write_queues_disconn() -> None:
    c = Connection(params())
    c.shutdown_write()
    assert c.state is State.WR_CLOSED
    assert c.disconn_pending
    assert not c.can_send_data()
    with pytest.raises(BrokenPipe) as info:
        c.data_header(1)
    assert info.value.errno == errno.EPIPE
    assert isinstance(info.value, BrokenPipeError)
    h = c.next_control()
    assert h is not None and h.mid is Mid.DISCONN and h.length == HEADER_SIZE
    assert not c.disconn_pending
    assert c.next_control() is None
    c.shutdown_write()  # idempotent
    assert c.next_control() is None


def test_disconn_waits_for_credits() -> None:
    c = Connection(params(peer_nbufs=4))
    for _ in range(3):
        c.data_header(1)
    c.shutdown_write()
    assert c.next_control() is None
    assert c.disconn_pending
    Peer(c).send(Mid.CREDIT_UPDATE, bufs=3, ack=2)
    h = c.next_control()
    assert h is not None and h.mid is Mid.DISCONN


def test_peer_disconn_is_eof_after_queued_data() -> None:
    c = Connection(params())
    p = Peer(c)
    p.send(Mid.DATA, b"abc")
    assert p.send(Mid.DISCONN) == [PeerClosed()]
    assert c.state is State.RD_CLOSED
    assert not c.eof
    c.consume(3)
    assert c.eof
    assert c.consume(3) == []
    # Still writable (half-close), and the peer may still return credits.
    c.data_header(1)
    p.send(Mid.CREDIT_UPDATE, bufs=1)
    c.shutdown_write()
    assert c.state is State.CLOSED


def test_peer_abort_resets() -> None:
    c = Connection(params())
    p = Peer(c)
    p.send(Mid.DATA, b"abc")
    assert p.send(Mid.ABORT) == [PeerAborted()]
    assert c.state is State.ABORTED
    assert isinstance(c.error, ConnectionResetError)
    assert c.error.errno == errno.ECONNRESET
    assert c.readable == 0
    with pytest.raises(ConnectionReset):
        c.consume(1)
    with pytest.raises(ConnectionReset):
        c.data_header(1)
    with pytest.raises(ConnectionReset):
        p.send(Mid.DATA, b"x")
    assert not c.can_send_data()
    assert c.next_control() is None
    assert sorted(c.take_free_slots()) == [0, 1]  # the dropped data's slot is free too


def test_local_abort() -> None:
    c = Connection(params())
    h = c.abort_header()
    assert h is not None and h.mid is Mid.ABORT
    assert c.state is State.ABORTED
    assert isinstance(c.error, ConnectionAborted)
    assert c.abort_header() is None
    with pytest.raises(ConnectionAbortedError):
        c.consume(1)


def test_abort_after_protocol_error_keeps_the_cause() -> None:
    c = Connection(params())
    with pytest.raises(ProtocolError):
        Peer(c).send(0x42)
    h = c.abort_header()
    assert h is not None and h.mid is Mid.ABORT
    assert c.state is State.ERROR
    assert isinstance(c.error, ProtocolError)


def test_abort_without_credit_returns_none() -> None:
    c = Connection(params(peer_nbufs=4))
    for _ in range(3):
        c.data_header(1)
    c._tx_credits = 0  # white-box: a state the rules only reach via a credit update
    assert c.abort_header() is None
    assert c.state is State.ABORTED


def test_fail_latches_io_errors() -> None:
    c = Connection(params())
    exc = ConnectionReset(errno.ECONNRESET, "CM DISCONNECTED")
    c.fail(exc)
    c.fail(ProtocolError(errno.EPROTO, "later"))
    assert c.error is exc
    assert c.state is State.ERROR
    with pytest.raises(ConnectionReset):
        c.shutdown_write()


def test_keepalive() -> None:
    c = Connection(params())
    h = c.keepalive_header()
    assert h is not None and h.mid is Mid.KEEPALIVE and h.length == HEADER_SIZE
    assert Peer(c).send(Mid.KEEPALIVE, bufs=0, ack=0) == []


def test_acks_track_the_peer() -> None:
    c = Connection(params())
    p = Peer(c)
    for _ in range(3):
        c.data_header(1)
    p.send(Mid.KEEPALIVE, ack=NO_SEQ)
    p.send(Mid.KEEPALIVE, ack=1)
    p.send(Mid.KEEPALIVE, ack=1)
    p.send(Mid.KEEPALIVE, ack=2)
    assert c.data_header(1).mseq_ack == 3


# ------------------------------------------------------------------------ hostile peers


def _expect_latched(
    c: Connection, p: Peer, mid: int, payload: bytes, match: str, **kw: int
) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        p.send(mid, payload, **kw)
    exc = info.value
    assert exc.errno == errno.EPROTO
    assert c.error is exc
    assert c.state is State.ERROR
    # Latched: everything afterwards fails fast with the same error.
    with pytest.raises(ProtocolError) as again:
        c.on_frame(0, Peer(c).frame(Mid.KEEPALIVE))
    assert again.value is exc
    with pytest.raises(ProtocolError):
        c.consume(1)
    with pytest.raises(ProtocolError):
        c.data_header(1)
    assert not c.can_send_data()
    assert c.next_control() is None
    assert c.keepalive_header() is None


@pytest.mark.parametrize(
    ("mid", "payload", "kw", "match"),
    [
        (0x42, b"", {}, "unknown message id"),
        (Mid.HELLO, b"", {}, "private data"),
        (Mid.DATA, b"abc", {"length": 18}, "len=18 but 19"),
        (Mid.DATA, b"x" * 300, {}, "exceeds the limit"),
        (Mid.DATA, b"x", {"bufs": 1}, "credit overflow"),
        (Mid.DATA, b"x", {"mseq": 1}, "mseq 1, expected 0"),
        (Mid.DATA, b"x", {"mseq": U32}, "expected 0"),
        (Mid.KEEPALIVE, b"", {"ack": 0}, "acks mseq 0"),
        (Mid.CREDIT_UPDATE, b"", {}, "returning no credits"),
        (Mid.SRC_AVAIL, SrcAvail(100, 1, 2).encode(), {}, "zero-copy was not negotiated"),
        (Mid.SINK_AVAIL, bytes(20), {}, "zero-copy"),
        (Mid.RDMA_RD_COMPL, b"\0\0\0\1", {}, "zero-copy"),
        (Mid.SEND_SM, b"", {}, "zero-copy"),
        (Mid.SRC_AVAIL_CANCEL, b"", {}, "zero-copy"),
    ],
)
def test_hostile_first_frame(mid: int, payload: bytes, kw: dict[str, int], match: str) -> None:
    c = Connection(params())
    _expect_latched(c, Peer(c), mid, payload, match, **kw)


def test_hostile_out_of_order_seq() -> None:
    c = Connection(params())
    p = Peer(c)
    p.send(Mid.DATA, b"a")
    _expect_latched(c, p, Mid.DATA, b"b", "mseq 2, expected 1", mseq=2)


def test_hostile_replayed_seq() -> None:
    c = Connection(params())
    p = Peer(c)
    p.send(Mid.DATA, b"a")
    _expect_latched(c, p, Mid.DATA, b"b", "mseq 0, expected 1", mseq=0)


def test_hostile_data_after_disconn() -> None:
    c = Connection(params())
    p = Peer(c)
    p.send(Mid.DISCONN)
    _expect_latched(c, p, Mid.DATA, b"late", "DATA after DISCONN")


def test_hostile_double_disconn() -> None:
    c = Connection(params())
    p = Peer(c)
    p.send(Mid.DISCONN)
    _expect_latched(c, p, Mid.DISCONN, b"", "DISCONN after DISCONN")


def test_hostile_returns_more_than_it_received() -> None:
    c = Connection(params())
    p = Peer(c)
    c.data_header(1)
    c.data_header(1)
    # Two frames sent, but the peer acks only the first: it cannot have re-posted two.
    _expect_latched(c, p, Mid.CREDIT_UPDATE, b"", "2 buffers returned, but only 1", bufs=2, ack=0)


def test_hostile_returns_twice() -> None:
    c = Connection(params())
    p = Peer(c)
    c.data_header(1)
    p.send(Mid.CREDIT_UPDATE, bufs=1, ack=0)
    _expect_latched(c, p, Mid.CREDIT_UPDATE, b"", "credit overflow", bufs=1, ack=0)


def test_hostile_ack_goes_backwards() -> None:
    c = Connection(params())
    p = Peer(c)
    c.data_header(1)
    c.data_header(1)
    p.send(Mid.KEEPALIVE, ack=1)
    _expect_latched(c, p, Mid.KEEPALIVE, b"", "acks mseq 0; last acked 1", ack=0)


def test_hostile_spends_reserved_last_credit() -> None:
    c = Connection(params(nbufs=4))
    p = Peer(c)
    for i in range(3):
        p.send(Mid.DATA, bytes([i]))
    assert c.peer_credits == 1
    _expect_latched(c, p, Mid.DATA, b"x", "last credit")


def test_hostile_sends_without_credit() -> None:
    c = Connection(params(nbufs=4))
    p = Peer(c)
    for i in range(3):
        p.send(Mid.DATA, bytes([i]))
    c.data_header(1)
    p.send(Mid.CREDIT_UPDATE, bufs=1)  # legal: last credit, returning credits
    assert c.peer_credits == 0
    # Slot 0 is posted again, but not yet advertised: the peer cannot know about it.
    c.consume(1)
    c.recv_reposted(len(c.take_free_slots()))
    _expect_latched(c, p, Mid.CREDIT_UPDATE, b"", "without a credit", bufs=0)


@given(st.lists(st.binary(max_size=40), max_size=12))
def test_fuzz_on_frame_raises_only_protocol_errors(frames: list[bytes]) -> None:
    c = Connection(params(nbufs=4, size=64))
    for i, data in enumerate(frames):
        slot = i % 4
        if c._slots[slot] != 0:
            c.consume(c.readable)
            c.recv_reposted(len(c.take_free_slots()))
        try:
            c.on_frame(slot, data)
        except ProtocolError:
            assert c.error is not None
            return
        except UsdpError:
            assert c.state is State.ABORTED
            return


# ------------------------------------------------------------------- the pair harness


class Side:
    """One endpoint plus the parts of an I/O layer the Connection needs."""

    def __init__(self, name: str, conn: Connection) -> None:
        self.name = name
        self.conn = conn
        n = conn.params.local_recv_bufs
        self.ring = [bytearray(conn.params.local_buf_size) for _ in range(n)]
        self.posted: deque[int] = deque(range(n))  # FIFO, like an RC receive queue
        self.inbox: deque[bytes] = deque()  # frames in flight towards this side
        self.unposted: list[int] = []  # taken from the Connection, not yet posted
        self.to_write = bytearray()
        self.written = 0
        self.received = bytearray()
        self.peer: Side
        self.control_sent = 0
        self.frames_sent = 0
        self.shut = False
        self.saw_eof = False
        # Application model: read only once everything is written (a client that sends its
        # whole request before reading). TCP completes with such a peer as long as the other
        # side reads, so usdp must too; this is what drives credits into their corners.
        self.writer_first = False
        self.grows = 0  # receive slots added by ring growth

    # I/O-layer primitives.

    def transmit(self, h: Header, payload: bytes = b"") -> None:
        frame = encode_header(h) + payload
        assert len(frame) == h.length <= self.peer.conn.params.local_buf_size
        self.peer.inbox.append(frame)
        assert len(self.peer.inbox) <= len(self.peer.posted), (
            f"{self.name} sent {h.mid.name} without a posted buffer at the peer (RNR)"
        )
        self.frames_sent += 1

    def pump(self) -> int:
        sent = 0
        while (h := self.conn.next_control()) is not None:
            assert h.length == HEADER_SIZE
            self.transmit(h)
            sent += 1
            assert sent < 4, "next_control keeps producing frames"
        self.control_sent += sent
        return sent

    def write(self, limit: int) -> int:
        sent = 0
        while self.to_write and self.conn.can_send_data():
            n = min(len(self.to_write), self.conn.max_payload, limit)
            h = self.conn.data_header(n)
            self.transmit(h, bytes(self.to_write[:n]))
            del self.to_write[:n]
            sent += 1
        if not self.to_write and not self.shut:
            self.conn.shutdown_write()
            self.shut = True
        return sent

    def deliver(self) -> bool:
        if not self.inbox:
            return False
        frame = self.inbox.popleft()
        slot = self.posted.popleft()
        self.ring[slot][: len(frame)] = frame
        for ev in self.conn.on_frame(slot, memoryview(self.ring[slot])[: len(frame)]):
            if isinstance(ev, PeerClosed):
                assert not self.saw_eof
                self.saw_eof = True
            assert not isinstance(ev, PeerAborted)
        return True

    def grow(self) -> bool:
        want = self.conn.recv_growth()
        if not want:
            return False
        slots = self.conn.add_recv_slots(want)
        self.ring += [bytearray(self.conn.params.local_buf_size) for _ in slots]
        self.posted.extend(slots)
        self.conn.recv_reposted(len(slots))
        self.grows += len(slots)
        return True

    def read(self, n: int) -> int:
        if self.writer_first and self.to_write:
            return 0
        got = 0
        for c in self.conn.consume(n):
            self.received += self.ring[c.slot][c.offset : c.offset + c.length]
            got += c.length
        return got

    def collect(self) -> None:
        self.unposted += self.conn.take_free_slots()

    def repost(self) -> bool:
        grown = self.grow()  # as the endpoint does before every re-post
        if not self.unposted:
            return grown
        self.posted.extend(self.unposted)
        self.conn.recv_reposted(len(self.unposted))
        self.unposted = []
        return True

    def step_all(self) -> bool:
        """One eager I/O-layer pass: deliver, read, re-post, write, pump."""
        progress = False
        while self.deliver():
            progress = True
        progress |= self.read(1 << 30) > 0
        self.collect()
        progress |= self.repost()
        progress |= self.write(1 << 30) > 0
        progress |= self.pump() > 0
        return progress


def make_pair(n_a: int, s_a: int, n_b: int, s_b: int, max_a: int = 0,
              max_b: int = 0) -> tuple[Side, Side]:
    """Two connected sides; ``max_a``/``max_b`` let a ring grow (both offer GROW)."""
    grow = Features.GROW if max_a or max_b else Features(0)
    ha = Hello(HandshakeKind.HELLO, n_a, s_a, s_a, grow, max_recv_bufs=max_a)
    hb = Hello(HandshakeKind.HELLO_ACK, n_b, s_b, s_b, grow, max_recv_bufs=max_b)
    a = Side("a", Connection(negotiate(ha, hb)))
    b = Side("b", Connection(negotiate(hb, ha)))
    a.peer, b.peer = b, a
    return a, b


def run_to_quiescence(a: Side, b: Side, max_rounds: int) -> int:
    for rounds in range(max_rounds):
        progress = a.step_all()
        progress |= b.step_all()
        if not progress:
            return rounds
    raise AssertionError(f"no quiescence after {max_rounds} rounds (deadlock or ping-pong?)")


def check_quiescent_and_closed(a: Side, b: Side, data_a: bytes, data_b: bytes) -> None:
    for side, expected in ((a, data_b), (b, data_a)):
        assert bytes(side.received) == expected
        assert not side.inbox
        assert side.saw_eof and side.conn.eof
        assert side.conn.state is State.CLOSED
        assert not side.conn.disconn_pending
        assert side.conn.error is None
        assert side.conn.next_control() is None
    # Nothing more happens, however often the I/O layers look.
    before = a.frames_sent + b.frames_sent
    for _ in range(5):
        assert not a.step_all() and not b.step_all()
    assert a.frames_sent + b.frames_sent == before


def random_run(
    seed: int,
    n_a: int,
    s_a: int,
    n_b: int,
    s_b: int,
    len_a: int,
    len_b: int,
    steps: int,
    writer_first: bool = False,
    max_a: int = 0,
    max_b: int = 0,
) -> tuple[Side, Side]:
    rng = random.Random(seed)
    a, b = make_pair(n_a, s_a, n_b, s_b, max_a, max_b)
    a.writer_first = writer_first
    data_a, data_b = rng.randbytes(len_a), rng.randbytes(len_b)
    a.to_write[:] = data_a
    b.to_write[:] = data_b
    a.shut = not data_a and rng.random() < 0.5  # sometimes shut down only at the end
    b.shut = not data_b and rng.random() < 0.5
    if a.shut:
        a.conn.shutdown_write()
    if b.shut:
        b.conn.shutdown_write()
    for _ in range(steps):
        side = rng.choice((a, b))
        r = rng.random()
        if r < 0.30:
            side.deliver()
        elif r < 0.50:
            side.read(rng.choice((1, 2, 7, 100, 1000, 1 << 20)))
        elif r < 0.60:
            side.collect()
        elif r < 0.70:
            side.repost()
        elif r < 0.90:
            side.write(rng.choice((1, 3, 50, 1 << 20)))
        else:
            side.pump()
        if rng.random() < 0.7:  # the eager I/O layer pumps after every event
            side.pump()
    run_to_quiescence(a, b, max_rounds=10 * (len_a + len_b) + 50)
    check_quiescent_and_closed(a, b, data_a, data_b)
    return a, b


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    n_a=st.sampled_from([4, 5, 8, 16]),
    n_b=st.sampled_from([4, 6, 8, 32]),
    s_a=st.sampled_from([64, 65, 100, 512]),
    s_b=st.sampled_from([64, 80, 256]),
    len_a=st.integers(0, 3000),
    len_b=st.integers(0, 3000),
    writer_first=st.booleans(),
)
def test_pair_random_streams(
    seed: int, n_a: int, n_b: int, s_a: int, s_b: int, len_a: int, len_b: int, writer_first: bool
) -> None:
    random_run(seed, n_a, s_a, n_b, s_b, len_a, len_b, steps=400, writer_first=writer_first)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("writer_first", [False, True])
def test_pair_tiny_rings(seed: int, writer_first: bool) -> None:
    random_run(seed, 4, 64, 4, 64, 5000, 5000, steps=3000, writer_first=writer_first)


@pytest.mark.parametrize("seed", range(5))
def test_pair_asymmetric(seed: int) -> None:
    random_run(seed, 4, 64, 64, 4096, 20000, 300, steps=2000)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    max_a=st.sampled_from([4, 5, 16, 64]),
    max_b=st.sampled_from([4, 8, 16, 33]),
    len_a=st.integers(0, 6000),
    len_b=st.integers(0, 6000),
    writer_first=st.booleans(),
)
def test_pair_random_streams_growing_rings(
    seed: int, max_a: int, max_b: int, len_a: int, len_b: int, writer_first: bool
) -> None:
    """Rings that start at 4 slots and grow with use: no deadlock, no RNR (``transmit``
    asserts a posted buffer for every frame), every byte in order, whatever the schedule."""
    a, b = random_run(seed, 4, 64, 4, 64, len_a, len_b, steps=600,
                      writer_first=writer_first, max_a=max_a, max_b=max_b)
    for side, most in ((a, max_a), (b, max_b)):
        assert 4 <= side.conn.ring_size == 4 + side.grows <= most


def test_pair_stream_grows_the_receiver_to_its_maximum() -> None:
    a, b = make_pair(4, 1024, 4, 1024, max_a=16, max_b=16)
    data = random.Random(2).randbytes(300_000)
    a.to_write[:] = data
    run_to_quiescence(a, b, max_rounds=10_000)
    check_quiescent_and_closed(a, b, data, b"")
    assert b.conn.ring_size == 16  # the reader's ring grew: 4 -> 8 -> 16
    assert a.conn.ring_size == 4  # the writer received only credit updates and DISCONN
    assert b.conn.tx_credits <= 4  # and the writer never returned more than it had


def _pump_until(a: Side, b: Side, done: Callable[[], bool]) -> None:
    for _ in range(100):
        if done():
            return
        a.step_all()
        b.step_all()
    raise AssertionError("no progress")


def test_pair_request_response_does_not_grow() -> None:
    a, b = make_pair(4, 1024, 4, 1024, max_a=16, max_b=16)
    a.shut = b.shut = True  # no DISCONN: the write() helper would send one when done
    for i in range(1, 51):
        msg = bytes([i]) * 100
        a.to_write[:] = msg
        _pump_until(a, b, lambda: len(b.received) == 100 * i)  # noqa: B023
        b.to_write[:] = msg
        _pump_until(a, b, lambda: len(a.received) == 100 * i)  # noqa: B023
    assert a.conn.ring_size == 4 and b.conn.ring_size == 4
    assert bytes(a.received) == bytes(b.received)


def test_recv_growth_policy() -> None:
    # The peer just spent its last data credit and our reader keeps up: double.
    assert recv_growth(4, 16, peer_credits=1, held=1) == 4
    assert recv_growth(8, 16, peer_credits=0, held=2) == 8
    assert recv_growth(12, 16, peer_credits=1, held=1) == 4  # capped at the maximum
    assert recv_growth(16, 16, peer_credits=1, held=1) == 0
    assert recv_growth(4, 16, peer_credits=2, held=1) == 0  # the peer is not window-bound
    assert recv_growth(4, 16, peer_credits=1, held=3) == 0  # a slow reader: no more memory


def test_add_recv_slots_checks_the_maximum() -> None:
    a, _b = make_pair(4, 1024, 4, 1024, max_a=6, max_b=6)
    assert a.conn.add_recv_slots(2) == [4, 5]
    with pytest.raises(ValueError, match="max 6"):
        a.conn.add_recv_slots(1)
    plain, _ = make_pair(4, 1024, 4, 1024)
    assert plain.conn.ring_max == 4


def test_hostile_returns_credits_beyond_its_announced_maximum() -> None:
    """A growing peer may return credits for new slots, but never beyond its maximum."""
    a, b = make_pair(4, 1024, 4, 1024, max_a=16, max_b=8)
    b.conn.add_recv_slots(4)
    b.conn.recv_reposted(4)
    h = b.conn.next_control()  # 4 owed reach the new half-ring threshold
    assert h is not None and h.mid is Mid.CREDIT_UPDATE and h.bufs == 4
    b.transmit(h)
    assert a.deliver() and a.conn.tx_credits == 8
    forged = Header(Mid.CREDIT_UPDATE, Flags(0), 1, HEADER_SIZE, 1, U32)
    with pytest.raises(ProtocolError, match="credit overflow"):
        a.conn.on_frame(a.posted.popleft(), encode_header(forged))


def test_pair_eager_io_layer_efficiency() -> None:
    a, b = make_pair(16, 1024, 16, 1024)
    data = random.Random(1).randbytes(200_000)
    a.to_write[:] = data
    b.conn.shutdown_write()
    b.shut = True
    run_to_quiescence(a, b, max_rounds=10_000)
    check_quiescent_and_closed(a, b, data, b"")
    data_frames = a.conn.stats.frames_out - 1  # minus DISCONN
    assert data_frames == -(-len(data) // a.conn.max_payload)  # every frame full
    # Batching: about one credit update per half ring of data, not one per frame.
    assert b.conn.stats.credit_updates_sent <= data_frames // 8 + 3


def test_pair_slow_reader_stalls_then_resumes() -> None:
    a, b = make_pair(8, 128, 8, 128)
    data = random.Random(2).randbytes(20_000)
    a.to_write[:] = data
    # b's application does not read: b delivers and re-posts, nothing else.
    for _ in range(200):
        a.write(1 << 30)
        a.pump()
        while b.deliver():
            pass
        b.collect()
        b.repost()
        b.pump()
        while a.deliver():
            pass
        a.collect()
        a.repost()
    # a filled b's ring minus the reserved credit, then stopped; no chatter since.
    assert b.conn.readable == 7 * a.conn.max_payload
    assert a.conn.stats.frames_out == 7
    assert b.conn.stats.frames_out == 0
    assert a.conn.stats.credit_stalls > 0
    assert not a.conn.can_send_data()
    # The reader wakes up, reading in small pieces; the writer resumes and finishes.
    for _ in range(20_000):
        b.read(37)
        if not (a.step_all() | b.step_all()) and not b.conn.readable:
            break
    run_to_quiescence(a, b, max_rounds=100)
    check_quiescent_and_closed(a, b, data, b"")


def test_pair_both_rings_full_no_ping_pong() -> None:
    # Both applications write and neither reads: each side ends with one credit and a ring
    # full of unread data. Credit updates must not bounce the last buffer back and forth.
    a, b = make_pair(4, 64, 4, 64)
    a.to_write[:] = bytes(1000)
    b.to_write[:] = bytes(1000)
    for _ in range(50):
        for s in (a, b):
            s.write(1 << 30)
            s.pump()
            while s.deliver():
                pass
            s.collect()
            s.repost()
            s.pump()
    frames = a.frames_sent + b.frames_sent
    assert a.conn.tx_credits == 1 and b.conn.tx_credits == 1
    for _ in range(50):
        for s in (a, b):
            s.write(1 << 30)
            while s.deliver():
                pass
            s.collect()
            s.repost()
            s.pump()
    assert a.frames_sent + b.frames_sent == frames
    # Now a's reader drains one segment at a time; each step may cost a bounded chatter.
    for _ in range(5):
        a.read(48)
        a.collect()
        a.repost()
        for _ in range(10):
            for s in (a, b):
                s.pump()
                while s.deliver():
                    pass
                s.collect()
                s.repost()
    run_to_quiescence(a, b, max_rounds=500)
    check_quiescent_and_closed(a, b, bytes(1000), bytes(1000))


def test_pair_update_chains_are_short() -> None:
    # After every single-frame event, count how many control frames the pair exchanges before
    # going quiet: a ping-pong would show up as a long (or endless) chain.
    rng = random.Random(5)
    a, b = make_pair(4, 64, 4, 64)
    a.to_write[:] = rng.randbytes(3000)
    b.to_write[:] = rng.randbytes(3000)
    data_a, data_b = bytes(a.to_write), bytes(b.to_write)
    for _ in range(4000):
        side = rng.choice((a, b))
        if rng.random() < 0.5:
            side.read(rng.randint(1, 100))
        side.collect()
        side.repost()
        side.write(rng.randint(1, 100))
        side.pump()
        chain = 0
        while a.inbox or b.inbox:
            for s in (a, b):
                if s.deliver():
                    s.collect()
                    s.repost()
                    chain += s.pump()
            assert chain <= 6, "credit updates keep answering each other"
    run_to_quiescence(a, b, max_rounds=2000)
    check_quiescent_and_closed(a, b, data_a, data_b)


def test_pair_sequence_numbers_wrap() -> None:
    a, b = make_pair(8, 128, 8, 128)
    for sender, receiver in ((a, b), (b, a)):  # white-box: start just below 2**32
        start = U32 - 3
        sender.conn._tx_seq = start
        sender.conn._peer_acked = (start - 1) & U32
        receiver.conn._rx_seq = start
    data_a, data_b = random.Random(3).randbytes(4000), random.Random(4).randbytes(4000)
    a.to_write[:] = data_a
    b.to_write[:] = data_b
    run_to_quiescence(a, b, max_rounds=1000)
    check_quiescent_and_closed(a, b, data_a, data_b)
    assert a.conn._tx_seq < 1000 and b.conn._tx_seq < 1000


def test_peek_does_not_consume() -> None:
    """MSG_PEEK: the chunks consume() would give, while the queue, the readable count and
    the slots stay as they were."""
    c = Connection(params())
    p = Peer(c)
    p.send(Mid.DATA, b"aaa")
    p.send(Mid.DATA, b"bbbb")
    assert c.peek(5) == [Chunk(0, HEADER_SIZE, 3, False), Chunk(1, HEADER_SIZE, 2, False)]
    assert c.peek(100) == [Chunk(0, HEADER_SIZE, 3, False), Chunk(1, HEADER_SIZE, 4, False)]
    assert c.peek(0) == []
    assert c.readable == 7 and c.take_free_slots() == []
    assert c.consume(2) == [Chunk(0, HEADER_SIZE, 2, False)]
    assert c.peek(2) == [Chunk(0, HEADER_SIZE + 2, 1, False), Chunk(1, HEADER_SIZE, 1, False)]
    with pytest.raises(ValueError):
        c.peek(-1)


def test_peek_raises_the_latched_error() -> None:
    c = Connection(params())
    p = Peer(c)
    p.send(Mid.DATA, b"x")
    p.send(Mid.ABORT)
    with pytest.raises(ConnectionReset):
        c.peek(1)
