"""The progress engine on rxe: the owner polls, sleeps on the fds, corks; nothing is lost.

What must always hold, whatever the load: every byte arrives in order, an idle
connection sleeps (armed, almost no CPU), a corked send goes out without a later call,
concurrent senders and readers on one socket do not lose wake-ups. How *well* the engine
does (round trips, events per frame) is measured by ``scripts/bench``, not here.
"""

from __future__ import annotations

import hashlib
import os
import random
import resource
import socket as stdsocket
import threading
import time

import pytest

import usdp
from tests.rxe.helpers import TIMEOUT, client, echo, recv_exactly, server, wait_for

pytestmark = pytest.mark.rxe


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def test_ping_pong_many_round_trips_exact(host_a: str, port: int) -> None:
    """Small request/response: every reply exact; the waits are served by the caller's
    own polling or sleep on the fds (counted), never by the completion thread's drain."""
    with server(host_a, port, echo) as errors, client(host_a, port) as s:
        for i in range(2000):
            msg = i.to_bytes(4, "big") * 16  # 64 bytes
            s.sendall(msg)
            assert recv_exactly(s, len(msg)) == msg
        st = s.stats()
    assert not errors, errors
    assert st["busy_polls"] + st["sleeps"] >= 1, st
    assert st["bytes_in"] == st["bytes_out"] == 2000 * 64


def test_idle_connection_is_armed_and_costs_no_cpu(host_a: str, port: int) -> None:
    """A reader blocked for 10 s on an idle connection sleeps: its CQs are armed by then
    and the process spends a small fraction of the 10 s on the CPU (busy-polling, were
    it not bounded, would spend all of it)."""
    hold = threading.Event()

    def idle_then_echo(conn: usdp.SdpSocket) -> None:
        assert hold.wait(TIMEOUT)
        conn.sendall(b"late")

    with server(host_a, port, idle_then_echo) as errors, client(host_a, port) as s:
        ep = s._ep
        assert ep is not None
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(s.recv(10)))
        cpu0, t0 = _cpu(), time.monotonic()
        reader.start()
        wait_for(lambda: ep.engine.armed_recv, "the receive CQ to be armed")
        time.sleep(10)  # the measured idle period, not a synchronisation
        cpu, wall = _cpu() - cpu0, time.monotonic() - t0
        assert reader.is_alive()
        hold.set()
        reader.join(TIMEOUT)
        assert got == [b"late"]
        st = s.stats()
    assert not errors, errors
    print(f"\nidle 10 s: {cpu:.3f} CPU s over {wall:.1f} s; stats {st['sleeps']} sleeps")
    assert cpu < 0.25 * wall, (cpu, wall)
    assert st["sleeps"] >= 1


def test_corked_small_sends_arrive_without_a_later_call(host_a: str, port: int) -> None:
    """Small sends behind an in-flight signaled send are corked; with no later call on
    the socket (the sender just waits elsewhere), the cork still goes out."""
    count, size = 3000, 37
    data = os.urandom(count * size)
    got = bytearray()
    done = threading.Event()

    def reader(conn: usdp.SdpSocket) -> None:
        while len(got) < len(data):
            chunk = conn.recv(1 << 16)
            assert chunk
            got.extend(chunk)
        done.set()

    with server(host_a, port, reader) as errors, client(host_a, port) as s:
        for i in range(count):
            s.sendall(data[i * size : (i + 1) * size])
        assert done.wait(TIMEOUT), f"{len(got)} of {len(data)} bytes arrived"
        st = s.stats()
    assert not errors, errors
    assert bytes(got) == data
    assert st["frames_out"] <= count, st


def test_nodelay_sends_every_small_send_as_its_own_frame(host_a: str, port: int) -> None:
    """TCP_NODELAY turns auto-cork off: each small send is posted as it comes (frames
    out at least the number of sends, credits permitting), and the stream is exact. Three
    sends per round trip: the peer's ring starts with 4 slots (it grows with use), and
    out of credits a send is corked, nodelay or not."""
    count, size = 300, 10
    data = os.urandom(count * size)
    with server(host_a, port, echo) as errors, client(host_a, port) as s:
        s.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
        assert s.getsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY) == 1
        for i in range(count):
            s.sendall(data[i * size : (i + 1) * size])
            if i % 3 == 2:  # keep the window open: read the echo so far
                assert recv_exactly(s, 3 * size) == data[(i - 2) * size : (i + 1) * size]
        st = s.stats()
    assert not errors, errors
    assert st["staged_frames"] == 0, st  # no cork was ever posted: nothing was corked


