"""A hostile raw pyverbs peer against a usdp listener (issue 6, "Hostile input").

The peer (``tests.rxe.rawpeer``) has no usdp socket code: it completes the CM handshake
with a valid Hello, proves it speaks the protocol (a DATA frame is echoed back, a valid
SrcAvail is RDMA-read), then sends one malformed frame. For each case: the usdp side's
``recv`` raises the documented error (ProtocolError/EPROTO, or RemoteAccessError/EREMOTEIO
for a SrcAvail the RDMA read cannot use) within a bound, the log says why, the peer gets
an ABORT, and the listener goes on: a connection opened before the whole module keeps
echoing, and a new usdp client connects and echoes after each case.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import queue
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

import usdp
from tests.rxe.helpers import client, recv_exactly
from tests.rxe.rawpeer import RawPeer
from usdp._wire import (
    HEADER_SIZE,
    MAGIC,
    Mid,
    RejectReason,
    SrcAvail,
    decode_header,
    error_from_reject,
)

WAIT = 15.0  # bound on every wait for the usdp side to react
IDLE = 300.0  # the long-lived good connection may sit idle between cases


@dataclass
class Conn:
    """One accepted connection, served by an echo loop in its own thread."""

    sock: usdp.SdpSocket
    echoed: int = 0
    error: BaseException | None = None
    failed_at: float = 0.0
    done: threading.Event = field(default_factory=threading.Event)


class EchoListener:
    """A usdp listener that echoes on every connection and records how each one ended."""

    def __init__(self, host: str, port: int) -> None:
        self.lst = usdp.SdpSocket()
        self.lst.bind((host, port))
        self.lst.listen()
        self.lst.settimeout(0.5)  # so the accept loop notices ``stop``
        self.accepted: queue.Queue[Conn] = queue.Queue()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept_loop, name="hostile-acceptor")
        self.acceptor.start()

    def _accept_loop(self) -> None:
        while not self.stop.is_set():
            try:
                sock, _addr = self.lst.accept()
            except TimeoutError:
                continue
            except BaseException as exc:  # the listener itself must never fail
                self.errors.append(exc)
                return
            c = Conn(sock)
            t = threading.Thread(target=self._serve, args=(c,))
            t.start()
            self.threads.append(t)
            self.accepted.put(c)

    @staticmethod
    def _serve(c: Conn) -> None:
        c.sock.settimeout(IDLE)
        buf = bytearray(64 * 1024)  # >= DIRECT_READ_MIN: SrcAvails are read directly
        try:
            while n := c.sock.recv_into(buf):
                # Counted before the echo goes out: a test that saw the echo arrive then
                # reads the count, and must not race this thread's increment.
                c.echoed += n
                c.sock.sendall(memoryview(buf)[:n])
        except OSError as exc:
            c.failed_at = time.monotonic()
            c.error = exc
        finally:
            c.sock.close()
            c.done.set()

    def next_conn(self) -> Conn:
        return self.accepted.get(timeout=WAIT)

    def close(self) -> None:
        self.stop.set()
        self.acceptor.join(WAIT)
        self.lst.close()
        for t in self.threads:
            t.join(WAIT)
        assert not self.acceptor.is_alive()
        assert all(not t.is_alive() for t in self.threads)


@pytest.fixture(scope="module")
def listener(host_a: str) -> Iterator[tuple[EchoListener, str, int]]:
    port = random.randrange(20000, 60000)
    srv = EchoListener(host_a, port)
    try:
        yield srv, host_a, port
    finally:
        srv.close()
    assert not srv.errors, srv.errors


@pytest.fixture(scope="module")
def old_conn(listener: tuple[EchoListener, str, int]) -> Iterator[usdp.SdpSocket]:
    """A good connection opened before any hostile peer, checked after every case."""
    srv, host, port = listener
    s = client(host, port)
    c = srv.next_conn()
    yield s
    s.close()
    assert c.done.wait(WAIT)
    assert c.error is None, c.error


def echo_check(s: usdp.SdpSocket, size: int) -> None:
    data = os.urandom(size)
    t = threading.Thread(target=s.sendall, args=(data,))
    t.start()
    got = recv_exactly(s, size)
    t.join(WAIT)
    assert not t.is_alive()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def listener_still_serves(srv: EchoListener, host: str, port: int,
                          old: usdp.SdpSocket) -> None:
    echo_check(old, 256 * 1024)
    with client(host, port) as s:
        c = srv.next_conn()
        echo_check(s, 1 << 20)
    assert c.done.wait(WAIT)
    assert c.error is None, c.error


def expect_echo(raw: RawPeer, data: bytes) -> None:
    """Read the usdp side's frames until ``data`` came back as DATA."""
    got = b""
    deadline = time.monotonic() + WAIT
    while len(got) < len(data):
        f = raw.recv_frame(max(0.0, deadline - time.monotonic()))
        assert f is not None, "the usdp side failed the connection during the echo"
        h = decode_header(f, max_frame=len(f))
        if h.mid is Mid.DATA:
            got += f[HEADER_SIZE:]
    assert got == data


