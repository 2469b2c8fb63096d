"""The progress engine of one connection: who polls its CQs, who arms them, who sleeps.

Theory of operation
===================

The 2005 SDP lock (``_lock``) says *the context that owns the connection does the work*:
an event that arrives while a user call owns the connection only sets a pending flag, and
the owner drains it. That only cuts events if the owner also *polls*: a user thread that
never polls hands every message to the completion thread and back (two thread switches and
two GIL transfers per message). Here, as in OFED SDP (``sdp_do_posts``, the ``recv_poll``
busy-poll, ``SDP_RX_ARMING_DELAY``) and rsockets (``rs_process_cq``: poll, test, arm, poll
again, then block), the owner polls and the completion thread only serves connections
nobody is inside:

* **The owner polls.** ``poll_all`` polls both CQs without arming them; a user call runs it
  when it needs something (``recv`` with an empty queue, ``send`` short of credits or
  slots) and every send drains completions as it goes (``_sendpath``).
* **Waiting without a hand-off** (``wait``). Busy-poll for an adaptive time (up to
  ``Options.busy_poll``), then arm the CQs, poll once more, and sleep in ``poll()`` on the
  completion fds themselves with the GIL released (``ConnLock.sleep``). On waking, read the
  events and poll, in the same thread. An event the completion thread sees meanwhile
  becomes a pending flag (``ConnLock.bh_event``); it does not drain.
* **Arming on leave.** A release does not re-arm a CQ that a user will likely poll again
  soon. The lock's leave hook (``_leave``) arms at once only if the completion thread is
  the one leaving or a readiness fd (selectors, asyncio) is in use; otherwise it asks the
  completion thread to arm after ``ARM_DELAY`` (``CORK_DELAY`` when a corked send waits
  for a completion), unless a user is back by then. Under load CQs are then almost never
  armed, and events disappear: that is the seed's "significant reduction in interrupts".
* **Solicited events.** The receive CQ is armed solicited-only when the peer promised to
  solicit every frame that can unblock us (``Features.SOLICIT``, rules in ``_signaling``).

Invariants (each checked by a test named in docs/design.md)
------------------------------------------------------------
1. One poller at a time: only the owner of the ``ConnLock`` polls or reads events.
2. Whenever nobody is inside, every CQ that someone may wait on is armed, or an arming
   timer is scheduled on the completion thread (``_due``).
3. A poll always follows an arm (``_arm_and_poll``): arming reports nothing already queued.
4. No event is lost: an event seen by the completion thread while the connection is owned
   or slept on becomes a pending flag under the lock's mutex, and its owner (or the
   sleeper, which polls the same fd) reads it; every event read is acknowledged.

``Options(defer=False)`` keeps the first engine for comparison: users never poll, every
release arms both CQs, and the completion thread drains every event (after waiting for the
owner).
"""

from __future__ import annotations

import math
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from usdp._errors import Timeout, WouldBlock
from usdp._lock import ConnLock, CqPend
from usdp._progress import progress

if TYPE_CHECKING:  # the engine itself needs no pyverbs: its unit tests run without it
    from usdp._verbs import QPResources

SEND = CqPend.SEND_CQ_PEND
RECV = CqPend.RECV_CQ_PEND
BOTH = SEND | RECV
_NONE = CqPend(0)
POLL_BUDGET = 16  # completions per poll call (the kernel's own CQ poller uses 16)
#: How long a CQ that a user left un-armed stays so before the completion thread arms it
#: (OFED SDP's SDP_RX_ARMING_DELAY is 10 ms).
ARM_DELAY = 0.010
#: The same for the send CQ while a corked send waits for a completion to flush it.
CORK_DELAY = 0.001
#: Busy-poll budget bounds (seconds); the budget adapts between them (see ``_adapt``).
SPIN_FLOOR = 20e-6
#: A napping wait polls every NAP for up to NAP_ROUNDS before it arms (``wait(nap=True)``).
NAP = 0.001
NAP_ROUNDS = 10


