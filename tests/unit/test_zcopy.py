"""Zero-copy bookkeeping in the sans-I/O connection: SrcAvail, remote reads, RdmaRdCompl."""

from __future__ import annotations

import struct

import pytest

from tests.unit.helpers import Peer
from usdp._connection import (
    MAX_ZCOPY,
    Chunk,
    Connection,
    DataReceived,
    RemoteChunk,
    ZcopyDone,
)
from usdp._errors import ProtocolError
from usdp._wire import (
    HEADER_SIZE,
    Features,
    HandshakeKind,
    Hello,
    Mid,
    Params,
    RdmaCompl,
    SrcAvail,
    negotiate,
)


def zparams(zcopy: bool = True) -> Params:
    f = Features.ZCOPY if zcopy else Features(0)
    return negotiate(Hello(HandshakeKind.HELLO, 8, 256, 256, f),
                     Hello(HandshakeKind.HELLO_ACK, 8, 256, 256, f))


def test_src_avail_read_in_pieces_then_rdcompl_only_after_the_last_read() -> None:
    c = Connection(zparams())
    p = Peer(c)
    assert p.send(Mid.DATA, b"abc") == [DataReceived(3)]
    assert p.send(Mid.SRC_AVAIL, SrcAvail(1000, 0x1234, 0x7000).encode()) == [DataReceived(1000)]
    assert p.send(Mid.DATA, b"xyz") == [DataReceived(3)]
    assert c.readable == 1006
    # Local bytes first; consume() stops at the remote segment.
    assert c.consume(100) == [Chunk(0, HEADER_SIZE, 3, True)]
    assert c.head_is_remote
    first = c.consume_remote(600)
    assert first == RemoteChunk(0x1234, 0x7000, 600, 0)
    second = c.consume_remote(600)
    assert second == RemoteChunk(0x1234, 0x7000 + 600, 400, 1000)
    assert not c.head_is_remote
    assert c.consume(10) == [Chunk(2, HEADER_SIZE, 3, True)]
    # Nothing answers the sender before the reads complete.
    assert c.next_control_frame() is None or c.next_control_frame()[0].mid != Mid.RDMA_RD_COMPL
    c.remote_read_done(first)
    c.remote_read_done(second)
    frame = c.next_control_frame()
    assert frame is not None
    assert frame[0].mid is Mid.RDMA_RD_COMPL and frame[1] == RdmaCompl(1000).encode()


def test_sender_side_waits_for_rdcompl() -> None:
    c = Connection(zparams())
    h, payload = c.src_avail_frame(5000, 7, 0x1000)
    assert h.mid is Mid.SRC_AVAIL and h.length == HEADER_SIZE + SrcAvail.SIZE
    assert payload == SrcAvail(5000, 7, 0x1000).encode()
    assert c.zcopy_outstanding
    with pytest.raises(ValueError):
        c.src_avail_frame(10, 7, 0x1000)  # one at a time
    p = Peer(c)
    assert p.send(Mid.RDMA_RD_COMPL, RdmaCompl(5000).encode()) == [ZcopyDone(5000)]
    assert not c.zcopy_outstanding


@pytest.mark.parametrize(
    ("mid", "payload", "message"),
    [
        (Mid.RDMA_RD_COMPL, RdmaCompl(10).encode(), "without an outstanding"),
        (Mid.SRC_AVAIL, SrcAvail(MAX_ZCOPY + 1, 1, 2).encode(), "exceeds"),
        (Mid.SRC_AVAIL, SrcAvail(10, 1, 2).encode() + b"inline", "inline"),
    ],
)
def test_hostile_zcopy_frames_are_protocol_errors(mid: Mid, payload: bytes,
                                                  message: str) -> None:
    c = Connection(zparams())
    with pytest.raises(ProtocolError, match=message):
        Peer(c).send(mid, payload)
    assert c.error is not None


