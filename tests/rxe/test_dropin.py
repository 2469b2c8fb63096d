"""The drop-in on rxe: unmodified stdlib programs over RDMA, ``both`` mode and fallback.

The RDMA address is the rxe link's (198.18.0.1): rxe cannot run RDMA CM over loopback.
198.18.0.2 lives in the network namespace ``usdp-b`` (a veth peer without rxe), which is
where "a client with no RDMA device" and "a peer that does not speak usdp" run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import select
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import pytest

import usdp

REAL_SOCKET = socket.socket
TIMEOUT = 60.0
SMALL = usdp.Options(recv_bufs=8, recv_buf_size=8192, send_bufs=8)
SMALL_ENV = {"USDP_RECV_BUFS": "8", "USDP_RECV_BUF_SIZE": "8192", "USDP_SEND_BUFS": "8"}
PEER_NS = "usdp-b"


@contextmanager
def patched(rules: str, program: str = "pytest") -> Iterator[None]:
    usdp.patch(usdp.parse_rules(rules, "test.conf"), program=program, options=SMALL)
    try:
        yield
    finally:
        usdp.unpatch()


def wait_for_line(proc: subprocess.Popen[str], needle: str, timeout: float) -> str:
    """Read ``proc``'s stderr until a line contains ``needle``; returns what was read."""
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while needle not in seen:
        remaining = deadline - time.monotonic()
        r, _, _ = select.select([proc.stderr], [], [], max(0.0, remaining))
        if not r:
            raise AssertionError(f"no {needle!r} within {timeout}s; stderr so far:\n{seen}")
        line = proc.stderr.readline()
        if not line:
            raise AssertionError(f"exited ({proc.wait(5)}) before {needle!r}:\n{seen}")
        seen += line
    return seen


@contextmanager
def background(argv: list[str], env: dict[str, str] | None = None,
               ) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=TIMEOUT)


URLLIB_CLIENT = """\
import hashlib, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=60) as r:
    body = r.read()
print(len(body), hashlib.sha256(body).hexdigest())
"""

ECHO_CLIENT = """\
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60) as s:
    s.sendall(b"ping\\n")
    got = b""
    while not got.endswith(b"\\n"):
        chunk = s.recv(100)
        if not chunk:
            break
        got += chunk
print(got.decode().strip())
"""


def test_http_server_and_urllib_under_usdp_run(host_a: str, port: int, tmp_path: Path) -> None:
    """``python -m http.server`` and a urllib script, both unmodified, under usdp.run."""
    site = tmp_path / "site"
    site.mkdir()
    data = os.urandom(200_000)
    (site / "blob.bin").write_bytes(data)
    conf = tmp_path / "rules.conf"
    conf.write_text("use sdp * * 198.18.0.0/15:*\nuse tcp * * *\n")
    client = tmp_path / "fetch.py"
    client.write_text(URLLIB_CLIENT)
    run = [sys.executable, "-m", "usdp.run", "--config", str(conf), "-v"]
    server = [*run, "-m", "http.server", "--bind", host_a, "--directory", str(site), str(port)]
    with background(server) as srv:
        started = wait_for_line(srv, "listening on", TIMEOUT)
        assert f"listening on {host_a}:{port} over sdp [" in started, started
        r = subprocess.run([*run, str(client), f"http://{host_a}:{port}/blob.bin"],
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [str(len(data)), hashlib.sha256(data).hexdigest()]
        assert f"-> {host_a}:{port} over sdp" in r.stderr, r.stderr
        server_log = wait_for_line(srv, "accepted", TIMEOUT)
    assert "over sdp" in server_log.split("accepted", 1)[1], server_log


def address(srv: socketserver.TCPServer) -> tuple[str, int]:
    addr = srv.server_address
    assert isinstance(addr, tuple) and isinstance(addr[0], str)
    return addr[0], int(addr[1])


class _Echo(socketserver.StreamRequestHandler):
    transports: ClassVar[list[str]] = []

    def handle(self) -> None:
        self.transports.append(usdp.transport_of(self.request))
        while line := self.rfile.readline():
            self.wfile.write(line)
            self.wfile.flush()


@contextmanager
def echo_server(host: str) -> Iterator[socketserver.ThreadingTCPServer]:
    _Echo.transports = []
    srv = socketserver.ThreadingTCPServer((host, 0), _Echo)
    srv.daemon_threads = False  # server_close joins the handlers: nothing outlives the test
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        t.join(TIMEOUT)
        srv.server_close()
    assert not t.is_alive()


def test_threading_tcp_server_echo_32_clients(host_a: str) -> None:
    n = 32
    results: dict[int, tuple[str, bool]] = {}
    with patched("use sdp * * 198.18.0.0/15:*\ndefault tcp\n"), echo_server(host_a) as srv:
        assert usdp.transport_of(srv.socket) == "sdp"

        def client(i: int) -> None:
            with socket.create_connection(address(srv), timeout=TIMEOUT) as c, \
                    c.makefile("rwb") as f:
                lines = [b"client %d line %d %s\n" % (i, j, b"x" * (i * j)) for j in range(5)]
                ok = True
                for line in lines:
                    f.write(line)
                    f.flush()
                    ok = ok and f.readline() == line
                results[i] = (usdp.transport_of(c), ok)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 2)
    assert results == dict.fromkeys(range(n), ("sdp", True))
    assert _Echo.transports == ["sdp"] * n


