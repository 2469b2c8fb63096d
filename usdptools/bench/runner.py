"""``python -m usdptools.bench``: every contender, every size, one run, one rxe link.

Run inside the test bed (``scripts/bench`` boots it). Placement:

* one host (``--hosts 1``): RDMA contenders run client and server on the one rxe device
  (198.18.0.1 to itself). Python TCP runs its server in the veth peer namespace ``usdp-b``
  (198.18.0.2), so its bytes cross the veth pair rather than the kernel's loopback device.
* two hosts (``--hosts 2``): every server runs on host B (through its agent), every client
  on host A; all traffic crosses the emulated link.

Rounds (``--rounds``, default 3): round r runs every contender at every size once, the
contenders in an order rotated by r, and the report gives the median of each metric over
the rounds, so that one noisy moment of the shared, emulated machine cannot decide a
ratio. Python measurements also report CPU seconds (user + sys, client and server) per MiB
moved.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usdptools.bench import report, summary
from usdptools.bench.procs import Done, Local, Netns, Place, Remote, client_until_up

WORKER = Path(__file__).with_name("worker.py")
RSPRELOAD = "/usr/lib/x86_64-linux-gnu/rsocket/librspreload.so"
KiB, MiB = 1024, 1 << 20
DEFAULT_SIZES = [64, 256, KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, MiB, 4 * MiB]
QUICK_SIZES = [64, 64 * KiB, MiB]
ALL = ["usdp-bcopy", "usdp-zcopy", "usdp-nodefer", "tcp", "rspreload", "rstream",
       "ib_send_bw", "ib_write_bw", "ib_send_lat"]
LABELS = {
    "usdp-bcopy": "usdp BCopy", "usdp-zcopy": "usdp ZCopy", "usdp-nodefer": "usdp, defer off",
    "tcp": "Python TCP", "rspreload": "Python+rspreload", "rstream": "rstream",
    "ib_send_bw": "ib_send_bw", "ib_write_bw": "ib_write_bw", "ib_send_lat": "ib_send_lat",
}
ZCOPY_THRESHOLD = 65536


@dataclass
class Config:
    hosts: int
    sizes: list[int]
    contenders: list[str]
    seconds: float  # per Python measurement
    stream_bytes: int  # per C-tool stream measurement (count = bytes / size, clamped)
    lat_iters: int  # C-tool ping-pong iterations at small sizes
    out: Path
    profile: bool
    rounds: int
    dev: str
    addr_a: str
    addr_b: str
    results: list[dict[str, Any]] = field(default_factory=list)


class Progress:
    """One line per finished measurement on stderr: count, label, value, elapsed, ETA."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def step(self, text: str) -> None:
        self.done += 1
        el = time.monotonic() - self.t0
        eta = el / self.done * (self.total - self.done)
        print(f"[bench {self.done:3d}/{self.total} {el:5.0f}s, ~{eta:4.0f}s left] {text}",
              file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        print(f"[bench] {text}", file=sys.stderr, flush=True)


_port = random.randrange(20000, 40000)


def next_port() -> int:
    global _port
    _port += 1
    return _port


def fmt_size(n: int) -> str:
    for unit, f in (("MiB", MiB), ("KiB", KiB)):
        if n >= f and n % f == 0:
            return f"{n // f} {unit}"
    return f"{n} B"


def describe(r: dict[str, Any]) -> str:
    head = f"{LABELS[r['contender']]:17s} {r['mode']:8s} {fmt_size(r['size']):>7s}: "
    if r.get("error"):
        first: str = str(r["error"]).splitlines()[0][:100]
        return head + "FAILED " + first
    cpu = summary.cpu_per_mib(r).get("cpu_s_per_mib")
    tail = "" if cpu is None else f", CPU {cpu:.3g} s/MiB"
    if r["mode"] == "stream":
        return head + f"{r['bytes_per_s'] / MiB:9.2f} MiB/s" + tail
    p50 = r.get("rtt_p50_us") or r.get("rtt_mean_us") or 0.0
    return head + f"RTT p50 {p50:9.0f} us" + tail


# ---------------------------------------------------------------------------- Python side


class PythonPair:
    """A Python contender's server and client processes, kept across the rounds: each
    round writes one batch of tests to the client's stdin (``worker.py client --stdin``)
    and reads one JSON line per test. Starting python (and usdp) takes seconds under TCG,
    so it is paid once per run instead of once per round; both processes sleep in a
    blocking call while other contenders run. A pair that failed is killed, its remaining
    tests of that round recorded as failed, and a new pair starts in the next round."""

    def __init__(self, cfg: Config, name: str, server: Place, rnd: int,
                 profile: str | None = None, sizes: list[int] | None = None) -> None:
        self.cfg, self.name, self.profile = cfg, name, profile
        sizes = sizes or cfg.sizes
        kind = "usdp" if name.startswith("usdp") else \
            "rspreload" if name == "rspreload" else "tcp"
        extra = {"usdp-zcopy": ["--zcopy", str(ZCOPY_THRESHOLD)],
                 "usdp-nodefer": ["--no-defer"]}.get(name, [])
        env = {"LD_PRELOAD": RSPRELOAD} if name == "rspreload" else {}
        py = sys.executable
        common = ["--kind", kind, "--host", server.addr, "--port", str(next_port()), *extra]
        # The server waits for the next round while every other contender runs: no idle
        # timeout short of the whole run (the runner stops it, or kills it on a failure).
        sargv = [py, str(WORKER), "server", *common, "--idle-timeout", "7200",
                 "--max-size", str(max(sizes))]
        cargv = [py, str(WORKER), "client", *common, "--quit", "--seconds",
                 str(cfg.seconds), "--stdin"]
        self.tag = profile or f"{name}-from-r{rnd}"
        if profile:
            sargv += ["--profile", str(cfg.out / f"profile-{self.tag}-server.txt")]
            cargv += ["--profile", str(cfg.out / f"profile-{self.tag}-client.txt")]
        logs = cfg.out / "logs"
        self.srv = server.spawn(sargv, env, logs / f"{self.tag}-server")
        self.err_path = logs / f"{self.tag}-client.err"
        with open(self.err_path, "wb") as err:
            self.cli = subprocess.Popen(cargv, env={**os.environ, **env},
                                        stdout=subprocess.PIPE, stderr=err,
                                        stdin=subprocess.PIPE)
        assert self.cli.stdout is not None and self.cli.stdin is not None
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.cli.stdout, selectors.EVENT_READ)
        self.buf = b""  # read from the client's stdout, not yet a whole line
        self.started = False  # a first result came back (the start-up is behind us)

    def _line(self, timeout: float) -> bytes | None:
        """The client's next output line; b"" at its EOF, None if none came in time.
        Raw reads after select (a buffered readline could hold a second line back from
        the next select)."""
        assert self.cli.stdout is not None
        while b"\n" not in self.buf:
            if not self.sel.select(timeout):
                return None
            chunk = os.read(self.cli.stdout.fileno(), 65536)
            if not chunk:
                return b""
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def run(self, tests: list[str], rnd: int, prog: Progress) -> bool:
        """Run ``tests`` (``MODE:SIZE``) as round ``rnd``; False if the pair failed (it
        is closed then, and the tests it did not finish are recorded as failed)."""
        assert self.cli.stdin is not None and self.cli.stdout is not None
        per_test = self.cfg.seconds + 120.0  # a test's bound: its time + connect + op timeouts
        startup = 90.0  # python + usdp import under TCG takes several seconds
        failure = ""
        done = 0
        try:
            self.cli.stdin.write((" ".join(tests) + "\n").encode())
            self.cli.stdin.flush()
        except OSError as e:
            failure = f"client gone: {e}"
        while not failure and done < len(tests):
            line = self._line(per_test + (0.0 if self.started else startup))
            if line is None:
                failure = f"no result within {per_test:.0f} s"
                break
            if not line:
                failure = "client exited early"
                break
            self.started = True
            res = json.loads(line)
            res.update(contender=self.name, round=rnd)
            if self.profile:
                res["profiled"] = True
            else:
                self.cfg.results.append(res)
            done += 1
            prog.step(describe(res))
        if not failure:
            return True
        msg = failure + ": " + self.kill()
        for t in tests[done:]:
            m, s = t.split(":")
            rec = {"contender": self.name, "mode": "stream" if m == "S" else "pingpong",
                   "size": int(s), "round": rnd, "error": msg}
            if not self.profile:
                self.cfg.results.append(rec)
            prog.step(describe(rec))
        return False

    def kill(self) -> str:
        """Stop both processes now; their stderr tails, for the error message."""
        self.sel.close()
        if self.cli.poll() is None:
            self.cli.kill()
        self.cli.wait(10)
        for f in (self.cli.stdin, self.cli.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass  # a broken pipe to the dead client
        sdone = self.srv.wait(5)
        if sdone.rc is None:
            self.srv.kill()
        return (self.err_path.read_text(errors="replace")[-600:] + " | server: "
                + sdone.stderr[-400:])

    def close(self, prog: Progress) -> None:
        """End of the run: EOF on the client's stdin makes it stop the server and exit."""
        assert self.cli.stdin is not None
        try:
            self.cli.stdin.close()
            rc: int | None = self.cli.wait(60)
        except (OSError, subprocess.TimeoutExpired):
            rc = None
        self.sel.close()
        if rc is None:
            self.cli.kill()
            self.cli.wait(10)
        if self.cli.stdout is not None:
            self.cli.stdout.close()
        sdone = self.srv.wait(150 if self.profile else 30)  # a profile renders slowly
        if sdone.rc is None:
            self.srv.kill()
        if rc != 0 or sdone.rc != 0:
            prog.note(f"warning: {self.tag}: client rc {rc}, server rc {sdone.rc} at the "
                      f"end (every result was in); see {self.err_path}")


def python_tests(modes: list[str], sizes: list[int]) -> list[str]:
    """A Python contender's tests of one round, as the worker takes them."""
    return [f"{m}:{s}" for s in sizes for m in modes]


# ---------------------------------------------------------------------------- C tools


def gid_index(dev: str, addr: str) -> int:
    """The GID index of ``addr``'s IPv4-mapped GID on ``dev`` (RoCE v2), else 1."""
    want = "".join(f"{int(o):02x}" for o in addr.split("."))
    gids = Path(f"/sys/class/infiniband/{dev}/ports/1/gids")
    try:
        for i in range(16):
            g = (gids / str(i)).read_text().strip().replace(":", "")
            if g == "00000000000000000000ffff" + want:
                return i
    except OSError:
        pass
    return 1


def clamp(v: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, v))


