"""TLS over usdp on rxe: the stdlib's TLS (asyncio's SSLProtocol) over a usdp transport, at
the streams and the protocol level, with certificates made by the test: host name checks,
a wrong certificate, an 8 MiB echo, and a STARTTLS upgrade (loop.start_tls)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import usdp

from .certs import self_signed

TIMEOUT = 120.0
NAME = "usdp.test"


@pytest.fixture
def tls(tmp_path: Path, host_a: str) -> dict[str, Any]:
    """A server context with a certificate for usdp.test and host A's address, a client
    context trusting it, and a client context trusting another certificate."""
    cert, key = self_signed(tmp_path, "server", [NAME], [host_a])
    other, _ = self_signed(tmp_path, "other", [NAME], [host_a])
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    return {"server": server, "client": ssl.create_default_context(cafile=str(cert)),
            "wrong": ssl.create_default_context(cafile=str(other)), "files": (cert, key)}


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 20):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


def test_tls_streams_echo_8mib(host_a: str, port: int, tls: dict[str, Any]) -> None:
    payload = os.urandom(8 << 20)

    async def main() -> tuple[bytes, dict[str, Any]]:
        server = await usdp.asyncio.start_server(_echo, host_a, port, ssl=tls["server"])
        async with server:
            r, w = await usdp.asyncio.open_connection(host_a, port, ssl=tls["client"],
                                                      server_hostname=NAME)
            sslobj = w.get_extra_info("ssl_object")
            info = {"version": sslobj.version(), "cert": w.get_extra_info("peercert"),
                    "transport": usdp.transport_of(w)}

            async def send() -> None:
                view = memoryview(payload)
                for i in range(0, len(view), 1 << 20):
                    w.write(view[i:i + (1 << 20)])
                    await w.drain()

            sender = asyncio.create_task(send())
            got = await r.readexactly(len(payload))
            await sender
            w.close()
            await w.wait_closed()
        return got, info

    got, info = asyncio.run(asyncio.wait_for(main(), TIMEOUT * 2))
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert info["transport"] == "sdp" and info["version"].startswith("TLS")
    assert ("DNS", NAME) in info["cert"]["subjectAltName"]


class Collect(asyncio.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


class Upper(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())

    def eof_received(self) -> bool:
        return False


def test_tls_protocol_level_checks_the_address_as_host_name(
        host_a: str, port: int, tls: dict[str, Any]) -> None:
    """create_connection(ssl=...) without server_hostname checks ``host`` (an IP SAN)."""

    async def main() -> tuple[bytes, Any, Any, BaseException | None]:
        server = await usdp.asyncio.create_server(Upper, host_a, port, ssl=tls["server"])
        async with server:
            transport, proto = await usdp.asyncio.create_connection(
                Collect, host_a, port, ssl=tls["client"], ssl_handshake_timeout=TIMEOUT)
            transport.write(b"over tls over rdma")
            while len(proto.data) < 18:
                await asyncio.sleep(0.01)
            sock = transport.get_extra_info("socket")
            sslobj = transport.get_extra_info("ssl_object")
            transport.close()
            exc = await asyncio.wait_for(proto.lost, TIMEOUT)
        return bytes(proto.data), sock, sslobj, exc

    data, sock, sslobj, exc = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert data == b"OVER TLS OVER RDMA"
    assert isinstance(sock, usdp.SdpSocket) and isinstance(sslobj, ssl.SSLObject)
    assert exc is None


def _refused(host: str, port: int, tls: dict[str, Any], ctx: str,
             hostname: str) -> tuple[ssl.SSLCertVerificationError, bytes]:
    """A client that must fail verification; then a good client on the same server."""

    async def main() -> tuple[ssl.SSLCertVerificationError, bytes]:
        server = await usdp.asyncio.start_server(_echo, host, port, ssl=tls["server"])
        async with server:
            with pytest.raises(ssl.SSLCertVerificationError) as info:
                await usdp.asyncio.open_connection(host, port, ssl=tls[ctx],
                                                   server_hostname=hostname)
            r, w = await usdp.asyncio.open_connection(host, port, ssl=tls["client"],
                                                      server_hostname=NAME)
            w.write(b"still serving\n")
            line = await r.readline()
            w.close()
            await w.wait_closed()
        return info.value, line

    return asyncio.run(asyncio.wait_for(main(), TIMEOUT))


def test_tls_wrong_certificate_is_a_verification_error(
        host_a: str, port: int, tls: dict[str, Any]) -> None:
    err, line = _refused(host_a, port, tls, "wrong", NAME)
    assert err.verify_code != 0 and "certificate" in str(err)
    assert line == b"still serving\n"


def test_tls_host_name_mismatch_is_a_verification_error(
        host_a: str, port: int, tls: dict[str, Any]) -> None:
    err, line = _refused(host_a, port, tls, "client", "not-" + NAME)
    assert "not-" + NAME in str(err) or "mismatch" in str(err).lower()
    assert line == b"still serving\n"


def test_starttls_upgrade_of_a_usdp_stream(host_a: str, port: int,
                                           tls: dict[str, Any]) -> None:
    """Plain first, then both ends upgrade (loop.start_tls on usdp transports)."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        assert await r.readline() == b"STARTTLS\n"
        w.write(b"GO\n")
        await w.drain()
        await w.start_tls(tls["server"])
        await _echo(r, w)

    async def main() -> tuple[bytes, bool, bool]:
        server = await usdp.asyncio.start_server(handle, host_a, port)
        async with server:
            r, w = await usdp.asyncio.open_connection(host_a, port)
            before = w.get_extra_info("ssl_object") is None
            w.write(b"STARTTLS\n")
            assert await r.readline() == b"GO\n"
            await w.start_tls(tls["client"], server_hostname=NAME)
            after = w.get_extra_info("ssl_object") is not None
            w.write(b"secret\n")
            line = await r.readline()
            w.close()
            await w.wait_closed()
        return line, before, after

    line, before, after = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert line == b"secret\n" and before and after


