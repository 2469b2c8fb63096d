"""Host B's side of the keepalive test: accept one usdp connection and wait on it.

    python tests/rxe/peer_idle.py ADDR PORT
Prints "accepted" when the connection is up, then blocks in recv until EOF or an error.
"""

from __future__ import annotations

import sys

import usdp


def main() -> int:
    lst = usdp.SdpSocket()
    lst.bind((sys.argv[1], int(sys.argv[2])))
    lst.listen()
    conn, _ = lst.accept()
    print("accepted", flush=True)
    try:
        conn.recv(1)
    except OSError as exc:
        print(f"peer: {exc!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