def test_both_server_takes_rdma_and_tcp_clients(host_a: str) -> None:
    rules = "use both server * *\nuse sdp client * 198.18.0.0/15:*\n"
    with patched(rules), echo_server(host_a) as srv:
        assert isinstance(srv.socket, usdp.HybridSocket)
        with socket.create_connection(address(srv), timeout=TIMEOUT) as rdma, \
                REAL_SOCKET() as tcp:
            tcp.settimeout(TIMEOUT)
            tcp.connect(address(srv))  # a plain kernel TCP client
            for s, msg in ((rdma, b"over rdma\n"), (tcp, b"over tcp\n"), (rdma, b"again\n")):
                s.sendall(msg)
                got = b""
                while not got.endswith(b"\n"):
                    got += s.recv(100)
                assert got == msg
            assert usdp.transport_of(rdma) == "sdp"
    assert sorted(_Echo.transports) == ["sdp", "tcp"]


def _in_peer_ns(argv: list[str]) -> list[str]:
    ip = shutil.which("ip")
    if ip is None or PEER_NS not in subprocess.run([ip, "netns", "list"], capture_output=True,
                                                   text=True, timeout=TIMEOUT).stdout:
        pytest.fail(f"the test bed has no network namespace {PEER_NS} (iproute2 needed)")
    return [ip, "netns", "exec", PEER_NS, *argv]


def test_both_client_without_rdma_device_falls_back(host_a: str, tmp_path: Path) -> None:
    """A client in usdp-b (its netdev has no RDMA device) reaches a ``both`` server by TCP."""
    conf = tmp_path / "both.conf"
    conf.write_text("default both\n")
    client = tmp_path / "echo_client.py"
    client.write_text(ECHO_CLIENT)
    with patched("default both\n"), echo_server(host_a) as srv:
        argv = [sys.executable, "-m", "usdp.run", "--config", str(conf), "-v", str(client),
                host_a, str(srv.server_address[1])]
        r = subprocess.run(_in_peer_ns(argv), capture_output=True, text=True, timeout=TIMEOUT,
                           env={**os.environ, **SMALL_ENV})
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "ping"
        assert "sdp failed" in r.stderr and "falling back to tcp" in r.stderr, r.stderr
        assert f"-> {host_a}:{srv.server_address[1]} over tcp" in r.stderr, r.stderr
    assert _Echo.transports == ["tcp"]


TCP_ECHO_SERVER = """\
import socket, sys
with socket.create_server((sys.argv[1], 0)) as s:
    print(s.getsockname()[1], flush=True)
    s.settimeout(60)
    c, _ = s.accept()
    with c:
        c.sendall(c.recv(100))
"""


