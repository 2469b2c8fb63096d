"""Sweep the receive-ring shape (slots x slot size) on one rxe link, in one run.

Streams the same amount of data one way for each shape, in interleaved rounds so that
drift of a shared, emulated machine hits every shape alike, and prints throughput as a
ratio to the best shape. Run it where an rxe device is (``scripts/rxe-vm -- .venv/bin/python
experiments/sweep_buffers.py``); absolute MB/s there mean nothing, ratios do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import usdp

SHAPES = [(8, 8192), (16, 16384), (32, 16384), (16, 32768), (32, 32768), (64, 32768),
          (16, 65536), (32, 65536), (8, 131072)]


def stream(host: str, port: int, opts: usdp.Options, nbytes: int) -> float:
    """Seconds to move ``nbytes`` one way (connection set-up excluded)."""
    lst = usdp.SdpSocket(options=opts)
    lst.bind((host, port))
    lst.listen()
    done = threading.Event()
    got = [0]

    def sink() -> None:
        conn, _ = lst.accept()
        buf = bytearray(1 << 20)
        with conn:
            while n := conn.recv_into(buf):
                got[0] += n
        done.set()

    t = threading.Thread(target=sink)
    t.start()
    chunk = os.urandom(1 << 20)
    with usdp.SdpSocket(options=opts) as s:
        s.settimeout(120)
        s.connect((host, port))
        t0 = time.perf_counter()
        sent = 0
        while sent < nbytes:
            s.sendall(chunk)
            sent += len(chunk)
    assert done.wait(120)
    elapsed = time.perf_counter() - t0
    t.join(10)
    lst.close()
    assert got[0] == nbytes, (got[0], nbytes)
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default=os.environ.get("USDP_HOST_A", "198.18.0.1"))
    ap.add_argument("--mib", type=int, default=24, help="MiB per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    times: dict[tuple[int, int], list[float]] = {s: [] for s in SHAPES}
    port = 21000
    for r in range(args.rounds):
        for shape in SHAPES:
            opts = usdp.Options(recv_bufs=shape[0], recv_buf_size=shape[1], send_bufs=16)
            port += 1
            times[shape].append(stream(args.host, port, opts, args.mib << 20))
            print(f"round {r + 1}/{args.rounds} {shape[0]:3d} x {shape[1] // 1024:3d} KiB: "
                  f"{args.mib / times[shape][-1]:.1f} MiB/s", file=sys.stderr, flush=True)
    rates = {s: args.mib / statistics.median(t) for s, t in times.items()}
    best = max(rates.values())
    print(f"\n| slots x size | window | memory/conn (recv+send) | MiB/s (median of "
          f"{args.rounds}) | ratio to best |")
    print("|---|---:|---:|---:|---:|")
    for (n, size), rate in rates.items():
        mem = (n + 16) * size
        print(f"| {n} x {size // 1024} KiB | {n * size // 1024} KiB | {mem // 1024} KiB | "
              f"{rate:.1f} | {rate / best:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
