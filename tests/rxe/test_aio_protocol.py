"""asyncio's protocol/transport level over RDMA on rxe: usdp.asyncio.create_connection and
create_server, flow control, BufferedProtocol, half-close, a killed peer, the Server
interface, and loop.sendfile (to the peer, not into the readiness fd), also under patch()."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import usdp
from usdp.asyncio import SdpServer, SdpTransport

TIMEOUT = 120.0
SMALL = usdp.Options(recv_bufs=8, recv_buf_size=8192, send_bufs=8)
HERE = Path(__file__).resolve().parent


class Echo(asyncio.Protocol):
    """Echo with backpressure: when our transport's queue is full, stop reading."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.paused = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.paused += 1
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close once the echo is written


class Sink(asyncio.Protocol):
    """The client side: records bytes, flow-control calls, EOF and connection_lost."""

    def __init__(self, expect: int = 0) -> None:
        self.expect = expect
        self.h = hashlib.sha256()
        self.got = 0
        self.events: list[str] = []
        self.done = asyncio.get_running_loop().create_future()
        self.lost = asyncio.get_running_loop().create_future()
        self.writable = asyncio.Event()
        self.writable.set()
        self.data = bytearray()
        self.keep = False

    def data_received(self, data: bytes) -> None:
        self.h.update(data)
        self.got += len(data)
        if self.keep:
            self.data += data
        if self.expect and self.got >= self.expect and not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        self.events.append("pause")
        self.writable.clear()

    def resume_writing(self) -> None:
        self.events.append("resume")
        self.writable.set()

    def eof_received(self) -> bool:
        self.events.append("eof")
        if not self.done.done():
            self.done.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        if not self.done.done():
            self.done.set_result(None)
        if not self.lost.done():
            self.lost.set_result(exc)


def test_protocol_echo_8mib_with_flow_control(host_a: str, port: int) -> None:
    payload = os.urandom(8 << 20)

    async def main() -> tuple[Sink, dict[str, Any], Echo]:
        echoes: list[Echo] = []

        def factory() -> Echo:
            echoes.append(Echo())
            return echoes[-1]

        server = await usdp.asyncio.create_server(factory, host_a, port, options=SMALL)
        assert isinstance(server, SdpServer) and server.is_serving()
        assert server.sockets[0].getsockname() == (host_a, port)
        async with server:
            transport, sink = await usdp.asyncio.create_connection(
                lambda: Sink(len(payload)), host_a, port, options=SMALL)
            assert isinstance(transport, SdpTransport)
            info = {k: transport.get_extra_info(k)
                    for k in ("peername", "sockname", "socket", "ssl_object")}
            info["real_peer"] = info["socket"].getpeername()
            transport.write(payload)  # far more than the RDMA window: it queues
            queued = transport.get_write_buffer_size()
            await asyncio.wait_for(sink.done, TIMEOUT)
            info["queued"] = queued
            transport.close()
            await asyncio.wait_for(sink.lost, TIMEOUT)
        assert not server.is_serving() and server.sockets == ()
        return sink, info, echoes[0]

    sink, info, echo = asyncio.run(asyncio.wait_for(main(), TIMEOUT * 2))
    assert sink.got == len(payload)
    assert sink.h.digest() == hashlib.sha256(payload).digest()
    assert info["queued"] > 64 * 1024
    assert sink.events[:2] == ["pause", "resume"] and sink.events[-1] == "lost"
    assert echo.paused >= 1  # the server's protocol was paused too (it stopped reading)
    assert info["peername"] == info["real_peer"]
    assert info["sockname"][0] == info["peername"][0]
    assert isinstance(info["socket"], usdp.SdpSocket) and info["ssl_object"] is None
    assert usdp.transport_of(info["socket"]) == "sdp"


