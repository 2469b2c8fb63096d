"""Setup errors on rxe name host:port and the failing step (resolve address, resolve route,
connect, bind), with the class a socket program expects."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys

import pytest

import usdp

TIMEOUT = 30.0


def test_nothing_listening_is_refused(host_a: str, port: int) -> None:
    with pytest.raises(ConnectionRefusedError) as info:
        usdp.create_connection((host_a, port), timeout=TIMEOUT)
    assert isinstance(info.value, usdp.ConnectionRefused)
    assert f"connect to {host_a}:{port}: connection refused" in str(info.value)


def test_a_tcp_only_peer_is_refused(host_a: str, port: int) -> None:
    """A peer without usdp (a kernel TCP listener, no RDMA one) refuses the RDMA connect."""
    with socket.create_server((host_a, port)), pytest.raises(usdp.ConnectionRefused) as info:
        usdp.create_connection((host_a, port), timeout=TIMEOUT)
    assert f"connect to {host_a}:{port}: connection refused" in str(info.value)
    assert "not usdp" in str(info.value)


def test_unanswered_address_names_the_resolve_step(host_a: str, port: int) -> None:
    """An address on the rxe link that nobody holds: address resolution gives up."""
    peer = host_a.rsplit(".", 1)[0] + ".99"
    with pytest.raises(usdp.UsdpError) as info:
        usdp.create_connection((peer, port), timeout=TIMEOUT)
    assert info.value.errno in (errno.EHOSTUNREACH, errno.ETIMEDOUT)
    assert f"connect to {peer}:{port}: resolve address" in str(info.value)


def test_address_without_an_rdma_device_names_the_step(port: int, rxe_dev: str) -> None:
    """Loopback has no RDMA device: the route cannot be resolved, and the message says
    how to get a device."""
    with pytest.raises(usdp.DeviceError) as info:
        usdp.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    assert f"connect to 127.0.0.1:{port}: resolve " in str(info.value)
    assert "rdma link add" in str(info.value)


def test_port_in_use(host_a: str, port: int) -> None:
    with usdp.SdpSocket() as first:
        first.bind((host_a, port))
        first.listen()
        second = usdp.SdpSocket()
        second.bind((host_a, port))
        with pytest.raises(usdp.AddressInUse) as info:
            second.listen()
        second.close()
    assert f"bind {host_a}:{port}" in str(info.value)


def test_listen_on_a_foreign_address(port: int, rxe_dev: str) -> None:
    s = usdp.SdpSocket()
    s.bind(("10.255.1.1", port))
    with pytest.raises(OSError) as info:
        s.listen()
    s.close()
    assert info.value.errno == errno.EADDRNOTAVAIL
    assert f"bind 10.255.1.1:{port}" in str(info.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop CAP_IPC_LOCK (the bed is)")
def test_memlock_limit_is_named(host_a: str, port: int) -> None:
    """Without CAP_IPC_LOCK and with a 128 KiB RLIMIT_MEMLOCK, the first 256 KiB of the
    receive ring cannot be registered: the error says which limit and how to raise it."""
    code = ("import sys, usdp\n"
            "try:\n"
            "    usdp.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)\n"
            "except OSError as e:\n"
            "    print(e.errno, e)\n")
    with usdp.SdpSocket() as lst:
        lst.bind((host_a, port))
        lst.listen()
        p = subprocess.run(["prlimit", "--memlock=131072:131072", "setpriv",
                            "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "--",
                            sys.executable, "-c", code, host_a, str(port)],
                           capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    err, _, msg = p.stdout.strip().partition(" ")
    assert int(err) == errno.ENOMEM, p.stdout
    assert f"connect to {host_a}:{port}: create the queue pair: registering" in msg, msg
    assert "RLIMIT_MEMLOCK" in msg and "ulimit -l" in msg, msg
