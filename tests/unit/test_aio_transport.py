"""SdpTransport's own logic (water marks, write queue, BufferedProtocol, EOF, sendfile),
on a kernel socketpair: the transport needs only the socket contract, no verbs. The same
code runs over RDMA in tests/rxe/test_aio_protocol.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import tempfile
from asyncio import transports
from typing import Any

import pytest

from usdp._aio_transport import JOIN_LIMIT, SdpTransport, water_marks

TIMEOUT = 60.0


@pytest.mark.parametrize("high, low", [(None, None), (1000, None), (None, 100), (500, 20),
                                       (0, 0), (7, 7)])
def test_water_marks_match_the_stdlib(high: int | None, low: int | None) -> None:
    loop = asyncio.new_event_loop()
    try:
        ref: Any = transports._FlowControlMixin(loop=loop)
        ref._set_write_buffer_limits(high, low)
        low_ref, high_ref = ref.get_write_buffer_limits()
    finally:
        loop.close()
    assert water_marks(high, low) == (high_ref, low_ref)


@pytest.mark.parametrize("high, low", [(10, 20), (-1, None), (None, -4)])
def test_water_marks_refuse_what_the_stdlib_refuses(high: int | None, low: int | None) -> None:
    loop = asyncio.new_event_loop()
    try:
        ref: Any = transports._FlowControlMixin(loop=loop)
        with pytest.raises(ValueError):
            ref._set_write_buffer_limits(high, low)
    finally:
        loop.close()
    with pytest.raises(ValueError):
        water_marks(high, low)


class Collect(asyncio.Protocol):
    """Records everything the transport calls."""

    def __init__(self, eof_keeps_open: bool = False) -> None:
        self.data = bytearray()
        self.events: list[str] = []
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.resumed = asyncio.Event()
        self.exc: BaseException | None = None
        self.eof_keeps_open = eof_keeps_open
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.events.append("eof")
        self.eof.set()
        return self.eof_keeps_open

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")
        self.resumed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.exc = exc
        self.lost.set()


class IntoBuffer(asyncio.BufferedProtocol):
    """Reads land in one preallocated buffer."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.filled = 0
        self.calls = 0
        self.eof = asyncio.Event()

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)[self.filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        self.calls += 1

    def eof_received(self) -> bool:
        self.eof.set()
        return False


def _pair(loop: asyncio.AbstractEventLoop, pa: asyncio.BaseProtocol,
          pb: asyncio.BaseProtocol) -> tuple[SdpTransport, SdpTransport]:
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    return SdpTransport(loop, a, pa), SdpTransport(loop, b, pb)


async def _until(cond: Any) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not cond():
            await asyncio.sleep(0.001)


def test_large_write_pauses_and_resumes_the_protocol() -> None:
    payload = os.urandom(4 << 20)

    async def main() -> tuple[Collect, Collect, SdpTransport]:
        loop = asyncio.get_running_loop()
        pa, pb = Collect(), Collect()
        ta, tb = _pair(loop, pa, pb)
        await asyncio.sleep(0)
        tb.pause_reading()  # the peer reads nothing: our queue must grow past high water
        ta.write(payload)
        assert ta.get_write_buffer_size() > ta.get_write_buffer_limits()[1]
        assert pa.events == ["made", "pause"]
        tb.resume_reading()
        await asyncio.wait_for(pa.resumed.wait(), TIMEOUT)
        assert ta.get_write_buffer_size() <= ta.get_write_buffer_limits()[0]
        ta.close()  # the queue still drains, then connection_lost(None)
        await asyncio.wait_for(pb.eof.wait(), TIMEOUT)
        await asyncio.wait_for(pa.lost.wait(), TIMEOUT)
        await asyncio.wait_for(pb.lost.wait(), TIMEOUT)
        return pa, pb, ta

    pa, pb, ta = asyncio.run(main())
    assert hashlib.sha256(pb.data).digest() == hashlib.sha256(payload).digest()
    assert pa.events == ["made", "pause", "resume", "lost"] and pa.exc is None
    assert pb.events == ["made", "eof", "lost"]
    assert ta.get_write_buffer_size() == 0


def test_set_write_buffer_limits_pauses_at_once_when_over() -> None:
    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        pa, pb = Collect(), Collect()
        ta, tb = _pair(loop, pa, pb)
        await asyncio.sleep(0)
        tb.pause_reading()
        ta.set_write_buffer_limits(high=10 << 20)
        ta.write(b"x" * (1 << 20))
        assert pa.events == ["made"]  # under the high mark
        ta.set_write_buffer_limits(high=1000)
        events = list(pa.events)
        ta.abort()
        tb.abort()
        await asyncio.wait_for(pa.lost.wait(), TIMEOUT)
        return events

    assert asyncio.run(main()) == ["made", "pause"]


def test_buffered_protocol_reads_into_its_buffer_and_writes_keep_order() -> None:
    pieces = [os.urandom(n) for n in (1, 100, JOIN_LIMIT - 1, 5, JOIN_LIMIT * 3, 7)]
    total = sum(map(len, pieces))

    async def main() -> IntoBuffer:
        loop = asyncio.get_running_loop()
        pa, pb = Collect(), IntoBuffer(total + 1)  # one byte more: room to read the EOF
        ta, tb = _pair(loop, pa, pb)
        await asyncio.sleep(0)
        tb.pause_reading()
        ta.write(pieces[0])
        ta.writelines([bytearray(p) for p in pieces[1:4]])
        ta.writelines([memoryview(p) for p in pieces[4:]])
        tb.resume_reading()
        ta.write_eof()
        assert ta.can_write_eof()
        with pytest.raises(RuntimeError):
            ta.write(b"after eof")
        await asyncio.wait_for(pb.eof.wait(), TIMEOUT)
        ta.close()
        return pb

    pb = asyncio.run(main())
    assert pb.filled == total and bytes(pb.buf[:total]) == b"".join(pieces)


def test_eof_received_true_keeps_the_write_side_open() -> None:
    async def main() -> tuple[Collect, Collect]:
        loop = asyncio.get_running_loop()
        pa, pb = Collect(), Collect(eof_keeps_open=True)
        ta, tb = _pair(loop, pa, pb)
        ta.write(b"question")
        ta.write_eof()
        await asyncio.wait_for(pb.eof.wait(), TIMEOUT)
        assert not tb.is_closing()
        tb.write(b"answer after your eof")
        tb.close()
        await asyncio.wait_for(pa.lost.wait(), TIMEOUT)
        await asyncio.wait_for(pb.lost.wait(), TIMEOUT)
        return pa, pb

    pa, pb = asyncio.run(main())
    assert bytes(pb.data) == b"question"
    assert bytes(pa.data) == b"answer after your eof"
    assert pa.events == ["made", "eof", "lost"] and pb.events == ["made", "eof", "lost"]


def test_protocol_error_is_reported_and_closes_with_the_exception() -> None:
    class Boom(Collect):
        def data_received(self, data: bytes) -> None:
            raise ValueError("protocol bug")

    async def main() -> tuple[Boom, list[dict[str, Any]]]:
        loop = asyncio.get_running_loop()
        contexts: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _l, ctx: contexts.append(ctx))
        pa, pb = Collect(), Boom()
        ta, _ = _pair(loop, pa, pb)
        ta.write(b"x")
        await asyncio.wait_for(pb.lost.wait(), TIMEOUT)
        ta.close()
        return pb, contexts

    pb, contexts = asyncio.run(main())
    assert isinstance(pb.exc, ValueError)
    assert [type(c["exception"]) for c in contexts] == [ValueError]