class Into(asyncio.BufferedProtocol):
    """Reads land in one preallocated buffer (e.g. a frame of a known size)."""

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size + 1)  # one spare byte to see the EOF
        self.view = memoryview(self.buf)
        self.filled = 0
        self.updates = 0
        self.eof = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view[self.filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self.filled += nbytes
        self.updates += 1

    def eof_received(self) -> bool:
        self.eof.set_result(None)
        return False


def test_buffered_protocol_reads_land_in_the_callers_buffer(host_a: str, port: int) -> None:
    payload = os.urandom(6 << 20)

    class Sender(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            transport.write(payload)
            transport.write_eof()

    async def main() -> Into:
        server = await usdp.asyncio.create_server(Sender, host_a, port)
        async with server:
            transport, proto = await usdp.asyncio.create_connection(
                lambda: Into(len(payload)), host_a, port)
            await asyncio.wait_for(proto.eof, TIMEOUT)
            assert transport.is_closing()
        return proto

    proto = asyncio.run(asyncio.wait_for(main(), TIMEOUT * 2))
    assert proto.filled == len(payload)
    assert bytes(proto.buf[:len(payload)]) == payload
    assert proto.updates >= 1


def test_eof_received_true_keeps_the_reply_direction_open(host_a: str, port: int) -> None:
    class Summer(asyncio.Protocol):
        """Reads until EOF, then answers with the digest of what came (half-close)."""

        def connection_made(self, transport: Any) -> None:
            self.transport, self.h, self.n = transport, hashlib.sha256(), 0

        def data_received(self, data: bytes) -> None:
            self.h.update(data)
            self.n += len(data)

        def eof_received(self) -> bool:
            self.transport.write(b"%d " % self.n + self.h.hexdigest().encode())
            self.transport.close()
            return True

    async def main() -> tuple[bytes, list[str], bool]:
        server = await usdp.asyncio.create_server(Summer, host_a, port)
        async with server:
            transport, sink = await usdp.asyncio.create_connection(Sink, host_a, port)
            sink.keep = True
            assert transport.can_write_eof()
            for i in range(100):
                transport.writelines([b"line %d\n" % i, b"x" * i])
            transport.write_eof()
            await asyncio.wait_for(sink.lost, TIMEOUT)
            return bytes(sink.data), sink.events, transport.is_closing()

    data, events, closing = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    sent = b"".join(b"line %d\n" % i + b"x" * i for i in range(100))
    assert data == b"%d " % len(sent) + hashlib.sha256(sent).hexdigest().encode()
    assert events == ["eof", "lost"] and closing


def test_killed_peer_is_connection_lost(host_a: str, port: int) -> None:
    """A peer process SIGKILLed mid-stream: connection_lost comes (with the socket's error
    when it reports one; an orderly-looking teardown gives EOF then None)."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "peer_stream.py"), "stream", host_a, str(port), "0",
         "1", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    async def main() -> tuple[Sink, BaseException | None]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while True:  # the peer listens once its interpreter is up
            try:
                transport, sink = await usdp.asyncio.create_connection(
                    lambda: Sink(4 << 20), host_a, port, options=SMALL)
                break
            except OSError:  # refused (or not routable yet) until the peer listens
                assert loop.time() < deadline and proc.poll() is None
                await asyncio.sleep(0.2)
        await asyncio.wait_for(sink.done, TIMEOUT)  # it streams: we got 4 MiB
        proc.send_signal(signal.SIGKILL)
        exc = await asyncio.wait_for(sink.lost, TIMEOUT)
        assert transport.is_closing()
        return sink, exc

    try:
        sink, exc = asyncio.run(asyncio.wait_for(main(), TIMEOUT * 2))
    finally:
        proc.kill()
        proc.communicate(timeout=TIMEOUT)
    assert sink.got >= 4 << 20
    assert sink.events[-1] == "lost"
    if exc is None:
        assert sink.events == ["eof", "lost"]
    else:
        assert isinstance(exc, OSError) and "eof" not in sink.events


def test_server_interface(host_a: str, port: int) -> None:
    step = ["start"]  # the step in progress: a stall fails naming it, never hangs the suite

    async def main() -> list[str]:
        steps: list[str] = []
        server = await usdp.asyncio.create_server(Echo, host_a, port, start_serving=False)
        assert not server.is_serving() and server.get_loop() is asyncio.get_running_loop()
        await server.start_serving()
        assert server.is_serving()
        forever = asyncio.create_task(server.serve_forever())
        await asyncio.sleep(0)
        step[0] = "connect"
        transport, sink = await usdp.asyncio.create_connection(
            lambda: Sink(5), host_a, port)
        sink.keep = True
        transport.write(b"hello")
        step[0] = "echo of hello"
        await asyncio.wait_for(sink.done, TIMEOUT)
        steps.append(bytes(sink.data).decode())
        forever.cancel()  # serve_forever's cancellation closes the server...
        closing = asyncio.create_task(server.wait_closed())
        await asyncio.sleep(0.1)
        # ...whose wait_closed() waits until the connections it made have gone.
        steps.append("waiting" if not closing.done() else "early")
        assert server.sockets == () and not server.is_serving()
        transport.close()
        step[0] = "wait_closed after the client's close"
        await asyncio.wait_for(closing, TIMEOUT)
        steps.append("closed")
        try:
            await forever
        except asyncio.CancelledError:
            steps.append("cancelled")
        # The port is free again: a new server binds it, and close_clients() ends a client.
        step[0] = "second server"
        made = asyncio.Event()

        def echo_telling() -> Echo:
            made.set()  # the server took the connection: close_clients() now reaches it
            return Echo()

        server2 = await usdp.asyncio.create_server(echo_telling, host_a, port)
        transport, sink = await usdp.asyncio.create_connection(Sink, host_a, port)
        # Our connect completes when the CM says ESTABLISHED, which may be before the
        # server's loop accepted the connection; close_clients() closes only the
        # connections the server made (as asyncio's does), so wait for that first.
        step[0] = "the second server's accept"
        await asyncio.wait_for(made.wait(), TIMEOUT)
        server2.close_clients()
        step[0] = "client's connection_lost after close_clients()"
        await asyncio.wait_for(sink.lost, TIMEOUT)
        steps.append(",".join(sink.events))
        server2.close()
        step[0] = "second server's wait_closed"
        await asyncio.wait_for(server2.wait_closed(), TIMEOUT)
        return steps

    async def bounded() -> list[str]:
        # Not wait_for(main()): on its timeout it waits for main() to finish cancelling,
        # and an ``async with server`` exit would then wait for ever.
        task = asyncio.create_task(main())
        done, _ = await asyncio.wait({task}, timeout=3 * TIMEOUT)
        assert done, f"stalled at: {step[0]}"
        exc = task.exception()
        if isinstance(exc, TimeoutError):
            raise AssertionError(f"timed out at: {step[0]}") from exc
        return task.result()

    steps = asyncio.run(bounded())
    assert steps == ["hello", "waiting", "closed", "cancelled", "eof,lost"]


async def _recv_all(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while data := await reader.read(1 << 20):
        out += data
    return bytes(out)


def _sendfile_roundtrip(host: str, port: int, content: bytes, patched: bool) -> tuple[
        int, int, bytes, str]:
    """loop.sendfile() on a client transport; the server reads until EOF."""
    received: asyncio.Future[bytes]

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        received.set_result(await _recv_all(r))
        w.close()

    async def main(path: str) -> tuple[int, int, bytes, str]:
        nonlocal received
        loop = asyncio.get_running_loop()
        received = loop.create_future()
        if patched:
            server: Any = await asyncio.start_server(handle, host, port)
            _r, w = await asyncio.open_connection(host, port)
        else:
            server = await usdp.asyncio.start_server(handle, host, port)
            _r, w = await usdp.asyncio.open_connection(host, port)
        async with server:
            with open(path, "rb") as f:
                sent = await loop.sendfile(w.transport, f, offset=1000, count=len(content) - 1500)
                pos = f.tell()
            w.write(b"END")
            w.write_eof()
            got = await asyncio.wait_for(received, TIMEOUT)
            kind = usdp.transport_of(w)
            w.close()
            await w.wait_closed()
        return sent, pos, got, kind

    with tempfile.NamedTemporaryFile() as f:
        f.write(content)
        f.flush()
        return asyncio.run(asyncio.wait_for(main(f.name), TIMEOUT))


def test_loop_sendfile_reaches_the_peer(host_a: str, port: int) -> None:
    content = os.urandom((3 << 20) + 777)
    sent, pos, got, kind = _sendfile_roundtrip(host_a, port, content, patched=False)
    assert kind == "sdp"
    assert sent == len(content) - 1500 and pos == len(content) - 500
    assert got == content[1000:-500] + b"END"


def test_loop_sendfile_under_patch_reaches_the_peer(host_a: str, port: int) -> None:
    """The stdlib's own transport on a patched socket: its native sendfile would write into
    the readiness socketpair; usdp makes it decline, and asyncio falls back to send()."""
    content = os.urandom((2 << 20) + 3)
    usdp.patch(usdp.parse_rules("use sdp * * 198.18.0.0/15:*\ndefault tcp\n"), options=SMALL)
    try:
        assert socket.socket is usdp.HybridSocket
        sent, pos, got, kind = _sendfile_roundtrip(host_a, port, content, patched=True)
    finally:
        usdp.unpatch()
    assert kind == "sdp"
    assert sent == len(content) - 1500 and pos == len(content) - 500
    assert got == content[1000:-500] + b"END"
