"""Bring a soft-RoCE (rxe) test link up or down, through netlink only.

Links, addresses, namespaces and qdiscs go through pyroute2 (rtnetlink); the rxe device
itself through RDMA netlink (``NETLINK_RDMA``, ``RDMA_NLDEV_CMD_NEWLINK``), for which
pyroute2 has no class, so a small message class is declared here. The numeric values are
those of ``<rdma/rdma_netlink.h>`` (checked against linux-libc-dev 6.1).

Two shapes of link:

* ``--veth`` (one host): a veth pair ``usdp0`` / ``usdp1``; ``usdp0`` carries
  198.18.0.1 and the rxe device, ``usdp1`` lives in the network namespace ``usdp-b`` with
  198.18.0.2 (a TCP peer for comparisons). RDMA client and server share the one rxe device.
* ``--netdev IF --addr A`` (a VM of a two-host bed): rxe on an existing interface.

Run as ``python -m usdptools.testbed.rxe up|down|status``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink import NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, nlmsg
from pyroute2.netlink.nlsocket import NetlinkSocket

NETLINK_RDMA = 20
RDMA_NL_NLDEV = 5
RDMA_NLDEV_CMD_GET = 1
RDMA_NLDEV_CMD_NEWLINK = 3
RDMA_NLDEV_CMD_DELLINK = 4

VETH_A, VETH_B, PEER_NS = "usdp0", "usdp1", "usdp-b"
HOST_A_ADDR, HOST_B_ADDR, PREFIX = "198.18.0.1", "198.18.0.2", 24
# IPv6 benchmarking range (RFC 5180), the counterpart of 198.18.0.0/15.
HOST_A_ADDR6, HOST_B_ADDR6, PREFIX6 = "2001:2::1", "2001:2::2", 64
IFA_F_NODAD = 0x02  # no duplicate address detection: the address is usable at once
DEFAULT_RXE = "rxe0"


class rdma_nldev_msg(nlmsg):  # type: ignore[misc]  # pyroute2 names its messages so
    """An RDMA_NL_NLDEV message: no fixed header, just attributes."""

    nla_map = (
        (1, "RDMA_NLDEV_ATTR_DEV_INDEX", "uint32"),
        (2, "RDMA_NLDEV_ATTR_DEV_NAME", "asciiz"),
        (3, "RDMA_NLDEV_ATTR_PORT_INDEX", "uint32"),
        (51, "RDMA_NLDEV_ATTR_NDEV_NAME", "asciiz"),
        (65, "RDMA_NLDEV_ATTR_LINK_TYPE", "asciiz"),
    )


def _nldev_type(cmd: int) -> int:
    return (RDMA_NL_NLDEV << 10) + cmd  # RDMA_NL_GET_TYPE


def _rdma_request(cmd: int, attrs: list[tuple[str, Any]], flags: int) -> list[Any]:
    sock = NetlinkSocket(family=NETLINK_RDMA)
    try:
        msg = rdma_nldev_msg()
        msg["attrs"] = attrs
        sock.marshal.msg_map[_nldev_type(cmd)] = rdma_nldev_msg
        return list(sock.nlm_request(msg, msg_type=_nldev_type(cmd), msg_flags=flags))
    finally:
        sock.close()


def rdma_devices() -> list[str]:
    """Names of the RDMA devices, from sysfs (cheap and always there with ib_core)."""
    base = Path("/sys/class/infiniband")
    return sorted(p.name for p in base.iterdir()) if base.is_dir() else []


def rdma_link_add(name: str, netdev: str, link_type: str = "rxe") -> None:
    _rdma_request(
        RDMA_NLDEV_CMD_NEWLINK,
        [
            ("RDMA_NLDEV_ATTR_DEV_NAME", name),
            ("RDMA_NLDEV_ATTR_LINK_TYPE", link_type),
            ("RDMA_NLDEV_ATTR_NDEV_NAME", netdev),
        ],
        NLM_F_REQUEST | NLM_F_ACK,
    )


def rdma_link_del(name: str) -> None:
    index = int((Path("/sys/class/infiniband") / name / "ibdev_index").read_text()) \
        if (Path("/sys/class/infiniband") / name / "ibdev_index").exists() else None
    if index is None:
        # DELLINK wants the device index; find it with a dump.
        for m in _rdma_request(RDMA_NLDEV_CMD_GET, [], NLM_F_REQUEST | NLM_F_DUMP):
            if m.get_attr("RDMA_NLDEV_ATTR_DEV_NAME") == name:
                index = m.get_attr("RDMA_NLDEV_ATTR_DEV_INDEX")
    if index is None:
        return
    _rdma_request(
        RDMA_NLDEV_CMD_DELLINK, [("RDMA_NLDEV_ATTR_DEV_INDEX", index)],
        NLM_F_REQUEST | NLM_F_ACK,
    )


def port_state(dev: str, port: int = 1) -> str:
    p = Path("/sys/class/infiniband") / dev / "ports" / str(port) / "state"
    return p.read_text().strip() if p.exists() else "absent"


def wait_active(dev: str, timeout: float = 30.0) -> None:
    """rxe's port goes ACTIVE once its netdev has carrier; poll sysfs (bounded)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if port_state(dev).endswith("ACTIVE"):
            return
        time.sleep(0.05)  # sysfs offers no event to wait on
    raise TimeoutError(f"{dev} port 1 is {port_state(dev)!r}, not ACTIVE, after {timeout}s")


