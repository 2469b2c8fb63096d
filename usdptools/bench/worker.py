"""One end of a Python socket benchmark: usdp, or ``socket.socket`` (plain TCP, or TCP
under ``LD_PRELOAD=librspreload.so``, i.e. rsockets). The same code measures all of them.

rsockets needs help from Python (``--kind rspreload``): CPython creates sockets with
``SOCK_STREAM | SOCK_CLOEXEC``, which ``rsocket()`` refuses (ENOTSUP), so librspreload
(rdma-core 44) silently falls back to a kernel TCP socket, and CPython accepts with
``accept4()``, which librspreload does not wrap. So this worker calls libc's ``socket()``
and ``accept()`` itself (under LD_PRELOAD those are rsockets' wrappers) and wraps the fds
in ``socket.socket``; every other call (connect, send, recv, poll, ...) goes through
libc names that librspreload does wrap. ``--kind rspreload`` without the library loaded
is refused, so the column cannot silently be TCP again.

Run by path (``python usdptools/bench/worker.py ...``), not with ``-m``:
``-m usdptools.bench.worker`` would import the usdp package (and pyverbs) into a TCP or
rsockets process that does not need it.
Only the standard library is imported at the top; usdp only for ``--kind usdp``.

Protocol, one connection per test: the client sends a 9-byte header (mode ``S`` stream,
``P`` ping-pong, ``Q`` quit; size as u64). Stream: the client sends ``size``-byte messages
for the test's duration, then shuts down its write side; the server reads to EOF.
Ping-pong: the client sends ``size`` bytes, the server echoes them, until the client shuts
down. Either way the server then answers one JSON line (its ``stats()`` for usdp, and the
CPU time it spent on the test) and closes, and the client prints one JSON line per test on
stdout.

CPU time: each side takes ``getrusage(RUSAGE_SELF)`` (user and sys of every thread of the
process, so usdp's completion thread and rsockets' threads count too) before and after
its timed part, and reports the difference (``client_cpu``/``server_cpu``, seconds). The
server's part runs from the test's header to the stream's last message (stream) or the
client's EOF (ping-pong, warm-up included: two messages).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import socket
import statistics
import struct
import sys
import time
from typing import Any

HEADER = struct.Struct("!cQ")
#: First byte of the last message of a stream test; every other message starts with 0.
LAST = b"\x01"


def _options(args: argparse.Namespace) -> Any:
    import usdp

    return usdp.Options(zcopy_threshold=args.zcopy, defer=not args.no_defer)


def _libc() -> Any:
    import ctypes

    if "librspreload" not in os.environ.get("LD_PRELOAD", ""):
        raise SystemExit("--kind rspreload needs LD_PRELOAD=.../librspreload.so")
    return ctypes.CDLL(None, use_errno=True)


def _wrap_fd(fd: int, what: str) -> socket.socket:
    if fd < 0:
        import ctypes

        code = ctypes.get_errno()
        raise OSError(code, f"{what} under librspreload: {os.strerror(code)}")
    # An rsocket holds an RDMA CM channel; a kernel TCP fallback would not.
    fds = os.listdir("/proc/self/fd")
    if not any(_readlink(f"/proc/self/fd/{f}") == "/dev/infiniband/rdma_cm" for f in fds):
        raise SystemExit(f"{what}: librspreload gave a kernel TCP socket, not an rsocket")
    return socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fileno=fd)


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _make_socket(args: argparse.Namespace) -> Any:
    if args.kind == "usdp":
        import usdp

        return usdp.SdpSocket(options=_options(args))
    if args.kind == "rspreload":  # see the module docstring
        s = _wrap_fd(_libc().socket(socket.AF_INET, socket.SOCK_STREAM, 0), "socket()")
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _settimeout(sock: Any, args: argparse.Namespace, seconds: float) -> None:
    """Socket timeouts, except for rsockets: with a timeout CPython polls before every
    call, and through librspreload's rpoll a stream then crawled at about one message per
    second (measured); blocking calls go straight to rsend/rrecv. The runner bounds
    every test anyway."""
    if args.kind != "rspreload":
        sock.settimeout(seconds)


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def _cpu_since(t0: tuple[float, float]) -> dict[str, float]:
    """User and sys CPU seconds of this process (all threads) since ``t0 = _cpu()``."""
    u, s = _cpu()
    return {"user": u - t0[0], "sys": s - t0[1]}


def _reply(sock: Any, cpu0: tuple[float, float]) -> None:
    """The server's answer after a test: its stats and the CPU time the test took."""
    cpu = _cpu_since(cpu0)
    sock.sendall(json.dumps({"stats": _stats(sock), "cpu": cpu}).encode() + b"\n")


