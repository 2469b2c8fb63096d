"""The TLS glue (make_transport: the stdlib's SSLProtocol over SdpTransport) on a kernel
socketpair, with certificates from both generators (cryptography and openssl). Over RDMA:
tests/rxe/test_tls.py."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.rxe.certs import _with_openssl, self_signed
from usdp._aio_transport import make_transport

TIMEOUT = 60.0


class Keep(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.transport: Any = None
        self.eof = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof.set_result(None)
        return False


async def _tls_pair(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext,
                    hostname: str) -> tuple[Keep, Keep, Any, Any]:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    for s in (a, b):
        s.setblocking(False)
    ps, pc = Keep(), Keep()
    ws: asyncio.Future[None] = loop.create_future()
    wc: asyncio.Future[None] = loop.create_future()
    ts = make_transport(loop, a, ps, ws, server_ctx, server_side=True)
    tc = make_transport(loop, b, pc, wc, client_ctx, server_hostname=hostname)
    results = await asyncio.wait_for(asyncio.gather(ws, wc, return_exceptions=True), TIMEOUT)
    for r in reversed(results):  # the client's error first: the server only sees a reset
        if isinstance(r, BaseException):
            ts.abort()
            tc.abort()
            raise r
    return ps, pc, ts, tc


@pytest.mark.parametrize("maker", ["default", "openssl"])
def test_tls_over_the_transport(tmp_path: Path, maker: str) -> None:
    if maker == "openssl":
        if shutil.which("openssl") is None:
            pytest.skip("no openssl command")
        cert, key = tmp_path / "s.crt", tmp_path / "s.key"
        _with_openssl(cert, key, "s", ["usdp.test"], [])
    else:
        cert, key = self_signed(tmp_path, "s", ["usdp.test"], [])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    payload = os.urandom(3 << 20)

    async def main() -> tuple[bytes, Any]:
        ps, _pc, ts, tc = await _tls_pair(server_ctx, client_ctx, "usdp.test")
        tc.write(payload)
        tc.close()  # close_notify after the data: the server sees EOF
        await asyncio.wait_for(ps.eof, TIMEOUT)
        ts.close()
        return bytes(ps.data), tc.get_extra_info("ssl_object")

    data, sslobj = asyncio.run(main())
    assert data == payload and isinstance(sslobj, ssl.SSLObject)


def test_tls_wrong_name_and_wrong_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "s", ["usdp.test"], [])
    other, _ = self_signed(tmp_path, "o", ["usdp.test"], [])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def attempt(cafile: Path, hostname: str) -> None:
        await _tls_pair(server_ctx, ssl.create_default_context(cafile=str(cafile)), hostname)

    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(attempt(cert, "other.test"))
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(attempt(other, "usdp.test"))
