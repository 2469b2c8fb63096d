"""Plain pyverbs RC endpoints connected through asynchronous RDMA CM: no usdp code.

Used by the smoke tests (the test bed itself must be proven with nothing of ours on top)
and runnable as a script so host B can run the passive side of a two-host smoke test:
``python tests/rxe/rawverbs.py serve ADDR PORT NBYTES COUNT``.
"""

from __future__ import annotations

import hashlib
import select
import sys
import time
from dataclasses import dataclass
from typing import Any

import pyverbs.cm_enums as cme
import pyverbs.enums as e
from pyverbs.cmid import CMID, AddrInfo, CMEvent, CMEventChannel, ConnParam
from pyverbs.cq import CQ, CompChannel
from pyverbs.mr import MR
from pyverbs.qp import QP, QPCap, QPInitAttr
from pyverbs.wr import SGE, RecvWR, SendWR

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from usdp._fdfind import CM_CHANNEL, COMP_CHANNEL, create_with_fd

TIMEOUT = 60.0  # seconds; every wait below is bounded


def wait_fd(fd: int, timeout: float = TIMEOUT) -> None:
    p = select.poll()  # not select.select: fds above 1023
    p.register(fd, select.POLLIN)
    if not p.poll(max(0, int(timeout * 1000))):
        raise TimeoutError(f"fd {fd} not readable within {timeout}s")


class Channel:
    """A CM event channel with its fd found, and a blocking-free ``next_event``."""

    def __init__(self) -> None:
        self.ch, self.fd = create_with_fd(CMEventChannel, CM_CHANNEL)

    def next_event(self, want: int | None = None) -> CMEvent:
        wait_fd(self.fd)
        ev = CMEvent(self.ch)
        if want is not None and ev.event_type != want:
            got = ev.event_type
            ev.ack_cm_event()
            raise RuntimeError(f"CM event {got}, expected {want}")
        return ev


@dataclass
class Endpoint:
    cmid: CMID
    comp: CompChannel
    comp_fd: int
    cq: CQ
    qp: QP
    mr: MR
    size: int
    events: int = 0

    def post_recv(self) -> None:
        self.qp.post_recv(RecvWR(wr_id=1, num_sge=1, sg=[SGE(self.mr.buf, self.size,
                                                                 self.mr.lkey)]))

    def post_send(self, data: bytes) -> None:
        self.mr.write(data, len(data), 0)
        wr = SendWR(wr_id=2, opcode=e.IBV_WR_SEND, num_sge=1,
                    sg=[SGE(self.mr.buf, len(data), self.mr.lkey)],
                    send_flags=e.IBV_SEND_SIGNALED)
        self.qp.post_send(wr)

    def wait_completion(self) -> Any:
        """One completion, obtained through a CQ *event* waited on with select."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            n, wcs = self.cq.poll(1)
            if n:
                wc = wcs[0]
                if wc.status != e.IBV_WC_SUCCESS:
                    raise RuntimeError(f"completion status {wc.status}")
                return wc
            self.cq.req_notify()
            n, wcs = self.cq.poll(1)  # close the race between the poll and the arm
            if n:
                return wcs[0]
            wait_fd(self.comp_fd, max(0.0, deadline - time.monotonic()))
            self.comp.get_cq_event(self.cq)
            self.cq.ack_events(1)
            self.events += 1


def _endpoint(cmid: CMID, size: int) -> Endpoint:
    comp, fd = create_with_fd(lambda: CompChannel(cmid.context), COMP_CHANNEL)
    cq = CQ(cmid.context, 16, None, comp, 0)
    cap = QPCap(max_send_wr=8, max_recv_wr=8, max_send_sge=1, max_recv_sge=1)
    qp = QP(cmid.pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=cap))
    mr = MR(cmid.pd, size, e.IBV_ACCESS_LOCAL_WRITE)
    return Endpoint(cmid, comp, fd, cq, qp, mr, size)


def _to_init(ep: Endpoint) -> None:
    """RESET -> INIT; receives can be posted from INIT on (not in RESET)."""
    attr, mask = ep.cmid.init_qp_attr(e.IBV_QPS_INIT)
    ep.qp.modify(attr, mask)


def _to_rts(ep: Endpoint) -> None:
    for state in (e.IBV_QPS_RTR, e.IBV_QPS_RTS):
        attr, mask = ep.cmid.init_qp_attr(state)
        if state == e.IBV_QPS_RTS:
            attr.retry_cnt, attr.timeout = 6, 14  # 7 would mean "never fail" on rxe
        ep.qp.modify(attr, mask)


class Listener:
    def __init__(self, addr: str, port: int) -> None:
        self.chan = Channel()
        self.cmid = CMID(creator=self.chan.ch, port_space=cme.RDMA_PS_TCP)
        self.cmid.bind_addr(AddrInfo(src=addr, src_service=str(port),
                                     port_space=cme.RDMA_PS_TCP, flags=cme.RAI_PASSIVE))
        self.cmid.listen()

    def accept(self, size: int) -> Endpoint:
        ev = self.chan.next_event(cme.RDMA_CM_EVENT_CONNECT_REQUEST)
        cmid = CMID(creator=ev, listen_id=self.cmid)
        ev.ack_cm_event()
        ep = _endpoint(cmid, size)
        _to_init(ep)
        ep.post_recv()
        _to_rts(ep)
        cmid.accept(ConnParam(qp_num=ep.qp.qp_num))
        self.chan.next_event(cme.RDMA_CM_EVENT_ESTABLISHED).ack_cm_event()
        return ep


def connect(addr: str, port: int, size: int, src: str | None = None) -> tuple[Channel, Endpoint]:
    chan = Channel()
    cmid = CMID(creator=chan.ch, port_space=cme.RDMA_PS_TCP)
    cmid.resolve_addr(AddrInfo(src=src or addr, dst=addr,
                               dst_service=str(port), port_space=cme.RDMA_PS_TCP), 2000)
    chan.next_event(cme.RDMA_CM_EVENT_ADDR_RESOLVED).ack_cm_event()
    cmid.resolve_route(2000)
    chan.next_event(cme.RDMA_CM_EVENT_ROUTE_RESOLVED).ack_cm_event()
    ep = _endpoint(cmid, size)
    _to_init(ep)
    ep.post_recv()
    cmid.connect(ConnParam(qp_num=ep.qp.qp_num))
    chan.next_event(cme.RDMA_CM_EVENT_CONNECT_RESPONSE).ack_cm_event()
    _to_rts(ep)
    cmid.establish()
    return chan, ep


def serve(addr: str, port: int, size: int, count: int) -> str:
    """Accept one connection, receive ``count`` messages, return their SHA-256."""
    lst = Listener(addr, port)
    print("listening", flush=True)
    ep = lst.accept(size)
    h = hashlib.sha256()
    for _ in range(count):
        wc = ep.wait_completion()
        h.update(ep.mr.read(wc.byte_len, 0))
        ep.post_recv()
    # Tell the sender we are done, so it cannot close before the last receive.
    ep.post_send(b"done")
    ep.wait_completion()
    return h.hexdigest()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        print(serve(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])))
