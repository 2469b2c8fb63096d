"""Wire codec: layouts, validation, and fuzzing that decoders raise only Protocol/HandshakeError."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usdp._errors import ConnectionRefused, HandshakeError, ProtocolError
from usdp._wire import (
    HEADER_SIZE,
    HELLO_SIZE,
    MAX_BUF_SIZE,
    MAX_CONNECT_PRIVATE_DATA,
    MAX_RECV_BUFS,
    MAX_REJECT_TEXT,
    MIN_BUF_SIZE,
    MIN_MAX_MSG,
    MIN_RECV_BUFS,
    NO_SEQ,
    PROTOCOL_VERSION,
    Features,
    Flags,
    HandshakeKind,
    Header,
    Hello,
    Mid,
    Params,
    RdmaCompl,
    Reject,
    RejectReason,
    SinkAvail,
    SrcAvail,
    decode_header,
    decode_hello,
    decode_rdma_compl,
    decode_reject,
    decode_sink_avail,
    decode_src_avail,
    encode_header,
    error_from_reject,
    negotiate,
    pack_header_into,
)

BIG = 1 << 20
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)

# A valid payload length for every mid that may be a frame.
VALID_PAYLOAD = {
    Mid.DATA: 1,
    Mid.DISCONN: 0,
    Mid.ABORT: 0,
    Mid.KEEPALIVE: 0,
    Mid.CREDIT_UPDATE: 0,
    Mid.SEND_SM: 0,
    Mid.MODE_CHANGE: 0,
    Mid.SRC_AVAIL_CANCEL: 0,
    Mid.SINK_AVAIL_CANCEL: 0,
    Mid.SINK_CANCEL_ACK: 0,
    Mid.SRC_AVAIL: 16,
    Mid.SINK_AVAIL: 20,
    Mid.RDMA_RD_COMPL: 4,
    Mid.RDMA_WR_COMPL: 4,
}


def raw_frame(
    mid: int, payload: bytes = b"", *, flags: int = 0, length: int | None = None
) -> bytes:
    n = HEADER_SIZE + len(payload) if length is None else length
    return struct.pack(">BBHIII", mid, flags, 3, n, 7, NO_SEQ) + payload


# ------------------------------------------------------------------------------ header


def test_header_layout_is_sdp_bsdh() -> None:
    h = Header(Mid.DATA, Flags(0), 0x0102, 0x03040506, 0x0708090A, 0x0B0C0D0E)
    assert encode_header(h) == bytes.fromhex("ff000102030405060708090a0b0c0d0e")
    assert HEADER_SIZE == 16


def test_message_ids_are_sdps() -> None:
    assert [int(m) for m in Mid][:11] == list(range(11))
    assert (Mid.KEEPALIVE, Mid.CREDIT_UPDATE) == (0x80, 0x81)
    assert (Mid.SINK_AVAIL, Mid.SRC_AVAIL, Mid.DATA) == (0xFD, 0xFE, 0xFF)
    assert (Flags.OOB_PRES, Flags.OOB_PEND, Flags.REQ_PIPE) == (1, 2, 4)


def test_pack_header_into_writes_in_place() -> None:
    buf = bytearray(b"\xaa" * 40)
    h = Header(Mid.CREDIT_UPDATE, Flags(0), 5, HEADER_SIZE, 1, 2)
    pack_header_into(buf, 8, h)
    assert buf[8:24] == encode_header(h)
    assert buf[:8] == b"\xaa" * 8 and buf[24:] == b"\xaa" * 16
    pack_header_into(memoryview(buf), 0, h)
    assert buf[:16] == encode_header(h)


@pytest.mark.parametrize("mid", list(VALID_PAYLOAD))
def test_decode_valid_frame_per_mid(mid: Mid) -> None:
    frame = raw_frame(mid, b"\x01" * VALID_PAYLOAD[mid])
    h = decode_header(frame, max_frame=BIG)
    assert h.mid is mid
    assert (h.bufs, h.length, h.mseq, h.mseq_ack) == (3, len(frame), 7, NO_SEQ)
    assert h.payload_len == VALID_PAYLOAD[mid]
    assert decode_header(memoryview(frame), max_frame=BIG) == h
    assert decode_header(bytearray(frame), max_frame=BIG) == h


def test_src_avail_may_carry_inline_data() -> None:
    h = decode_header(raw_frame(Mid.SRC_AVAIL, b"\x01" * 100), max_frame=BIG)
    assert h.payload_len == 100


@pytest.mark.parametrize(
    ("frame", "match"),
    [
        (b"", "shorter"),
        (raw_frame(Mid.DISCONN)[:15], "shorter"),
        (raw_frame(0x42), "unknown message id 0x42"),
        (raw_frame(0x0B), "unknown message id"),  # SDP ChRcvBuf: not in usdp
        (raw_frame(Mid.HELLO), "private data"),
        (raw_frame(Mid.HELLO_ACK), "private data"),
        (raw_frame(Mid.DATA, b"x", flags=Flags.OOB_PRES), "unsupported flags"),
        (raw_frame(Mid.DATA, b"x", flags=0x80), "unsupported flags"),
        (raw_frame(Mid.DATA, b"xy", length=17), "len=17 but 18 bytes"),
        (raw_frame(Mid.DATA, b"xy", length=19), "len=19 but 18 bytes"),
        (raw_frame(Mid.DATA), "DATA with 0 payload"),
        (raw_frame(Mid.DISCONN, b"x"), "DISCONN with 1 payload"),
        (raw_frame(Mid.ABORT, b"x"), "ABORT"),
        (raw_frame(Mid.KEEPALIVE, b"x"), "KEEPALIVE"),
        (raw_frame(Mid.CREDIT_UPDATE, b"x"), "CREDIT_UPDATE"),
        (raw_frame(Mid.SEND_SM, b"x"), "SEND_SM"),
        (raw_frame(Mid.SRC_AVAIL_CANCEL, b"x"), "SRC_AVAIL_CANCEL"),
        (raw_frame(Mid.SRC_AVAIL, b"x" * 15), r"expected >= 16"),
        (raw_frame(Mid.SINK_AVAIL, b"x" * 21), r"expected 20"),
        (raw_frame(Mid.RDMA_RD_COMPL, b"x" * 3), r"expected 4"),
        (raw_frame(Mid.RDMA_WR_COMPL, b"x" * 5), r"expected 4"),
    ],
)
def test_decode_rejects(frame: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_header(frame, max_frame=BIG)


def test_decode_enforces_max_frame() -> None:
    frame = raw_frame(Mid.DATA, b"x" * 48)
    assert decode_header(frame, max_frame=64).length == 64
    with pytest.raises(ProtocolError, match="exceeds the limit of 63"):
        decode_header(frame, max_frame=63)


@given(st.binary(max_size=200), st.integers(0, 300))
def test_fuzz_decode_header_arbitrary_bytes(data: bytes, max_frame: int) -> None:
    try:
        h = decode_header(data, max_frame=max_frame)
    except ProtocolError:
        return
    assert h.length == len(data) <= max_frame
    assert encode_header(h) == data[:HEADER_SIZE]


@given(
    st.integers(0, 255), st.integers(0, 255), u16, u32, u32, st.binary(max_size=40), st.booleans()
)
def test_fuzz_decode_header_plausible_frames(
    mid: int, flags: int, bufs: int, mseq: int, ack: int, payload: bytes, honest_len: bool
) -> None:
    # Frames whose len matches, so validation gets past the length check most of the time.
    length = HEADER_SIZE + len(payload) if honest_len else (mseq & 0xFF)
    frame = struct.pack(">BBHIII", mid, flags, bufs, length, mseq, ack) + payload
    try:
        h = decode_header(frame, max_frame=BIG)
    except ProtocolError:
        return
    assert (int(h.mid), int(h.flags), h.bufs, h.mseq, h.mseq_ack) == (mid, flags, bufs, mseq, ack)
    assert flags == 0
    assert encode_header(h) == frame[:HEADER_SIZE]


@given(st.sampled_from(list(VALID_PAYLOAD)), u16, u32, u32, st.integers(0, 30))
def test_header_round_trip(mid: Mid, bufs: int, mseq: int, ack: int, extra: int) -> None:
    payload_len = VALID_PAYLOAD[mid] + (extra if mid in (Mid.DATA, Mid.SRC_AVAIL) else 0)
    h = Header(mid, Flags(0), bufs, HEADER_SIZE + payload_len, mseq, ack)
    frame = encode_header(h) + b"\0" * payload_len
    assert decode_header(frame, max_frame=len(frame)) == h


# ----------------------------------------------------------------- zero-copy ext headers


def test_ext_header_layouts() -> None:
    assert SrcAvail(1, 2, 3).encode() == struct.pack(">IIQ", 1, 2, 3)
    assert SinkAvail(1, 2, 3, 4).encode() == struct.pack(">IIQI", 1, 2, 3, 4)
    assert RdmaCompl(9).encode() == struct.pack(">I", 9)
    assert (SrcAvail.SIZE, SinkAvail.SIZE, RdmaCompl.SIZE) == (16, 20, 4)


@given(st.integers(1, 0xFFFF_FFFF), u32, u64, st.binary(max_size=20))
def test_src_avail_round_trip(length: int, rkey: int, vaddr: int, inline: bytes) -> None:
    x = SrcAvail(length, rkey, vaddr)
    assert decode_src_avail(x.encode() + inline) == x


@given(st.integers(1, 0xFFFF_FFFF), u32, u64, u32)
def test_sink_avail_round_trip(size: int, rkey: int, addr: int, non_disc: int) -> None:
    x = SinkAvail(size, rkey, addr, non_disc)
    assert decode_sink_avail(x.encode()) == x
    assert decode_sink_avail(memoryview(x.encode())) == x


@given(st.integers(1, 0xFFFF_FFFF))
def test_rdma_compl_round_trip(length: int) -> None:
    assert decode_rdma_compl(RdmaCompl(length).encode()) == RdmaCompl(length)


@given(st.binary(max_size=40))
def test_fuzz_ext_decoders(data: bytes) -> None:
    for decode in (decode_src_avail, decode_sink_avail, decode_rdma_compl):
        with contextlib.suppress(ProtocolError):
            decode(data)


def test_ext_headers_reject_zero_lengths_and_bad_values() -> None:
    with pytest.raises(ProtocolError):
        decode_src_avail(bytes(16))
    with pytest.raises(ProtocolError):
        decode_sink_avail(bytes(20))
    with pytest.raises(ProtocolError):
        decode_rdma_compl(bytes(4))
    with pytest.raises(ValueError):
        SrcAvail(1, 1 << 32, 0)
    with pytest.raises(ValueError):
        SinkAvail(1, 0, 1 << 64, 0)
    with pytest.raises(ValueError):
        RdmaCompl(0)


# ------------------------------------------------------------------------------- hello


def hello(kind: HandshakeKind = HandshakeKind.HELLO, bufs: int = 64, size: int = 4096) -> Hello:
    return Hello(kind, bufs, size, size)


def test_hello_layout_and_size() -> None:
    data = Hello(HandshakeKind.HELLO_ACK, 64, 32768, 65536, Features.ZCOPY).encode()
    assert data == (b"USDP" + bytes([PROTOCOL_VERSION, 1])
                    + struct.pack(">HIIIHIQ", 64, 32768, 65536, 1, 0, 0, 0))
    assert HELLO_SIZE == 16
    assert len(data) == 34 <= MAX_CONNECT_PRIVATE_DATA


def test_probe_byte_round_trip_and_negotiation() -> None:
    """The byte the peer offers its probe (rkey and address) reaches Params; absent (an
    earlier revision's shorter Hello, or the CM's zero padding) it is 0, "none offered",
    and an rkey without its address (the 26-byte Hello of one revision) counts as none."""
    addr = 0x7F12_3456_7000
    keyed = Hello(HandshakeKind.HELLO, 16, 65536, 65536, Features.ZCOPY,
                  probe_rkey=0x1234_56AB, probe_addr=addr)
    data = keyed.encode()
    assert struct.unpack_from(">IQ", data, 22) == (0x1234_56AB, addr)
    assert decode_hello(data, expect_kind=HandshakeKind.HELLO) == keyed
    padded = decode_hello(data[:22] + bytes(34), expect_kind=HandshakeKind.HELLO)
    assert (padded.probe_rkey, padded.probe_addr) == (0, 0)
    rkey_only = decode_hello(data[:26], expect_kind=HandshakeKind.HELLO)
    assert (rkey_only.probe_rkey, rkey_only.probe_addr) == (0, 0)
    ack = Hello(HandshakeKind.HELLO_ACK, 16, 65536, 65536, probe_rkey=7, probe_addr=4096)
    assert (negotiate(ack, keyed).peer_probe_rkey,
            negotiate(ack, keyed).peer_probe_addr) == (0x1234_56AB, addr)
    assert (negotiate(keyed, ack).peer_probe_rkey,
            negotiate(keyed, ack).peer_probe_addr) == (7, 4096)
    for rkey, probe_addr in ((7, 0), (0, 4096)):  # offered in part: none
        partial = Hello(HandshakeKind.HELLO_ACK, 16, 65536, 65536, probe_rkey=rkey,
                        probe_addr=probe_addr)
        assert (negotiate(keyed, partial).peer_probe_rkey,
                negotiate(keyed, partial).peer_probe_addr) == (0, 0)
    with pytest.raises(ValueError, match="probe_rkey"):
        Hello(HandshakeKind.HELLO, 16, 65536, 65536, probe_rkey=1 << 32)
    with pytest.raises(ValueError, match="probe_addr"):
        Hello(HandshakeKind.HELLO, 16, 65536, 65536, probe_addr=1 << 64)


def test_hello_without_features_field_offers_none() -> None:
    full = Hello(HandshakeKind.HELLO, 64, 32768, 65536, Features.ZCOPY).encode()
    old = decode_hello(full[:HELLO_SIZE], expect_kind=HandshakeKind.HELLO)
    assert old.features == Features(0)
    assert decode_hello(full, expect_kind=HandshakeKind.HELLO).features == Features.ZCOPY
    unknown = full[:HELLO_SIZE] + struct.pack(">I", 0xFFFF_FFF8)  # a newer peer's bits
    assert decode_hello(unknown, expect_kind=HandshakeKind.HELLO).features == Features(0)
    both = full[:HELLO_SIZE] + struct.pack(">I", 0xFFFF_FFFA)
    assert decode_hello(both, expect_kind=HandshakeKind.HELLO).features == Features.SOLICIT


def test_grow_max_recv_bufs_round_trip_and_negotiation() -> None:
    grow = Features.ZCOPY | Features.GROW
    small = Hello(HandshakeKind.HELLO, 4, 65536, 65536, grow, max_recv_bufs=16)
    data = small.encode()
    assert struct.unpack_from(">H", data, 20) == (16,)
    back = decode_hello(data, expect_kind=HandshakeKind.HELLO)
    assert back == small and back.ring_max == 16
    # The CM pads private data with zeros: an older peer's Hello means "no growth".
    old = Hello(HandshakeKind.HELLO, 16, 65536, 65536, Features.ZCOPY).encode()[:20]
    padded = decode_hello(old + bytes(36), expect_kind=HandshakeKind.HELLO)
    assert padded.max_recv_bufs == 0 and padded.ring_max == 16
    # Each side's ring grows only if the *other* side accepts the credits (GROW).
    params = negotiate(small, small)
    assert (params.local_max_recv_bufs, params.peer_max_recv_bufs) == (16, 16)
    plain = Hello(HandshakeKind.HELLO_ACK, 16, 65536, 65536, Features.ZCOPY)
    params = negotiate(small, plain)
    assert (params.local_max_recv_bufs, params.peer_max_recv_bufs) == (0, 16)
    params = negotiate(plain, small)
    assert (params.local_max_recv_bufs, params.peer_max_recv_bufs) == (16, 0)


def test_grow_max_below_initial_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_recv_bufs"):
        Hello(HandshakeKind.HELLO, 8, 65536, 65536, max_recv_bufs=4)
    data = Hello(HandshakeKind.HELLO, 8, 65536, 65536).encode()[:20] + struct.pack(">H", 5)
    with pytest.raises(HandshakeError) as err:
        decode_hello(data, expect_kind=HandshakeKind.HELLO)
    assert err.value.reason is RejectReason.BAD_PARAMS


def test_solicited_receives_only_when_both_offer() -> None:
    plain = Hello(HandshakeKind.HELLO, 16, 65536, 65536, Features.ZCOPY)
    soliciting = Hello(HandshakeKind.HELLO, 16, 65536, 65536, Features.ZCOPY | Features.SOLICIT)
    assert negotiate(soliciting, soliciting).solicited
    assert not negotiate(soliciting, plain).solicited
    assert not negotiate(plain, soliciting).solicited


def test_zcopy_negotiated_only_when_both_offer() -> None:
    a = Hello(HandshakeKind.HELLO, 16, 65536, 65536, Features.ZCOPY)
    b = Hello(HandshakeKind.HELLO_ACK, 16, 65536, 65536)
    assert not negotiate(a, b).zcopy
    assert negotiate(a, Hello(HandshakeKind.HELLO_ACK, 16, 65536, 65536, Features.ZCOPY)).zcopy


def test_hello_decodes_with_cm_padding() -> None:
    h = hello()
    padded = h.encode().ljust(MAX_CONNECT_PRIVATE_DATA, b"\0")
    assert decode_hello(padded, expect_kind=HandshakeKind.HELLO) == h
    assert decode_hello(memoryview(padded + bytes(140)), expect_kind=HandshakeKind.HELLO) == h


@given(
    st.sampled_from([HandshakeKind.HELLO, HandshakeKind.HELLO_ACK]),
    st.integers(MIN_RECV_BUFS, MAX_RECV_BUFS),
    st.integers(MIN_BUF_SIZE, MAX_BUF_SIZE),
    st.integers(MIN_MAX_MSG, MAX_BUF_SIZE),
    st.binary(max_size=40),
)
def test_hello_round_trip(
    kind: HandshakeKind, bufs: int, size: int, max_msg: int, trailer: bytes
) -> None:
    h = Hello(kind, bufs, size, max_msg)
    assert decode_hello(h.encode() + trailer, expect_kind=kind) == h


def _patched(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize(
    ("data", "reason", "match"),
    [
        (b"", RejectReason.NOT_USDP, "magic"),
        (b"USD", RejectReason.NOT_USDP, "magic"),
        (b"XSDP" + hello().encode()[4:], RejectReason.NOT_USDP, "magic"),
        (bytes(56), RejectReason.NOT_USDP, "magic"),
        (b"USDP", RejectReason.BAD_PARAMS, "truncated"),
        (_patched(hello().encode(), 4, ">B", 2), RejectReason.VERSION, "version 2"),
        (_patched(hello().encode(), 4, ">B", 0)[:6], RejectReason.VERSION, "version 0"),
        (hello().encode()[:15], RejectReason.BAD_PARAMS, "15 bytes"),
        (hello(HandshakeKind.HELLO_ACK).encode(), RejectReason.BAD_PARAMS, "expected HELLO"),
        (_patched(hello().encode(), 5, ">B", 2), RejectReason.BAD_PARAMS, "kind 2"),
        (_patched(hello().encode(), 6, ">H", 3), RejectReason.BAD_PARAMS, "recv_bufs=3"),
        (_patched(hello().encode(), 6, ">H", 4097), RejectReason.BAD_PARAMS, "recv_bufs"),
        (_patched(hello().encode(), 8, ">I", 63), RejectReason.BAD_PARAMS, "recv_buf_size=63"),
        (_patched(hello().encode(), 8, ">I", MAX_BUF_SIZE + 1), RejectReason.BAD_PARAMS, "size"),
        (_patched(hello().encode(), 12, ">I", 15), RejectReason.BAD_PARAMS, "max_msg=15"),
        (_patched(hello().encode(), 12, ">I", MAX_BUF_SIZE + 1), RejectReason.BAD_PARAMS, "max"),
    ],
)
def test_decode_hello_rejects(data: bytes, reason: RejectReason, match: str) -> None:
    with pytest.raises(HandshakeError, match=match) as info:
        decode_hello(data, expect_kind=HandshakeKind.HELLO)
    assert info.value.reason is reason


@given(st.binary(max_size=64), st.sampled_from(list(HandshakeKind)))
def test_fuzz_decode_hello(data: bytes, kind: HandshakeKind) -> None:
    try:
        decode_hello(data, expect_kind=kind)
    except HandshakeError as exc:
        assert exc.reason is not None


@given(st.binary(min_size=12, max_size=12), st.binary(max_size=44))
def test_fuzz_decode_hello_with_good_preamble(body: bytes, trailer: bytes) -> None:
    data = b"USDP" + bytes([PROTOCOL_VERSION]) + body[:11] + trailer
    try:
        h = decode_hello(data, expect_kind=HandshakeKind(body[0] % 2))
    except HandshakeError:
        return
    assert h.encode() == data[:HELLO_SIZE]


def test_hello_construction_validates() -> None:
    with pytest.raises(ValueError, match="recv_bufs"):
        Hello(HandshakeKind.HELLO, 3, 4096, 4096)
    with pytest.raises(ValueError, match="kind"):
        Hello(HandshakeKind.REJECT, 64, 4096, 4096)


# ------------------------------------------------------------------------------ reject


def test_reject_layout_and_round_trip() -> None:
    r = Reject(RejectReason.BACKLOG, "queue full")
    data = r.encode()
    assert data[:8] == b"USDP" + bytes([PROTOCOL_VERSION, 2]) + struct.pack(">H", 4)
    assert data[8:] == b"queue full"
    assert decode_reject(data) == r
    assert decode_reject(data.ljust(148, b"\0")) == r  # padded by the CM


def test_reject_text_is_cut_at_a_character_boundary() -> None:
    r = Reject(RejectReason.SHUTDOWN, "é" * 30)  # 60 bytes of UTF-8
    data = r.encode()
    assert len(data) == 8 + MAX_REJECT_TEXT
    assert decode_reject(data).text == "é" * 20
    odd = Reject(RejectReason.SHUTDOWN, "a" + "é" * 30).encode()
    assert decode_reject(odd).text == "a" + "é" * 19  # the split character is dropped


@given(st.sampled_from(list(RejectReason)), st.text(max_size=50))
def test_reject_round_trip(reason: RejectReason, text: str) -> None:
    back = decode_reject(Reject(reason, text).encode())
    assert back.reason is reason
    assert text.startswith(back.text) or "\0" in text


@given(st.binary(max_size=64))
def test_fuzz_decode_reject(data: bytes) -> None:
    with contextlib.suppress(HandshakeError):
        decode_reject(data)


def test_decode_reject_errors() -> None:
    with pytest.raises(HandshakeError) as info:
        decode_reject(b"")
    assert info.value.reason is RejectReason.NOT_USDP
    with pytest.raises(HandshakeError, match="unknown reason 99"):
        decode_reject(b"USDP" + bytes([PROTOCOL_VERSION, 2]) + struct.pack(">H", 99))
    with pytest.raises(HandshakeError, match="expected REJECT"):
        decode_reject(hello().encode())


@pytest.mark.parametrize(
    "reason", [RejectReason.BACKLOG, RejectReason.NO_RESOURCES, RejectReason.SHUTDOWN]
)
def test_transient_rejects_are_connection_refused(reason: RejectReason) -> None:
    exc = Reject(reason, "busy").to_error()
    assert isinstance(exc, ConnectionRefusedError)
    assert isinstance(exc, ConnectionRefused)
    assert "busy" in str(exc)


@pytest.mark.parametrize(
    "reason", [RejectReason.VERSION, RejectReason.BAD_PARAMS, RejectReason.NOT_USDP]
)
def test_mismatch_rejects_are_handshake_errors(reason: RejectReason) -> None:
    exc = Reject(reason).to_error()
    assert isinstance(exc, HandshakeError)
    assert exc.reason is reason


def test_error_from_reject() -> None:
    # No listener: the CM rejects with no (or foreign) private data.
    assert isinstance(error_from_reject(None), ConnectionRefusedError)
    assert isinstance(error_from_reject(b""), ConnectionRefusedError)
    assert isinstance(error_from_reject(bytes(148)), ConnectionRefusedError)
    exc = error_from_reject(Reject(RejectReason.VERSION).encode())
    assert isinstance(exc, HandshakeError) and exc.reason is RejectReason.VERSION


# ---------------------------------------------------------------------------- negotiate


def test_negotiate() -> None:
    local = Hello(HandshakeKind.HELLO, 16, 8192, 1 << 20)
    peer = Hello(HandshakeKind.HELLO_ACK, 32, 4096, 2048)
    p = negotiate(local, peer)
    assert p == Params(
        local_recv_bufs=16,
        local_buf_size=8192,
        peer_recv_bufs=32,
        peer_buf_size=4096,
        max_payload=4096 - HEADER_SIZE,  # the peer's buffer, not our max_msg, limits us
        max_recv_frame=2048,  # the peer promised never to send more
    )


def test_negotiate_limited_by_own_max_msg() -> None:
    local = Hello(HandshakeKind.HELLO, 16, 8192, 1000)
    p = negotiate(local, hello(HandshakeKind.HELLO_ACK, size=4096))
    assert p.max_payload == 1000 - HEADER_SIZE


def test_negotiate_refuses_header_only_sender() -> None:
    with pytest.raises(HandshakeError) as info:
        negotiate(Hello(HandshakeKind.HELLO, 16, 8192, 16), hello(HandshakeKind.HELLO_ACK))
    assert info.value.reason is RejectReason.BAD_PARAMS


@given(
    st.integers(MIN_RECV_BUFS, MAX_RECV_BUFS),
    st.integers(MIN_BUF_SIZE, MAX_BUF_SIZE),
    st.integers(HEADER_SIZE + 1, MAX_BUF_SIZE),
    st.integers(MIN_RECV_BUFS, MAX_RECV_BUFS),
    st.integers(MIN_BUF_SIZE, MAX_BUF_SIZE),
    st.integers(MIN_MAX_MSG, MAX_BUF_SIZE),
)
def test_negotiate_never_exceeds_peer_buffers(
    lb: int, ls: int, lm: int, pb: int, ps: int, pm: int
) -> None:
    p = negotiate(
        Hello(HandshakeKind.HELLO, lb, ls, lm), Hello(HandshakeKind.HELLO_ACK, pb, ps, pm)
    )
    assert HEADER_SIZE + p.max_payload <= min(ps, lm)
    assert p.max_recv_frame <= ls
    assert (p.local_recv_bufs, p.peer_recv_bufs) == (lb, pb)
