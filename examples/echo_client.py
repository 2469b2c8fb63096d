"""Echo client over usdp: sends COUNT messages of SIZE bytes, checks every byte that
comes back, and prints throughput and round-trip latency percentiles.

    python examples/echo_client.py HOST PORT [--size B] [--count N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time

import usdp


def connect(host: str, port: int, timeout: float) -> usdp.SdpSocket:
    """Connect, retrying while the server is not listening yet (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return usdp.create_connection((host, port), timeout=30)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # the server process is still starting


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("host")
    ap.add_argument("port", type=int)
    ap.add_argument("--size", type=int, default=65536)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--connect-timeout", type=float, default=10.0)
    args = ap.parse_args()
    payload = os.urandom(args.size)
    back = bytearray(args.size)
    rtts = []
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    with connect(args.host, args.port, args.connect_timeout) as s:
        t0 = time.perf_counter()
        for i in range(args.count):
            t = time.perf_counter()
            s.sendall(payload)
            sent_hash.update(payload)
            got = 0
            view = memoryview(back)
            while got < args.size:
                n = s.recv_into(view[got:])
                if n == 0:
                    print(f"echo_client: EOF after {i} messages", file=sys.stderr)
                    return 1
                got += n
            rtts.append(time.perf_counter() - t)
            recv_hash.update(back)
            if back != payload:
                print(f"echo_client: message {i} differs", file=sys.stderr)
                return 1
            if args.count >= 10 and (i + 1) % max(1, args.count // 10) == 0:
                print(f"  {i + 1}/{args.count} messages", file=sys.stderr, flush=True)
        elapsed = time.perf_counter() - t0
        stats = s.stats()
        s.shutdown(usdp.SHUT_WR)
        assert s.recv(1) == b""
    if sent_hash.digest() != recv_hash.digest():
        print("echo_client: checksum mismatch", file=sys.stderr)
        return 1
    q = statistics.quantiles(rtts, n=100) if len(rtts) >= 2 else [rtts[0]] * 99
    mb = 2 * args.size * args.count / elapsed / 1e6
    print(f"echo: {args.count} x {args.size} B verified (sha256 {sent_hash.hexdigest()[:16]})")
    print(f"throughput {mb:.1f} MB/s (both directions), {args.count / elapsed:.0f} msg/s")
    print(f"round trip p50 {q[49] * 1e6:.0f} us, p90 {q[89] * 1e6:.0f} us, "
          f"p99 {q[98] * 1e6:.0f} us")
    print(f"completion-channel events {stats['channel_events']}, deferred "
          f"{stats['drains_deferred']}, credit stalls {stats['credit_stalls']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
