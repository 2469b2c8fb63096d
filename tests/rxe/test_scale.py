"""Memory per connection: rings that start small and grow with use (issue 11, item 14).

An idle connection registers at most 256 KiB (4 receive slots of 64 KiB, no registered
send slot: small frames go inline); a stream grows both rings to their maximum; a
thousand connections echo at once in one process. The numbers are printed (``-s``) for
the closing note: registered bytes and fds per connection.
"""

from __future__ import annotations

import hashlib
import os
import random
import resource
import selectors
import threading
import time

import usdp
from tests.rxe.helpers import TIMEOUT, client, echo, recv_exactly, server

KIB = 1024
IDLE_LIMIT = 256 * KIB
#: Connections of the scale test (``USDP_SCALE_CONNS`` to measure another count).
CONNS = int(os.environ.get("USDP_SCALE_CONNS", "1000"))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_idle_connection_registers_at_most_256k(host_a: str, port: int) -> None:
    """Both ends of a fresh connection, and after a small echo: <= 256 KiB registered."""
    accepted: list[usdp.SdpSocket] = []
    got = threading.Event()

    def keep(conn: usdp.SdpSocket) -> None:
        accepted.append(conn)
        echo(conn)
        got.set()

    with server(host_a, port, keep) as errors, client(host_a, port) as c:
        deadline = time.monotonic() + TIMEOUT
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.01)
        srv = accepted[0]
        for side in (c, srv):
            st = side.stats()
            print(f"idle: {st['registered_bytes']} B registered, recv {st['recv_slots']}/"
                  f"{st['recv_slots_max']} slots, send {st['send_slots']}/"
                  f"{st['send_slots_max']} + {st['inline_slots']} inline")
            assert st["registered_bytes"] <= IDLE_LIMIT
            assert st["recv_slots"] < st["recv_slots_max"]  # default Options: 16
        for i in range(20):  # request/response with small messages: nothing grows
            msg = bytes([i]) * 100
            c.sendall(msg)
            assert recv_exactly(c, len(msg)) == msg
        for side in (c, srv):
            assert side.stats()["registered_bytes"] <= IDLE_LIMIT
        c.shutdown(usdp.SHUT_WR)
        assert c.recv(1) == b""
    assert got.wait(TIMEOUT)
    assert not errors


def test_bulk_transfer_grows_both_rings(host_a: str, port: int) -> None:
    """A stream grows the receiver's ring and the sender's send ring; every byte arrives
    in order (SHA-256 on both ends)."""
    size = 24 * 1024 * 1024
    data = random.Random(7).randbytes(size)
    result: dict[str, object] = {}

    def sink(conn: usdp.SdpSocket) -> None:
        before = conn.stats()
        h = hashlib.sha256()
        buf = bytearray(256 * KIB)
        n_total = 0
        while n := conn.recv_into(buf):
            h.update(memoryview(buf)[:n])
            n_total += n
        result.update(before=before, after=conn.stats(), digest=h.hexdigest(), n=n_total)

    with server(host_a, port, sink) as errors, client(host_a, port) as c:
        before = c.stats()["registered_bytes"]
        c.sendall(data)
        after = c.stats()
        c.shutdown(usdp.SHUT_WR)
        assert c.recv(1) == b""
    assert not errors
    assert result["n"] == size
    assert result["digest"] == hashlib.sha256(data).hexdigest()
    rb, ra = result["before"], result["after"]
    assert isinstance(rb, dict) and isinstance(ra, dict)
    print(f"bulk: receiver {rb['registered_bytes']} -> {ra['registered_bytes']} B "
          f"({ra['recv_slots']} recv slots), sender {before} -> "
          f"{after['registered_bytes']} B ({after['send_slots']} send slots)")
    assert ra["recv_slots"] > rb["recv_slots"]  # the receive ring grew
    assert ra["registered_bytes"] > rb["registered_bytes"]
    assert after["send_slots"] > 0 and after["registered_bytes"] > before  # and the send ring
    assert ra["recv_slots"] <= ra["recv_slots_max"]
    assert after["send_slots"] <= after["send_slots_max"]


