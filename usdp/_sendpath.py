"""Our half of the data path: send slots, signaling, solicitation and the cork (BCopy).

Every method runs while owning the connection's ``ConnLock``. A send is copied into a
registered send slot and posted; the slot comes back when a *signaled* completion at or
after it is polled (sends complete in order). Which sends are signaled and solicited, and
when small sends share a frame (the cork), is decided by the pure rules of
``usdp._signaling``; this module applies them to the slots.

The cork has two reasons to exist, both SDP's BCopy buffering:

* out of credits, a send of less than a frame is copied into one open slot that the next
  credit posts (a send returns once its bytes are buffered);
* auto-cork: while a signaled send is in flight, a small send is appended to the open slot
  instead of taking a frame and a credit of its own. The completion of that signaled send
  flushes it (``flush_cork`` from the engine's ``after``), so a cork never waits for
  anything that is not already coming.
"""

from __future__ import annotations

import errno
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from usdp._connection import Connection, State
from usdp._errors import UsdpError, from_wc
from usdp._liveness import AckWatch
from usdp._signaling import (
    SignalPolicy,
    should_cork,
    should_flush_cork,
    signal_send,
    solicit_data,
)
from usdp._verbs import INLINE_SIZE, WC_FLUSH, WC_SUCCESS, QPResources
from usdp._wire import HEADER_SIZE, Header, Mid, pack_header_into