# Each case: the frame that breaks the rules (built from a RawPeer after a valid DATA frame
# was echoed), and what the log must say.
Bad = Callable[[RawPeer], bytes]
CASES: dict[str, tuple[Bad, str]] = {
    "unknown_mid": (lambda p: p.next(0x42), "unknown message id 0x42"),
    "hello_as_frame": (lambda p: p.next(Mid.HELLO), "only valid in CM private data"),
    "len_above_bytes": (lambda p: p.next(Mid.DATA, b"x" * 100, length=HEADER_SIZE + 4000),
                        "header says len=4016 but 116 bytes arrived"),
    "len_below_bytes": (lambda p: p.next(Mid.DATA, b"x" * 100, length=HEADER_SIZE + 10),
                        "header says len=26 but 116 bytes arrived"),
    "short_frame": (lambda p: p.next(Mid.DATA)[:10], "shorter than the 16-byte header"),
    "frame_above_peer_max": (lambda p: p.next(Mid.DATA, b"x" * 4096),
                             "exceeds the limit of 4096"),
    "credit_overflow": (lambda p: p.next(Mid.CREDIT_UPDATE, bufs=0xFFFF), "credit overflow"),
    "credits_never_acked": (lambda p: p.next(Mid.CREDIT_UPDATE, bufs=1, mseq_ack=0xFFFFFFFF),
                            "buffers returned, but only 0"),
    "empty_credit_update": (lambda p: p.next(Mid.CREDIT_UPDATE, bufs=0),
                            "CREDIT_UPDATE returning no credits"),
    "mseq_gap": (lambda p: p.next(Mid.DATA, b"gap", mseq=5), "has mseq 5, expected 1"),
    "mseq_replay": (lambda p: p.next(Mid.DATA, b"again", mseq=0), "has mseq 0, expected 1"),
    "ack_of_unsent_frame": (lambda p: p.next(Mid.DATA, b"x", mseq_ack=50), "acks mseq 50"),
    "unsupported_flags": (lambda p: bytes([0xFF, 0x01]) + p.next(Mid.DATA, b"x")[2:],
                          "unsupported flags 0x01"),
    "rdma_rd_compl_unasked": (lambda p: p.next(Mid.RDMA_RD_COMPL, struct.pack(">I", 10)),
                              "RdmaRdCompl without an outstanding SrcAvail"),
    "sink_avail": (lambda p: p.next(Mid.SINK_AVAIL, bytes(20)), "SINK_AVAIL but zero-copy"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_frame_aborts_only_that_connection(
        listener: tuple[EchoListener, str, int], old_conn: usdp.SdpSocket,
        caplog: pytest.LogCaptureFixture, case: str) -> None:
    srv, host, port = listener
    bad, why = CASES[case]
    caplog.set_level(logging.WARNING, logger="usdp")
    raw = RawPeer(host, port)
    try:
        c = srv.next_conn()
        hello = b"raw peer speaks usdp"
        raw.send(raw.next(Mid.DATA, hello))
        expect_echo(raw, hello)  # the peer is valid up to here
        raw.send(bad(raw))
        sent = time.monotonic()
        assert c.done.wait(WAIT), "the usdp side did not notice the bad frame"
        detect = c.failed_at - sent
        assert isinstance(c.error, usdp.ProtocolError), repr(c.error)
        assert c.error.errno == errno.EPROTO
        assert why in str(c.error)
        assert c.echoed == len(hello)  # the bad frame's bytes never reached the reader
        logged = [r for r in caplog.records if r.name == "usdp" and r.levelno >= logging.ERROR
                  and "protocol error from peer" in r.getMessage()]
        assert logged and why in logged[-1].getMessage(), caplog.text
        # The usdp side answers with ABORT (it has credits left) before it disconnects.
        mids: list[Mid] = []
        deadline = time.monotonic() + WAIT
        while Mid.ABORT not in mids:
            f = raw.recv_frame(max(0.0, deadline - time.monotonic()))
            assert f is not None, f"QP failed before an ABORT came; frames: {mids}"
            mids.append(decode_header(f, max_frame=len(f)).mid)
        print(f"{case}: {type(c.error).__name__} after {detect * 1000:.1f} ms: {c.error}")
    finally:
        raw.close()
    listener_still_serves(srv, host, port, old_conn)


def _src_avail(raw: RawPeer, length: int, rkey: int, vaddr: int) -> bytes:
    return raw.next(Mid.SRC_AVAIL, SrcAvail(length, rkey, vaddr).encode())


SRC_CASES: dict[str, Callable[[int, int, int], tuple[int, int, int]]] = {
    # (real length, rkey, address) -> what the bogus SrcAvail advertises
    "bogus_rkey": lambda n, rkey, addr: (n, rkey ^ 0x00A5A500, addr),
    "bogus_address": lambda n, rkey, addr: (n, rkey, addr + (64 << 20)),
    "bogus_length": lambda n, rkey, addr: (n * 64, rkey, addr),
}


@pytest.mark.parametrize("case", list(SRC_CASES))
def test_bogus_src_avail_fails_the_read_not_the_listener(
        listener: tuple[EchoListener, str, int], old_conn: usdp.SdpSocket,
        caplog: pytest.LogCaptureFixture, case: str) -> None:
    """A SrcAvail whose rkey, address or length is wrong: the usdp side's RDMA read fails
    with a remote access error, its recv raises RemoteAccessError (EREMOTEIO)."""
    srv, host, port = listener
    caplog.set_level(logging.WARNING, logger="usdp")
    raw = RawPeer(host, port)
    mr = raw.remote_mr(8192)
    try:
        c = srv.next_conn()
        # First a valid SrcAvail: the usdp side RDMA-reads it and echoes the bytes.
        good = os.urandom(5000)
        mr.write(good, len(good), 0)
        raw.send(_src_avail(raw, len(good), mr.rkey, mr.buf))
        expect_echo(raw, good)
        assert c.echoed == len(good)
        length, rkey, vaddr = SRC_CASES[case](len(good), mr.rkey, mr.buf)
        raw.send(_src_avail(raw, length, rkey, vaddr))
        sent = time.monotonic()
        assert c.done.wait(WAIT), "the usdp side did not notice the failed read"
        detect = c.failed_at - sent
        assert isinstance(c.error, usdp.RemoteAccessError), repr(c.error)
        assert c.error.errno == errno.EREMOTEIO
        assert c.echoed == len(good)  # nothing of the bogus buffer was handed out
        logged = [r for r in caplog.records if r.name == "usdp" and r.levelno >= logging.ERROR
                  and "remote access error" in r.getMessage()]
        assert logged, caplog.text
        print(f"{case}: {type(c.error).__name__} after {detect * 1000:.1f} ms: {c.error}")
    finally:
        mr.close()
        raw.close()
    listener_still_serves(srv, host, port, old_conn)


ABSURD_HELLOS = {
    # test_handshake covers another version, 65535 x 1 GiB slots and a foreign protocol.
    "zero_recv_bufs": struct.pack(">4sBBHII", MAGIC, 1, 0, 0, 4096, 4096),
    "tiny_slots": struct.pack(">4sBBHII", MAGIC, 1, 0, 16, 16, 16),
    "huge_max_msg": struct.pack(">4sBBHII", MAGIC, 1, 0, 16, 4096, 0xFFFFFFFF),
    "hello_ack_kind": struct.pack(">4sBBHII", MAGIC, 1, 1, 16, 4096, 4096),
    "truncated": MAGIC + b"\x01\x00\x00",
}


@pytest.mark.parametrize("case", list(ABSURD_HELLOS))
def test_absurd_hello_is_refused_and_the_listener_goes_on(
        listener: tuple[EchoListener, str, int], old_conn: usdp.SdpSocket,
        caplog: pytest.LogCaptureFixture, case: str) -> None:
    srv, host, port = listener
    caplog.set_level(logging.WARNING, logger="usdp")
    raw = RawPeer(host, port, hello=ABSURD_HELLOS[case])
    try:
        assert raw.rejected is not None, "an absurd Hello was accepted"
        err = error_from_reject(raw.rejected)
        assert isinstance(err, usdp.HandshakeError), err
        assert err.reason == RejectReason.BAD_PARAMS
        assert any("rejecting" in r.getMessage() for r in caplog.records), caplog.text
        assert srv.accepted.empty()
    finally:
        raw.close()
    listener_still_serves(srv, host, port, old_conn)


def test_raw_peer_frames_are_valid_when_built_right(
        listener: tuple[EchoListener, str, int], old_conn: usdp.SdpSocket) -> None:
    """The control: many valid frames from the raw peer, credits returned, then DISCONN:
    the usdp side echoes all and sees EOF. (So the cases above fail for their one fault.)"""
    srv, host, port = listener
    raw = RawPeer(host, port)
    try:
        c = srv.next_conn()
        for i in range(20):  # more frames than either ring holds: credits must flow
            data = os.urandom(1000 + i)
            raw.send(raw.next(Mid.DATA, data))
            expect_echo(raw, data)
        raw.send(raw.next(Mid.DISCONN))
        assert c.done.wait(WAIT)
        assert c.error is None, c.error
        assert c.echoed == sum(1000 + i for i in range(20))
    finally:
        raw.close()
    listener_still_serves(srv, host, port, old_conn)