def _raise_nofile(need: int) -> None:
    """Soft limit up to ``need`` fds (the hard limit too, as root, if it is lower)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need and os.geteuid() == 0:
        hard = need
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


class _EchoLoop:
    """The server side: one selectors loop echoing every accepted connection."""

    def __init__(self, lst: usdp.SdpSocket) -> None:
        self.lst = lst
        self.sel = selectors.DefaultSelector()
        self.conns: list[usdp.SdpSocket] = []
        self.errors: list[BaseException] = []
        self.echoed = 0
        self.closed = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="scale-echo")

    def _run(self) -> None:
        try:
            self.lst.setblocking(False)
            self.sel.register(self.lst, selectors.EVENT_READ)
            buf = bytearray(4096)
            while not self._stop:
                for key, _ in self.sel.select(0.5):
                    s = key.fileobj
                    assert isinstance(s, usdp.SdpSocket)
                    if s is self.lst:
                        while True:
                            try:
                                conn, _addr = self.lst.accept()
                            except BlockingIOError:
                                break
                            conn.setblocking(False)
                            self.conns.append(conn)
                            self.sel.register(conn, selectors.EVENT_READ)
                        continue
                    try:
                        n = s.recv_into(buf)
                    except BlockingIOError:
                        continue
                    if n == 0:
                        self.sel.unregister(s)
                        s.close()
                        self.closed += 1
                        continue
                    s.setblocking(True)  # small echo: a blocking sendall is immediate
                    s.sendall(memoryview(buf)[:n])
                    s.setblocking(False)
                    self.echoed += 1
        except BaseException as exc:
            self.errors.append(exc)

    def stop(self) -> None:
        self._stop = True
        self.thread.join(TIMEOUT)
        self.sel.close()


def test_thousand_connections_echo_in_one_process(host_a: str, port: int) -> None:
    """CONNS client connections and their CONNS server ends in this one process, all
    echoing at once (a selectors loop on each side), then closed cleanly."""
    _raise_nofile(16 * CONNS + 1024)
    t0 = time.monotonic()
    fds0 = _open_fds()
    lst = usdp.SdpSocket()
    lst.bind((host_a, port))
    lst.listen(CONNS)
    loop = _EchoLoop(lst)
    loop.thread.start()
    clients: list[usdp.SdpSocket] = []
    try:
        for _ in range(CONNS):
            clients.append(client(host_a, port))
        deadline = time.monotonic() + 10 * TIMEOUT
        while len(loop.conns) < CONNS and time.monotonic() < deadline and not loop.errors:
            time.sleep(0.05)
        assert not loop.errors, loop.errors
        assert len(loop.conns) == CONNS
        t_connect = time.monotonic() - t0

        # Every client sends, then one selectors loop collects every echo: all CONNS
        # requests are in flight at once.
        sel = selectors.DefaultSelector()
        want: dict[usdp.SdpSocket, bytes] = {}
        for i, c in enumerate(clients):
            msg = f"hello {i:06d} ".encode() * 4
            c.sendall(msg)
            c.setblocking(False)
            want[c] = msg
            sel.register(c, selectors.EVENT_READ, bytearray())
        pending = set(clients)
        deadline = time.monotonic() + 10 * TIMEOUT
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(1.0):
                sock = key.fileobj
                assert isinstance(sock, usdp.SdpSocket)
                try:
                    chunk = sock.recv(4096)
                except BlockingIOError:
                    continue
                assert chunk, "EOF before the echo"
                key.data.extend(chunk)
                if len(key.data) >= len(want[sock]):
                    assert bytes(key.data) == want[sock]
                    sel.unregister(sock)
                    pending.discard(sock)
        sel.close()
        assert not pending, f"{len(pending)} echoes missing"
        assert loop.echoed >= CONNS
        t_echo = time.monotonic() - t0 - t_connect

        fds = _open_fds() - fds0
        regs = [s.stats()["registered_bytes"] for s in clients + loop.conns]
        per_conn_fds = fds / CONNS  # both ends of a connection live in this process
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
        print(f"\n{CONNS} connections, both ends in one process: connect {t_connect:.1f} s, "
              f"all echo {t_echo:.1f} s; fds: {fds} ({per_conn_fds:.1f} per connection, "
              f"both ends, readiness fds included); registered per endpoint: "
              f"max {max(regs)} B, mean {sum(regs) / len(regs):.0f} B, total "
              f"{sum(regs) / 2**20:.0f} MiB; max RSS {rss / 1024:.0f} MiB")
        assert max(regs) <= IDLE_LIMIT
        assert per_conn_fds <= 12  # 2 ends x (2 CQ channels + CM channel + readiness)
    finally:
        for c in clients:
            c.setblocking(True)
            c.settimeout(TIMEOUT)
            c.shutdown(usdp.SHUT_WR)
        deadline = time.monotonic() + 10 * TIMEOUT
        while loop.closed < len(loop.conns) and time.monotonic() < deadline \
                and not loop.errors:
            time.sleep(0.05)
        closed_by_server = loop.closed
        for c in clients:
            c.close()
        loop.stop()
        lst.close()
    assert not loop.errors, loop.errors
    assert closed_by_server == CONNS  # every server end saw EOF: a clean close
    print(f"{CONNS} connections: total {time.monotonic() - t0:.1f} s")