class SendPath:
    """Send slots, in-flight tracking, signaling and the cork of one connection.

    Args:
        res: verbs resources (the send ring and the QP).
        conn: the sans-I/O connection (credits, headers).
        liveness: the ack watchdog, told about every signaled send and completion.
        policy: signaling/solicitation knobs.
        fail: latches a fatal error on the connection (and moves the QP to error).
        on_flush: a flushed send was seen (the engine looks for the real cause).
    """

    def __init__(self, res: QPResources, conn: Connection, liveness: AckWatch,
                 policy: SignalPolicy, *, fail: Callable[[UsdpError], None],
                 on_flush: Callable[[], None]) -> None:
        self.res, self.conn, self.liveness, self.policy = res, conn, liveness, policy
        self._fail, self._on_flush = fail, on_flush
        # Inline slots (unregistered, small frames) and registered slots (any frame) keep
        # separate free lists; the registered ones grow with use (``_grow``).
        self._ninline = res.inline_slots
        self.ifree: deque[int] = deque(range(self._ninline))
        self.free: deque[int] = deque(range(self._ninline, len(res.send_views)))
        self._growable = res.send_slots < res.send_max
        self.inflight: deque[int] = deque()
        self._signaled = [False] * (self._ninline + res.send_max)
        self.signaled_inflight = 0
        self._unsignaled = 0
        self._unsolicited = 0
        self.nodelay = False
        self.cork: int | None = None  # a send slot holding DATA bytes not yet posted
        self.cork_len = 0
        self._cork_cap = 0  # payload bytes the cork's slot holds
        self.cork_frames = 0  # corked frames posted (stats: "staged_frames")
        self.grown = 0  # registered send slots added after setup (stats)
        self._views = res.send_views  # one view per slot; the list grows in place
        self._caps = res.send_caps

    def release_views(self) -> None:
        self._views = []

    # ------------------------------------------------------------------ slots

    def has_slot(self) -> bool:
        """A slot is free now: a control frame (always small) can be posted."""
        return bool(self.ifree or self.free)

    def _big_avail(self) -> int:
        """Registered slots a send could take now, one more if the ring may still grow
        (and the inline slots if there is no registered ring and there will be none: a
        refused first growth must not stop the stream, only shorten its frames)."""
        n = len(self.free) + self._growable
        if not n and not self.res.send_slots:
            n = len(self.ifree)
        return n

    def _avail_for(self, nbytes: int) -> int:
        """Slots a send of ``nbytes`` payload could take now. A large send never takes an
        inline slot while the registered ring exists: it would spend a credit (and a 64 KiB
        buffer of the peer's) on a 240-byte frame; it waits for a registered slot (the
        post that leaves none free is signaled, so its completion comes)."""
        if nbytes + HEADER_SIZE <= INLINE_SIZE:
            return len(self.ifree) + len(self.free) + self._growable
        return self._big_avail()

    def _grow(self) -> bool:
        """Register more send slots (doubling, up to the maximum); False if the ring is
        full or the budget (or the registration) refuses: then it stays as it is."""
        if not self._growable:
            return False
        slots = self.res.grow_send(max(1, self.res.send_slots))
        self._growable = bool(slots) and self.res.send_slots < self.res.send_max
        self.free.extend(slots)
        self.grown += len(slots)
        return bool(slots)

    def _take(self, nbytes: int, *, big: bool = False) -> int | None:
        """A free slot for a frame of ``nbytes`` (header included), or None.

        Inline if the frame fits one (no copy into registered memory, no slot of the
        registered ring in use); else a registered slot, growing the ring when none is
        free; else, with no registered ring at all, an inline slot anyway (the caller then
        sends a shorter frame).
        ``big`` (a cork that will gather small sends) prefers a registered slot.
        """
        if not big and self.ifree and nbytes <= INLINE_SIZE:
            return self.ifree.popleft()
        if self.free or self._grow():
            return self.free.popleft()
        if self.ifree and (nbytes <= INLINE_SIZE or not self.res.send_slots):
            return self.ifree.popleft()
        return None

    def _give_back(self, slot: int) -> None:
        (self.ifree if slot < self._ninline else self.free).appendleft(slot)

    # ------------------------------------------------------------------ posting

    def post_frame(self, h: Header, payload: Any, *, control: bool = False,
                   last: bool = True, waited_on: bool | None = None) -> None:
        """Copy ``h`` and ``payload`` into a free slot and post it.

        ``waited_on`` (default: ``control``) says a completion of this frame is awaited
        (always signaled); a credit update is a control frame nobody waits on.
        """
        slot = self._take(h.length)
        if slot is None or h.length > self._caps[slot]:
            # Callers check has_slot() (control frames fit every slot) or take the slot
            # themselves (_post_data): a frame without room is a local bug.
            if slot is not None:
                self._give_back(slot)
            raise UsdpError(errno.ENOBUFS, f"no send slot for a {h.length}-byte frame")
        self._post_in(slot, h, payload, control=control, last=last,
                      waited_on=control if waited_on is None else waited_on)

    def _post_in(self, slot: int, h: Header, payload: Any, *, control: bool = False,
                 last: bool = True, waited_on: bool = False) -> None:
        """Copy ``h`` and ``payload`` into ``slot`` (taken by the caller) and post it."""
        view = self._views[slot]
        pack_header_into(view, 0, h)
        n = HEADER_SIZE
        if payload is not None:
            n += len(payload)
            view[HEADER_SIZE:n] = payload
        self._post_slot(slot, n, control=control, last=last, waited_on=waited_on)

    def _post_slot(self, slot: int, n: int, *, control: bool, last: bool,
                   waited_on: bool = False) -> None:
        conn = self.conn
        credit_after = conn.data_credit_ok()
        # "The pool runs dry": for a registered slot, the registered pool (a large send
        # waits for those); for an inline one, every slot.
        free_after = len(self.free) + self._growable
        if slot < self._ninline:
            free_after += len(self.ifree)
        signaled = signal_send(self.policy, control=waited_on, unsignaled_run=self._unsignaled,
                               free_slots_after=free_after,
                               credit_ok_after=credit_after,
                               inflight_before=len(self.inflight),
                               signaled_inflight=self.signaled_inflight)
        if control:
            solicited = True
        else:
            solicited = solicit_data(self.policy, last_of_burst=last,
                                     credits_after=conn.tx_credits,
                                     unsolicited_run=self._unsolicited)
            self._unsolicited = 0 if solicited else self._unsolicited + 1
        self.liveness.posted(time.monotonic(), signaled)
        if signaled:
            self._unsignaled = 0
            self.signaled_inflight += 1
        else:
            self._unsignaled += 1
        self._signaled[slot] = signaled
        self.inflight.append(slot)
        try:
            self.res.post_send(slot, n, signaled, solicited)
        except UsdpError as exc:
            self.inflight.pop()
            self._give_back(slot)
            if signaled:
                self.signaled_inflight -= 1
            self.liveness.unposted(signaled)
            self._fail(exc)
            raise

    def send_control(self) -> None:
        """Send queued control frames (RdmaRdCompl, DISCONN, credit updates) while a slot
        is free."""
        while (self.ifree or self.free) and self.conn.error is None:
            frame = self.conn.next_control_frame()
            if frame is None:
                return
            h, payload = frame
            # A credit update is awaited by nobody, unless our side is closing: then
            # close() waits for every posted send, and only a signaled one can tell.
            self.post_frame(h, memoryview(payload) if payload else None, control=True,
                            waited_on=h.mid != Mid.CREDIT_UPDATE
                            or self.conn.state is not State.OPEN)

    # ------------------------------------------------------------------ completions

    def on_send_wc(self, wc: Any) -> None:
        """A completion of one of our sends: free its slot and every one before it."""
        self.liveness.completed(time.monotonic())
        status = wc.status
        if status == WC_FLUSH:
            self._on_flush()
        elif status != WC_SUCCESS:
            # Retries exhausted is a reset (the documented outcome of a dead peer).
            self._fail(from_wc(status, "send"))
        slot = wc.wr_id
        inflight, free, signaled = self.inflight, self.free, self._signaled
        ninline, ifree = self._ninline, self.ifree
        while inflight:
            s = inflight.popleft()
            if s < ninline:
                ifree.append(s)
            else:
                free.append(s)
            if signaled[s]:
                signaled[s] = False
                self.signaled_inflight -= 1
            if s == slot:
                break

    # ------------------------------------------------------------------ state

    def writable(self) -> bool:
        """``send_bcopy`` would take bytes now: to post (a credit and a slot), or to cork
        (a spare slot, or room left in the cork)."""
        if self.cork is not None:
            return self.cork_len < self._cork_cap
        avail = self._avail_for(self.conn.max_payload)  # whatever the send's size
        return avail >= 2 or (avail >= 1 and self.conn.data_credit_ok())

    def can_take(self, nbytes: int) -> bool:
        """A blocking ``send_bcopy`` of ``nbytes`` would take bytes now."""
        credit = self.conn.data_credit_ok()
        if self.cork is not None:
            return self.cork_len < self._cork_cap or credit
        avail = self._avail_for(nbytes)
        if credit and avail:
            return True
        return nbytes < self.conn.max_payload and avail >= 2

    def needs_completion(self) -> bool:
        """A corked send waits for a completion (or a credit) that must wake someone."""
        return self.cork is not None

    def outstanding(self) -> bool:
        """Some send has not completed yet (a sleeper should arm the send CQ)."""
        return bool(self.inflight)

    # ------------------------------------------------------------------ the cork

    def flush_cork(self, *, force: bool = False) -> bool:
        """Post the cork if it should go now and a credit allows; True if it went (or
        there was none)."""
        slot = self.cork
        if slot is None:
            return True
        if not self.conn.data_credit_ok():
            return False
        if not force and not should_flush_cork(self.cork_len, self._cork_cap,
                                               nodelay=self.nodelay,
                                               signaled_inflight=self.signaled_inflight):
            return False
        self.cork = None
        n = self.cork_len
        pack_header_into(self._views[slot], 0, self.conn.data_header(n))
        self._post_slot(slot, HEADER_SIZE + n, control=False, last=True)
        self.cork_frames += 1
        return True

    def send_bcopy(self, data: memoryview, nonblocking: bool) -> int:
        """Copy as much of ``data`` as credits, slots and the cork allow now; returns the
        count taken (possibly 0). Never waits.

        Whole frames of a blocking call wait for credits rather than being corked (one
        copy less); a non-blocking call corks one frame (its readiness said writable). One
        slot always stays free for control frames.
        """
        conn = self.conn
        maxp = conn.max_payload
        total = len(data)
        sent = 0
        while sent < total and conn.error is None:
            if self.cork is not None:
                room = self._cork_cap - self.cork_len
                if room > 0:
                    n = min(room, total - sent)
                    pos = HEADER_SIZE + self.cork_len
                    self._views[self.cork][pos : pos + n] = data[sent : sent + n]
                    self.cork_len += n
                    sent += n
                    continue
                if not self.flush_cork(force=True):
                    break  # a full cork waits for a credit
                continue
            remaining = total - sent
            avail = self._avail_for(remaining)
            if avail and conn.data_credit_ok() and not (
                    avail >= 2 and should_cork(remaining, maxp, nodelay=self.nodelay,
                                               signaled_inflight=self.signaled_inflight)):
                slot = self._take(HEADER_SIZE + min(maxp, remaining))
                if slot is None:
                    break  # the ring could not grow after all
                n = min(maxp, remaining, self._caps[slot] - HEADER_SIZE)
                self._post_in(slot, conn.data_header(n), data[sent : sent + n],
                              last=remaining - n < maxp or not self._avail_for(remaining - n))
                sent += n
                continue
            if (remaining < maxp or nonblocking) and avail >= 2:
                slot = self._take(0, big=True)
                if slot is None or not self.has_slot():
                    if slot is not None:  # one slot always stays free for control frames
                        self._give_back(slot)
                    break
                self.cork, self.cork_len = slot, 0
                self._cork_cap = min(maxp, self._caps[slot] - HEADER_SIZE)
                continue
            break
        if self.cork is not None:
            self.flush_cork()  # nothing in flight would flush it later
        return sent
