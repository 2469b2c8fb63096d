"""dask.distributed over ``usdp://`` against ``tcp://``, in one run on the same hosts.

For each protocol the same cluster is started through dask's own CLIs: a scheduler and
worker 1 on host A, worker 2 on host A (``--hosts 1``) or on host B through its agent
(``--hosts 2``, so worker-to-worker traffic crosses the link). The client is this process.

Measurements (median of ``--repeat``):

* **move 64 MiB**: a 64 MiB array made on worker 1 is needed by a task pinned to worker
  2; the time from submit to result (worker 2 fetches it from worker 1).
* **shuffle**: a 2048 x 2048 float64 array (32 MiB) in row blocks, persisted across both
  workers, rechunked to column blocks (an all-to-all exchange of 8 x 8 pieces).

Run through ``scripts/bench --dask [--hosts 2]``; in the emulated VM absolute times mean
nothing, the ratio within one run does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PROTOCOLS = ("tcp", "usdp")
MOVE_BYTES = 64 * 1024 * 1024
SHUFFLE_N = 2048
SHUFFLE_BLOCKS = 8
TIMEOUT = 600.0
DASK = str(Path(sys.executable).with_name("dask"))
ENV = {"DASK_LOGGING__DISTRIBUTED": "warning",
       "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "120s"}


def _wait_listening(proto: str, host: str, port: int) -> None:
    """A Client started before the scheduler listens backs off for tens of seconds."""
    import socket

    import usdp

    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        try:
            # Any listener answers a plain TCP connect on tcp://; usdp:// needs RDMA CM.
            s: Any = usdp.create_connection((host, port), timeout=10) \
                if proto == "usdp" else socket.create_connection((host, port), 10)
            s.close()
            return
        except OSError:
            time.sleep(0.5)  # the scheduler is another process still starting up
    raise TimeoutError(f"no scheduler listening on {host}:{port}")


class _Cluster:
    """Scheduler + 2 workers of one protocol, started with dask's CLIs."""

    def __init__(self, proto: str, hosts: int, addr_a: str, addr_b: str, logdir: Path,
                 port: int) -> None:
        self.proto, self.hosts, self.addr_a, self.addr_b = proto, hosts, addr_a, addr_b
        self.logdir, self.port = logdir, port
        self.local: list[subprocess.Popen[bytes]] = []
        self.remote: list[int] = []
        self.agent: Any = None

    @property
    def address(self) -> str:
        return f"{self.proto}://{self.addr_a}:{self.port}"

    def _local(self, name: str, *args: str) -> None:
        log = open(self.logdir / f"dask-{self.proto}-{name}.log", "wb")  # noqa: SIM115
        self.local.append(subprocess.Popen(
            [DASK, *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **ENV}))
        log.close()

    def _worker_args(self, host: str, name: str) -> list[str]:
        return ["worker", self.address, "--host", host, "--name", name, "--nthreads", "1",
                "--no-nanny", "--memory-limit", "0", "--no-dashboard"]

    def start(self) -> None:
        self._local("scheduler", "scheduler", "--protocol", self.proto, "--host",
                    self.addr_a, "--port", str(self.port), "--no-dashboard")
        self._local("w1", *self._worker_args(self.addr_a, "w1"))
        if self.hosts == 2:
            from usdptools.testbed.agent import AgentClient

            self.agent = AgentClient(self.addr_b)
            log = f"{self.logdir}/dask-{self.proto}-w2-b.log"
            cmd = " ".join([DASK, *self._worker_args(self.addr_b, "w2")])
            self.remote.append(self.agent.spawn(["sh", "-c", f"exec {cmd} >{log} 2>&1"],
                                                ENV))
        else:
            self._local("w2", *self._worker_args(self.addr_a, "w2"))

    def stop(self) -> None:
        for pid in self.remote:
            self.agent.kill(pid, signal.SIGTERM)
            if self.agent.wait(pid, 60)["rc"] is None:
                self.agent.kill(pid)
                self.agent.wait(pid, 60)
        if self.agent is not None:
            self.agent.close()
        for p in self.local:
            p.send_signal(signal.SIGTERM)
        for p in self.local:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(60)


@contextmanager
def _cluster(proto: str, cfg: argparse.Namespace, port: int) -> Iterator[Any]:
    from distributed import Client

    cl = _Cluster(proto, cfg.hosts, cfg.addr_a, cfg.addr_b, cfg.out, port)
    cl.start()
    try:
        _wait_listening(proto, cfg.addr_a, port)
        with Client(cl.address, timeout=TIMEOUT) as c:
            c.wait_for_workers(2, timeout=TIMEOUT)
            yield c
    finally:
        cl.stop()


