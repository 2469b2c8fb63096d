"""usdp wire format: the frame header, message ids, and the handshake in CM private data.

Theory of operation
===================

This module is bytes in, values out (and back). It has no state and does no I/O. Its one
promise to callers is that **decoding never raises anything but** :class:`ProtocolError`
(frames) **or** :class:`HandshakeError` (handshake), whatever bytes a peer sends. A
``struct.error``, ``IndexError`` or ``ValueError`` escaping from here would be a bug, and
the hypothesis tests feed arbitrary bytes to every decoder to show there is none.

Frames
------
Every message on the RC queue pair is one SEND into one of the peer's pre-posted receive
buffers, starting with SDP's 16-byte BSDH (``>BBHIII``)::

    mid u8 | flags u8 | bufs u16 | len u32 | mseq u32 | mseq_ack u32

``len`` counts header plus payload and must equal the byte count of the receive completion
exactly, so a frame cannot claim more or fewer bytes than actually arrived. Message ids are
SDP's, plus two of usdp's own (KEEPALIVE, CREDIT_UPDATE) in the 0x80 range SDP never used.
:func:`decode_header` checks everything the frame itself can prove (id, flags, lengths);
what needs connection state (sequence numbers, credits, ordering) is checked in
``usdp._connection``.

Encoding trusts its caller (the Connection builds headers from its own counters): a
``struct.error`` there means a local bug, not bad input.

Handshake
---------
Hello and HelloAck are not frames: they ride in RDMA CM private data, which on
``rdma_connect`` over RDMA_PS_TCP holds at most 56 bytes (``rdma_accept``: 196) and is padded
with zeros by the CM. Both are 16 bytes, and decoders ignore trailing bytes. A listener that
refuses a connection puts a :class:`Reject` in the CM reject's private data.
:func:`negotiate` turns the two Hellos into the :class:`Params` of one connection.

Zero-copy
---------
Hello and HelloAck carry a features word; ``Features.ZCOPY`` offered by both sides turns
on zero-copy for the connection (:attr:`Params.zcopy`, every usdp peer offers it since it
costs nothing until a SrcAvail arrives). The extended headers of SrcAvail and RdmaRdCompl
are used (read zero-copy: the receiver RDMA-reads the sender's advertised buffer, see
docs/protocol.md section 10); SinkAvail and RdmaWrCompl have codecs so their layout is
fixed, but the connection refuses them as a protocol error: usdp never sends them.

The reject reasons (:class:`RejectReason`) live in ``usdp._errors`` with the mapping of a
Reject to an exception (``from_reject``), and are re-exported here.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final

from usdp._errors import HandshakeError, ProtocolError, RejectReason, UsdpError, from_reject

__all__ = [
    "HEADER_SIZE",
    "HELLO_SIZE",
    "MAGIC",
    "MAX_BUF_SIZE",
    "MAX_CONNECT_PRIVATE_DATA",
    "MAX_RECV_BUFS",
    "MAX_REJECT_TEXT",
    "MIN_BUF_SIZE",
    "MIN_MAX_MSG",
    "MIN_RECV_BUFS",
    "NO_SEQ",
    "PROTOCOL_VERSION",
    "REJECT_HEADER_SIZE",
    "SUPPORTED_FLAGS",
    "Buffer",
    "Features",
    "Flags",
    "HandshakeKind",
    "Header",
    "Hello",
    "Mid",
    "Params",
    "RdmaCompl",
    "Reject",
    "RejectReason",
    "SinkAvail",
    "SrcAvail",
    "decode_header",
    "decode_hello",
    "decode_rdma_compl",
    "decode_reject",
    "decode_sink_avail",
    "decode_src_avail",
    "encode_header",
    "error_from_reject",
    "negotiate",
    "pack_header_into",
]

Buffer = bytes | bytearray | memoryview

PROTOCOL_VERSION: Final = 1
MAGIC: Final = b"USDP"

#: ``rdma_connect`` private data limit on RDMA_PS_TCP (rdma_accept allows 196).
MAX_CONNECT_PRIVATE_DATA: Final = 56

_HEADER = struct.Struct(">BBHIII")
HEADER_SIZE: Final = _HEADER.size  # 16, SDP's BSDH
_U32: Final = 0xFFFF_FFFF
_U16: Final = 0xFFFF
#: ``mseq_ack`` before anything was received: "the message before 0".
NO_SEQ: Final = _U32

_HELLO = struct.Struct(">4sBBHII")
HELLO_SIZE: Final = _HELLO.size  # 16: the minimum a Hello has
# Appended after the 16 bytes (decoders ignore what they do not know, so a peer that sends
# only 16 bytes, or the CM's zero padding, simply means "no features").
_FEATURES = struct.Struct(">I")
# After the features: the most receive buffers the sender's ring may grow to (0, as in the
# CM's zero padding or a Hello without it: no growth beyond ``recv_bufs``).
_MAX_BUFS = struct.Struct(">H")
_MAX_BUFS_AT: Final = HELLO_SIZE + _FEATURES.size
# After max_recv_bufs: the rkey and address of one byte of the sender's that stays readable
# for the connection's life, for the peer's one-byte READ probe (0, as in the CM's zero
# padding or a shorter Hello: none offered).
_PROBE_RKEY = struct.Struct(">I")
_PROBE_RKEY_AT: Final = _MAX_BUFS_AT + _MAX_BUFS.size
_PROBE_ADDR = struct.Struct(">Q")
_PROBE_ADDR_AT: Final = _PROBE_RKEY_AT + _PROBE_RKEY.size
_U64: Final = (1 << 64) - 1

class Features(IntFlag):
    """Optional capabilities offered in a Hello; used only when both sides offer them."""

    ZCOPY = 1  # SrcAvail / RDMA read / RdmaRdCompl
    #: "I solicit every frame that can unblock you" (``usdp._signaling``): the receiver may
    #: then arm its receive CQ solicited-only. A peer that does not offer it (an older
    #: usdp, a raw verbs peer) gets a receive CQ armed for every completion.
    SOLICIT = 2
    #: "I accept credits from your ring as it grows, up to your ``max_recv_bufs``": the
    #: peer may then start with a small ring and register more slots with use.
    GROW = 4


_KNOWN_FEATURES: Final = int(Features.ZCOPY | Features.SOLICIT | Features.GROW)


NO_FEATURES: Final = Features(0)
_REJECT = struct.Struct(">4sBBH")
REJECT_HEADER_SIZE: Final = _REJECT.size  # 8
#: Reject text is informational; 8 + 40 bytes stays well inside any private-data limit.
MAX_REJECT_TEXT: Final = 40

# Hello bounds. Four buffers is the least that leaves data flowing with two held in reserve
# (last-credit rule) and lets the half-ring credit threshold be >= 2; 4096 bounds the state a
# peer can make us track. 64 bytes leaves room for a header plus a useful payload; 16 MiB is
# the largest buffer we are willing to register per slot.
MIN_RECV_BUFS: Final = 4
MAX_RECV_BUFS: Final = 4096
MIN_BUF_SIZE: Final = 64
MAX_BUF_SIZE: Final = 16 * 1024 * 1024
#: A peer may promise never to send anything but header-only frames.
MIN_MAX_MSG: Final = HEADER_SIZE


class Mid(IntEnum):
    """Message ids: SDP's, plus usdp's KEEPALIVE and CREDIT_UPDATE."""

    HELLO = 0x00
    HELLO_ACK = 0x01
    DISCONN = 0x02
    ABORT = 0x03
    SEND_SM = 0x04
    RDMA_WR_COMPL = 0x05
    RDMA_RD_COMPL = 0x06
    MODE_CHANGE = 0x07
    SRC_AVAIL_CANCEL = 0x08
    SINK_AVAIL_CANCEL = 0x09
    SINK_CANCEL_ACK = 0x0A
    KEEPALIVE = 0x80
    CREDIT_UPDATE = 0x81
    SINK_AVAIL = 0xFD
    SRC_AVAIL = 0xFE
    DATA = 0xFF


class Flags(IntFlag):
    """BSDH flag bits (SDP's). None is implemented yet, so any set bit is rejected."""

    OOB_PRES = 0x01
    OOB_PEND = 0x02
    REQ_PIPE = 0x04


#: Flag bits this version accepts. Grows when out-of-band data is implemented.
SUPPORTED_FLAGS: Final = Flags(0)
_UNSUPPORTED_MASK: Final = 0xFF & ~int(SUPPORTED_FLAGS)

_MIDS: Final[dict[int, Mid]] = {int(m): m for m in Mid}

# (min payload, max payload or None) for every mid that may appear as a frame.
_PAYLOAD: Final[dict[Mid, tuple[int, int | None]]] = {
    Mid.DATA: (1, None),
    Mid.DISCONN: (0, 0),
    Mid.ABORT: (0, 0),
    Mid.KEEPALIVE: (0, 0),
    Mid.CREDIT_UPDATE: (0, 0),
    Mid.SEND_SM: (0, 0),
    Mid.MODE_CHANGE: (0, 0),
    Mid.SRC_AVAIL_CANCEL: (0, 0),
    Mid.SINK_AVAIL_CANCEL: (0, 0),
    Mid.SINK_CANCEL_ACK: (0, 0),
    Mid.SRC_AVAIL: (16, None),  # extended header, then optional inline data
    Mid.SINK_AVAIL: (20, 20),
    Mid.RDMA_RD_COMPL: (4, 4),
    Mid.RDMA_WR_COMPL: (4, 4),
}


def _proto(msg: str) -> ProtocolError:
    return ProtocolError(errno.EPROTO, msg)


# --------------------------------------------------------------------------- frame header


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded (or to-be-encoded) BSDH.

    ``bufs`` is incremental: receive buffers the sender re-posted since its previous header.
    ``length`` is the wire ``len`` (header + payload).
    """

    mid: Mid
    flags: Flags
    bufs: int
    length: int
    mseq: int
    mseq_ack: int

    @property
    def payload_len(self) -> int:
        return self.length - HEADER_SIZE


def encode_header(h: Header) -> bytes:
    """Return the 16 header bytes for ``h``."""
    return _HEADER.pack(h.mid, h.flags, h.bufs, h.length, h.mseq, h.mseq_ack)


def pack_header_into(buf: bytearray | memoryview, offset: int, h: Header) -> None:
    """Write ``h`` into a writable buffer: the send path builds frames in registered memory."""
    _HEADER.pack_into(buf, offset, h.mid, h.flags, h.bufs, h.length, h.mseq, h.mseq_ack)


def decode_header(frame: Buffer, *, max_frame: int) -> Header:
    """Decode and validate the header of one received frame.

    Args:
        frame: exactly the bytes of one receive completion (header and payload).
        max_frame: the largest frame this receiver accepts (``Params.max_recv_frame``).

    Raises:
        ProtocolError: short frame, ``len`` not equal to the bytes received or above
            ``max_frame``, unknown or handshake-only mid, unsupported flags, or a payload
            length that is wrong for the mid.
    """
    n = len(frame)
    if n < HEADER_SIZE:
        raise _proto(f"frame of {n} bytes is shorter than the {HEADER_SIZE}-byte header")
    mid_raw, flags_raw, bufs, length, mseq, mseq_ack = _HEADER.unpack_from(frame, 0)
    mid = _MIDS.get(mid_raw)
    if mid is None:
        raise _proto(f"unknown message id 0x{mid_raw:02x}")
    if mid is Mid.HELLO or mid is Mid.HELLO_ACK:
        raise _proto(f"{mid.name} is only valid in CM private data, not as a frame")
    if flags_raw & _UNSUPPORTED_MASK:
        raise _proto(f"unsupported flags 0x{flags_raw:02x} in {mid.name}")
    if length != n:
        raise _proto(f"{mid.name} header says len={length} but {n} bytes arrived")
    if length > max_frame:
        raise _proto(f"{mid.name} frame of {length} bytes exceeds the limit of {max_frame}")
    lo, hi = _PAYLOAD[mid]
    payload = length - HEADER_SIZE
    if payload < lo or (hi is not None and payload > hi):
        want = f"{lo}" if lo == hi else f">= {lo}" if hi is None else f"{lo}..{hi}"
        raise _proto(f"{mid.name} with {payload} payload bytes (expected {want})")
    return Header(mid, Flags(flags_raw), bufs, length, mseq, mseq_ack)


# ------------------------------------------------------------------ zero-copy ext. headers

_SRC_AVAIL = struct.Struct(">IIQ")
_SINK_AVAIL = struct.Struct(">IIQI")
_RDMA_COMPL = struct.Struct(">I")


def _check_uint(name: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{name}={value} does not fit in u{bits}")


@dataclass(frozen=True, slots=True)
class SrcAvail:
    """SrcAvail extended header: ``length`` bytes at ``vaddr``/``rkey`` are ready to read.

    Any payload bytes after the 16-byte extended header are the first bytes of that data,
    sent inline.
    """

    length: int
    rkey: int
    vaddr: int

    SIZE = _SRC_AVAIL.size

    def __post_init__(self) -> None:
        _check_uint("length", self.length, 32)
        _check_uint("rkey", self.rkey, 32)
        _check_uint("vaddr", self.vaddr, 64)
        if self.length == 0:
            raise ValueError("SrcAvail of 0 bytes")

    def encode(self) -> bytes:
        return _SRC_AVAIL.pack(self.length, self.rkey, self.vaddr)


@dataclass(frozen=True, slots=True)
class SinkAvail:
    """SinkAvail extended header: the receiver offers ``size`` bytes at ``addr``/``rkey``."""

    size: int
    rkey: int
    addr: int
    non_disc: int

    SIZE = _SINK_AVAIL.size

    def __post_init__(self) -> None:
        _check_uint("size", self.size, 32)
        _check_uint("rkey", self.rkey, 32)
        _check_uint("addr", self.addr, 64)
        _check_uint("non_disc", self.non_disc, 32)
        if self.size == 0:
            raise ValueError("SinkAvail of 0 bytes")

    def encode(self) -> bytes:
        return _SINK_AVAIL.pack(self.size, self.rkey, self.addr, self.non_disc)


@dataclass(frozen=True, slots=True)
class RdmaCompl:
    """RdmaRdCompl / RdmaWrCompl payload: how many bytes the RDMA operation moved."""

    length: int

    SIZE = _RDMA_COMPL.size

    def __post_init__(self) -> None:
        _check_uint("length", self.length, 32)
        if self.length == 0:
            raise ValueError("RDMA completion of 0 bytes")

    def encode(self) -> bytes:
        return _RDMA_COMPL.pack(self.length)


def decode_src_avail(payload: Buffer) -> SrcAvail:
    """Decode the first 16 payload bytes of a SrcAvail; the rest is inline data.

    Raises:
        ProtocolError: fewer than 16 bytes, or a zero length.
    """
    if len(payload) < SrcAvail.SIZE:
        raise _proto(f"SrcAvail payload of {len(payload)} bytes, need {SrcAvail.SIZE}")
    length, rkey, vaddr = _SRC_AVAIL.unpack_from(payload, 0)
    if length == 0:
        raise _proto("SrcAvail advertises 0 bytes")
    return SrcAvail(length, rkey, vaddr)


def decode_sink_avail(payload: Buffer) -> SinkAvail:
    """Decode a SinkAvail payload (exactly 20 bytes).

    Raises:
        ProtocolError: wrong size, or a zero size.
    """
    if len(payload) != SinkAvail.SIZE:
        raise _proto(f"SinkAvail payload of {len(payload)} bytes, need {SinkAvail.SIZE}")
    size, rkey, addr, non_disc = _SINK_AVAIL.unpack_from(payload, 0)
    if size == 0:
        raise _proto("SinkAvail advertises 0 bytes")
    return SinkAvail(size, rkey, addr, non_disc)


def decode_rdma_compl(payload: Buffer) -> RdmaCompl:
    """Decode an RdmaRdCompl/RdmaWrCompl payload (exactly one u32).

    Raises:
        ProtocolError: wrong size, or a zero length.
    """
    if len(payload) != RdmaCompl.SIZE:
        raise _proto(f"RDMA completion payload of {len(payload)} bytes, need {RdmaCompl.SIZE}")
    (length,) = _RDMA_COMPL.unpack_from(payload, 0)
    if length == 0:
        raise _proto("RDMA completion of 0 bytes")
    return RdmaCompl(length)


# ---------------------------------------------------------------------------- handshake


class HandshakeKind(IntEnum):
    """The ``kind`` byte of handshake private data."""

    HELLO = 0
    HELLO_ACK = 1
    REJECT = 2


_REASONS: Final[dict[int, RejectReason]] = {int(r): r for r in RejectReason}


def _hello_problem(recv_bufs: int, recv_buf_size: int, max_msg: int) -> str | None:
    """Describe the first out-of-bounds Hello field, or None; shared by encode and decode."""
    if not MIN_RECV_BUFS <= recv_bufs <= MAX_RECV_BUFS:
        return f"recv_bufs={recv_bufs} outside {MIN_RECV_BUFS}..{MAX_RECV_BUFS}"
    if not MIN_BUF_SIZE <= recv_buf_size <= MAX_BUF_SIZE:
        return f"recv_buf_size={recv_buf_size} outside {MIN_BUF_SIZE}..{MAX_BUF_SIZE}"
    if not MIN_MAX_MSG <= max_msg <= MAX_BUF_SIZE:
        return f"max_msg={max_msg} outside {MIN_MAX_MSG}..{MAX_BUF_SIZE}"
    return None


@dataclass(frozen=True)
class Hello:
    """Hello (connect) or HelloAck (accept): what one side offers.

    Attributes:
        kind: HELLO or HELLO_ACK.
        recv_bufs: receive buffers this side pre-posted before sending this message; the
            peer's initial send credits.
        recv_buf_size: bytes per receive buffer, header included; the peer never sends a
            larger frame.
        max_msg: the largest frame this side will ever send.
        features: optional capabilities offered (``Features``).
        max_recv_bufs: the most receive buffers this side's ring may grow to (used only if
            the peer offers ``Features.GROW``); 0 means ``recv_bufs`` (no growth).
        probe_rkey: the rkey of a byte of this side's, readable as long as the
            connection lives, that the peer's liveness probe (a one-byte RDMA READ) reads
            (0: none offered).
        probe_addr: that byte's address (with ``probe_rkey``). Why not a zero-length
            READ, which needs no rkey at all (IB spec C9-88): rxe (Linux 6.1) forgets the
            rkey of a zero-length READ, and when it *replays* one whose response was lost
            it re-validates that forgotten rkey 0 and kills its own queue pair, exactly
            under the loss the probe is there to detect (docs/protocol.md, section 10a).

    Raises:
        ValueError: on construction, for a kind or a field out of bounds (a local bug).
    """

    kind: HandshakeKind
    recv_bufs: int
    recv_buf_size: int
    max_msg: int
    features: Features = NO_FEATURES
    max_recv_bufs: int = 0
    probe_rkey: int = 0
    probe_addr: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.probe_rkey <= _U32:
            raise ValueError(f"probe_rkey={self.probe_rkey} is not a 32-bit rkey")
        if not 0 <= self.probe_addr <= _U64:
            raise ValueError(f"probe_addr={self.probe_addr} is not a 64-bit address")
        if self.kind not in (HandshakeKind.HELLO, HandshakeKind.HELLO_ACK):
            raise ValueError(f"a Hello cannot have kind {self.kind!r}")
        problem = _hello_problem(self.recv_bufs, self.recv_buf_size, self.max_msg) \
            or _max_bufs_problem(self.recv_bufs, self.max_recv_bufs)
        if problem is not None:
            raise ValueError(problem)

    @property
    def ring_max(self) -> int:
        """The most receive buffers this side may ever have posted."""
        return self.max_recv_bufs or self.recv_bufs

    def encode(self) -> bytes:
        """The 34 bytes to put in CM private data (fits the 56-byte connect limit)."""
        return _HELLO.pack(
            MAGIC, PROTOCOL_VERSION, self.kind, self.recv_bufs, self.recv_buf_size, self.max_msg
        ) + _FEATURES.pack(int(self.features)) + _MAX_BUFS.pack(self.max_recv_bufs) \
            + _PROBE_RKEY.pack(self.probe_rkey) + _PROBE_ADDR.pack(self.probe_addr)


def _max_bufs_problem(recv_bufs: int, max_recv_bufs: int) -> str | None:
    if max_recv_bufs and not recv_bufs <= max_recv_bufs <= MAX_RECV_BUFS:
        return f"max_recv_bufs={max_recv_bufs} outside {recv_bufs}..{MAX_RECV_BUFS}"
    return None


def _handshake_error(msg: str, reason: RejectReason) -> HandshakeError:
    return HandshakeError(errno.EPROTO, msg, reason=reason)


def _check_preamble(data: Buffer, what: str) -> None:
    """Magic and version come first so a foreign or newer peer gets the precise reason."""
    if bytes(data[:4]) != MAGIC:
        raise _handshake_error(f"{what}: not a usdp peer (bad magic)", RejectReason.NOT_USDP)
    if len(data) < 5:
        raise _handshake_error(f"{what}: truncated after magic", RejectReason.BAD_PARAMS)
    if data[4] != PROTOCOL_VERSION:
        raise _handshake_error(
            f"{what}: protocol version {data[4]}, we speak {PROTOCOL_VERSION}",
            RejectReason.VERSION,
        )


def decode_hello(data: Buffer, *, expect_kind: HandshakeKind) -> Hello:
    """Decode a Hello or HelloAck from CM private data; trailing (padding) bytes are ignored.

    Raises:
        HandshakeError: ``reason`` NOT_USDP (bad magic), VERSION (other version) or
            BAD_PARAMS (truncated, wrong kind, field out of bounds).
    """
    what = expect_kind.name
    _check_preamble(data, what)
    if len(data) < HELLO_SIZE:
        raise _handshake_error(
            f"{what}: {len(data)} bytes, need {HELLO_SIZE}", RejectReason.BAD_PARAMS
        )
    _magic, _version, kind, recv_bufs, recv_buf_size, max_msg = _HELLO.unpack_from(data, 0)
    if kind != expect_kind:
        raise _handshake_error(f"expected {what}, got kind {kind}", RejectReason.BAD_PARAMS)
    problem = _hello_problem(recv_bufs, recv_buf_size, max_msg)
    if problem is not None:
        raise _handshake_error(f"{what}: {problem}", RejectReason.BAD_PARAMS)
    features = Features(0)
    if len(data) >= HELLO_SIZE + _FEATURES.size:
        # Unknown bits are a newer peer's offers: ignore them.
        (raw,) = _FEATURES.unpack_from(data, HELLO_SIZE)
        features = Features(raw & _KNOWN_FEATURES)
    max_recv_bufs = 0
    if len(data) >= _MAX_BUFS_AT + _MAX_BUFS.size:
        (max_recv_bufs,) = _MAX_BUFS.unpack_from(data, _MAX_BUFS_AT)
        problem = _max_bufs_problem(recv_bufs, max_recv_bufs)
        if problem is not None:
            raise _handshake_error(f"{what}: {problem}", RejectReason.BAD_PARAMS)
    probe_rkey = probe_addr = 0
    if len(data) >= _PROBE_ADDR_AT + _PROBE_ADDR.size:
        # Both or neither: an rkey without its address names nothing a probe can read.
        (probe_rkey,) = _PROBE_RKEY.unpack_from(data, _PROBE_RKEY_AT)
        (probe_addr,) = _PROBE_ADDR.unpack_from(data, _PROBE_ADDR_AT)
    return Hello(expect_kind, recv_bufs, recv_buf_size, max_msg, features, max_recv_bufs,
                 probe_rkey, probe_addr)


@dataclass(frozen=True)
class Reject:
    """A listener's refusal, carried in the CM reject's private data.

    ``text`` is for humans (logs, exception messages); it is cut to 40 bytes of UTF-8.
    """

    reason: RejectReason
    text: str = ""

    def encode(self) -> bytes:
        raw = self.text.encode("utf-8")[:MAX_REJECT_TEXT]
        # Cutting may split a character; drop the fragment instead of sending bad UTF-8.
        raw = raw.decode("utf-8", "ignore").encode("utf-8")
        return _REJECT.pack(MAGIC, PROTOCOL_VERSION, HandshakeKind.REJECT, self.reason) + raw

    def to_error(self, what: str = "") -> UsdpError:
        """The exception a connecting socket raises for this Reject (``_errors.from_reject``)."""
        return from_reject(self.reason, self.text, what)


def decode_reject(data: Buffer) -> Reject:
    """Decode a Reject from CM reject private data; zero padding is stripped from the text.

    Raises:
        HandshakeError: NOT_USDP (no usdp magic: e.g. a reject by the CM itself because
            nobody listens), VERSION, or BAD_PARAMS (truncated, wrong kind, unknown reason).
    """
    _check_preamble(data, "Reject")
    if len(data) < REJECT_HEADER_SIZE:
        raise _handshake_error(
            f"Reject: {len(data)} bytes, need {REJECT_HEADER_SIZE}", RejectReason.BAD_PARAMS
        )
    _magic, _version, kind, code = _REJECT.unpack_from(data, 0)
    if kind != HandshakeKind.REJECT:
        raise _handshake_error(f"expected REJECT, got kind {kind}", RejectReason.BAD_PARAMS)
    reason = _REASONS.get(code)
    if reason is None:
        raise _handshake_error(f"Reject with unknown reason {code}", RejectReason.BAD_PARAMS)
    raw = bytes(data[REJECT_HEADER_SIZE : REJECT_HEADER_SIZE + MAX_REJECT_TEXT]).rstrip(b"\0")
    return Reject(reason, raw.decode("utf-8", "replace"))


def error_from_reject(private_data: Buffer | None, what: str = "") -> UsdpError:
    """Map an RDMA_CM_EVENT_REJECTED's private data to the exception ``connect()`` raises.

    A reject without a decodable usdp Reject (no listener on that port, a non-usdp
    listener, an old peer) is :class:`ConnectionRefused`, like a TCP RST answering a SYN
    (the mapping itself is ``_errors.from_reject``).
    """
    if private_data:
        try:
            return decode_reject(private_data).to_error(what)
        except HandshakeError:
            pass
    return from_reject(None, "", what)


# --------------------------------------------------------------------------- negotiation


@dataclass(frozen=True)
class Params:
    """What one connection uses, from our Hello and the peer's.

    Attributes:
        local_recv_bufs: our receive ring's first size; the peer's initial credits.
        local_buf_size: bytes per receive slot on our side.
        peer_recv_bufs: the peer's first ring size; our initial credits.
        peer_buf_size: bytes per receive slot on the peer's side.
        max_payload: largest DATA payload we send, so that no frame exceeds
            ``peer_buf_size`` nor our own ``max_msg``.
        max_recv_frame: largest frame we accept: our slot size, or less if the peer
            promised smaller frames (``max_msg``).

    Raises:
        ValueError: on construction, for inconsistent values (a local bug).
    """

    local_recv_bufs: int
    local_buf_size: int
    peer_recv_bufs: int
    peer_buf_size: int
    max_payload: int
    max_recv_frame: int
    zcopy: bool = False
    solicited: bool = False
    #: The most our ring may grow to (the peer accepts the credits): ``local_recv_bufs``
    #: unless the peer offered GROW. 0 means ``local_recv_bufs``.
    local_max_recv_bufs: int = 0
    #: The most the peer's ring may grow to, hence the most credits we can ever hold:
    #: ``peer_recv_bufs`` unless we offered GROW. 0 means ``peer_recv_bufs``.
    peer_max_recv_bufs: int = 0
    #: The byte the peer's Hello offered for our liveness probe to read (rkey or address
    #: 0: none offered; the probe is then a zero-length READ, see ``Hello.probe_addr``).
    peer_probe_rkey: int = 0
    peer_probe_addr: int = 0

    def __post_init__(self) -> None:
        for name in ("local_recv_bufs", "peer_recv_bufs"):
            if not MIN_RECV_BUFS <= getattr(self, name) <= MAX_RECV_BUFS:
                raise ValueError(f"{name}={getattr(self, name)} out of bounds")
        for name, least in (("local_max_recv_bufs", self.local_recv_bufs),
                            ("peer_max_recv_bufs", self.peer_recv_bufs)):
            value = getattr(self, name)
            if value and not least <= value <= MAX_RECV_BUFS:
                raise ValueError(f"{name}={value} out of bounds")
        if not 1 <= self.max_payload <= self.peer_buf_size - HEADER_SIZE:
            raise ValueError(f"max_payload={self.max_payload} does not fit the peer's buffers")
        if not HEADER_SIZE <= self.max_recv_frame <= self.local_buf_size:
            raise ValueError(f"max_recv_frame={self.max_recv_frame} does not fit our buffers")


def negotiate(local: Hello, peer: Hello) -> Params:
    """Combine our Hello and the peer's into connection parameters.

    The rule that keeps receives safe: a sender never sends a frame larger than the peer's
    ``recv_buf_size`` (the receive would fail with a local length error and kill the QP), nor
    larger than its own ``max_msg``.

    Raises:
        HandshakeError: BAD_PARAMS if our ``max_msg`` leaves no room for any payload.
    """
    largest = min(peer.recv_buf_size, local.max_msg)
    probe_offered = bool(peer.probe_rkey and peer.probe_addr)
    if largest <= HEADER_SIZE:
        raise _handshake_error(
            f"max_msg={local.max_msg} leaves no room for data", RejectReason.BAD_PARAMS
        )
    return Params(
        local_recv_bufs=local.recv_bufs,
        local_buf_size=local.recv_buf_size,
        peer_recv_bufs=peer.recv_bufs,
        peer_buf_size=peer.recv_buf_size,
        max_payload=largest - HEADER_SIZE,
        max_recv_frame=min(local.recv_buf_size, peer.max_msg),
        zcopy=bool(local.features & peer.features & Features.ZCOPY),
        solicited=bool(local.features & peer.features & Features.SOLICIT),
        # A ring grows only if the other side said it accepts the extra credits.
        local_max_recv_bufs=local.ring_max if peer.features & Features.GROW else 0,
        peer_max_recv_bufs=peer.ring_max if local.features & Features.GROW else 0,
        # A byte offered in part (rkey or address 0) names nothing a probe can read.
        peer_probe_rkey=peer.probe_rkey if probe_offered else 0,
        peer_probe_addr=peer.probe_addr if probe_offered else 0,
    )
