"""Keepalive: a silent peer behind a dead link is detected, not waited on forever."""

from __future__ import annotations

import socket as stdsocket
import time

import pytest

import usdp
from tests.rxe.conftest import HostB
from usdptools.testbed import rxe


def test_keepalive_probes_a_live_idle_peer_without_breaking_it(host_a: str, port: int) -> None:
    """One host: an idle connection with keepalive on stays up through many probes."""
    from tests.rxe.helpers import client, recv_exactly, server

    def late_echo(conn: usdp.SdpSocket) -> None:
        assert conn.recv(5) == b"hello"
        conn.sendall(b"world")

    opts = usdp.Options(keepalive=0.3)
    with server(host_a, port, late_echo, options=opts) as errors, \
            client(host_a, port, opts) as s:
        s.settimeout(2.0)  # several probe intervals of silence
        with pytest.raises(TimeoutError):
            s.recv(1)
        s.settimeout(30)
        s.sendall(b"hello")
        assert recv_exactly(s, 5) == b"world"
        assert s.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_KEEPALIVE) == 1
    assert not errors, errors


@pytest.mark.twohost
def test_link_down_is_detected_by_keepalive(host_b: HostB, port: int, host_a: str) -> None:
    pid = host_b.spawn([".venv/bin/python", "tests/rxe/peer_idle.py", host_b.addr, str(port)])
    deadline = time.monotonic() + 120
    s = usdp.SdpSocket()
    s.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_KEEPALIVE, 1)
    s.settimeout(30)
    while True:  # host B's listener may not be up yet (bounded)
        try:
            s.connect((host_b.addr, port))
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            time.sleep(0.2)  # waiting for a process on another VM to listen
    # Host A's side of the link goes down: everything A sends is lost. (Only here: the
    # agent that would set B's side talks over this very link.)
    rxe.netem("eth0", {"loss": 100})
    try:
        t0 = time.monotonic()
        s.settimeout(60)
        with pytest.raises(OSError) as info:
            s.recv(1)
        detect = time.monotonic() - t0
    finally:
        rxe.netem("eth0", None)
    print(f"\nlink down detected after {detect:.1f} s: {info.value!r}")
    assert isinstance(info.value, ConnectionResetError)  # a dead peer reads as a reset
    assert "no acknowledgement" in str(info.value)
    assert detect < 15  # 2 s of silence + 5 s ack_timeout, with room for the emulated CPU
    s.close()
    host_b.kill(pid)
    host_b.wait(pid, 30)
    # Back up: a new connection works.
    pid2 = host_b.spawn([".venv/bin/python", "tests/rxe/peer_idle.py", host_b.addr,
                         str(port + 1)])
    deadline = time.monotonic() + 120
    while True:
        try:
            s2 = usdp.create_connection((host_b.addr, port + 1), timeout=30)
            break
        except ConnectionRefusedError:
            assert time.monotonic() < deadline
            time.sleep(0.2)  # as above
    s2.sendall(b"x")
    s2.close()
    res = host_b.wait(pid2, 60)
    assert res["rc"] == 0, res
