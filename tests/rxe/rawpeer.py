"""A raw pyverbs peer that speaks usdp's wire format by hand: no usdp socket code.

It builds its QP like ``rawverbs`` (plain pyverbs over asynchronous RDMA CM), encodes its
Hello and frames with ``usdp._wire`` (the codec only), and posts whatever frames a test
asks for, valid or not. It tracks nothing for the peer: sequence numbers, credits and acks
are the caller's to choose, which is the point (hostile-peer tests).
"""

from __future__ import annotations

import time
from typing import Any

import pyverbs.cm_enums as cme
import pyverbs.enums as e
from pyverbs.cmid import CMID, AddrInfo, ConnParam
from pyverbs.cq import CQ, CompChannel
from pyverbs.mr import MR
from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
from pyverbs.wr import SGE, RecvWR, SendWR

from tests.rxe.rawverbs import Channel, wait_fd
from usdp._fdfind import COMP_CHANNEL, create_with_fd
from usdp._wire import (
    HEADER_SIZE,
    NO_SEQ,
    Features,
    Flags,
    HandshakeKind,
    Header,
    Hello,
    Mid,
    encode_header,
)

RECV_BUFS = 4  # the least a Hello may offer
SLOT = 4096
SEND_AREA = 64 * 1024


def frame(mid: int, mseq: int, payload: bytes = b"", *, bufs: int = 0,
          mseq_ack: int = NO_SEQ, length: int | None = None) -> bytes:
    """Header + payload; ``length`` overrides the header's ``len`` (to lie about it)."""
    n = HEADER_SIZE + len(payload) if length is None else length
    try:
        return encode_header(Header(Mid(mid), Flags(0), bufs, n, mseq, mseq_ack)) + payload
    except ValueError:  # not a known Mid: pack the header by hand
        return bytes([mid, 0]) + bufs.to_bytes(2, "big") + n.to_bytes(4, "big") \
            + mseq.to_bytes(4, "big") + mseq_ack.to_bytes(4, "big") + payload


