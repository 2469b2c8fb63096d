"""dask.distributed over ``usdp://`` on rxe: in-process, through the CLIs, across two hosts.

Every comm of these clusters is a usdp connection (the tests check the client's comm
class and the addresses). Deadlines are generous: the VM's CPU is emulated, and a dask
process takes seconds to start there.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

np = pytest.importorskip("numpy")
distributed = pytest.importorskip("distributed")

from distributed import Client, Scheduler, Worker  # noqa: E402

from tests.rxe.conftest import HostB  # noqa: E402
from usdp.dask import USDPComm  # noqa: E402

TIMEOUT = 300.0
MB64 = 8 * 1024 * 1024  # float64 elements: 64 MiB
DASK = str(Path(sys.executable).with_name("dask"))
ROOT = str(Path(__file__).resolve().parents[2])
#: For the CLI processes: quieter logs, patient connects (emulated CPU).
ENV = {"DASK_LOGGING__DISTRIBUTED": "warning",
       "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "120s",
       "PYTHONPATH": ROOT}


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)  # polling another process's state: there is no event to wait on


def _wait_listening(host: str, port: int) -> None:
    """Wait until a usdp listener accepts on host:port. A Client started before the
    scheduler listens backs off exponentially between refused attempts (tens of seconds
    once the VM's slow scheduler start has used up a few)."""
    import usdp

    def up() -> bool:
        try:
            usdp.create_connection((host, port), timeout=10).close()
        except OSError:
            return False
        return True

    _wait_for(up, f"a usdp listener on {host}:{port}")


def _check_usdp(client: Client) -> None:
    assert client.scheduler_comm is not None
    comm = client.scheduler_comm.comm
    assert isinstance(comm, USDPComm), type(comm)
    assert comm.peer_address.startswith("usdp://")
    workers = client.scheduler_info()["workers"]
    assert workers and all(a.startswith("usdp://") for a in workers), workers


# ---------------------------------------------------------------------------- one host


def test_in_process_scatter_compute_gather(host_a: str) -> None:
    """Scheduler(protocol="usdp"), Worker(protocol="usdp"), Client("usdp://..."):
    a 64 MiB array goes to the worker, is computed on there, and comes back intact."""

    async def main() -> None:
        async with Scheduler(protocol="usdp", host=host_a, dashboard_address=":0") as s:
            assert s.address.startswith(f"usdp://{host_a}:")
            async with Worker(s.address, protocol="usdp", host=host_a, nthreads=1,
                              memory_limit=0) as w, \
                    Client(f"usdp://{host_a}:{s.address.rsplit(':', 1)[1]}",
                           asynchronous=True, timeout=TIMEOUT) as c:
                assert w.address.startswith(f"usdp://{host_a}:")
                assert isinstance(c.scheduler_comm.comm, USDPComm)
                x = np.random.default_rng(1).random(MB64)
                [fx] = await c.scatter([x], workers=[w.address])
                y = c.submit(lambda a: a + 1, fx)
                total = c.submit(lambda a: float(a.sum()), fx)
                got, got_total = await asyncio.wait_for(c.gather([y, total]), TIMEOUT)
                assert got.nbytes == 64 * 1024 * 1024
                assert np.array_equal(got, x + 1)
                assert got_total == pytest.approx(float(x.sum()))
                assert w.data[fx.key] is not None  # it was stored on the worker

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))