def test_both_client_falls_back_when_peer_has_no_rdma(
        host_a: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A plain TCP server in usdp-b: the RDMA attempt gets no answer; TCP is used."""
    caplog.set_level(logging.INFO, logger="usdp")
    peer = os.environ.get("USDP_HOST_B", "198.18.0.2")
    script = tmp_path / "tcp_echo.py"
    script.write_text(TCP_ECHO_SERVER)
    with background(_in_peer_ns([sys.executable, str(script), peer])) as srv:
        assert srv.stdout is not None
        r, _, _ = select.select([srv.stdout], [], [], TIMEOUT)
        assert r, "the TCP peer did not start"
        peer_port = int(srv.stdout.readline())
        with patched("use both client * 198.18.0.0/15:*\nrdma-timeout 2\n"), \
                socket.create_connection((peer, peer_port), timeout=TIMEOUT) as c:
            c.sendall(b"hello")
            assert c.recv(100) == b"hello"
            assert usdp.transport_of(c) == "tcp"
    assert "sdp failed" in caplog.text, caplog.text
    assert f"-> {peer}:{peer_port} over tcp" in caplog.text


def test_create_server_create_connection_and_af_inet_sdp(host_a: str) -> None:
    with patched("default tcp\nuse sdp * * 198.18.0.1/32:*\n"), \
            socket.create_server((host_a, 0)) as lst:
        lst.settimeout(TIMEOUT)
        assert usdp.transport_of(lst) == "sdp"
        accepted = accept_in_thread(lst)
        with socket.create_connection(lst.getsockname()[:2], timeout=TIMEOUT) as c, \
                accepted() as conn:
            c.sendall(b"abc")
            assert conn.recv(3) == b"abc"
            assert usdp.transport_of(c) == usdp.transport_of(conn) == "sdp"
    # AF_INET_SDP asks for RDMA by name, whatever the rules say.
    with patched("default tcp\n"), socket.create_server((host_a, 0)) as tcp_lst:
        assert usdp.transport_of(tcp_lst) == "tcp"
        with socket.socket(usdp.AF_INET_SDP, socket.SOCK_STREAM) as lst:
            lst.bind((host_a, 0))
            lst.listen()
            lst.settimeout(TIMEOUT)
            assert usdp.transport_of(lst) == "sdp"
            accepted = accept_in_thread(lst)
            with socket.socket(usdp.AF_INET_SDP, socket.SOCK_STREAM) as c:
                c.settimeout(TIMEOUT)
                c.connect(lst.getsockname()[:2])
                with accepted() as conn:
                    assert usdp.transport_of(c) == usdp.transport_of(conn) == "sdp"


def accept_in_thread(lst: socket.socket) -> Callable[[], Any]:
    """Accept in a thread (an RDMA connect completes only when the listener accepts);
    the returned function gives the connection."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(lst.accept()[0]))
    t.start()

    def get() -> Any:
        t.join(TIMEOUT)
        assert out, "accept() did not return"
        return out[0]

    return get


class _ForkedEcho(socketserver.StreamRequestHandler):
    """Runs in the forked child: records how serving the inherited connection ended."""

    report: ClassVar[str] = ""

    def handle(self) -> None:
        try:
            line = self.rfile.readline()
            self.wfile.write(line)
            self.wfile.flush()
            outcome = "served"
        except OSError as exc:
            outcome = f"{type(exc).__name__} errno={exc.errno}: {exc}"
        with open(self.report, "w") as f:
            f.write(outcome)


def test_forking_server_child_fails_clearly_on_an_inherited_rdma_socket(
        host_a: str, tmp_path: Path) -> None:
    """socketserver.ForkingMixIn under the drop-in: RDMA resources do not survive fork, so
    the child's handler gets a clear EBADF, the parent closes its copy (the client reads
    EOF, promptly), and the server goes on accepting."""
    rules = "use sdp * * 198.18.0.0/15:*\ndefault tcp\n"
    with patched(rules):
        srv = socketserver.ForkingTCPServer((host_a, 0), _ForkedEcho)
        t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
        t.start()
        try:
            assert usdp.transport_of(srv.socket) == "sdp"
            for i in range(2):  # the second shows the server survived the first
                _ForkedEcho.report = str(tmp_path / f"child{i}")
                with socket.create_connection(address(srv), timeout=TIMEOUT) as c:
                    assert usdp.transport_of(c) == "sdp"
                    c.sendall(b"ping\n")
                    try:
                        assert c.recv(100) == b""
                    except ConnectionError:
                        pass  # a reset is as clear as EOF
                deadline = time.monotonic() + TIMEOUT
                report = tmp_path / f"child{i}"
                while not report.exists() or not report.read_text():
                    assert time.monotonic() < deadline, "the child never reported"
                    threading.Event().wait(0.05)
                text = report.read_text()
                assert "errno=9" in text and "inherited across fork()" in text, text
        finally:
            srv.shutdown()
            t.join(TIMEOUT)
            srv.server_close()
    assert not t.is_alive()