def test_example_aio_echo_server_with_tls(host_a: str, port: int, tls: dict[str, Any]) -> None:
    """examples/aio_echo_server.py --tls CERT KEY serves one TLS client and exits."""
    example = Path(__file__).resolve().parents[2] / "examples" / "aio_echo_server.py"
    cert, key = tls["files"]
    proc = subprocess.Popen([sys.executable, str(example), host_a, str(port), "--tls",
                             str(cert), str(key), "--count", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    payload = os.urandom(1 << 20)

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while True:  # the server listens once its interpreter is up
            try:
                r, w = await usdp.asyncio.open_connection(host_a, port, ssl=tls["client"],
                                                          server_hostname=NAME)
                break
            except OSError as exc:  # refused until it listens
                assert loop.time() < deadline and proc.poll() is None, exc
                await asyncio.sleep(0.2)
        w.write(payload)
        got = await r.readexactly(len(payload))
        w.close()
        await w.wait_closed()
        return got

    try:
        got = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert got == payload
    assert proc.returncode == 0, err
    assert f"{len(payload)} bytes echoed" in err and "with tls" in err


@pytest.mark.twohost
def test_tls_asyncio_across_two_hosts(host_b: Any, port: int) -> None:
    """examples/aio_echo_server.py --tls on host B, an asyncio TLS client on host A: 8 MiB
    echoed over the link between the VMs, checksummed. The certificate goes through the
    bed's shared output folder (both VMs mount it)."""
    out = os.environ.get("USDP_OUT")
    if not out:
        pytest.skip("needs the bed's shared output folder (USDP_OUT)")
    folder = Path(out) / f"tls-test-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = self_signed(folder, "hostb", [NAME], [host_b.addr])
    pid = host_b.spawn([".venv/bin/python", "examples/aio_echo_server.py", host_b.addr,
                        str(port), "--tls", str(cert), str(key), "--count", "1"])
    payload = os.urandom(8 << 20)
    client = ssl.create_default_context(cafile=str(cert))

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while True:  # host B's server listens once its interpreter is up
            try:
                r, w = await usdp.asyncio.open_connection(host_b.addr, port, ssl=client,
                                                          server_hostname=NAME)
                break
            except OSError as exc:
                assert loop.time() < deadline, exc
                await asyncio.sleep(0.5)

        async def send() -> None:
            for i in range(0, len(payload), 1 << 20):
                w.write(payload[i:i + (1 << 20)])
                await w.drain()

        sender = asyncio.create_task(send())
        got = await r.readexactly(len(payload))
        await sender
        w.close()
        await w.wait_closed()
        return got

    res: dict[str, Any] = {"rc": None}
    try:
        got = asyncio.run(asyncio.wait_for(main(), TIMEOUT * 2))
        res = host_b.wait(pid, TIMEOUT)
    finally:
        if res["rc"] is None:  # not reaped yet (the agent forgets a reaped pid)
            host_b.kill(pid)
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert res["rc"] == 0, res
    assert f"{len(payload)} bytes echoed" in res["stderr"], res
