"""Shared helpers of the rxe tests: a threaded listener, an echo handler, a connected
client, exact reads, bounded polling waits, a connect to host B that waits for its
listener."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, TypeVar

import usdp

if TYPE_CHECKING:
    from tests.rxe.conftest import HostB

TIMEOUT = 60.0
_T = TypeVar("_T")


@contextmanager
def server(host: str, port: int, handler: Callable[[usdp.SdpSocket], None], count: int = 1,
           options: usdp.Options | None = None) -> Iterator[list[BaseException]]:
    """A listener that runs ``handler(conn)`` in a thread per accepted connection."""
    errors: list[BaseException] = []
    lst = usdp.SdpSocket(options=options)
    lst.bind((host, port))
    lst.listen()
    threads: list[threading.Thread] = []

    def run(conn: usdp.SdpSocket) -> None:
        try:
            with conn:
                handler(conn)
        except BaseException as exc:
            errors.append(exc)

    def acceptor() -> None:
        try:
            for _ in range(count):
                conn, _addr = lst.accept()
                t = threading.Thread(target=run, args=(conn,))
                t.start()
                threads.append(t)
        except BaseException as exc:
            errors.append(exc)

    at = threading.Thread(target=acceptor)
    at.start()
    try:
        yield errors
    finally:
        at.join(TIMEOUT)
        for t in threads:
            t.join(TIMEOUT)
        lst.close()
    assert not at.is_alive()
    assert all(not t.is_alive() for t in threads)


def echo(conn: usdp.SdpSocket) -> None:
    buf = bytearray(256 * 1024)
    while n := conn.recv_into(buf):
        conn.sendall(memoryview(buf)[:n])


def recv_exactly(s: usdp.SdpSocket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return bytes(out)


def client(host: str, port: int, options: usdp.Options | None = None) -> usdp.SdpSocket:
    s = usdp.SdpSocket(options=options)
    s.settimeout(TIMEOUT)
    s.connect((host, port))
    return s


def wait_for(cond: Callable[[], object], what: str, timeout: float = TIMEOUT,
             interval: float = 0.01) -> None:
    """Poll ``cond`` until true (state that has no event to wait on), bounded by
    ``timeout``; the interval only paces the polls."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)


def settled(read: Callable[[], _T], interval: float, deadline: float) -> _T:
    """``read()`` once three readings ``interval`` apart agree, bounded by ``deadline``
    seconds; the last reading either way (the caller's comparison then tells)."""
    end = time.monotonic() + deadline
    last, same = read(), 0
    while same < 2 and time.monotonic() < end:
        threading.Event().wait(interval)
        now = read()
        same, last = (same + 1 if now == last else 0), now
    return last


def connect_b(host_b: HostB, port: int, options: usdp.Options | None = None,
              bound: float = 60.0) -> usdp.SdpSocket:
    """Connect to host B's listener, retrying (bounded) while its process starts."""
    deadline = time.monotonic() + bound
    while True:
        s = usdp.SdpSocket(options=options)
        s.settimeout(30)
        try:
            s.connect((host_b.addr, port))
            return s
        except ConnectionRefusedError:
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # pacing retries while another VM's process comes up
