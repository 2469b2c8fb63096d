"""Fixtures for tests that need a real rxe device (the test bed provides one).

Every test in this folder is marked ``rxe``. Without a device they are skipped, and the
project's test command fails a run in which any rxe test was skipped or none ran.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from usdptools.testbed import rxe


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.rxe)


@pytest.fixture(scope="session", autouse=True)
def _enough_fds() -> None:
    """A connection holds 5 fds on each side (2 completion channels, its CM channel, the
    readiness pair), so the 100-connection tests need ~1000 fds plus the listener's: at
    the default soft limit of 1024 they ran at the edge (one EMFILE seen). Raise the soft
    limit as a server with hundreds of connections must."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@pytest.fixture(scope="session")
def rxe_dev() -> str:
    """The name of the local rxe device (``USDP_RXE_DEV``), checked to be ACTIVE."""
    dev = os.environ.get("USDP_RXE_DEV", "")
    if not dev or dev not in rxe.rdma_devices():
        pytest.skip(f"no rxe device (USDP_RXE_DEV={dev!r}); run through scripts/test")
    assert rxe.port_state(dev).endswith("ACTIVE"), rxe.port_state(dev)
    return dev


@pytest.fixture(scope="session")
def host_a(rxe_dev: str) -> str:
    """This host's address on the rxe link (client and server share it on one host)."""
    return os.environ.get("USDP_HOST_A", rxe.HOST_A_ADDR)


@pytest.fixture
def port() -> int:
    """A port for one test's listener (random, so reruns do not collide)."""
    return random.randrange(20000, 60000)


class HostB:
    """Host B of a two-host bed, reached through its agent: processes and faults there."""

    def __init__(self) -> None:
        from usdptools.testbed.agent import AgentClient

        self.addr = os.environ["USDP_HOST_B"]
        self.agent = AgentClient(self.addr)
        self.agent.call(op="ping")

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        return self.agent.spawn(argv, env)

    def wait(self, pid: int, timeout: float) -> dict[str, Any]:
        return self.agent.wait(pid, timeout)

    def kill(self, pid: int) -> None:
        self.agent.kill(pid)

    def netem(self, spec: dict[str, Any] | None) -> None:
        self.agent.netem(spec)


@pytest.fixture(scope="session")
def host_b(rxe_dev: str) -> Iterator[HostB]:
    """Host B (two-host bed only)."""
    if os.environ.get("USDP_HOSTS") != "2":
        pytest.skip("needs the two-host bed (scripts/rxe-vm --hosts 2)")
    b = HostB()
    yield b
    b.agent.close()


@pytest.fixture
def netem(host_b: HostB) -> Iterator[Any]:
    """``netem(spec)`` puts the same netem qdisc on both ends of the link; removed after."""

    def apply(spec: dict[str, Any] | None) -> None:
        rxe.netem("eth0", spec)
        host_b.netem(spec)

    yield apply
    apply(None)


@pytest.fixture(scope="session")
def host_a6(rxe_dev: str) -> str:
    """This host's IPv6 address on the rxe link (RFC 5180 benchmarking range)."""
    return os.environ.get("USDP_HOST_A6", rxe.HOST_A_ADDR6)
