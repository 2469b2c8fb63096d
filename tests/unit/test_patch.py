"""``usdp.patch()`` with no RDMA in reach (loopback): stdlib programs keep working on TCP.

Loopback never has RDMA (rxe cannot use 127.0.0.1, and these tests run where no device may
exist), so ``both`` must fall back, and ``tcp`` must leave the kernel socket alone.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import http.server
import logging
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import usdp

REAL_SOCKET = socket.socket
TIMEOUT = 30.0


@pytest.fixture
def patched() -> Iterator[None]:
    usdp.patch(usdp.parse_rules("use tcp server * *:1-1023\ndefault both\nrdma-timeout 2"),
               program="unit")
    try:
        yield
    finally:
        usdp.unpatch()


def test_patch_replaces_only_inet_stream_sockets(patched: None) -> None:
    assert socket.socket is usdp.HybridSocket
    with socket.socket() as s:
        assert type(s) is usdp.HybridSocket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as u, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as d:
        assert type(u) is REAL_SOCKET and type(d) is REAL_SOCKET
        assert isinstance(u, socket.socket)  # still a socket.socket to isinstance
    a, b = socket.socketpair()
    with a, b:
        assert type(a) is REAL_SOCKET
        a.sendall(b"x")
        assert b.recv(1) == b"x"
    usdp.unpatch()
    assert socket.socket is REAL_SOCKET and not usdp.is_patched()


def address(srv: socketserver.TCPServer) -> tuple[str, int]:
    addr = srv.server_address
    assert isinstance(addr, tuple) and isinstance(addr[0], str)
    return addr[0], int(addr[1])


class _Echo(socketserver.StreamRequestHandler):
    transports: list[str]

    def handle(self) -> None:
        self.transports.append(usdp.transport_of(self.request))
        while line := self.rfile.readline():
            self.wfile.write(line)


def test_socketserver_falls_back_to_tcp_on_loopback(
        patched: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="usdp")
    _Echo.transports = []
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo) as srv:
        t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
        t.start()
        try:
            with socket.create_connection(address(srv), timeout=TIMEOUT) as c, \
                    c.makefile("rwb") as f:
                assert usdp.transport_of(c) == "tcp"
                for i in range(20):
                    f.write(b"line %d\n" % i)
                    f.flush()
                    assert f.readline() == b"line %d\n" % i
        finally:
            srv.shutdown()
            t.join(TIMEOUT)
    assert _Echo.transports == ["tcp"]
    assert "falling back to tcp" in caplog.text, caplog.text


def test_create_server_and_connection(patched: None) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        srv.settimeout(TIMEOUT)
        assert type(srv) is usdp.HybridSocket
        with socket.create_connection(srv.getsockname()[:2], timeout=TIMEOUT) as c:
            conn, _ = srv.accept()
            with conn:
                c.sendall(b"ping")
                assert conn.recv(4) == b"ping"
                assert usdp.transport_of(conn) == "tcp"


def test_http_server_and_urllib(patched: None, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (tmp_path / "blob").write_bytes(data)
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as srv:
        t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
        t.start()
        try:
            url = f"http://127.0.0.1:{srv.server_address[1]}/blob"
            with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
                got = r.read()
        finally:
            srv.shutdown()
            t.join(TIMEOUT)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_asyncio_streams_through_the_patch(patched: None) -> None:
    async def main() -> list[bytes]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.readline())
            await w.drain()
            w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        out = []
        async with server:
            for i in range(3):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                assert usdp.transport_of(w) == "tcp"
                w.write(b"hello %d\n" % i)
                out.append(await r.readline())
                w.close()
                await w.wait_closed()
        return out

    assert asyncio.run(asyncio.wait_for(main(), TIMEOUT)) == [b"hello %d\n" % i for i in range(3)]


def test_transport_of_rejects_non_stream() -> None:
    with REAL_SOCKET(socket.AF_INET, socket.SOCK_DGRAM) as d, pytest.raises(ValueError):
        usdp.transport_of(d)
    with pytest.raises(TypeError):
        usdp.transport_of(object())


def test_run_reports_a_bad_rules_line(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("use tcp * * *\nuse sdp client * 198.18.0.1\n")
    prog = tmp_path / "prog.py"
    prog.write_text("print('must not run')\n")
    r = subprocess.run([sys.executable, "-m", "usdp.run", "--config", str(conf), str(prog)],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 2
    assert f"{conf}:2: the target is ADDRESS[/PREFIX]:PORT[-PORT] or *" in r.stderr, r.stderr
    assert "must not run" not in r.stdout


def test_run_passes_argv_and_patches(tmp_path: Path) -> None:
    prog = tmp_path / "prog.py"
    prog.write_text("import socket, sys\n"
                    "print(sys.argv[1:], socket.socket.__name__, __name__)\n")
    r = subprocess.run([sys.executable, "-m", "usdp.run", str(prog), "a", "--b"],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['a', '--b'] HybridSocket __main__"


@pytest.fixture
def sdp_only() -> Iterator[None]:
    usdp.patch(usdp.parse_rules("default sdp\n"), program="unit")
    try:
        yield
    finally:
        usdp.unpatch()


def test_states_of_a_tcp_connection_and_listener(patched: None) -> None:
    """undecided -> listening (the rule says both; with no RDMA listener possible here it
    is tcp only) and undecided -> connected over tcp, as repr and transport_of say."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        assert "usdp=undecided" in repr(srv)
        with pytest.raises(ValueError, match="not yet"):
            usdp.transport_of(srv)
        srv.listen()
        assert "usdp=listen:tcp" in repr(srv)  # both, with no RDMA listener: tcp only
        assert usdp.transport_of(srv) == "tcp"
        with socket.create_connection(srv.getsockname()[:2], timeout=TIMEOUT) as c:
            assert "usdp=tcp" in repr(c)
            conn, _ = srv.accept()
            conn.close()


def test_sdp_rule_without_rdma_raises_a_usdp_error(sdp_only: None) -> None:
    """This host has no RDMA (loopback never has): an sdp-only connect fails with
    usdp's DeviceError naming the address, and the socket is still undecided."""
    with socket.socket() as s:
        s.settimeout(TIMEOUT)
        with pytest.raises(usdp.UsdpError) as info:
            s.connect(("127.0.0.1", 9))
        assert "127.0.0.1:9" in str(info.value)
        assert "usdp=undecided" in repr(s)


def test_non_blocking_sdp_connect_reports_through_so_error(sdp_only: None) -> None:
    """connecting: EINPROGRESS at once, then EALREADY or the outcome; SO_ERROR reports the
    failure once (as the kernel does), and a repeated connect() raises it."""
    with socket.socket() as s:
        s.setblocking(False)
        with pytest.raises(BlockingIOError) as first:
            s.connect(("127.0.0.1", 9))
        assert first.value.errno == errno.EINPROGRESS
        assert "usdp=connecting" in repr(s)
        deadline = time.monotonic() + TIMEOUT
        err = None
        while err is None and time.monotonic() < deadline:
            try:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            except BlockingIOError:
                continue  # still under way (getsockopt itself waits a little)
        assert err is not None and err != 0
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0  # reported once
        with pytest.raises(usdp.UsdpError) as again:
            s.connect(("127.0.0.1", 9))
        assert again.value.errno == err