class _Procs:
    """CLI processes of one test, killed and reaped at the end."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as the proc
        p = subprocess.Popen([DASK, *args], stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env={**os.environ, **ENV})
        log.close()
        self.procs.append(p)
        return p

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}"
                         for f in sorted(self.logdir.glob("*.log")))

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(60)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[_Procs]:
    ps = _Procs(tmp_path)
    yield ps
    ps.close()


def _slow_then_sum(marker: str, a: Any) -> tuple[int, float]:
    """The first attempt records its pid and blocks (until its worker is killed); a
    retry on another worker computes at once."""
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(marker) as f:
        first = len(f.read().split()) == 1
    deadline = time.monotonic() + 600
    while first and time.monotonic() < deadline:
        time.sleep(0.1)
    return os.getpid(), float(a.sum())


def test_cli_worker_killed_mid_task_is_retried(host_a: str, port: int, procs: _Procs,
                                                tmp_path: Path) -> None:
    """``dask scheduler --protocol usdp`` and two ``dask worker usdp://...``: SIGKILL the
    worker running a slow task; the scheduler sees it lost and reruns the task on the
    other worker, with the right result."""
    addr = f"usdp://{host_a}:{port}"
    procs.start("scheduler", "scheduler", "--protocol", "usdp", "--host", host_a,
                "--port", str(port), "--no-dashboard")
    workers = {procs.start(f"worker{i}", "worker", addr, "--host", host_a,
                           "--nthreads", "1", "--no-nanny", "--memory-limit", "0",
                           "--no-dashboard", "--death-timeout", "240")
               for i in range(2)}
    _wait_listening(host_a, port)
    with Client(addr, timeout=TIMEOUT) as c:
        try:
            c.wait_for_workers(2, timeout=TIMEOUT)
        except TimeoutError:
            pytest.fail(f"workers did not register:\n{procs.logs()}")
        _check_usdp(c)
        by_pid = {pid: a for a, pid in c.run(os.getpid).items()}
        assert set(by_pid) == {p.pid for p in workers}
        x = np.arange(1 << 20, dtype=np.float64)
        # A computed input (not scattered: scattered data dies with its worker).
        fx = c.submit(np.arange, 1 << 20, dtype=np.float64)
        marker = str(tmp_path / "attempts")
        fut = c.submit(_slow_then_sum, marker, fx, pure=False)
        _wait_for(lambda: os.path.exists(marker) and Path(marker).read_text().endswith("\n"),
                  "the task to start")
        victim = int(Path(marker).read_text().split()[0])
        assert victim in by_pid
        os.kill(victim, signal.SIGKILL)
        _wait_for(lambda: by_pid[victim] not in c.scheduler_info()["workers"],
                  "the scheduler to see the killed worker lost")
        try:
            pid, total = fut.result(timeout=TIMEOUT)
        except Exception as exc:
            raise AssertionError(f"{exc!r}; the cluster's logs:\n{procs.logs()}") from exc
        assert pid != victim and pid in by_pid
        assert total == float(x.sum())
        assert list(c.scheduler_info()["workers"]) == [by_pid[pid]]


# ---------------------------------------------------------------------------- two hosts


def _spawn_b(host_b: HostB, *args: str) -> int:
    """A dask CLI process on host B, its output in a log file there (the agent's pipes
    would fill up with dask's logging)."""
    cmd = " ".join([DASK, *args])
    env = {**ENV}
    return host_b.spawn(["sh", "-c", f"exec {cmd} >/tmp/dask-{args[0]}-$$.log 2>&1"], env)


@pytest.mark.twohost
def test_two_hosts_scheduler_and_worker_on_b(host_b: HostB, port: int) -> None:
    """Scheduler and worker on host B (CLIs), client on host A: a 64 MiB array crosses
    the link both ways, computed on B."""
    addr = f"usdp://{host_b.addr}:{port}"
    pids = [_spawn_b(host_b, "scheduler", "--protocol", "usdp", "--interface", "eth0",
                     "--port", str(port), "--no-dashboard")]
    try:
        pids.append(_spawn_b(host_b, "worker", addr, "--host", host_b.addr,
                             "--nthreads", "1", "--memory-limit", "0",
                             "--no-dashboard", "--death-timeout", "240"))
        _wait_listening(host_b.addr, port)
        with Client(addr, timeout=TIMEOUT) as c:
            c.wait_for_workers(1, timeout=TIMEOUT)
            _check_usdp(c)
            [w] = c.scheduler_info()["workers"]
            assert w.startswith(f"usdp://{host_b.addr}:")
            x = np.random.default_rng(2).random(MB64)
            [fx] = c.scatter([x])
            y = c.submit(lambda a: a * 2 + 1, fx)
            got = y.result(timeout=TIMEOUT)
            assert np.array_equal(got, x * 2 + 1)
            assert c.submit(lambda a: float(a.sum()), fx).result(timeout=TIMEOUT) \
                == pytest.approx(float(x.sum()))
    finally:
        for pid in reversed(pids):  # SIGTERM: the nanny takes its worker down with it
            host_b.agent.kill(pid, signal.SIGTERM)
            if host_b.wait(pid, 60)["rc"] is None:
                host_b.kill(pid)
                host_b.wait(pid, 60)