def _stats(sock: Any) -> dict[str, int]:
    fn = getattr(sock, "stats", None)
    if fn is None:
        return {}
    out: dict[str, int] = fn()
    return out


def _recv_exact(sock: Any, view: memoryview) -> bool:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            return False
        got += n
    return True


def _read_line(sock: Any) -> bytes:
    out = bytearray()
    while not out.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        out += chunk
    return bytes(out)


def _read_all(sock: Any) -> bytes:
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


# ---------------------------------------------------------------------------- server


def _accept(lst: Any, args: argparse.Namespace) -> Any:
    if args.kind != "rspreload":
        return lst.accept()[0]
    # CPython's accept() uses accept4(), which librspreload does not wrap: call accept().
    # Blocking, without a select() first: after rselect() on the listener the accepted
    # connection's first send stalled ~5 s (measured). The runner bounds the run.
    return _wrap_fd(_libc().accept(lst.fileno(), None, None), "accept()")


def _recv_stream(conn: Any, view: memoryview, size: int) -> bool:
    """Read ``size``-byte messages until the one whose first byte is LAST has arrived
    whole (False on an early EOF). Ending on a marker, not on EOF, keeps a transport's
    shutdown cost (rsockets took ~5 s) out of the timed stream."""
    got = 0
    end = -1  # stream offset just past the last message, once its marker was seen
    while end < 0 or got < end:
        n = conn.recv_into(view)
        if n == 0:
            return False
        if end < 0:
            first = (-got) % size  # where the next message starts in this chunk
            starts = view[first:n:size].tobytes()
            i = starts.find(LAST)
            if i >= 0:
                end = got + first + i * size + size
        got += n
    return True


def serve(args: argparse.Namespace) -> int:
    lst = _make_socket(args)
    if args.kind != "usdp":
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((args.host, args.port))
    lst.listen(8)
    _settimeout(lst, args, args.idle_timeout)
    print(f"worker: {args.kind} server on {args.host}:{args.port}", file=sys.stderr, flush=True)
    profiler = None
    buf = bytearray(max(1 << 20, args.max_size))
    view = memoryview(buf)
    try:
        while True:
            try:
                conn = _accept(lst, args)
            except TimeoutError:
                print("worker: no client within the idle timeout", file=sys.stderr)
                return 2
            if args.profile and profiler is None:
                profiler = _start_profiler(args)  # the first connection only, not the waits
            with conn:
                _settimeout(conn, args, args.op_timeout)
                hdr = bytearray(HEADER.size)
                if not _recv_exact(conn, memoryview(hdr)):
                    continue  # a client probing whether we listen
                mode, size = HEADER.unpack(hdr)
                if mode == b"Q":
                    return 0
                cpu0 = _cpu()
                if mode == b"S":
                    complete = _recv_stream(conn, view, size)
                    if complete:
                        _reply(conn, cpu0)
                    while conn.recv_into(view):  # to the client's EOF (untimed)
                        pass
                    continue
                msg = view[:size]
                while _recv_exact(conn, msg):
                    conn.sendall(msg)
                _reply(conn, cpu0)
            if profiler is not None and profiler.is_running:
                _stop_profiler(profiler, args)
    finally:
        if profiler is not None and profiler.is_running:
            _stop_profiler(profiler, args)
        lst.close()


# ---------------------------------------------------------------------------- client


def _connect(args: argparse.Namespace) -> Any:
    """Connect, retrying while the server is not listening yet (bounded)."""
    deadline = time.monotonic() + args.connect_timeout
    while True:
        s = _make_socket(args)
        _settimeout(s, args, args.op_timeout)
        try:
            s.connect((args.host, args.port))
            return s
        except OSError as e:
            s.close()
            refused = isinstance(e, ConnectionRefusedError) or e.errno in (
                errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EHOSTUNREACH)
            if not refused or time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # the server process is still starting: retry, bounded