def load_modules() -> None:
    """On a native kernel, load rxe's modules (a VM's init already did)."""
    if Path("/sys/module/rdma_rxe").exists() and Path("/sys/module/rdma_ucm").exists():
        return
    for mod in ("rdma_rxe", "ib_uverbs", "rdma_ucm"):
        r = subprocess.run(["modprobe", mod], capture_output=True, text=True)
        if r.returncode != 0:
            raise OSError(errno.ENODEV, f"modprobe {mod} failed: {r.stderr.strip()}")


def native_rxe_possible() -> bool:
    """True when this kernel can give us rxe without a VM."""
    if Path("/sys/module/rdma_rxe").exists():
        return True
    release = os.uname().release
    return any(Path(f"/lib/modules/{release}").rglob("rdma_rxe.ko*")) \
        if Path(f"/lib/modules/{release}").is_dir() else False


def _add_addrs(ipr: Any, index: int, addr4: str, addr6: str) -> None:
    """Both test addresses on an interface (already present is fine: re-run safe)."""
    with contextlib.suppress(Exception):
        ipr.addr("add", index=index, address=addr4, prefixlen=PREFIX)
    with contextlib.suppress(Exception):
        ipr.addr("add", index=index, address=addr6, prefixlen=PREFIX6, flags=IFA_F_NODAD)


def up_veth(dev: str = DEFAULT_RXE) -> None:
    load_modules()
    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=VETH_A):
            ipr.link("add", ifname=VETH_A, kind="veth", peer=VETH_B)
        a = ipr.link_lookup(ifname=VETH_A)[0]
        if PEER_NS not in netns.listnetns():
            netns.create(PEER_NS)
        b = ipr.link_lookup(ifname=VETH_B)
        if b:
            ipr.link("set", index=b[0], net_ns_fd=PEER_NS)
        _add_addrs(ipr, a, HOST_A_ADDR, HOST_A_ADDR6)
        ipr.link("set", index=a, state="up")
    with NetNS(PEER_NS) as ns:
        b_idx = ns.link_lookup(ifname=VETH_B)[0]
        _add_addrs(ns, b_idx, HOST_B_ADDR, HOST_B_ADDR6)
        ns.link("set", index=b_idx, state="up")
        ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
    if dev not in rdma_devices():
        rdma_link_add(dev, VETH_A)
    wait_active(dev)


