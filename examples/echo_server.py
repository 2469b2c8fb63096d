"""Echo server over usdp: every byte a client sends comes back.

    python examples/echo_server.py HOST PORT [--count N]
"""

from __future__ import annotations

import argparse
import logging
import threading

import usdp


def serve_client(conn: usdp.SdpSocket, addr: tuple[str, int]) -> None:
    with conn:
        buf = bytearray(1 << 20)
        total = 0
        while n := conn.recv_into(buf):
            conn.sendall(memoryview(buf)[:n])
            total += n
    logging.info("%s:%d done, %d bytes echoed", addr[0], addr[1], total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--count", type=int, default=0, help="exit after N clients (0: never)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="server: %(message)s")
    with usdp.socket() as srv:
        srv.bind((args.host, args.port))
        srv.listen()
        logging.info("listening on %s:%d", *srv.getsockname())
        threads = []
        served = 0
        while not args.count or served < args.count:
            conn, addr = srv.accept()
            served += 1
            t = threading.Thread(target=serve_client, args=(conn, addr))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()


if __name__ == "__main__":
    main()