def _workers(c: Any) -> tuple[str, str]:
    by_name = {info["name"]: a for a, info in c.scheduler_info()["workers"].items()}
    return by_name["w1"], by_name["w2"]


def _move(c: Any, i: int) -> float:
    """Seconds for worker 2 to get a 64 MiB array that lives on worker 1 (and use it)."""
    import numpy as np
    from distributed import wait

    w1, w2 = _workers(c)
    x = c.submit(np.full, MOVE_BYTES // 8, float(i), workers=[w1], pure=False)
    wait(x, timeout=TIMEOUT)
    t0 = time.perf_counter()
    n = c.submit(lambda a: float(a[-1]) + a.nbytes, x, workers=[w2], pure=False) \
        .result(timeout=TIMEOUT)
    dt = time.perf_counter() - t0
    assert n == float(i) + MOVE_BYTES, n
    return dt


def _shuffle(c: Any, i: int) -> float:
    """Seconds to rechunk row blocks into column blocks across both workers."""
    import dask.array as da
    from distributed import wait

    blk = SHUFFLE_N // SHUFFLE_BLOCKS
    x = da.random.default_rng(i).random((SHUFFLE_N, SHUFFLE_N), chunks=(blk, SHUFFLE_N))
    x = x.persist()
    wait(x, timeout=TIMEOUT)
    t0 = time.perf_counter()
    y = x.rechunk((SHUFFLE_N, blk)).persist()
    wait(y, timeout=TIMEOUT)
    dt = time.perf_counter() - t0
    assert y.numblocks == (1, SHUFFLE_BLOCKS)
    del x, y
    return dt


def _measure(c: Any, fn: Callable[[Any, int], float], repeat: int) -> list[float]:
    fn(c, 0)  # warm-up: connections between the workers, code on both
    return [fn(c, i + 1) for i in range(repeat)]


def run(cfg: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, dict[str, list[float]]] = {}
    for k, proto in enumerate(PROTOCOLS):
        print(f"[dask-bench] {proto}://: starting the cluster", file=sys.stderr, flush=True)
        with _cluster(proto, cfg, cfg.port + k) as c:
            results[proto] = {"move 64 MiB": _measure(c, _move, cfg.repeat),
                              f"shuffle {SHUFFLE_N}x{SHUFFLE_N} f64": _measure(
                                  c, _shuffle, cfg.repeat)}
        print(f"[dask-bench] {proto}://: {results[proto]}", file=sys.stderr, flush=True)
    return {"hosts": cfg.hosts, "repeat": cfg.repeat, "seconds": results}


def table(res: dict[str, Any]) -> str:
    """Markdown: median seconds per protocol and usdp's speed relative to tcp."""
    secs = res["seconds"]
    place = ("scheduler + worker 1 on host A, worker 2 on host B" if res["hosts"] == 2
             else "scheduler and both workers on one host (tcp:// over loopback)")
    lines = [f"dask.distributed, {place}; median of {res['repeat']} (seconds)", "",
             "| measurement | tcp:// | usdp:// | usdp speed / tcp |",
             "|---|---:|---:|---:|"]
    for name in secs["tcp"]:
        t, u = statistics.median(secs["tcp"][name]), statistics.median(secs["usdp"][name])
        lines.append(f"| {name} | {t:.2f} | {u:.2f} | {t / u:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m usdptools.bench --dask",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, choices=[1, 2],
                    default=int(os.environ.get("USDP_HOSTS", "1")))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--port", type=int, default=28786, help="scheduler port (tcp), +1 usdp")
    ap.add_argument("--out", type=Path, help="results folder (default results/dask-<time>)")
    ap.add_argument("--quick", action="store_true", help="one repetition")
    args, _ = ap.parse_known_args(argv)  # the main bench's other options do not apply
    if args.quick:
        args.repeat = 1
    args.out = (args.out or Path("results") / time.strftime("dask-%Y%m%d-%H%M%S")).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.addr_a = os.environ.get("USDP_HOST_A", "198.18.0.1")
    args.addr_b = os.environ.get("USDP_HOST_B", "198.18.0.2")
    res = run(args)
    md = table(res)
    (args.out / "dask.json").write_text(json.dumps(res, indent=2))
    (args.out / "dask.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
