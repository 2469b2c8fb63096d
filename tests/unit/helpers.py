"""Shared helpers of the unit tests (test modules do not import each other)."""

from __future__ import annotations

import struct

from usdp._connection import Connection, Event
from usdp._wire import HEADER_SIZE, HandshakeKind, Hello, Params, negotiate

U32 = 0xFFFF_FFFF


def params(nbufs: int = 8, size: int = 256, peer_nbufs: int | None = None) -> Params:
    """Connection parameters of two like peers (``peer_nbufs`` to make them unlike)."""
    peer_n = nbufs if peer_nbufs is None else peer_nbufs
    local = Hello(HandshakeKind.HELLO, nbufs, size, size)
    peer = Hello(HandshakeKind.HELLO_ACK, peer_n, size, size)
    return negotiate(local, peer)


class Peer:
    """Hand-builds the frames a (possibly hostile) peer sends to one Connection."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.mseq = 0
        self.slot = 0

    def frame(
        self,
        mid: int,
        payload: bytes = b"",
        *,
        bufs: int = 0,
        ack: int | None = None,
        mseq: int | None = None,
        length: int | None = None,
    ) -> bytes:
        seq = self.mseq if mseq is None else mseq
        acked = (self.conn._tx_seq - 1) & U32 if ack is None else ack
        n = HEADER_SIZE + len(payload) if length is None else length
        return struct.pack(">BBHIII", mid, 0, bufs, n, seq, acked) + payload

    def send(self, mid: int, payload: bytes = b"", **kw: int) -> list[Event]:
        data = self.frame(mid, payload, **kw)
        slot = self.slot
        self.slot = (self.slot + 1) % self.conn.params.local_recv_bufs
        events = self.conn.on_frame(slot, memoryview(data))
        self.mseq = (self.mseq + 1) & U32
        return events