def up_netdev(netdev: str, addr: str, dev: str = DEFAULT_RXE) -> None:
    load_modules()
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=netdev)
        if not idx:
            raise OSError(errno.ENODEV, f"no network interface {netdev}")
        addr6 = HOST_A_ADDR6 if addr == HOST_A_ADDR else HOST_B_ADDR6
        _add_addrs(ipr, idx[0], addr, addr6)
        ipr.link("set", index=idx[0], state="up")
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
    if dev not in rdma_devices():
        rdma_link_add(dev, netdev)
    wait_active(dev)


def down(dev: str = DEFAULT_RXE) -> None:
    if dev in rdma_devices():
        rdma_link_del(dev)
    with IPRoute() as ipr:
        for i in ipr.link_lookup(ifname=VETH_A):
            ipr.link("del", index=i)
    if PEER_NS in netns.listnetns():
        netns.remove(PEER_NS)


def netem(ifname: str, spec: dict[str, Any] | None, ns: str | None = None) -> None:
    """Put a netem qdisc with ``spec`` (pyroute2 keywords: loss, delay, jitter, ...) as
    the root of ``ifname``, or remove it with ``spec=None``."""
    ipr: Any = NetNS(ns) if ns else IPRoute()
    with ipr:
        idx = ipr.link_lookup(ifname=ifname)[0]
        with contextlib.suppress(Exception):
            ipr.tc("del", index=idx, handle="1:", root=True)
        if spec and "rate" in spec:
            # pyroute2's netem rate encoding is refused by the kernel (ERANGE): use tc.
            argv = ["tc", "qdisc", "add", "dev", ifname, "root", "handle", "1:", "netem",
                    "delay", f"{spec.get('delay', 0)}us", f"{spec.get('jitter', 0)}us",
                    "rate", str(spec["rate"])]
            if ns:
                argv = ["ip", "netns", "exec", ns, *argv]
            subprocess.run(argv, check=True, timeout=30, capture_output=True)
        elif spec:
            ipr.tc("add", "netem", index=idx, handle="1:", root=True, **spec)


def rdma_resources() -> dict[str, int]:
    """How many QPs, CQs, MRs, PDs and CM ids user processes hold on the RDMA devices, as
    the kernel's resource tracking sees them (``rdma -j res show KIND``; root for MRs).

    Device-wide on purpose: an object created by a thread that has since exited (an
    accept thread, say) is listed without a pid, so a per-pid count would miss exactly
    the leaks worth finding. In the test bed the tests are the only RDMA users. Kernel
    objects (``comm`` set, no pid: ib_core's GSI QP and the like) are not counted.
    """
    counts: dict[str, int] = {}
    for kind in ("qp", "cq", "mr", "pd", "cm_id"):
        out = subprocess.run(["rdma", "-j", "res", "show", kind], capture_output=True,
                             text=True, timeout=30, check=True).stdout
        rows = json.loads(out or "[]")
        counts[kind] = sum(1 for r in rows if isinstance(r, dict)
                           and ("pid" in r or "comm" not in r))
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m usdptools.testbed.rxe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="create the test link and the rxe device")
    up.add_argument("--veth", action="store_true", help="a veth pair (one host)")
    up.add_argument("--netdev", help="put rxe on this existing interface")
    up.add_argument("--addr", help="address for --netdev")
    up.add_argument("--dev", default=DEFAULT_RXE)
    dn = sub.add_parser("down", help="remove what 'up --veth' made")
    dn.add_argument("--dev", default=DEFAULT_RXE)
    sub.add_parser("status", help="list RDMA devices and their port state")
    args = ap.parse_args(argv)
    if args.cmd == "up":
        if args.netdev:
            if not args.addr:
                ap.error("--netdev needs --addr")
            up_netdev(args.netdev, args.addr, args.dev)
        else:
            up_veth(args.dev)
        print(f"{args.dev}: {port_state(args.dev)}", file=sys.stderr)
    elif args.cmd == "down":
        down(args.dev)
    else:
        for d in rdma_devices():
            print(f"{d}: {port_state(d)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