def test_mixed_size_streams_full_duplex_from_several_threads(host_a: str, port: int) -> None:
    """Three connections, each with a sender thread and a reader thread on the same
    client socket (an owner and a sleeper interleaving), messages of mixed sizes echoed
    back: every byte, in order, on every connection."""
    conns = 3
    rng = random.Random(7)
    payloads = []
    for _ in range(conns):
        sizes = [rng.choice([1, 7, 64, 1000, 4096, 65519, 65520, 65521, 200_000])
                 for _ in range(60)]
        payloads.append(b"".join(os.urandom(n) for n in sizes))
    errors_c: list[BaseException] = []
    digests: dict[int, str] = {}

    def one(idx: int) -> None:
        try:
            s = client(host_a, port)
            data = payloads[idx]
            h = hashlib.sha256()

            def read() -> None:
                left = len(data)
                buf = bytearray(70_000)
                while left:
                    n = s.recv_into(buf, min(left, len(buf)))
                    assert n
                    h.update(memoryview(buf)[:n])
                    left -= n

            rt = threading.Thread(target=read)
            rt.start()
            pos = 0
            r = random.Random(idx)
            while pos < len(data):
                n = r.choice([1, 100, 5000, 65520, 300_000])
                s.sendall(data[pos : pos + n])
                pos += n
            rt.join(TIMEOUT * 2)
            assert not rt.is_alive()
            digests[idx] = h.hexdigest()
            s.close()
        except BaseException as exc:
            errors_c.append(exc)

    with server(host_a, port, echo, count=conns) as errors:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 3)
    assert not errors, errors
    assert not errors_c, errors_c
    for i in range(conns):
        assert digests[i] == hashlib.sha256(payloads[i]).hexdigest(), i


def test_busy_poll_option_and_sockopt(host_a: str, port: int) -> None:
    """SO_BUSY_POLL (microseconds) sets the spin bound; 0 never spins, and the stream
    still works (every wait sleeps on the fds)."""
    so_busy_poll = getattr(stdsocket, "SO_BUSY_POLL", 46)
    with server(host_a, port, echo) as errors, client(host_a, port) as s:
        s.setsockopt(stdsocket.SOL_SOCKET, so_busy_poll, 0)
        assert s.getsockopt(stdsocket.SOL_SOCKET, so_busy_poll) == 0
        for i in range(200):
            msg = bytes([i % 256]) * 100
            s.sendall(msg)
            assert recv_exactly(s, 100) == msg
        st = s.stats()
    assert not errors, errors
    assert st["busy_polls"] == 0 or st["sleeps"] > 0, st


def test_no_deferral_keeps_the_first_engine(host_a: str, port: int) -> None:
    """Options(defer=False): users never poll; the completion thread drains every event
    (the baseline the bench compares with). The stream is exact and nothing is deferred."""
    opts = usdp.Options(defer=False)
    data = os.urandom(3 << 20)
    with server(host_a, port, echo, options=opts) as errors, client(host_a, port, opts) as s:
        got = bytearray()

        def read() -> None:
            while len(got) < len(data):
                chunk = s.recv(1 << 20)
                assert chunk
                got.extend(chunk)

        rt = threading.Thread(target=read)
        rt.start()
        s.sendall(data)
        rt.join(TIMEOUT * 2)
        st = s.stats()
    assert not errors, errors
    assert bytes(got) == data
    assert st["busy_polls"] == 0 and st["sleeps"] == 0 and st["drains_deferred"] == 0, st
    assert st["channel_events"] > 0, st


def test_graceful_close_is_eof_never_a_reset(host_a: str, port: int) -> None:
    """The peer's DISCONN precedes its CM disconnect; whichever the engine sees first, the
    reader gets every byte and then EOF (a drain of one CQ once judged the disconnect
    before the DISCONN it had not polled yet, and reported a reset)."""
    rounds = 40
    payload = os.urandom(3000)

    def reply_then_close(conn: usdp.SdpSocket) -> None:
        got = bytearray()
        while chunk := conn.recv(65536):
            got.extend(chunk)
        conn.sendall(hashlib.sha256(got).digest())

    with server(host_a, port, reply_then_close, count=rounds) as errors:
        for _ in range(rounds):
            with client(host_a, port) as s:
                for i in range(0, len(payload), 100):
                    s.sendall(payload[i : i + 100])
                s.shutdown(stdsocket.SHUT_WR)
                assert recv_exactly(s, 32) == hashlib.sha256(payload).digest()
                assert s.recv(10) == b""  # EOF, not ConnectionResetError
    assert not errors, errors


def test_shutdown_with_corked_bytes_sends_them_then_eof(host_a: str, port: int) -> None:
    """Issue 11 item 3: with the peer's window full and bytes corked (staged),
    shutdown(SHUT_WR) returns at once, and once the peer reads it gets every byte and
    then EOF; the reply it sends afterwards arrives (a half-close protocol works)."""
    go = threading.Event()
    data = os.urandom(80 * 20_000)

    def read_all_then_reply(conn: usdp.SdpSocket) -> None:
        assert go.wait(TIMEOUT)
        got = bytearray()
        while chunk := conn.recv(1 << 20):
            got.extend(chunk)
        conn.sendall(hashlib.sha256(got).digest())

    with server(host_a, port, read_all_then_reply) as errors, client(host_a, port) as s:
        s.setblocking(False)
        taken = 0
        while taken < len(data):
            try:
                taken += s.send(data[taken : taken + 80])
            except BlockingIOError:
                break  # the window is full and the cork too
        assert taken < len(data), "the peer's window never filled"
        st = s.stats()
        t0 = time.monotonic()
        s.shutdown(stdsocket.SHUT_WR)
        returned_in = time.monotonic() - t0
        with pytest.raises(BrokenPipeError):
            s.send(b"x")
        go.set()
        s.settimeout(TIMEOUT)
        assert recv_exactly(s, 32) == hashlib.sha256(data[:taken]).digest()
    assert not errors, errors
    print(f"\nshutdown returned in {returned_in * 1000:.1f} ms with {taken} bytes taken; "
          f"{st['staged_frames']} corked frames before it")