class RawPeer:
    """An RC connection to a usdp listener, with a receive ring of ``RECV_BUFS`` slots."""

    def __init__(self, addr: str, port: int, timeout: float = 30.0,
                 hello: bytes | None = None) -> None:
        self.timeout = timeout
        self.frames: list[bytes] = []  # every frame received, in order
        self.rejected: bytes | None = None  # the Reject's private data, if refused
        self.owed = 0  # slots re-posted and not yet returned in a frame's ``bufs``
        self.ack = NO_SEQ  # mseq of the last frame received
        self.mseq = 0  # the next frame's sequence number, for frames built by ``next``
        deadline = time.monotonic() + timeout
        self.chan = Channel()
        self.cmid = CMID(creator=self.chan.ch, port_space=cme.RDMA_PS_TCP)
        self.cmid.resolve_addr(AddrInfo(src=addr, dst=addr, dst_service=str(port),
                                        port_space=cme.RDMA_PS_TCP), 2000)
        self.chan.next_event(cme.RDMA_CM_EVENT_ADDR_RESOLVED).ack_cm_event()
        self.cmid.resolve_route(2000)
        self.chan.next_event(cme.RDMA_CM_EVENT_ROUTE_RESOLVED).ack_cm_event()
        ctx = self.cmid.context
        self.comp, self.comp_fd = create_with_fd(lambda: CompChannel(ctx), COMP_CHANNEL)
        self.cq = CQ(ctx, 64, None, self.comp, 0)
        cap = QPCap(max_send_wr=16, max_recv_wr=RECV_BUFS, max_send_sge=1, max_recv_sge=1)
        self.qp = QP(self.cmid.pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq,
                                               cap=cap))
        # Slots first, then a send area; a separate MR is what SrcAvail advertises.
        self.mr = MR(self.cmid.pd, RECV_BUFS * SLOT + SEND_AREA, e.IBV_ACCESS_LOCAL_WRITE)
        self._move(e.IBV_QPS_INIT)
        for slot in range(RECV_BUFS):  # every receive posted before the Hello goes out
            self.post_recv(slot)
        if hello is None:
            hello = Hello(HandshakeKind.HELLO, RECV_BUFS, SLOT, SLOT, Features.ZCOPY).encode()
        param = ConnParam(resources=1, depth=1, retry=6, rnr_retry=6, qp_num=self.qp.qp_num,
                          data_len=56)
        param.set_private_data(hello)
        self.cmid.connect(param)
        wait_fd(self.chan.fd, max(0.0, deadline - time.monotonic()))
        ev = self.chan.next_event()
        if ev.event_type == cme.RDMA_CM_EVENT_REJECTED:
            self.rejected = bytes(ev.private_data or b"")
            ev.ack_cm_event()
            return
        if ev.event_type != cme.RDMA_CM_EVENT_CONNECT_RESPONSE:
            got = ev.event_type
            ev.ack_cm_event()
            raise RuntimeError(f"CM event {got}, expected CONNECT_RESPONSE")
        ev.ack_cm_event()
        self._move(e.IBV_QPS_RTR)
        self._move(e.IBV_QPS_RTS)
        self.cmid.establish()  # the RTU

    def next(self, mid: int, payload: bytes = b"", **kw: Any) -> bytes:
        """The next frame in sequence, returning what we owe and acking what we got;
        keywords override any field (``mseq``, ``bufs``, ``mseq_ack``, ``length``)."""
        kw.setdefault("mseq", self.mseq)
        kw.setdefault("bufs", self.owed)
        kw.setdefault("mseq_ack", self.ack)
        self.mseq += 1
        self.owed -= min(self.owed, kw["bufs"])
        mseq = kw.pop("mseq")
        return frame(mid, mseq, payload, **kw)

    def _move(self, state: int) -> None:
        attr, mask = self.cmid.init_qp_attr(state)
        if state == e.IBV_QPS_INIT:  # let the usdp side RDMA-read what we advertise
            attr.qp_access_flags |= e.IBV_ACCESS_REMOTE_READ
            mask |= e.IBV_QP_ACCESS_FLAGS
        elif state == e.IBV_QPS_RTR:
            attr.max_dest_rd_atomic = max(attr.max_dest_rd_atomic, 1)
            mask |= e.IBV_QP_MAX_DEST_RD_ATOMIC
        elif state == e.IBV_QPS_RTS:
            attr.retry_cnt, attr.timeout, attr.rnr_retry = 6, 14, 6
            mask |= e.IBV_QP_TIMEOUT | e.IBV_QP_RETRY_CNT | e.IBV_QP_RNR_RETRY
        self.qp.modify(attr, mask)

    def post_recv(self, slot: int) -> None:
        sge = SGE(self.mr.buf + slot * SLOT, SLOT, self.mr.lkey)
        self.qp.post_recv(RecvWR(wr_id=slot, num_sge=1, sg=[sge]))

    def send(self, data: bytes) -> None:
        """Post one SEND of exactly ``data`` and wait for its completion."""
        off = RECV_BUFS * SLOT
        self.mr.write(data, len(data), off)
        wr = SendWR(wr_id=1 << 20, opcode=e.IBV_WR_SEND, num_sge=1,
                    sg=[SGE(self.mr.buf + off, len(data), self.mr.lkey)],
                    send_flags=e.IBV_SEND_SIGNALED)
        self.qp.post_send(wr)
        wc = self._next_wc(lambda w: w.wr_id == 1 << 20)
        if wc is None or wc.status != e.IBV_WC_SUCCESS:
            raise RuntimeError(f"send failed: {None if wc is None else wc.status}")

    def recv_frame(self, timeout: float | None = None) -> bytes | None:
        """The next frame the usdp side sent (its slot is re-posted), or None if the QP
        failed (flush) instead."""
        wc = self._next_wc(lambda w: w.wr_id < RECV_BUFS or w.status != 0, timeout)
        if wc is None or wc.status != e.IBV_WC_SUCCESS:
            return None
        data = bytes(self.mr.read(wc.byte_len, wc.wr_id * SLOT))
        self.frames.append(data)
        self.ack = int.from_bytes(data[8:12], "big")
        self.post_recv(wc.wr_id)
        self.owed += 1
        return data

    def _next_wc(self, want: Any, timeout: float | None = None) -> Any:
        """Completions until one matches ``want``; others (receives) are kept for later."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        pending: list[Any] = getattr(self, "_pending", [])
        self._pending = pending
        for i, wc in enumerate(pending):
            if want(wc):
                return pending.pop(i)
        armed = False
        while True:
            n, wcs = self.cq.poll(1)
            if n:
                wc = wcs[0]
                if want(wc):
                    return wc
                pending.append(wc)
                continue
            if not armed:  # arm, then poll once more: closes the poll/arm race
                self.cq.req_notify()
                armed = True
                continue
            wait_fd(self.comp_fd, max(0.0, deadline - time.monotonic()))
            self.comp.get_cq_event(self.cq)
            self.cq.ack_events(1)
            armed = False

    def cm_event(self, timeout: float) -> int:
        """The next CM event's type (e.g. DISCONNECTED after the usdp side aborted)."""
        wait_fd(self.chan.fd, timeout)
        ev = self.chan.next_event()
        t = int(ev.event_type)
        ev.ack_cm_event()
        return t

    def to_error(self) -> None:
        """Move our QP to ERR: the HCA stops answering (the peer's requests go unacked,
        and it retries them), while the CM connection stays up."""
        attr = QPAttr()
        attr.qp_state = e.IBV_QPS_ERR
        self.qp.modify(attr, e.IBV_QP_STATE)

    def remote_mr(self, size: int) -> MR:
        return MR(self.cmid.pd, size, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ)

    def close(self) -> None:
        for obj in (self.qp, self.mr, self.cq, self.comp):
            try:
                obj.close()
            except Exception:
                pass
        try:
            self.cmid.close()
        except Exception:
            pass
        self.chan.ch.close()
