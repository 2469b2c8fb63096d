"""Verbs resources: device context, PD, CQs with completion channels, the RC QP, and the
registered rings of send and receive buffers. The only module (with ``_cm``) that touches
pyverbs.

Why each choice (see docs/design.md for the whole picture):

* One ``Device`` (context + PD) per RDMA device per process, opened by name, never the
  wrappers pyverbs hangs on a CMID: closing an accepted CMID nulls its listener's
  context/PD wrappers in pyverbs 44, which would break every sibling connection.
* Two CQs per connection (send, receive), each with its own completion channel: pyverbs'
  ``get_cq_event`` raises if a channel reports another CQ, and the 2005 SDP lock keeps one
  pending flag per CQ.
* Ring memory is an anonymous ``mmap`` registered with ``MR(address=...)``: Python gets a
  writable ``memoryview`` on the very bytes the HCA reads and writes, so payloads are
  copied once each way (user buffer <-> ring), never through ``MR.read``'s temporary
  ``bytes``.
* Work requests are built once per slot and re-posted as they are: pyverbs 44's
  ``SendWR``/``RecvWR``/``SGE`` leak their C memory when garbage-collected.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import mmap
import os
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

from usdp._errors import NO_DEVICE_HINT, DeviceError, UsdpError, from_pyverbs, no_pyverbs
from usdp._fdfind import COMP_CHANNEL, create_with_fd

log = logging.getLogger("usdp")


@contextlib.contextmanager
def importing_pyverbs() -> Iterator[None]:
    """Wrap the imports of pyverbs (here and in ``_cm``, the only modules that make them).

    Importing ``pyverbs.base`` runs ``logging.basicConfig(level=INFO)``, which would print
    every INFO record of the user's program: the root logger's handlers and level are put
    back as they were. A Python without pyverbs gets a :class:`DeviceError` that names the
    fix instead of a bare ``ModuleNotFoundError``: ``import usdp`` itself never imports
    pyverbs, only the first RDMA connect or listen does (through this module).
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    except ImportError as exc:
        raise no_pyverbs(exc) from exc
    finally:
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)
        root.setLevel(level)


with importing_pyverbs():
    import pyverbs.enums as e
    from pyverbs.cq import CQ, CompChannel
    from pyverbs.device import Context
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.pyverbs_error import PyverbsError, PyverbsRDMAError
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
    from pyverbs.wr import SGE, RecvWR, SendWR

#: RC transport timers: 4.096 us * 2**14 (~67 ms) before a retransmission. ``retry_cnt`` 7
#: means "retry forever" on rxe. With any smaller count, rxe also spends a retry on every
#: sequence-error NAK, so 5 % loss, jitter or reordering reset a healthy connection within
#: the first MiB (measured with 6). A dead peer is noticed by usdp's own watchdog instead
#: (``Options.ack_timeout``: a signaled send left unacknowledged that long fails the
#: connection), as TCP_USER_TIMEOUT does for TCP.
ACK_TIMEOUT = 14
RETRY_CNT = 7
#: Credits make RNR impossible by construction; a bounded RNR retry turns a protocol bug
#: into a visible error instead of a silent stall. 12 = 0.64 ms between RNR retries.
RNR_RETRY = 6
MIN_RNR_TIMER = 12

WC_SUCCESS = e.IBV_WC_SUCCESS
WC_FLUSH = e.IBV_WC_WR_FLUSH_ERR
#: QP states connection setup moves through (``QPResources.modify``).
QPS_INIT, QPS_RTR, QPS_RTS = e.IBV_QPS_INIT, e.IBV_QPS_RTR, e.IBV_QPS_RTS
ACCESS_LOCAL_WRITE = e.IBV_ACCESS_LOCAL_WRITE
ACCESS_REMOTE_READ = e.IBV_ACCESS_REMOTE_READ


def verbs_error(exc: PyverbsError, what: str) -> UsdpError:
    """Translate a pyverbs exception (kept for callers; see ``_errors.from_pyverbs``)."""
    return from_pyverbs(exc, what)


