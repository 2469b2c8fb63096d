"""Shared helpers of the rxe tests (test modules do not import each other): a threaded
listener, an echo handler, a connected client, exact reads."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import usdp

TIMEOUT = 60.0


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