def c_tool(cfg: Config, name: str, server: Place, mode: str, size: int,
           prog: Progress, rnd: int = 0) -> None:
    port = next_port()
    addr = server.addr
    to = 180.0
    if name == "rstream":
        if mode == "stream":
            count, iters = clamp(cfg.stream_bytes // size, 8, 20000), 1
        else:
            count, iters = 1, clamp(cfg.stream_bytes // 4 // size, 10, cfg.lat_iters)
        args = ["-p", str(port), "-S", str(size), "-C", str(count), "-I", str(iters)]
        sargv, cargv = ["rstream", "-b", addr, *args], ["rstream", "-s", addr, *args]
        # rstream echoes each iteration's transfers: both directions count
        parse: Callable[[str], dict[str, Any]] = functools.partial(
            _parse_rstream, moved=2 * count * iters * size)
    else:
        if mode == "stream":
            n = clamp(cfg.stream_bytes // size, 8, 20000)
        else:
            n = clamp(cfg.stream_bytes // 4 // size, 10, cfg.lat_iters)
        args = ["-d", cfg.dev, "-x", str(gid_index(cfg.dev, cfg.addr_a)), "-F",
                "-s", str(size), "-n", str(n), "-p", str(port)]
        sargv, cargv = [name, *args], [name, *args, addr]
        parse = _parse_perftest_lat if name == "ib_send_lat" else _parse_perftest_bw
    # the server's GID index is its own host's; -x is read locally by each side
    if isinstance(server, Remote) and name != "rstream":
        sargv[sargv.index("-x") + 1] = str(_remote_gid_guess(cfg))
    log = cfg.out / "logs" / f"{name}-{mode}-{size}-r{rnd}"
    t0 = time.monotonic()
    srv = server.spawn(sargv, {}, log.with_name(log.name + "-server"))
    res: dict[str, Any] = {"contender": name, "mode": mode, "size": size, "round": rnd}
    try:
        d = client_until_up(cargv, {}, srv, to)
        (log.with_name(log.name + "-client.out")).write_text(d.stdout + "\n" + d.stderr)
        if d.rc != 0:
            res["error"] = f"client rc {d.rc}: {(d.stdout + d.stderr)[-500:]}"
        else:
            res.update(parse(d.stdout))
            res["wall_seconds"] = time.monotonic() - t0
    except (ValueError, IndexError) as e:
        res["error"] = f"could not parse the output: {e}"
    finally:
        sd: Done = srv.wait(30)
        if sd.rc is None:
            srv.kill()
    cfg.results.append(res)
    prog.step(describe(res))


def _remote_gid_guess(cfg: Config) -> int:
    # Host B's rxe sits on its eth0 set up exactly like A's, so its IPv4 GID has the same
    # index as A's own.
    return gid_index(cfg.dev, cfg.addr_a)


def _table_after(out: str, header_start: str) -> tuple[list[str], list[str]]:
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(header_start):
            for row in lines[i + 1:]:
                if row.strip() and row.strip()[0].isdigit():
                    return line.split(), row.split()
    raise ValueError(f"no {header_start!r} table in {out[-300:]!r}")


def _parse_perftest_bw(out: str) -> dict[str, Any]:
    head, row = _table_after(out, "#bytes")
    avg = float(row[3])
    unit = " ".join(head)
    bps = avg * 125e6 if "Gb/sec" in unit else avg * MiB  # perftest's MB = 2^20 B
    return {"bytes_per_s": bps, "n": int(row[1])}


def _parse_perftest_lat(out: str) -> dict[str, Any]:
    _, row = _table_after(out, "#bytes")
    # ib_send_lat reports half a round trip: t_min t_max t_typical t_avg t_stdev 99% 99.9%
    return {"n": int(row[1]), "rtt_p50_us": 2 * float(row[4]),
            "rtt_mean_us": 2 * float(row[5]), "rtt_p99_us": 2 * float(row[7])}


def _parse_rstream(out: str, moved: int) -> dict[str, Any]:
    """rstream's result line; ``moved``: the bytes of the run, both directions (its
    Gb/sec column has two decimals, 0.00 for small messages under TCG, so the rate is
    computed from the bytes and its time)."""
    for line in out.splitlines():
        f = line.split()
        if len(f) == 8 and f[0] == "custom":
            secs = float(f[5].rstrip("s"))
            usec_per_xfer = float(f[7])
            # bytes moved / time: client sends C x S, then server sends C x S back
            bps = moved / secs if secs > 0 else float(f[6]) * 125e6
            return {"bytes_per_s": bps, "seconds": secs,
                    "rtt_mean_us": 2 * usec_per_xfer,
                    "note": "rstream reports a mean only"}
    raise ValueError(f"no rstream result line in {out[-300:]!r}")


# ---------------------------------------------------------------------------- main


def plan(cfg: Config) -> list[tuple[str, str]]:
    """(contender, mode) pairs in run order."""
    out: list[tuple[str, str]] = []
    for c in cfg.contenders:
        if c in ("ib_send_bw", "ib_write_bw", "usdp-nodefer"):
            out.append((c, "stream"))
        elif c == "ib_send_lat":
            out.append((c, "pingpong"))
        else:
            out += [(c, "stream"), (c, "pingpong")]
    return out


def run(cfg: Config) -> int:
    (cfg.out / "logs").mkdir(parents=True, exist_ok=True)
    remote: Remote | None = None
    if cfg.hosts == 2:
        remote = Remote(cfg.addr_b)
        rdma_srv: Place = remote
        tcp_srv: Place = remote
        placement = (f"clients on host A ({cfg.addr_a}), servers on host B ({cfg.addr_b}) "
                     "through its agent; two VMs joined by qemu's socket netdev")
    else:
        rdma_srv = Local(cfg.addr_a)
        tcp_srv = Netns(cfg.addr_b)
        placement = (f"one VM: RDMA contenders loop back through the one rxe device "
                     f"({cfg.dev}, {cfg.addr_a} to itself); Python TCP's server runs in the "
                     f"veth peer namespace usdp-b ({cfg.addr_b}), so TCP crosses the veth "
                     "pair, not the loopback device")
    pairs = plan(cfg)
    total = cfg.rounds * len(pairs) * len(cfg.sizes) + (2 if cfg.profile else 0)
    prog = Progress(total)
    prog.note(f"{cfg.rounds} round(s) x {len(cfg.contenders)} contenders x "
              f"{len(cfg.sizes)} sizes, {total} measurements; {placement}")
    prog.note("the VM is emulated (TCG): absolute numbers mean nothing, ratios within "
              "this run do")
    t0 = time.monotonic()
    live: dict[str, PythonPair] = {}  # Python contenders' processes, kept across rounds
    try:
        for rnd in range(cfg.rounds):
            order = summary.rotation(cfg.contenders, rnd)
            prog.note(f"round {rnd + 1}/{cfg.rounds}: " + ", ".join(order))
            for c in order:
                modes = [m for cc, m in pairs if cc == c]
                if c.startswith("usdp") or c in ("tcp", "rspreload"):
                    place = tcp_srv if c == "tcp" else rdma_srv
                    pair = live.get(c) or PythonPair(cfg, c, place, rnd)
                    live[c] = pair
                    tests = python_tests(["S" if m == "stream" else "P" for m in modes],
                                         cfg.sizes)
                    if not pair.run(tests, rnd, prog):
                        del live[c]  # killed; the next round starts a new pair
                else:
                    for m in modes:
                        for s in cfg.sizes:
                            c_tool(cfg, c, rdma_srv, m, s, prog, rnd)
        while live:
            live.popitem()[1].close(prog)
        if cfg.profile:
            size = 64 * KiB if 64 * KiB in cfg.sizes else max(cfg.sizes)
            prog.note(f"profiling the usdp BCopy stream at {fmt_size(size)} (pyinstrument)")
            for tag, test in ((f"usdp-stream-{size}", f"S:{size}"),
                              ("usdp-pingpong-64", "P:64")):
                pair = PythonPair(cfg, "usdp-bcopy", rdma_srv, 0, profile=tag,
                                  sizes=[int(test[2:])])
                if pair.run([test], 0, prog):
                    pair.close(prog)
    finally:
        for pair in live.values():  # an exception: stop what still runs
            pair.kill()
        if remote is not None:
            remote.close()
    meta = {
        "hosts": cfg.hosts, "device": cfg.dev, "placement": placement,
        "sizes": cfg.sizes, "contenders": cfg.contenders, "rounds": cfg.rounds,
        "seconds_per_python_test":
        cfg.seconds, "stream_bytes_per_c_test": cfg.stream_bytes,
        "zcopy_threshold": ZCOPY_THRESHOLD, "wall_seconds": time.monotonic() - t0,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
        "emulated": os.environ.get("USDP_IN_VM") == "1",
    }
    md = report.write(cfg.out, meta, cfg.results, LABELS)
    print(md, flush=True)
    failed = [r for r in cfg.results if r.get("error")]
    if failed:
        prog.note(f"{len(failed)} measurement(s) failed; see {cfg.out / 'logs'}")
    prog.note(f"results in {cfg.out}")
    return 1 if failed else 0


def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([kKmM]?)(i?B)?", s.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r}")
    return int(m.group(1)) * {"": 1, "k": KiB, "m": MiB}[m.group(2).lower()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--dask" in argv:  # dask.distributed over usdp:// vs tcp://: its own module
        from usdptools.bench import dask_bench
        return dask_bench.main([a for a in argv if a != "--dask"])
    ap = argparse.ArgumentParser(prog="python -m usdptools.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, choices=[1, 2],
                    default=int(os.environ.get("USDP_HOSTS", "1")))
    ap.add_argument("--quick", action="store_true", help="3 sizes, short measurements")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds; the report gives the median of each metric "
                         "(default 3)")
    ap.add_argument("--sizes", nargs="+", type=parse_size, help="e.g. 64 4K 1M")
    ap.add_argument("--contenders", nargs="+", choices=ALL, default=ALL)
    ap.add_argument("--seconds", type=float, help="time per Python measurement")
    ap.add_argument("--stream-bytes", type=parse_size, help="bytes per C-tool stream test")
    ap.add_argument("--lat-iters", type=int, help="C-tool ping-pong iterations (small sizes)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the usdp stream and ping-pong (pyinstrument)")
    ap.add_argument("--out", type=Path, help="results folder (default results/bench-<time>)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    quick = args.quick
    out = args.out or Path(os.environ.get("USDP_OUT", "results")) / \
        time.strftime("bench-%Y%m%d-%H%M%S")
    cfg = Config(
        hosts=args.hosts,
        sizes=args.sizes or (QUICK_SIZES if quick else DEFAULT_SIZES),
        contenders=args.contenders,
        # Per measurement, shorter than with one round: three rounds keep a full one-host
        # run near 10-15 min and --quick near 2-3 min in the emulated VM.
        seconds=args.seconds or (0.2 if quick else 0.5),
        stream_bytes=args.stream_bytes or (2 * MiB if quick else 12 * MiB),
        lat_iters=args.lat_iters or (50 if quick else 400),
        out=out.resolve(), profile=args.profile, rounds=args.rounds,
        dev=os.environ.get("USDP_RXE_DEV", "rxe0"),
        addr_a=os.environ.get("USDP_HOST_A", "198.18.0.1"),
        addr_b=os.environ.get("USDP_HOST_B", "198.18.0.2"),
    )
    return run(cfg)
