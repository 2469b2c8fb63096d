"""asyncio streams over RDMA on rxe: usdp.asyncio, and the stdlib's streams under patch().

The data path must be the event loop's selector on each socket's readiness fd, not a
thread per connection: the 100-connection test counts threads while all are open.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading

import usdp

TIMEOUT = 120.0
SMALL = usdp.Options(recv_bufs=8, recv_buf_size=8192, send_bufs=8)


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


def test_streams_echo_100_connections(host_a: str, port: int) -> None:
    n = 100
    peak_threads = 0
    accepted: list[str] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(usdp.transport_of(w))
        await _echo(r, w)

    async def client(i: int, all_open: asyncio.Event, opened: list[int]) -> bytes:
        r, w = await usdp.asyncio.open_connection(host_a, port, options=SMALL)
        try:
            assert usdp.transport_of(w) == "sdp"
            opened.append(i)
            if len(opened) == n:
                all_open.set()
            await all_open.wait()  # every connection open at once
            msg = b"%d:" % i + bytes([i]) * (1000 + 37 * i)  # some exceed one 8 KiB slot
            w.write(msg)
            await w.drain()
            got = await r.readexactly(len(msg))
            assert got == msg
            return hashlib.sha256(got).digest()
        finally:
            w.close()
            await w.wait_closed()

    async def main() -> list[bytes]:
        nonlocal peak_threads
        server = await usdp.asyncio.start_server(handle, host_a, port, options=SMALL)
        async with server:
            all_open = asyncio.Event()
            opened: list[int] = []
            tasks = [asyncio.create_task(client(i, all_open, opened)) for i in range(n)]
            await asyncio.wait_for(all_open.wait(), TIMEOUT)
            peak_threads = threading.active_count()
            return await asyncio.gather(*tasks)

    digests = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert len(digests) == n
    assert accepted == ["sdp"] * n
    # Executor threads for setup (at most min(32, cpus + 4)) and usdp's completion thread;
    # a thread per connection would be 100 or more.
    assert peak_threads < 40, peak_threads


def test_stdlib_streams_under_patch_use_rdma(host_a: str) -> None:
    """asyncio.start_server/open_connection, unmodified, on patched sockets."""

    async def main() -> tuple[list[bytes], str, str]:
        server = await asyncio.start_server(_echo, host_a, 0)
        bound = server.sockets[0].getsockname()
        server_t = usdp.transport_of(server.sockets[0])
        out = []
        async with server:
            r, w = await asyncio.open_connection(host_a, bound[1])
            for i in range(5):
                w.write(b"line %d\n" % i)
                await w.drain()
                out.append(await r.readline())
            transport = usdp.transport_of(w)
            w.close()
            await w.wait_closed()
        return out, transport, server_t

    usdp.patch(usdp.parse_rules("use sdp * * 198.18.0.0/15:*\ndefault tcp\n"), options=SMALL)
    try:
        assert socket.socket is usdp.HybridSocket
        lines, client_t, server_t = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    finally:
        usdp.unpatch()
    assert lines == [b"line %d\n" % i for i in range(5)]
    assert client_t == server_t == "sdp"
