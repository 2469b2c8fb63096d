"""The test bed's VMs die with their launcher (scripts/rxe-vm), however it is ended.

These run on the host (they boot a VM each, about a minute in all), not inside the bed:
``pytest -m testbed tests/testbed``. A VM is found by a marker unique to the test, the
``--out`` directory, which qemu's command line carries (``-virtfs ...,path=<out>``).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.testbed,
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                       reason="qemu-system-x86_64 is not installed (scripts/bootstrap)"),
]

ROOT = Path(__file__).resolve().parents[2]
RXE_VM = str(ROOT / "scripts" / "rxe-vm")
BOOT_DEADLINE = 300.0  # an emulated boot on a busy machine
GONE_DEADLINE = 60.0


def qemus_with(marker: str) -> list[int]:
    """Pids of qemu processes whose command line holds ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile
        if argv and b"qemu-system" in argv[0] and any(marker.encode() in a for a in argv):
            pids.append(int(proc.name))
    return pids


def wait_gone(marker: str) -> list[int]:
    """Wait (bounded) until no qemu with ``marker`` is left; returns the survivors."""
    end = time.monotonic() + GONE_DEADLINE
    while (left := qemus_with(marker)) and time.monotonic() < end:
        time.sleep(0.2)  # polling /proc: a foreign process's exit has no event to wait on
    return left


def wait_for_output(fd: int, needle: bytes, timeout: float) -> bool:
    """Read ``fd`` until ``needle`` shows up (True), EOF or ``timeout`` (False)."""
    end = time.monotonic() + timeout
    seen = b""
    while needle not in seen:
        r, _, _ = select.select([fd], [], [], max(0.0, end - time.monotonic()))
        if not r:
            return False
        chunk = os.read(fd, 65536)
        if not chunk:
            return False
        seen = seen[-len(needle):] + chunk
    return True


def kill_leftovers(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_timeout_sigterm_stops_the_vm(tmp_path: Path) -> None:
    """``timeout -s TERM`` ends the launcher while the guest command is still busy."""
    marker = str(tmp_path / "out-term")
    p = subprocess.Popen(["timeout", "-s", "TERM", "40", RXE_VM, "--out", marker, "--",
                          "sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen = False
    end = time.monotonic() + 40 + BOOT_DEADLINE
    while p.poll() is None and time.monotonic() < end:
        seen = seen or bool(qemus_with(marker))
        time.sleep(0.2)
    p.kill()  # only acts if the launcher outlived its own timeout (a failure below)
    _, err = p.communicate()
    left = wait_gone(marker)
    kill_leftovers(left)
    assert seen, f"no qemu carrying {marker} was ever seen; launcher said:\n{err.decode()}"
    assert p.returncode == 124, err.decode()  # timeout's status: it had to send the signal
    assert not left, f"qemu {left} outlived its launcher (SIGTERM)"
    assert b"SIGTERM: VMs stopped" in err, err.decode()


def test_sigkill_of_the_launcher_stops_the_vm(tmp_path: Path) -> None:
    """SIGKILL leaves the launcher no chance to clean up: the parent-death signal does it."""
    marker = str(tmp_path / "out-kill")
    p = subprocess.Popen([RXE_VM, "--out", marker, "--", "sleep", "300"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert p.stderr is not None
    try:
        # Wait for the guest's userspace, so the VM is busy with the command when we kill.
        booted = wait_for_output(p.stderr.fileno(), b"userspace after", BOOT_DEADLINE)
        running = qemus_with(marker)
    finally:
        p.kill()
        p.wait()
    left = wait_gone(marker)
    kill_leftovers(left)
    assert booted, "the guest never reached userspace"
    assert running, f"no qemu carrying {marker} while the guest ran"
    assert not left, f"qemu {left} outlived its SIGKILLed launcher"