@dataclass
class EngineStats:
    """Counters of the progress engine (part of ``SdpSocket.stats()``)."""

    cq_polls: int = 0
    completions: int = 0
    cq_events: int = 0  # completion-channel events read, by any thread
    arms: int = 0
    busy_polls: int = 0  # waits satisfied while busy-polling
    sleeps: int = 0  # waits that slept on the completion fds
    naps: int = 0  # waits satisfied by a poll after a nap (no arm, no event)
    arm_timers: int = 0  # arming delays that the completion thread served


class _WakeFd:
    """A per-thread eventfd that ``ConnLock`` writes to wake a sleeper."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def clear(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def __del__(self) -> None:
        os.close(self.fd)


_tls = threading.local()


def _wake_fd() -> _WakeFd:
    w: _WakeFd | None = getattr(_tls, "wake", None)
    if w is None:
        w = _tls.wake = _WakeFd()
    return w


class Engine:
    """Polls, arms and sleeps for one connection (see the module docstring).

    Args:
        res: the connection's verbs resources.
        defer: the seed's deferral and the owner-polls engine; False keeps the first
            engine (the completion thread drains everything) for comparison.
        solicited_only: arm the receive CQ solicited-only (the peer solicits).
        busy_poll: the most a wait busy-polls before it sleeps (seconds; 0 never spins).
        on_send_wc, on_recv_wc: completion handlers (run by the owner).
        after: runs after completions were processed (flush, control frames, readiness).
        send_events_needed: a send completion must wake someone even if nobody is inside
            (a corked send waits for it).
        sends_outstanding: something waits on a send completion (arm before sleeping).
        eager: a readiness fd is in use: arm at once on leave, never after a delay.
    """

    def __init__(self, res: QPResources, *, defer: bool, solicited_only: bool,
                 busy_poll: float, on_send_wc: Callable[[Any], None],
                 on_recv_wc: Callable[[Any], None], after: Callable[[], None],
                 send_events_needed: Callable[[], bool],
                 sends_outstanding: Callable[[], bool], eager: Callable[[], bool],
                 name: str) -> None:
        self.res = res
        self.defer = defer
        self.solicited_only = solicited_only and defer
        self.busy_poll = max(0.0, busy_poll)
        self._spin = min(self.busy_poll, 100e-6)
        self._on_send_wc, self._on_recv_wc, self._after = on_send_wc, on_recv_wc, after
        self._send_events_needed = send_events_needed
        self._sends_outstanding = sends_outstanding
        self._eager = eager
        self.lock = ConnLock(self._drain, defer=defer, name=name, leave=self._leave)
        self.stats = EngineStats()
        self.armed_send = False
        self.armed_recv = False
        self.closed = False
        self._due: float | None = None  # an arming timer is scheduled for then
        self._woken = _NONE  # CQ fds a sleeper saw readable
        self._napping = 0  # threads napping on this connection (they poll within NAP)

    # ------------------------------------------------------------------ polling

    def _poll_cq(self, send: bool) -> int:
        """Poll one CQ until it is empty, handling each completion (owner only)."""
        assert self.lock._owner == threading.get_ident(), "polled by a non-owner"
        cq = self.res.send_cq if send else self.res.recv_cq
        handle = self._on_send_wc if send else self._on_recv_wc
        st = self.stats
        total = 0
        while True:
            n, wcs = cq.poll(POLL_BUDGET)
            st.cq_polls += 1
            for wc in wcs:
                handle(wc)
            total += int(n)
            if n < POLL_BUDGET:
                st.completions += total
                return total

    def _read_events(self, flags: CqPend) -> None:
        """Read (and acknowledge) the events queued on the flagged CQs' channels."""
        if flags & SEND:
            n = self.res.read_events(True)
            if n:
                self.stats.cq_events += n
                self.armed_send = False
        if flags & RECV:
            n = self.res.read_events(False)
            if n:
                self.stats.cq_events += n
                self.armed_recv = False

    def _drain(self, flags: CqPend) -> None:
        """The lock's drain callback: events and completions of the flagged CQs (owner)."""
        if self.closed:
            return
        self._read_events(flags)
        if self.defer:
            # Send CQ first: when the QP fails, the cause is a send-queue completion, and
            # the receive queue only shows the flushes that follow.
            if flags & SEND:
                self._poll_cq(True)
            if flags & RECV:
                self._poll_cq(False)
        else:
            # The first engine: every drain re-arms (poll, arm, poll again).
            if flags & SEND:
                self._poll_cq(True)
                self.armed_send = False
            if flags & RECV:
                self._poll_cq(False)
                self.armed_recv = False
            self._arm_and_poll(flags, after=False)
        self._after()

    def poll_all(self) -> int:
        """The owner polls both CQs now (and takes the deferred events with it)."""
        if self.closed:
            return 0
        pend = self.lock.take_pending() | self._woken
        self._woken = _NONE
        if pend:
            self._read_events(pend)
        n = self._poll_cq(True) + self._poll_cq(False)
        if n or pend:
            self._after()
        return n

    def poll_send(self) -> int:
        """Poll the send CQ only (the owner looks for the cause of a flush)."""
        return 0 if self.closed else self._poll_cq(True)

    def poll_both(self) -> int:
        """Poll both CQs, send first, without running ``after`` (the owner makes sure it
        has seen every completion that came before a CM event)."""
        return 0 if self.closed else self._poll_cq(True) + self._poll_cq(False)

    def _arm_and_poll(self, flags: CqPend, *, after: bool = True) -> None:
        """Arm the flagged CQs that are not armed, and poll each one armed just now."""
        if self.closed:
            return
        armed = _NONE
        if flags & SEND and not self.armed_send:
            self.res.arm(True)
            self.armed_send = True
            armed |= SEND
        if flags & RECV and not self.armed_recv:
            self.res.arm(False, self.solicited_only)
            self.armed_recv = True
            armed |= RECV
        if armed:
            self.stats.arms += 1
            n = (self._poll_cq(True) if armed & SEND else 0) \
                + (self._poll_cq(False) if armed & RECV else 0)
            if n and after:
                self._after()

    # ------------------------------------------------------------------ leaving

    def _leave(self) -> None:
        """The lock's leave hook: arm now, or have the completion thread arm a bit later."""
        if self.closed:
            return
        if not self.defer:
            self._arm_and_poll(BOTH)
            return
        if self._napping:
            return  # a napping thread polls within NAP: nothing to arm or schedule
        need_send = self._send_events_needed()
        if progress().on_thread or self._eager():
            self._arm_and_poll(RECV | SEND if need_send else RECV)
            return
        if not self.armed_recv or (need_send and not self.armed_send):
            self._schedule(CORK_DELAY if need_send else ARM_DELAY)

    def _schedule(self, delay: float) -> None:
        when = time.monotonic() + delay
        due = self._due
        if due is not None and due <= when:
            return
        self._due = when
        progress().schedule(when, self._on_due)

    def _on_due(self) -> None:
        """Completion thread: an arming delay ran out. Serve it if nobody is inside."""
        if self.closed:
            return
        if self._napping or not self.lock.lock(timeout=0):
            # A user is inside; its leave may have seen our timer as still pending, so
            # keep one going for as long as the connection stays owned.
            self._due = time.monotonic() + ARM_DELAY
            progress().schedule(self._due, self._on_due)
            return
        self._due = None
        self.stats.arm_timers += 1
        try:
            self.poll_all()
        finally:
            self.lock.unlock()  # leave, on this thread: arms at once

    def on_fd(self, flag: CqPend) -> None:
        """Completion thread: a completion fd fired (edge-triggered)."""
        if self.closed:
            return
        self.lock.bh_handle(flag, timeout=5.0)

    # ------------------------------------------------------------------ waiting

    def wait(self, predicate: Callable[[], bool], timeout: float | None, what: str, *,
             nap: bool = False) -> None:
        """The owner waits until ``predicate()``: busy-poll, then sleep on the fds.

        With ``nap`` (a wait that throughput, not latency, depends on: a pure reader of a
        stream, a writer waiting for credits), the sleep starts with up to ``NAP_ROUNDS``
        naps of ``NAP`` without arming, each followed by a poll: frames that keep coming
        are picked up without a single event (Linux's ``napi_defer_hard_irqs`` with
        ``gro_flush_timeout``). Only a wait that outlasts the naps arms and sleeps on the
        fds. Request/response waits do not nap: their latency is the point.

        Raises:
            WouldBlock: ``timeout`` is 0 and the predicate is false after one poll.
            Timeout: the deadline passed.
        """
        if predicate():
            return
        if timeout == 0.0:
            if self.defer:
                self.poll_all()
            if not predicate():
                raise WouldBlock(11, f"{what} would block")
            return
        if not self.defer:
            if not self.lock.wait(predicate, timeout):
                raise Timeout(110, f"timed out: {what}")
            return
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        # 1. Busy-poll: a reply or a credit often comes within microseconds.
        spin_end = start + self._spin
        while True:
            self.poll_all()
            if predicate():
                self.stats.busy_polls += 1
                self._adapt(time.monotonic() - start)
                return
            now = time.monotonic()
            if now >= spin_end or self.lock.has_waiters or self.closed \
                    or (deadline is not None and now >= deadline):
                break
            time.sleep(0)  # lets the process's other threads have the GIL between polls
        wake = _wake_fd()
        # 2. Naps: sleep without arming, poll on waking (no events while frames flow).
        if nap:
            for _ in range(NAP_ROUNDS):
                if deadline is not None and time.monotonic() + NAP >= deadline:
                    break
                seen = self.lock.generation
                self._napping += 1
                try:
                    if self.lock.sleep(self._nap, wake.fd, seen, None):
                        wake.clear()
                finally:
                    self._napping -= 1
                self.poll_all()
                if predicate():
                    self.stats.naps += 1
                    self._adapt(time.monotonic() - start)
                    return
                if self.closed:
                    break
        # 3. Arm, poll again, sleep on the completion fds; poll ourselves on waking.
        while True:
            seen = self.lock.generation
            self._arm_and_poll(RECV | SEND if self._sends_outstanding() else RECV)
            if predicate():
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(110, f"timed out: {what}")
            self.stats.sleeps += 1
            slept = self.lock.sleep(self._block, wake.fd, seen, deadline)
            if slept:
                wake.clear()
            self.poll_all()
            if predicate():
                break
        self._adapt(time.monotonic() - start)

    def _block(self, timeout: float | None) -> None:
        """Sleep (GIL released) until a completion fd or our wake fd is readable."""
        p = select.poll()
        send_fd, recv_fd = self.res.send_fd, self.res.recv_fd
        p.register(send_fd, select.POLLIN)
        p.register(recv_fd, select.POLLIN)
        p.register(_wake_fd().fd, select.POLLIN)
        ms = -1 if timeout is None else math.ceil(timeout * 1000)
        woken = _NONE
        for fd, _ in p.poll(ms):
            if fd == send_fd:
                woken |= SEND
            elif fd == recv_fd:
                woken |= RECV
        self._woken |= woken

    @staticmethod
    def _nap(timeout: float | None) -> None:
        """A nap: wait on our wake fd only (a change by another thread), for ``NAP``."""
        p = select.poll()
        p.register(_wake_fd().fd, select.POLLIN)
        p.poll(math.ceil(NAP * 1000))

    def _adapt(self, waited: float) -> None:
        """Adapt the busy-poll budget: twice what recent waits took, within the bounds.

        A wait that a spin of up to ``busy_poll`` would have caught grows the budget; a
        longer one halves it, so an idle connection stops spinning after a few waits.
        """
        if waited <= self.busy_poll:
            self._spin = min(self.busy_poll, max(2 * waited, self._spin, SPIN_FLOOR))
        else:
            self._spin = self._spin / 2 if self._spin > SPIN_FLOOR else 0.0