class Device:
    """One opened RDMA device (context + PD), shared by every connection on it."""

    _registry: ClassVar[dict[str, Device]] = {}
    _registry_lock = threading.Lock()

    def __init__(self, name: str) -> None:
        try:
            self.ctx = Context(name=name)
            self.pd = PD(self.ctx)
        except PyverbsError as exc:
            raise DeviceError(errno.ENODEV, f"opening RDMA device {name!r}: {exc}; "
                              f"{NO_DEVICE_HINT}") from exc
        self.name = name
        #: The liveness probe's page (``QPResources.post_probe``): every peer's probe reads
        #: one byte of it (offset 0), and ours land at ``PROBE_LANDING`` of it. It holds
        #: nothing but zeros, so its remote read right exposes no data: the only
        #: registration with a remote right that outlives a zero-copy transfer.
        self.probe_page = Ring(self, 1, mmap.PAGESIZE,
                               e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_READ)

    @classmethod
    def get(cls, name: str) -> Device:
        with cls._registry_lock:
            dev = cls._registry.get(name)
            if dev is None:
                dev = cls._registry[name] = Device(name)
            return dev


class Ring:
    """``count`` slots of ``size`` bytes in one registered, page-aligned mapping."""

    def __init__(self, dev: Device, count: int, size: int, access: int) -> None:
        self.count, self.size = count, size
        self._mm = mmap.mmap(-1, count * size)
        self._anchor = ctypes.c_char.from_buffer(self._mm)  # pins the mapping while registered
        self.addr = ctypes.addressof(self._anchor)
        self.view = memoryview(self._mm)
        try:
            self.mr = MR(dev.pd, count * size, access, address=self.addr)
        except PyverbsError as exc:
            self.close()
            raise verbs_error(exc, "registering a buffer ring") from exc
        self.lkey = self.mr.lkey

    def slot(self, i: int) -> memoryview:
        return self.view[i * self.size : (i + 1) * self.size]

    def close(self) -> None:
        mr = getattr(self, "mr", None)
        if mr is not None:
            mr.close()
            self.mr = None
        self.view.release()
        del self._anchor
        try:
            self._mm.close()
        except BufferError:
            # A view of the ring is still referenced (e.g. by the traceback of a latched
            # protocol error); the memory goes when that does. The MR is already gone.
            pass


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


def buffer_address(view: memoryview) -> int:
    """The address of a contiguous buffer's first byte, read-only buffers included.

    The caller keeps ``view`` alive for as long as the address is used: the export pins
    the memory (a bytearray cannot be resized while exported; bytes never move).
    """
    pb = _PyBuffer()
    _get_buffer(view, ctypes.byref(pb), 0)  # PyBUF_SIMPLE: contiguous bytes
    try:
        return int(pb.buf or 0)
    finally:
        _release_buffer(ctypes.byref(pb))


_remote_mrs = 0
_remote_mrs_lock = threading.Lock()


def remote_access_mrs() -> int:
    """How many registrations of user memory with remote access rights exist now (least
    privilege: only while a zero-copy transfer is outstanding). Each device's probe page
    (``Device.probe_page``, zeros only) is not counted: its right exposes no data."""
    return _remote_mrs


class UserMR:
    """A registration of the caller's own memory, for zero-copy."""

    def __init__(self, dev: Device, view: memoryview, access: int) -> None:
        global _remote_mrs
        self.view = view  # holds the export: the memory cannot go away under the HCA
        self.addr = buffer_address(view)
        self.length = len(view)
        self.remote = bool(access & (e.IBV_ACCESS_REMOTE_READ | e.IBV_ACCESS_REMOTE_WRITE))
        try:
            self.mr: Any = MR(dev.pd, self.length, access, address=self.addr)
        except PyverbsError as exc:
            raise verbs_error(exc, "registering a user buffer") from exc
        self.lkey: int = self.mr.lkey
        self.rkey: int = self.mr.rkey
        if self.remote:
            with _remote_mrs_lock:
                _remote_mrs += 1

    def close(self) -> None:
        global _remote_mrs
        if self.mr is None:
            return
        self.mr.close()  # deregistered: the rkey is of no use to anyone any more
        self.mr = None
        self.view.release()  # and the caller's buffer is its own again (resizable)
        if self.remote:
            with _remote_mrs_lock:
                _remote_mrs -= 1


