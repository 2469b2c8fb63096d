"""Where a benchmark's processes run: this host, the veth peer namespace, or host B."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from usdptools.testbed.rxe import PEER_NS


@dataclass
class Done:
    rc: int | None  # None: still running when the wait ended
    stdout: str
    stderr: str


class Proc(Protocol):
    def wait(self, timeout: float) -> Done: ...
    def kill(self) -> None: ...
    def alive(self) -> bool: ...


class Place(Protocol):
    """Somewhere a server can run, and the address a client reaches it at."""

    name: str
    addr: str

    def spawn(self, argv: list[str], env: dict[str, str], log: Path) -> Proc: ...


class LocalProc:
    """A child process whose output goes to files (no pipe can fill up and stall it)."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.out_path = log.with_suffix(".out")
        self.err_path = log.with_suffix(".err")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.p = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out,
                                      stderr=err, stdin=subprocess.DEVNULL)

    def wait(self, timeout: float) -> Done:
        try:
            rc: int | None = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        return Done(rc, self.out_path.read_text(errors="replace"),
                    self.err_path.read_text(errors="replace"))

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                # Seen once: an rstream server stuck in the kernel (rxe teardown) ignored
                # SIGKILL for >10 s. One stuck process must not end the whole run.
                print(f"[bench] warning: pid {self.p.pid} ({self.p.args!r:.60}) still alive "
                      "30 s after SIGKILL; going on", file=sys.stderr, flush=True)

    def alive(self) -> bool:
        return self.p.poll() is None


@dataclass
class Local:
    addr: str
    name: str = "A"

    def spawn(self, argv: list[str], env: dict[str, str], log: Path) -> Proc:
        return LocalProc(argv, env, log)


@dataclass
class Netns:
    """The veth peer namespace of the one-host bed (``usdp-b``, 198.18.0.2): TCP between
    198.18.0.1 and 198.18.0.2 crosses the veth pair instead of the kernel's loopback."""

    addr: str
    ns: str = PEER_NS
    name: str = "A/netns usdp-b"

    def spawn(self, argv: list[str], env: dict[str, str], log: Path) -> Proc:
        pre = [f"{k}={v}" for k, v in env.items()]
        return LocalProc(["ip", "netns", "exec", self.ns, "env", *pre, *argv], {}, log)


class RemoteProc:
    def __init__(self, place: Remote, pid: int, log: Path) -> None:
        self.place, self.pid, self.log = place, pid, log
        self.done: Done | None = None

    def wait(self, timeout: float) -> Done:
        if self.done is not None:
            return self.done
        r = self.place.agent.wait(self.pid, timeout)
        d = Done(r.get("rc"), r.get("stdout", ""), r.get("stderr", ""))
        if d.rc is not None:
            self.done = d
            self.log.with_suffix(".out").write_text(d.stdout)
            self.log.with_suffix(".err").write_text(d.stderr)
        return d

    def kill(self) -> None:
        if self.done is None:
            try:
                self.place.agent.kill(self.pid)
            except RuntimeError:
                pass  # already reaped
            self.wait(10)

    def alive(self) -> bool:
        return self.wait(0.01).rc is None


class Remote:
    """Host B of the two-host bed, through its agent (``usdptools.testbed.agent``)."""

    name = "B"

    def __init__(self, addr: str) -> None:
        from usdptools.testbed.agent import AgentClient

        self.addr = addr
        self.agent = AgentClient(addr)
        self.agent.call(op="ping")

    def spawn(self, argv: list[str], env: dict[str, str], log: Path) -> Proc:
        return RemoteProc(self, self.agent.spawn(argv, env), log)

    def close(self) -> None:
        self.agent.close()


def run_client(argv: list[str], env: dict[str, str], timeout: float) -> Done:
    """Run a client to completion locally, bounded by ``timeout``."""
    try:
        p = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else ""
        return Done(None, out, f"timed out after {timeout:.0f} s")
    return Done(p.returncode, p.stdout, p.stderr)


def client_until_up(argv: list[str], env: dict[str, str], server: Proc, timeout: float,
                    connect_window: float = 30.0) -> Done:
    """Run a C tool's client, retrying while its server is not listening yet (bounded:
    ``connect_window`` seconds of retries, each attempt bounded by ``timeout``)."""
    deadline = time.monotonic() + connect_window
    while True:
        t = time.monotonic()
        d = run_client(argv, env, timeout)
        quick_fail = d.rc not in (0, None) and time.monotonic() - t < 5.0
        if not quick_fail or time.monotonic() > deadline or not server.alive():
            return d
        time.sleep(0.2)  # server still starting: retry (bounded by connect_window)