def test_rdcompl_length_must_match() -> None:
    c = Connection(zparams())
    c.src_avail_frame(100, 1, 2)
    with pytest.raises(ProtocolError, match="advertised"):
        Peer(c).send(Mid.RDMA_RD_COMPL, RdmaCompl(99).encode())


def test_second_src_avail_before_answer_is_rejected() -> None:
    c = Connection(zparams())
    p = Peer(c)
    p.send(Mid.SRC_AVAIL, SrcAvail(10, 1, 2).encode())
    with pytest.raises(ProtocolError, match="unanswered"):
        p.send(Mid.SRC_AVAIL, SrcAvail(10, 1, 2).encode())


def test_zcopy_frames_need_negotiation() -> None:
    c = Connection(zparams(zcopy=False))
    with pytest.raises(ProtocolError, match="not negotiated"):
        Peer(c).send(Mid.SRC_AVAIL, SrcAvail(10, 1, 2).encode())
    with pytest.raises(ValueError):
        Connection(zparams(zcopy=False)).src_avail_frame(10, 1, 2)


def test_src_avail_header_layout() -> None:
    assert struct.unpack(">IIQ", SrcAvail(1, 2, 3).encode()) == (1, 2, 3)


def test_held_remote_bytes_stay_readable_and_first_until_released() -> None:
    """A read into a staging buffer (hold=True): the bytes still count as readable (so a
    readiness fd and EOF stay right), nothing overtakes them, RdmaRdCompl goes once the
    read is done, and they leave ``readable`` only when handed out."""
    c = Connection(zparams())
    p = Peer(c)
    p.send(Mid.SRC_AVAIL, SrcAvail(1000, 0x55, 0x9000).encode())
    p.send(Mid.DATA, b"tail")
    p.send(Mid.DISCONN)
    assert c.remote_available == 1000
    staged = c.consume_remote(4096, hold=True)
    assert staged == RemoteChunk(0x55, 0x9000, 1000, 1000)
    assert c.held == 1000 and c.readable == 1004 and c.remote_available == 0
    assert c.head_is_remote  # the held bytes are next
    assert c.consume(100) == [] and c.peek(100) == []  # "tail" must not overtake them
    assert not c.eof
    c.remote_read_done(staged)
    frame = c.next_control_frame()
    assert frame is not None and frame[0].mid is Mid.RDMA_RD_COMPL
    c.release_held(600)
    assert c.held == 400 and c.readable == 404 and c.head_is_remote
    with pytest.raises(ValueError):
        c.release_held(401)
    c.release_held(400)
    assert not c.head_is_remote and c.readable == 4
    assert [ch.length for ch in c.consume(100)] == [4]
    assert c.eof


def test_held_bytes_must_go_before_more_is_taken_unheld() -> None:
    c = Connection(zparams())
    p = Peer(c)
    p.send(Mid.SRC_AVAIL, SrcAvail(3000, 0x55, 0x9000).encode())
    first = c.consume_remote(1000, hold=True)
    assert first is not None and first.completes == 0
    with pytest.raises(ValueError):
        c.consume_remote(1000)  # a direct read now would overtake the held bytes
    second = c.consume_remote(1000, hold=True)  # more staging keeps the order
    assert second == RemoteChunk(0x55, 0x9000 + 1000, 1000, 0)
    c.release_held(2000)
    third = c.consume_remote(5000)
    assert third == RemoteChunk(0x55, 0x9000 + 2000, 1000, 3000)
    assert c.readable == 0


def test_held_bytes_are_dropped_when_the_peer_aborts() -> None:
    c = Connection(zparams())
    p = Peer(c)
    p.send(Mid.SRC_AVAIL, SrcAvail(3000, 0x55, 0x9000).encode())
    c.consume_remote(1000, hold=True)
    p.send(Mid.ABORT)
    assert c.error is not None
    assert c.held == 0 and c.readable == 0 and not c.head_is_remote
    with pytest.raises(type(c.error)):
        c.consume_remote(1000, hold=True)