#: wr_id of the (single) outstanding RDMA read; send slots use 0..count-1.
READ_WR_ID = 1 << 40
#: wr_id of the (single) outstanding liveness probe, a one-byte RDMA READ.
PROBE_WR_ID = READ_WR_ID + 1
#: Where in our own probe page the byte our probe reads lands (away from offset 0, the byte
#: peers read; the value is never looked at).
PROBE_LANDING = 64


#: Bytes a frame may have to go inline (``IBV_SEND_INLINE``: the HCA copies it from our
#: memory at post time, so it needs no registered slot). Control frames and small DATA go
#: this way; rxe allows up to 400, RDMA NICs typically more.
INLINE_SIZE = 256
#: Inline send slots per connection (unregistered memory, no registration cost).
INLINE_SLOTS = 4


class QPResources:
    """The verbs objects of one connection, with rings that grow with use.

    The QP and both CQs are created for the *largest* rings (``recv_max``, ``send_max``)
    so that growing never touches them; the rings themselves start with ``recv_count``
    receive slots and ``send_count`` registered send slots (plus ``INLINE_SLOTS``
    unregistered inline ones, when the device takes inline sends) and grow by whole
    registered segments (``grow_recv``/``grow_send``). Slot numbers are global and are
    the work requests' ``wr_id``: receive slots 0..recv_slots-1; send slots are the inline
    ones first, then the registered ones. ``recv_views``/``send_views`` hold one
    ``memoryview`` per slot (the hot path indexes a list instead of computing offsets)
    and are extended in place, so holders of the lists see new slots.
    """

    def __init__(self, dev: Device, *, recv_count: int, recv_size: int, send_count: int,
                 send_size: int, recv_max: int | None = None,
                 send_max: int | None = None) -> None:
        self.dev = dev
        self._closed = False
        self.recv_size, self.send_size = recv_size, send_size
        self.recv_max = max(recv_count, recv_max or recv_count)
        self.send_max = max(send_count, send_max or send_count)
        self._segments: list[Ring] = []
        self.recv_views: list[memoryview] = []
        self.send_views: list[memoryview] = []
        self.send_caps: list[int] = []  # bytes each send slot holds
        self._recv_wrs: list[Any] = []
        self._send_wrs: list[Any] = []
        self._send_sges: list[Any] = []
        self.inline_slots = 0
        self.registered_bytes = 0
        ctx = dev.ctx
        try:
            self.send_comp, self.send_fd = create_with_fd(lambda: CompChannel(ctx), COMP_CHANNEL)
            self.recv_comp, self.recv_fd = create_with_fd(lambda: CompChannel(ctx), COMP_CHANNEL)
            # Non-blocking: a user thread and the completion thread may both see an fd
            # readable; whoever reads second gets EAGAIN instead of blocking with the GIL.
            for fd in (self.send_fd, self.recv_fd):
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
            # A full CQ silently drops completions on rxe: size each for every WR it can
            # see, at the largest the rings may grow to (the QP's send queue has room
            # beyond the slots for the RDMA read and the liveness probe, and spare).
            send_wrs = self.send_max + INLINE_SLOTS
            self.send_cq = CQ(ctx, send_wrs + 8, None, self.send_comp, 0)
            self.recv_cq = CQ(ctx, self.recv_max + 8, None, self.recv_comp, 0)
            self.qp = self._create_qp(dev, send_wrs + 4)
            if not self.inline_slots and send_count < 2:
                # No inline sends on this device: control frames need registered slots
                # from the start (two: one stays free for them).
                if not self.admit((2 - send_count) * send_size):
                    raise UsdpError(errno.ENOBUFS, "no inline sends on this device, and no "
                                    "memory budget left for two send slots")
                send_count = 2
            # The unregistered inline slots come first (they exist only if the QP takes
            # inline data), then the first registered segments.
            if self.inline_slots:
                self._inline_mem = ctypes.create_string_buffer(INLINE_SLOTS * INLINE_SIZE)
                iview = memoryview(self._inline_mem).cast("B")
                base = ctypes.addressof(self._inline_mem)
                for i in range(INLINE_SLOTS):
                    self._add_send_slot(base + i * INLINE_SIZE, INLINE_SIZE, 0,
                                        iview[i * INLINE_SIZE : (i + 1) * INLINE_SIZE])
            self._add_recv(recv_count)
            self._add_send(send_count)
        except PyverbsError as exc:
            self.close()
            raise verbs_error(exc, "creating the queue pair") from exc
        except BaseException:
            self.close()  # a ring failed to register: free what exists
            raise
        # One RDMA-read WR, re-aimed for every read (see the send WRs for why).
        self._read_sge = SGE(0, 1, 0)
        self._read_wr = SendWR(wr_id=READ_WR_ID, opcode=e.IBV_WR_RDMA_READ, num_sge=1,
                               sg=[self._read_sge], send_flags=e.IBV_SEND_SIGNALED)
        self._read_wr.sg_list = self._read_sge
        # The liveness probe: until ``aim_probe`` names the byte the peer offered, a
        # zero-length RDMA READ of the peer's address 0, rkey 0, into nothing (pyverbs 44
        # refuses a WR without SGEs: one of length 0 into our probe page).
        page = dev.probe_page
        #: The byte of ours the peer's probe reads (Hello.probe_rkey, probe_addr): the
        #: device's probe page, registered as long as the device is open.
        self.probe_rkey: int = page.mr.rkey
        self.probe_addr: int = page.addr
        self._probe_sge = SGE(page.addr + PROBE_LANDING, 0, page.lkey)
        self._probe_wr = SendWR(wr_id=PROBE_WR_ID, opcode=e.IBV_WR_RDMA_READ, num_sge=1,
                                sg=[self._probe_sge], send_flags=e.IBV_SEND_SIGNALED)
        self._probe_wr.sg_list = self._probe_sge
        self._probe_wr.set_wr_rdma(0, 0)
        self.qp_num: int = self.qp.qp_num

    def _create_qp(self, dev: Device, max_send_wr: int) -> Any:
        """The RC QP, with inline sends if the device takes them (else without: then
        every frame goes through a registered slot)."""
        for inline in (INLINE_SIZE, 0):
            cap = QPCap(max_send_wr=max_send_wr, max_recv_wr=self.recv_max,
                        max_send_sge=1, max_recv_sge=1, max_inline_data=inline)
            init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.send_cq, rcq=self.recv_cq,
                              cap=cap, sq_sig_all=0)
            try:
                qp = QP(dev.pd, init)
            except PyverbsError:
                if inline:
                    continue
                raise
            self.inline_slots = INLINE_SLOTS if inline else 0
            return qp
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ rings

    @property
    def recv_slots(self) -> int:
        return len(self.recv_views)

    @property
    def send_slots(self) -> int:
        """Registered send slots (the inline ones not counted)."""
        return len(self.send_views) - self.inline_slots

    def _segment(self, count: int, size: int) -> Ring:
        ring = Ring(self.dev, count, size, e.IBV_ACCESS_LOCAL_WRITE)
        self._segments.append(ring)
        self.registered_bytes += count * size
        return ring

    def _add_recv(self, count: int) -> list[int]:
        if count <= 0:
            return []
        ring = self._segment(count, self.recv_size)
        first = len(self.recv_views)
        for i in range(count):
            # RecvWR copies its SGE, so the temporary SGE is freed at once.
            sge = SGE(ring.addr + i * ring.size, ring.size, ring.lkey)
            self._recv_wrs.append(RecvWR(wr_id=first + i, num_sge=1, sg=[sge]))
            sge.close()
            self.recv_views.append(ring.slot(i))
        return list(range(first, first + count))

    def _add_send_slot(self, addr: int, size: int, lkey: int, view: memoryview) -> None:
        # A SendWR pointed at an SGE's own struct (``sg_list``) lets us change the length
        # in place; the WR's close() then frees that struct. (The SG list the constructor
        # copied is lost: 16 bytes per slot per connection, unavoidable in pyverbs 44.)
        sge = SGE(addr, size, lkey)
        wr = SendWR(wr_id=len(self.send_views), opcode=e.IBV_WR_SEND, num_sge=1, sg=[sge],
                    send_flags=0)
        wr.sg_list = sge
        self._send_sges.append(sge)
        self._send_wrs.append(wr)
        self.send_views.append(view)
        self.send_caps.append(size)

    def _add_send(self, count: int) -> list[int]:
        if count <= 0:
            return []
        ring = self._segment(count, self.send_size)
        first = len(self.send_views)
        for i in range(count):
            self._add_send_slot(ring.addr + i * ring.size, ring.size, ring.lkey, ring.slot(i))
        return list(range(first, first + count))

    def admit(self, nbytes: int) -> bool:
        """May ``nbytes`` more be registered? (The budgeted subclass asks the budget.)"""
        return True

    def unadmit(self, nbytes: int) -> None:
        """Give back what ``admit`` took, after a failed registration."""

    def grow_recv(self, count: int) -> list[int]:
        """Register and return up to ``count`` new receive slots (not yet posted); []
        when the rings are at their maximum, the budget refuses or registration fails
        (growth is an optimisation: the connection works at any size)."""
        return self._grow(count, self.recv_max - self.recv_slots, self.recv_size,
                          self._add_recv)

    def grow_send(self, count: int) -> list[int]:
        """Register and return up to ``count`` new send slots (free to use); [] as
        ``grow_recv``."""
        return self._grow(count, self.send_max - self.send_slots, self.send_size,
                          self._add_send)

    def _grow(self, count: int, room: int, size: int, add: Any) -> list[int]:
        count = min(count, room)
        if count <= 0 or self._closed or not self.admit(count * size):
            return []
        try:
            slots: list[int] = add(count)
        except (UsdpError, PyverbsError, OSError) as exc:
            self.unadmit(count * size)
            log.debug("growing a ring by %d slots failed: %s", count, exc)
            return []
        return slots

    # ------------------------------------------------------------------ QP states

    def modify(self, cmid: Any, state: int) -> None:
        attr, mask = cmid.init_qp_attr(state)
        if state == e.IBV_QPS_INIT:
            # The active side reaches INIT before the CM knows the responder resources, so
            # the CM leaves out remote read; zero-copy needs the peer to RDMA-read us. (A
            # read still needs a live rkey: only memory advertised by a SrcAvail is open.)
            attr.qp_access_flags |= e.IBV_ACCESS_REMOTE_READ
            mask |= e.IBV_QP_ACCESS_FLAGS
        elif state == e.IBV_QPS_RTR:
            attr.min_rnr_timer = MIN_RNR_TIMER
            attr.max_dest_rd_atomic = max(attr.max_dest_rd_atomic, 1)
            mask |= e.IBV_QP_MAX_DEST_RD_ATOMIC
        elif state == e.IBV_QPS_RTS:
            attr.timeout, attr.retry_cnt, attr.rnr_retry = ACK_TIMEOUT, RETRY_CNT, RNR_RETRY
            attr.max_rd_atomic = max(attr.max_rd_atomic, 1)
            mask |= (e.IBV_QP_TIMEOUT | e.IBV_QP_RETRY_CNT | e.IBV_QP_RNR_RETRY
                     | e.IBV_QP_MAX_QP_RD_ATOMIC)
        try:
            self.qp.modify(attr, mask)
        except PyverbsError as exc:
            raise verbs_error(exc, f"moving the QP to state {state}") from exc

    def to_error(self) -> None:
        """Flush every posted WR (rdma_disconnect does not touch an external QP)."""
        try:
            self.qp.modify(QPAttr(qp_state=e.IBV_QPS_ERR), e.IBV_QP_STATE)
        except PyverbsError:
            pass  # already in error or destroyed: nothing left to flush

    # ------------------------------------------------------------------ posting

    def post_recv(self, slot: int) -> None:
        try:
            self.qp.post_recv(self._recv_wrs[slot])
        except PyverbsRDMAError as exc:
            raise verbs_error(exc, "posting a receive") from exc

    def post_send(self, slot: int, length: int, signaled: bool, solicited: bool = True) -> None:
        self._send_sges[slot].length = length
        wr = self._send_wrs[slot]
        wr.send_flags = ((e.IBV_SEND_SIGNALED if signaled else 0)
                         | (e.IBV_SEND_SOLICITED if solicited else 0)
                         | (e.IBV_SEND_INLINE if slot < self.inline_slots else 0))
        try:
            self.qp.post_send(wr)
        except PyverbsRDMAError as exc:
            raise verbs_error(exc, "posting a send") from exc

    def post_read(self, laddr: int, length: int, lkey: int, rkey: int, raddr: int) -> None:
        """RDMA-read ``length`` bytes of the peer's ``raddr`` (``rkey``) into ``laddr``."""
        sge = self._read_sge
        sge.addr, sge.length, sge.lkey = laddr, length, lkey
        self._read_wr.set_wr_rdma(rkey, raddr)
        try:
            self.qp.post_send(self._read_wr)
        except PyverbsRDMAError as exc:
            raise verbs_error(exc, "posting an RDMA read") from exc

    def aim_probe(self, rkey: int, addr: int) -> None:
        """Make the probe a one-byte READ of the byte the peer offered (``Hello.probe_addr``
        says why not a zero-length one)."""
        self._probe_sge.length = 1
        self._probe_wr.set_wr_rdma(rkey, addr)

    def post_probe(self) -> None:
        """Post the liveness probe: a signaled one-byte RDMA READ (``PROBE_WR_ID``) of the
        byte the peer offered in its Hello (``aim_probe``).

        It needs no credit: the peer's HCA answers it, and no receive buffer is consumed.
        It needs remote read access on the peer's QP, which every usdp QP grants
        (``modify``, INIT), and a readable byte of the peer's: the peer's probe page.
        Against a peer that offered none it is a zero-length READ, which IB spec C9-88
        lets skip the R_Key check, but which rxe 6.1 cannot replay (``Hello.probe_addr``).
        A zero-length WRITE would need remote write access, which usdp never grants.
        The caller keeps at most one outstanding.
        """
        try:
            self.qp.post_send(self._probe_wr)
        except PyverbsRDMAError as exc:
            raise verbs_error(exc, "posting a liveness probe") from exc

    # ------------------------------------------------------------------ CQs

    @staticmethod
    def poll(cq: CQ, budget: int) -> list[Any]:
        n, wcs = cq.poll(budget)
        return list(wcs[:n]) if n else []

    def read_events(self, send: bool) -> int:
        """Consume every completion event queued on a CQ's channel; returns how many.

        ``ibv_get_cq_event`` on the non-blocking channel fd until it fails (EAGAIN): a user
        thread and the completion thread may both have seen the fd readable, and the one
        that comes second must not block with the GIL held. Not a bare ``read()`` of the
        fd: ``ibv_get_cq_event`` keeps bookkeeping that ``ibv_destroy_cq`` waits on
        (measured: with plain reads, CQ destruction hung). Every event taken is
        acknowledged, since ``ibv_destroy_cq`` waits until the acknowledged count equals
        the count handed out.
        """
        comp, cq = (self.send_comp, self.send_cq) if send else (self.recv_comp, self.recv_cq)
        n = 0
        try:
            while True:
                comp.get_cq_event(cq)
                n += 1
        except PyverbsError:
            pass  # EAGAIN: nothing (more) queued
        if n:
            cq.ack_events(n)
        return n

    def arm(self, send: bool, solicited_only: bool = False) -> None:
        """Request one completion event (``ibv_req_notify_cq``; a system call on rxe)."""
        cq = self.send_cq if send else self.recv_cq
        try:
            cq.req_notify(solicited_only)
        except PyverbsError as exc:
            raise verbs_error(exc, "arming a completion queue") from exc

    def close(self) -> None:
        """Destroy in dependency order; idempotent."""
        if self._closed:
            return
        self._closed = True
        for name in ("qp", "send_cq", "recv_cq", "send_comp", "recv_comp"):
            obj = getattr(self, name, None)
            if obj is not None:
                with contextlib.suppress(PyverbsError):
                    obj.close()
        # Free the C memory pyverbs 44 would leak (once: closing twice is a double free).
        # A send WR's close() frees its SGE's struct too, so the SGEs are not closed.
        wrs = getattr(self, "_recv_wrs", []) + getattr(self, "_send_wrs", [])
        for name in ("_read_wr", "_probe_wr"):
            if getattr(self, name, None) is not None:
                wrs.append(getattr(self, name))
        for wr in wrs:
            wr.close()
        self._recv_wrs, self._send_wrs, self._send_sges = [], [], []
        self._read_wr = self._probe_wr = None
        for view in self.recv_views + self.send_views:
            with contextlib.suppress(BufferError):  # still exported: goes with its user
                view.release()
        self.recv_views.clear()
        self.send_views.clear()
        for ring in self._segments:
            ring.close()
        self._segments = []