def run_test(args: argparse.Namespace, mode: str, size: int) -> dict[str, Any]:
    payload = b"\x00" + os.urandom(size - 1)
    last = LAST + payload[1:]
    back = bytearray(size)
    bview = memoryview(back)
    teardown = ""
    sock = _connect(args)
    with sock:
        sock.sendall(HEADER.pack(mode.encode()[:1], size))
        rtts: list[float] = []
        n = 0
        if mode == "S":
            cpu0 = _cpu()
            t0 = time.perf_counter()
            end = t0 + args.seconds
            while n < args.max_msgs and (n < args.min_msgs or time.perf_counter() < end):
                sock.sendall(payload)
                n += 1
            sock.sendall(last)
            n += 1
            reply = _read_line(sock)  # the server has every byte
            elapsed = time.perf_counter() - t0
            cpu = _cpu_since(cpu0)
            try:  # untimed: the server already confirmed every byte
                sock.shutdown(socket.SHUT_WR)
                _read_all(sock)
            except ConnectionError as e:
                # Kept as a warning, not a failed measurement (the report lists it).
                teardown = f"{type(e).__name__}: {e}"
        else:
            for _ in range(args.warmup):
                sock.sendall(payload)
                if not _recv_exact(sock, bview):
                    raise ConnectionError("EOF from the echo server")
            cpu0 = _cpu()
            t0 = time.perf_counter()
            end = t0 + args.seconds
            while n < args.max_msgs and (n < args.min_msgs or time.perf_counter() < end):
                t = time.perf_counter()
                sock.sendall(payload)
                if not _recv_exact(sock, bview):
                    raise ConnectionError("EOF from the echo server")
                rtts.append(time.perf_counter() - t)
                n += 1
            elapsed = time.perf_counter() - t0
            cpu = _cpu_since(cpu0)
            sock.shutdown(socket.SHUT_WR)
            reply = _read_all(sock)
        cstats = _stats(sock)
    server = json.loads(reply.decode().strip() or "{}")
    res: dict[str, Any] = {"mode": "stream" if mode == "S" else "pingpong", "size": size,
                           "n": n, "seconds": elapsed, "client_stats": cstats,
                           "server_stats": server.get("stats", {}), "client_cpu": cpu}
    if "cpu" in server:
        res["server_cpu"] = server["cpu"]
    if teardown:
        res["teardown_error"] = teardown
    if mode == "S":
        res["bytes_per_s"] = n * size / elapsed
    else:
        q = statistics.quantiles(rtts, n=100, method="inclusive") if len(rtts) > 1 else rtts * 99
        res.update(rtt_p50_us=q[49] * 1e6, rtt_p99_us=q[98] * 1e6,
                   rtt_mean_us=statistics.fmean(rtts) * 1e6,
                   bytes_per_s=2 * n * size / elapsed)
    return res


def _batches(args: argparse.Namespace) -> Any:
    """The tests to run: ``--tests``, then with ``--stdin`` one batch per input line (the
    runner's rounds), so that one process serves every round without a restart."""
    if args.tests:
        yield args.tests
    if args.stdin:
        for line in sys.stdin:
            yield line.split()


def client(args: argparse.Namespace) -> int:
    profiler = _start_profiler(args)
    try:
        for batch in _batches(args):
            for spec in batch:
                mode, size = spec.split(":")
                res = run_test(args, mode, int(size))
                print(json.dumps(res), flush=True)
    finally:
        _stop_profiler(profiler, args)
    if args.quit:
        with _connect(args) as s:
            s.sendall(HEADER.pack(b"Q", 0))
    return 0


# ---------------------------------------------------------------------------- profiling


def _start_profiler(args: argparse.Namespace) -> Any:
    if not args.profile:
        return None
    from pyinstrument import Profiler

    p = Profiler(interval=0.001, use_timing_thread=True)
    p.start()
    return p


def _stop_profiler(p: Any, args: argparse.Namespace) -> None:
    if p is None:
        return
    p.stop()
    with open(args.profile, "w") as f:
        f.write(p.output_text(unicode=True, color=False, show_all=False))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("role", choices=["server", "client"])
    ap.add_argument("--kind", choices=["usdp", "tcp", "rspreload"], default="usdp",
                    help="tcp = socket.socket (rsockets when run under LD_PRELOAD)")
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--zcopy", type=int, default=0, help="usdp zcopy_threshold (0 = off)")
    ap.add_argument("--no-defer", action="store_true", help="usdp Options(defer=False)")
    ap.add_argument("--tests", nargs="*", default=[], help="MODE:SIZE, MODE S or P")
    ap.add_argument("--stdin", action="store_true",
                    help="client: then read more tests from stdin, one batch per line, "
                         "until EOF")
    ap.add_argument("--seconds", type=float, default=1.5, help="time per test")
    ap.add_argument("--min-msgs", type=int, default=5)
    ap.add_argument("--max-msgs", type=int, default=1_000_000)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-size", type=int, default=4 << 20)
    ap.add_argument("--quit", action="store_true", help="client: stop the server at the end")
    ap.add_argument("--connect-timeout", type=float, default=60.0)
    ap.add_argument("--op-timeout", type=float, default=60.0)
    ap.add_argument("--idle-timeout", type=float, default=300.0)
    ap.add_argument("--profile", help="write a pyinstrument text profile here")
    args = ap.parse_args(argv)
    if args.kind == "usdp":
        import usdp  # noqa: F401  (seconds under TCG: keep it out of the profiles)
    return serve(args) if args.role == "server" else client(args)


if __name__ == "__main__":
    sys.exit(main())