def test_loop_sendfile_falls_back_to_write() -> None:
    content = os.urandom(3 * 65536 + 123)

    async def main(path: str) -> tuple[int, int, bytes, list[str]]:
        loop = asyncio.get_running_loop()
        pa, pb = Collect(), Collect()
        ta, tb = _pair(loop, pa, pb)
        await asyncio.sleep(0)
        with open(path, "rb") as f:
            sent = await loop.sendfile(ta, f, offset=100, count=len(content) - 200)
            pos = f.tell()
        assert ta.get_protocol() is pa and ta.is_reading()
        ta.write(b"tail")
        ta.close()
        await asyncio.wait_for(pb.eof.wait(), TIMEOUT)
        tb.close()
        return sent, pos, bytes(pb.data), pa.events

    with tempfile.NamedTemporaryFile() as f:
        f.write(content)
        f.flush()
        sent, pos, got, events = asyncio.run(main(f.name))
    assert sent == len(content) - 200 and pos == len(content) - 100
    assert got == content[100:-100] + b"tail"
    assert events[0] == "made"


def test_extra_info() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ta, tb = _pair(loop, Collect(), Collect())
        assert isinstance(ta, asyncio.Transport) and isinstance(ta, transports._FlowControlMixin)
        sock = ta.get_extra_info("socket")
        assert isinstance(sock, socket.socket)
        assert ta.get_extra_info("peername") == sock.getpeername()
        assert ta.get_extra_info("sockname") == sock.getsockname()
        assert ta.get_extra_info("ssl_object") is None
        assert ta.get_extra_info("nope", 5) == 5
        ta.close()
        tb.close()
        await asyncio.sleep(0)
        assert ta.is_closing()

    asyncio.run(main())


def test_close_with_queued_data_then_abort_loses_the_connection_once() -> None:
    async def main() -> tuple[Collect, Collect]:
        loop = asyncio.get_running_loop()
        pa, pb = Collect(), Collect()
        ta, tb = _pair(loop, pa, pb)
        await asyncio.sleep(0)
        ta.write(b"z" * (1 << 20))  # more than the socketpair holds: some stays queued
        assert ta.get_write_buffer_size() > 0
        ta.close()
        await asyncio.wait_for(pb.eof.wait(), TIMEOUT)  # the queue drained, then EOF
        await asyncio.wait_for(pa.lost.wait(), TIMEOUT)
        ta.abort()
        ta.close()
        tb.close()
        await asyncio.wait_for(pb.lost.wait(), TIMEOUT)
        await asyncio.sleep(0.01)
        return pa, pb

    pa, pb = asyncio.run(main())
    assert pa.events.count("lost") == 1 and len(pb.data) == 1 << 20
