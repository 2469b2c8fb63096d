"""Host B's side of the two-host fault tests: one usdp connection, a stream each way at once.

``python tests/rxe/peer_stream.py stream ADDR PORT NBYTES SEED_OUT SEED_IN`` listens on
ADDR:PORT, accepts one connection, sends NBYTES of ``stream(SEED_OUT)`` while it reads until
EOF, then prints one JSON line: the SHA-256 of what it received, whether that equals
``stream(SEED_IN, NBYTES)``, byte counts and seconds. NBYTES=0 means "send until killed"
(the SIGKILL test).

``python tests/rxe/peer_stream.py accept ADDR PORT BACKLOG`` echoes one message on every
connection (a thread each) until a connection sends ``quit``, then prints JSON counts (the
connection-storm test). Every wait is bounded by a socket timeout.
"""

from __future__ import annotations

import hashlib
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import usdp

BLOCK = 1 << 20
TIMEOUT = 60.0


def stream(seed: int, nbytes: int) -> Iterator[bytes]:
    """``nbytes`` of a reproducible stream: one random MiB, each copy stamped with its
    index (so a lost, repeated or reordered block changes the digest); endless if 0."""
    base = bytes(((seed * 2654435761 + i * 40503) >> 7) & 0xFF for i in range(256)) * (BLOCK // 256)
    i = 0
    left = nbytes
    while nbytes == 0 or left > 0:
        block = i.to_bytes(8, "big") + seed.to_bytes(8, "big") + base[16:]
        n = BLOCK if nbytes == 0 else min(BLOCK, left)
        yield block[:n]
        left -= n
        i += 1


def stream_sha(seed: int, nbytes: int) -> str:
    h = hashlib.sha256()
    for b in stream(seed, nbytes):
        h.update(b)
    return h.hexdigest()


def pump(sock: usdp.SdpSocket, seed: int, nbytes: int, out: dict[str, object]) -> None:
    """Send the stream, then half-close; records bytes sent and any error."""
    sent = 0
    try:
        for b in stream(seed, nbytes):
            sock.sendall(b)
            sent += len(b)
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        out["send_error"] = f"{type(exc).__name__}: {exc}"
    out["sent"] = sent


def drain(sock: usdp.SdpSocket, out: dict[str, object]) -> None:
    """Read until EOF; records the digest, byte count and any error."""
    h = hashlib.sha256()
    buf = bytearray(4 << 20)
    n = got = 0
    try:
        while n := sock.recv_into(buf):
            h.update(memoryview(buf)[:n])
            got += n
    except OSError as exc:
        out["recv_error"] = f"{type(exc).__name__}: {exc}"
    out["received"], out["rx_sha"] = got, h.hexdigest()


SMALL = usdp.Options(recv_bufs=4, recv_buf_size=4096, send_bufs=4)  # for connection storms


def accept_many(addr: str, port: int, backlog: int) -> dict[str, object]:
    lst = usdp.SdpSocket(options=SMALL)
    lst.bind((addr, port))
    lst.listen(backlog)
    print("listening", flush=True)
    out: dict[str, object] = {"served": 0, "errors": []}
    errors: list[str] = []
    lock = threading.Lock()
    threads = []
    stop = threading.Event()

    def serve(c: usdp.SdpSocket) -> None:
        try:
            with c:
                c.settimeout(TIMEOUT)
                msg = c.recv(4096)
                c.sendall(msg)
                if msg == b"quit":
                    stop.set()
                with lock:
                    out["served"] = int(str(out["served"])) + 1
        except OSError as exc:
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")

    deadline = time.monotonic() + 5 * TIMEOUT
    lst.settimeout(0.5)  # so the loop sees ``stop`` soon after the quit message
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            c, _ = lst.accept()
        except TimeoutError:
            continue
        t = threading.Thread(target=serve, args=(c,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(TIMEOUT)
    lst.close()
    out["errors"] = errors
    return out


def main() -> int:
    if sys.argv[1] == "accept":
        print(json.dumps(accept_many(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))),
              flush=True)
        return 0
    addr, port, nbytes, seed_out, seed_in = (sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                             int(sys.argv[5]), int(sys.argv[6]))
    lst = usdp.SdpSocket()
    lst.bind((addr, port))
    lst.listen(4)
    lst.settimeout(TIMEOUT)
    print("listening", flush=True)
    conn, _ = lst.accept()
    conn.settimeout(TIMEOUT)
    t0 = time.monotonic()
    out: dict[str, object] = {}
    sender = threading.Thread(target=pump, args=(conn, seed_out, nbytes, out))
    sender.start()
    drain(conn, out)
    sender.join(TIMEOUT * 2)
    out["secs"] = time.monotonic() - t0
    out["rx_ok"] = nbytes > 0 and out["rx_sha"] == stream_sha(seed_in, nbytes)
    conn.close()
    lst.close()
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
