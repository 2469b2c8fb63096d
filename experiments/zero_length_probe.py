"""Does rxe complete a zero-length RDMA WRITE / READ with rkey 0 and address 0?

The credit-free liveness probe (docs/design.md, failure semantics) needs a signaled work
request that the peer's *HCA* answers without a receive buffer (so no credit) and
without any memory of the peer's (so nothing to advertise). IB spec C9-88: a zero-length
RDMA operation need not validate the R_Key or the virtual address. Measured here on the
test bed's rxe, with plain pyverbs (no usdp code), for each combination of

* opcode: RDMA WRITE or RDMA READ, zero SGEs, rkey 0, remote address 0;
* the responder QP's access flags: none, REMOTE_READ (what usdp sets), REMOTE_WRITE;

and, as a negative control, a one-byte READ with rkey 0 (must fail: the rkey is checked
once there is something to access). Last, with the peer's QP moved to the error state (a
dead peer that sends nothing back; retry_cnt 7 retries forever on rxe), whether the
probe stays uncompleted, as the watchdog needs.

    scripts/rxe-vm -- .venv/bin/python experiments/zero_length_probe.py
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyverbs.enums as e
from pyverbs.qp import QPAttr
from pyverbs.wr import SGE, SendWR

from tests.rxe import rawverbs

ADDR = os.environ.get("USDP_HOST_A", "198.18.0.1")
WC_NAMES = {v: k for k, v in vars(e).items()
            if isinstance(v, int) and (k == "IBV_WC_SUCCESS"
                                       or (k.startswith("IBV_WC_") and k.endswith("_ERR")))}


def set_access(ep: rawverbs.Endpoint, flags: int) -> None:
    """Change the responder's QP access flags (allowed in RTS)."""
    attr = QPAttr()
    attr.qp_access_flags = flags
    ep.qp.modify(attr, e.IBV_QP_ACCESS_FLAGS)


def post_probe(ep: rawverbs.Endpoint, opcode: int, length: int = 0) -> None:
    # pyverbs 44 refuses a WR without SGEs ("A WR needs at least one SGE"): a zero-length
    # SGE on our own memory instead.
    wr = SendWR(wr_id=7, opcode=opcode, num_sge=1, sg=[SGE(ep.mr.buf, length, ep.mr.lkey)],
                send_flags=e.IBV_SEND_SIGNALED)
    wr.set_wr_rdma(0, 0)  # rkey 0, remote address 0
    ep.qp.post_send(wr)


def wait_wc(ep: rawverbs.Endpoint, timeout: float) -> Any:
    """The next completion on the (shared) CQ, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n, wcs = ep.cq.poll(1)
        if n:
            return wcs[0]
        time.sleep(0.01)
    return None


def pair(port: int) -> tuple[rawverbs.Endpoint, rawverbs.Endpoint]:
    """A fresh connection (a failed WR moves the requester's QP to error)."""
    lst = rawverbs.Listener(ADDR, port)
    server: dict[str, rawverbs.Endpoint] = {}
    t = threading.Thread(target=lambda: server.setdefault("ep", lst.accept(4096)))
    t.start()
    _chan, cli = rawverbs.connect(ADDR, port, 4096)
    t.join(30)
    pair.keep.append((lst, _chan))  # type: ignore[attr-defined]
    return cli, server["ep"]


pair.keep = []  # type: ignore[attr-defined]


def main() -> int:
    ok = True
    cases = [
        ("WRITE", e.IBV_WR_RDMA_WRITE, "none", 0, 0),
        ("WRITE", e.IBV_WR_RDMA_WRITE, "REMOTE_READ", e.IBV_ACCESS_REMOTE_READ, 0),
        ("WRITE", e.IBV_WR_RDMA_WRITE, "REMOTE_WRITE", e.IBV_ACCESS_REMOTE_WRITE, 0),
        ("READ", e.IBV_WR_RDMA_READ, "none", 0, 0),
        ("READ", e.IBV_WR_RDMA_READ, "REMOTE_READ", e.IBV_ACCESS_REMOTE_READ, 0),
        ("READ", e.IBV_WR_RDMA_READ, "REMOTE_READ", e.IBV_ACCESS_REMOTE_READ, 1),
    ]
    for i, (name, op, acc_name, acc, length) in enumerate(cases):
        cli, srv = pair(18515 + i)
        set_access(srv, acc)
        what = f"{'zero-length' if not length else f'{length}-byte':11} {name:5} rkey 0, " \
               f"responder access {acc_name:12}"
        t0 = time.monotonic()
        try:
            post_probe(cli, op, length)
        except Exception as exc:  # a refused post is a result too
            print(f"{what}: post failed: {exc}")
            ok = False
            continue
        wc = wait_wc(cli, 10.0)
        dt = (time.monotonic() - t0) * 1000
        if wc is None:
            print(f"{what}: NO completion in 10 s")
            continue
        print(f"{what}: {WC_NAMES.get(wc.status, wc.status)} "
              f"(wr_id {wc.wr_id}, byte_len {wc.byte_len}, {dt:.1f} ms)")
        if not length and name == "READ" and acc and wc.status != e.IBV_WC_SUCCESS:
            ok = False
    return 0 if ok else 1


def dead_peer() -> None:
    """Second connection: the responder's QP goes to error, then a zero-length READ."""
    port = 18530
    plain_rts = rawverbs._to_rts

    def rts_forever(ep: rawverbs.Endpoint) -> None:  # usdp's retry_cnt: 7, forever on rxe
        for state in (e.IBV_QPS_RTR, e.IBV_QPS_RTS):
            attr, mask = ep.cmid.init_qp_attr(state)
            if state == e.IBV_QPS_RTS:
                attr.retry_cnt, attr.timeout = 7, 14
            ep.qp.modify(attr, mask)

    rawverbs._to_rts = rts_forever
    lst = rawverbs.Listener(ADDR, port)
    server: dict[str, rawverbs.Endpoint] = {}
    t = threading.Thread(target=lambda: server.setdefault("ep", lst.accept(4096)))
    t.start()
    _chan, cli = rawverbs.connect(ADDR, port, 4096)
    t.join(30)
    srv = server["ep"]
    rawverbs._to_rts = plain_rts
    set_access(srv, e.IBV_ACCESS_REMOTE_READ)
    srv.qp.modify(QPAttr(qp_state=e.IBV_QPS_ERR), e.IBV_QP_STATE)
    for _name, op in (("READ", e.IBV_WR_RDMA_READ), ("WRITE", e.IBV_WR_RDMA_WRITE)):
        post_probe(cli, op)
    t0 = time.monotonic()
    wc = wait_wc(cli, 5.0)
    print(f"({time.monotonic() - t0:.1f} s) "
          "zero-length READ+WRITE to a peer QP in error, retry_cnt 7: "
          + ("no completion in 5 s (the watchdog's case)" if wc is None
             else f"completion {WC_NAMES.get(wc.status, wc.status)}"))


if __name__ == "__main__":
    rc = main()
    dead_peer()
    sys.exit(rc)
