"""asyncio protocol echo server over usdp, optionally with TLS.

    python examples/aio_echo_server.py HOST PORT [--tls CERT KEY] [--count N]

Every byte a client sends comes back. The protocol stops reading while its transport's
write queue is above the high-water mark (pause_writing/resume_writing), so a client that
does not read cannot make the server buffer without bound. A client, for instance:

    reader, writer = await usdp.asyncio.open_connection(HOST, PORT, ssl=ctx,
                                                        server_hostname="...")
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
from typing import Any

import usdp


class Echo(asyncio.Protocol):
    def __init__(self, done: asyncio.Queue[int]) -> None:
        self.done = done
        self.total = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        tls = " tls" if transport.get_extra_info("ssl_object") else ""
        logging.info("%s:%d connected%s", *transport.get_extra_info("peername")[:2], tls)

    def data_received(self, data: bytes) -> None:
        self.total += len(data)
        self.transport.write(data)

    def pause_writing(self) -> None:
        self.transport.pause_reading()  # backpressure: read no more than we can send

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close once the echo is flushed

    def connection_lost(self, exc: Exception | None) -> None:
        logging.info("done, %d bytes echoed%s", self.total, f" ({exc})" if exc else "")
        self.done.put_nowait(self.total)


async def serve(host: str, port: int, tls: ssl.SSLContext | None, count: int) -> None:
    done: asyncio.Queue[int] = asyncio.Queue()
    server = await usdp.asyncio.create_server(lambda: Echo(done), host, port, ssl=tls)
    logging.info("listening on %s:%d%s", host, port, " with tls" if tls else "")
    async with server:
        if not count:
            await server.serve_forever()
        for _ in range(count):
            await done.get()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"), help="serve TLS")
    ap.add_argument("--count", type=int, default=0, help="exit after N clients (0: never)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="server: %(message)s")
    tls = None
    if args.tls:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(*args.tls)
    asyncio.run(serve(args.host, args.port, tls, args.count))


if __name__ == "__main__":
    main()
