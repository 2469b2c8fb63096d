"""Host B's side of the keepalive and probe tests: accept one usdp connection and wait.

    python tests/rxe/peer_idle.py ADDR PORT          # block in recv until EOF or an error
    python tests/rxe/peer_idle.py ADDR PORT hold S   # never read; exit after S seconds

Prints "accepted" when the connection is up. ``hold`` is the program that stopped reading
(its receive ring fills, the sender runs out of credits); the test kills it, ``S`` only
bounds its life if the test cannot.
"""

from __future__ import annotations

import sys
import threading

import usdp


def main() -> int:
    lst = usdp.SdpSocket()
    lst.bind((sys.argv[1], int(sys.argv[2])))
    lst.listen()
    conn, _ = lst.accept()
    print("accepted", flush=True)
    if sys.argv[3:4] == ["hold"]:
        threading.Event().wait(float(sys.argv[4]))  # never reads; killed by the test
        return 0
    try:
        conn.recv(1)
    except OSError as exc:
        print(f"peer: {exc!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
