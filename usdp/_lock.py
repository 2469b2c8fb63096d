"""ConnLock: the 2005 SDP connection lock, shared by user threads and the completion thread.

Theory of operation
===================

The seed is Libor Michalek's description of ``SDP_CONN_LOCK`` on openib-general (17 Feb
2005). The lock gives "exclusive access from both process and irq context, which is why a
semaphore was not used". Its state is a ``users`` counter, a spinlock and a wait queue; the
process-context lock "will increment the counter when it's using the connection, but will not
hold the spinlock for the duration". And the part that matters most:

    "if a CQ event occurs and the connection is already locked in process context
    (lock.users is non-zero) the connection is marked as having received an event and the CQ
    is not polled or rearmed. Instead when the connection is unlocked using SDP_CONN_UNLOCK
    the CQ is drained and rearmed. This results in a significant reduction in interrupts
    when the connection is under heavy load."

``SDP_CONN_RELOCK`` is an unlock/lock "which will cause the CQ to be drained". The last
paragraph moves the two ``SDP_CONN_F_{SEND,RECV}_CQ_PEND`` flags into the lock structure,
"since they are only protected when the spinlock is held". Linux's socket lock is the modern
form of the same idea: ``lock_sock`` sets ``owned``, softirq work is deferred while owned,
and ``release_sock`` runs ``tcp_release_cb``, which clears every deferred flag in one atomic
step *before* running the deferred work.

In usdp, "process context" is any user thread calling into a socket, and "irq context" (the
seed's ``SDP_CONN_LOCK_BH``) is the completion thread that waits on the completion channel
for every connection. Python has no spinlock, so a ``threading.Lock`` (``_mutex`` below)
stands in for it. It is held for a few bytecodes at a time and never across a drain or a
sleep. A ``threading.Condition`` on that mutex is the wait queue.

An unusual lock
---------------
Ownership of the connection is *not* the mutex. Ownership is ``users == 1``, and the mutex
is released while it is held. That is unusual, and it is the point. A user call can own the
connection for milliseconds (a large copy, a wait for credits), and during that time the
completion thread must never sleep behind it: the completion thread serves every
connection, so a plain mutex would stall them all behind one busy socket. Instead the
completion thread calls :meth:`ConnLock.bh_event`. If the connection is owned, it sets a
pending flag inside the lock and moves on without polling or re-arming that CQ. The CQ stays
unarmed, so it raises no further events, and the owner drains everything that piled up in
one pass when it unlocks. Under heavy load that batches completions and cuts events (on rxe
every re-arm is a system call).

A try-lock plus a flag kept somewhere else would not do either: the completion thread could
fail the try-lock, the owner could release before the flag is set, and the flag would never
be consumed. Here "check ``users``, set the flag" and "check the flags, drop ``users``" are
both done under the same mutex, so one always sees the other.

Invariant: no completion is lost or processed twice
---------------------------------------------------
* A CQ is drained only by the current owner (``users == 1``), so by one thread at a time.
  The drain callback runs outside the mutex but inside ownership.
* A deferred event's flag is set and consumed only under the mutex. The release path takes
  *all* pending flags and clears them in the same step, then drains outside the mutex while
  still owning the connection, and loops. An event that arrives during that drain finds
  ``users == 1``, sets its flag again, and the loop sees it: it is neither lost nor merged
  into a drain that had already polled.
* Ownership is dropped only in the same mutex section that found no pending flag.
* Only the drainer re-arms a CQ, after emptying it, and then polls it once more (arming is
  one-shot and reports nothing that was already queued). A completion that lands after
  that last poll finds the CQ armed and raises a new event.

The drain callback
==================
``drain(flags)`` belongs to the I/O layer. It is always called by the thread that owns the
connection, never with the mutex held, with ``flags`` a non-empty :class:`CqPend`. For each
CQ named in ``flags`` it must poll until empty and process every completion, re-arm the CQ,
poll again until empty (processing those too), and return. It must tolerate a CQ that
turns out to be empty (events can be spurious). Getting and acknowledging channel events is
the completion thread's job and is done whether or not the event is deferred. ``drain`` may
call :meth:`ConnLock.notify`, :meth:`ConnLock.stats` and (with deferral on)
:meth:`ConnLock.bh_event`, but never ``lock``/``unlock``/``relock``/``wait``/
``bh_unlock``.

If ``drain`` raises, the flags it was given become pending again, so the next owner
retries them and no completion is lost. Then the exception propagates. ``unlock``,
``bh_unlock`` and ``bh_handle`` still give up ownership; ``relock`` and ``wait`` still
return holding it.
"""

from __future__ import annotations

import enum
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple

__all__ = ["ConnLock", "CqPend", "LockStats"]


class CqPend(enum.IntFlag):
    """A CQ whose event was deferred because the connection was owned.

    The seed's ``SDP_CONN_F_SEND_CQ_PEND`` and ``SDP_CONN_F_RECV_CQ_PEND``. If one CQ is
    shared for sends and receives, the drain callback treats either bit as "drain it".
    """

    SEND_CQ_PEND = 1
    RECV_CQ_PEND = 2


_NO_FLAGS = CqPend(0)
_ALL_FLAGS = CqPend.SEND_CQ_PEND | CqPend.RECV_CQ_PEND


def _flag_text(flags: CqPend) -> str:
    return flags.name if flags and flags.name else "0"


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


@dataclass(frozen=True, slots=True)
class LockStats:
    """Counters of one :class:`ConnLock`, read together under its mutex.

    ``events == deferred + bh_drains`` always holds. Several deferred
    events fold into one later drain, so ``unlock_drains <= deferred``. The gap between the
    two is the batching the seed promises.

    Attributes:
        events: ``bh_event`` calls (CQ events the completion thread reported).
        deferred: events turned into a pending flag because the connection was owned.
        bh_drains: events after which the completion thread owned the connection and
            drained the CQ itself.
        unlock_drains: drains run by a release path (``unlock``, ``relock``, ``wait``,
            ``bh_unlock``) for pending flags.
        lock_waits: times a user-side acquisition (``lock``, ``relock``, or ``wait``
            taking the lock back) had to sleep because the connection was owned.
        bh_waits: times ``bh_event`` with ``defer=False`` had to sleep behind an owner.
        generation: the current generation (see :meth:`ConnLock.notify`).
        sleeps: times an owner gave the connection up to sleep on its fds (:meth:`sleep`).
    """

    events: int
    deferred: int
    bh_drains: int
    unlock_drains: int
    lock_waits: int
    bh_waits: int
    generation: int
    sleeps: int = 0


class _Released(NamedTuple):
    """What a release path saw in the mutex section where it dropped ownership."""

    generation: int
    acquisitions: int
    waiters: int
    slept: bool = False


class ConnLock:
    """The SDP connection lock: ownership shared by user threads and a completion thread.

    User threads ("process context") use :meth:`lock`/:meth:`unlock` (or ``with lock:``),
    :meth:`relock` and :meth:`wait`. The completion thread uses :meth:`bh_event` and
    :meth:`bh_unlock`, or :meth:`bh_handle`, which wraps both around a drain. Ownership
    is not reentrant and belongs to a thread: only the owning thread may unlock it.

    Args:
        drain: the I/O layer's drain callback (contract in the module docstring).
        defer: if True (the seed's design), an event on an owned connection only sets a
            pending flag. If False, ``bh_event`` waits for the owner like a user thread
            and the completion thread always polls. The switch exists to measure the
            seed's claim; leave it on.
        name: shown in ``repr`` and error messages.
        leave: called by the owner on every release path once no flag is pending, just
            before ownership is dropped: the progress engine arms its CQs there (or
            schedules the arming), so that whenever nobody is inside every CQ is armed or
            about to be. It may poll (completions found then are processed by the owner);
            flags set meanwhile are drained before ownership goes.
    """

    def __init__(
        self, drain: Callable[[CqPend], None], *, defer: bool = True, name: str = "",
        leave: Callable[[], None] | None = None,
    ) -> None:
        self._drain = drain
        self._leave = leave
        self._defer = defer
        self._name = name
        # The seed's spinlock. Held only for a few statements, never across a drain or a
        # sleep. Every field below, counters included, is read and written only with it
        # held (the three above never change).
        self._mutex = threading.Lock()
        # The seed's wait queue. Woken when ownership is dropped, when the generation
        # changes, and (for relock's hand-off) when someone acquires or gives up waiting.
        self._cond = threading.Condition(self._mutex)
        self._users = 0  # 0 or 1: lock() waits for 0 before adding 1
        self._owner: int | None = None  # thread ident of the owner, for errors/assertions
        self._pending = _NO_FLAGS  # deferred CQ events (the seed's last paragraph)
        self._generation = 0  # bumped whenever connection state may have changed
        self._acquisitions = 0  # ownership hand-outs, so relock can see someone got in
        self._lock_waiters = 0  # threads sleeping until users == 0
        self._yielders = 0  # relock calls waiting for a waiter to get in first
        # Wake fds (eventfds) of threads that gave the connection up to sleep on its
        # completion fds (sleep()). Written, and the list emptied, whenever the
        # generation moves: a sleeper's poll() then returns.
        self._sleepers: list[int] = []
        self._sleeps = 0
        self._events = 0
        self._deferred = 0
        self._bh_drains = 0
        self._unlock_drains = 0
        self._lock_waits = 0
        self._bh_waits = 0

    # ---------------------------------------------------------------- queries

    @property
    def name(self) -> str:
        """The name given at construction."""
        return self._name

    @property
    def defer(self) -> bool:
        """Whether events on an owned connection are deferred (the seed's design)."""
        return self._defer

    @property
    def owned(self) -> bool:
        """True if some thread owns the connection (Linux's ``sock_owned_by_user``)."""
        with self._mutex:
            return self._users > 0

    @property
    def owned_by_caller(self) -> bool:
        """True if the calling thread owns the connection. Meant for assertions."""
        with self._mutex:
            return self._users > 0 and self._owner == threading.get_ident()

    @property
    def users(self) -> int:
        """The seed's ``users`` counter: 0 or 1."""
        with self._mutex:
            return self._users

    @property
    def pending(self) -> CqPend:
        """The deferred-event flags not yet taken by a release path."""
        with self._mutex:
            return self._pending

    @property
    def generation(self) -> int:
        """A counter bumped whenever connection state may have changed."""
        with self._mutex:
            return self._generation

    def stats(self) -> LockStats:
        """Returns a consistent snapshot of the counters."""
        with self._mutex:
            return LockStats(
                events=self._events,
                deferred=self._deferred,
                bh_drains=self._bh_drains,
                unlock_drains=self._unlock_drains,
                lock_waits=self._lock_waits,
                bh_waits=self._bh_waits,
                generation=self._generation,
                sleeps=self._sleeps,
            )

    def __repr__(self) -> str:
        with self._mutex:
            return (
                f"<ConnLock {self._name!r} users={self._users} "
                f"pending={_flag_text(self._pending)} generation={self._generation}"
                f"{'' if self._defer else ' defer=False'}>"
            )

    # -------------------------------------------------------- process context

    def lock(self, timeout: float | None = None) -> bool:
        """Takes ownership of the connection (``SDP_CONN_LOCK``).

        Sleeps while another thread owns it. The mutex is not held on return.

        Args:
            timeout: seconds to wait for the owner; None waits forever.

        Returns:
            True if the caller now owns the connection, False on timeout.

        Raises:
            RuntimeError: the calling thread already owns the connection (not reentrant).
            ValueError: ``timeout`` is negative.
        """
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None, not {timeout!r}")
        with self._mutex:
            if self._users and self._owner == threading.get_ident():
                raise RuntimeError(f"{self._label()}: lock() by its owner; it is not reentrant")
            return self._acquire_locked(timeout, bh=False)

    def unlock(self) -> None:
        """Gives up ownership after draining deferred events (``SDP_CONN_UNLOCK``).

        Follows ``tcp_release_cb``: take all pending flags and clear them in one step under
        the mutex, drain them outside it while still owning, and repeat until none are left.
        Then drop ownership, bump the generation and wake every waiter, all in that last
        mutex section.

        Raises:
            RuntimeError: the calling thread does not own the connection.
            BaseException: whatever ``drain`` raised. Ownership is given up anyway, and
                the flags being drained are pending again.
        """
        self._check_caller_owns("unlock")
        self._release(stop=None, keep_on_error=False)

    def relock(self) -> None:
        """Unlock and lock again (``SDP_CONN_RELOCK``), returning as the owner.

        Runs the deferred drains and lets a waiting thread in. Python's lock is not fair: a
        plain unlock() then lock() would nearly always win the race against the threads it
        just woke. So if threads were waiting when ownership was dropped, relock sleeps
        until one of them has taken the lock (or all have given up), and then queues for
        it like anyone else.

        Raises:
            RuntimeError: the calling thread does not own the connection.
            BaseException: whatever ``drain`` raised. The caller still owns the connection,
                and the flags being drained are pending again.
        """
        self._check_caller_owns("relock")
        released = self._release(stop=None, keep_on_error=True)
        assert released is not None  # stop=None never keeps ownership
        with self._mutex:
            if released.waiters:
                self._yielders += 1
                try:
                    self._cond.wait_for(
                        lambda: (
                            self._acquisitions != released.acquisitions or not self._lock_waiters
                        )
                    )
                finally:
                    self._yielders -= 1
            self._acquire_locked(None, bh=False)

    def wait(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Sleeps without owning the connection until ``predicate()`` holds (``sk_wait_event``).

        Called by the owner. Loops: if ``predicate()`` holds, return True. Otherwise release
        as :meth:`unlock` does, running deferred drains and checking ``predicate`` after
        each. Sleep until the generation moves past the value it had *before*
        ``predicate()`` was evaluated plus this call's own release bump, or until the
        deadline; then take the lock back. So no wakeup can be lost: a
        :meth:`notify` issued after ``predicate()`` looked, even one issued before the
        release, has moved the generation on and the call does not sleep. ``predicate``
        is only ever called while the caller owns the connection.

        Args:
            predicate: reads connection state, e.g. "data is queued" or "credits > 0".
            timeout: seconds in all; None waits forever. Taking the lock back after the
                deadline is not bounded, just as in ``sk_wait_event``.

        Returns:
            ``predicate()``'s last value: True if it held, False on timeout. The caller
            owns the connection on return, in every case, including when an exception
            propagates.

        Raises:
            RuntimeError: the calling thread does not own the connection.
            ValueError: ``timeout`` is negative.
            BaseException: whatever ``drain`` or ``predicate`` raised (flags restored).
        """
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None, not {timeout!r}")
        self._check_caller_owns("wait")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._mutex:
                seen = self._generation
            if predicate():
                return True
            released = self._release(stop=predicate, keep_on_error=True)
            if released is None:
                return True  # a deferred drain made it true; still the owner
            with self._mutex:
                # Our own release bumped the generation exactly once; anything beyond
                # seen + 1 is someone else's change made after predicate() looked.
                self._sleep_while_generation_locked(seen + 1, deadline)
                self._acquire_locked(None, bh=False)
            if deadline is not None and time.monotonic() >= deadline:
                return predicate()

    def notify(self) -> None:
        """Bumps the generation and wakes every waiter.

        For anyone who changed connection state without going through a release path:
        the completion thread after a drain outside this lock, ``close()`` from another
        thread, an error latched by the progress engine.
        """
        with self._mutex:
            self._generation += 1
            self._cond.notify_all()
            self._wake_sleepers_locked()

    def take_pending(self) -> CqPend:
        """The owner takes (and clears) the pending flags because it polls every CQ now.

        Meant for an owner that is about to poll both CQs anyway: the deferred events are
        consumed by that poll instead of by a second one at release.
        """
        with self._mutex:
            flags, self._pending = self._pending, _NO_FLAGS
            return flags

    @property
    def has_waiters(self) -> bool:
        """True if a thread is waiting to take the connection (a busy-polling owner yields).

        Read without the mutex: a hint, never a decision that needs to be exact.
        """
        return self._lock_waiters > 0

    def sleep(self, block: Callable[[float | None], None], wake_fd: int, seen: int,
              deadline: float | None) -> bool:
        """The owner gives the connection up and sleeps in ``block`` (``sk_wait_event``
        on the completion fds themselves), then takes it back.

        The release runs the deferred drains and the leave hook as :meth:`unlock` does
        (the caller has armed its CQs before). In the mutex section that drops ownership
        the caller registers ``wake_fd`` (an eventfd) as a sleeper, but only if the
        generation is still ``seen`` plus this release's own bump: any change made since
        the caller last looked means "do not sleep". From then on every generation bump
        (a release by another thread, :meth:`notify`) writes ``wake_fd``, and a CQ event
        that the completion thread sees becomes a pending flag, not a drain by the
        completion thread. ``block(timeout)`` must wait on the CQ fds and ``wake_fd`` with
        the GIL released, and return when any is readable.

        Returns:
            True if it slept, False if a change seen on the way made sleeping pointless.
            Either way the caller owns the connection again on return.
        """
        self._check_caller_owns("sleep")
        released = self._release(stop=None, keep_on_error=True, sleeper=(wake_fd, seen))
        assert released is not None
        slept = released.slept
        try:
            if slept:
                block(_remaining(deadline))
        finally:
            with self._mutex:
                if wake_fd in self._sleepers:
                    self._sleepers.remove(wake_fd)
                self._acquire_locked(None, bh=False)
        return slept

    def __enter__(self) -> ConnLock:
        self.lock()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unlock()

    # -------------------------------------------------- completion thread (BH)

    def bh_event(self, flag: CqPend, timeout: float | None = None, *,
                 wake_sleepers: bool = False) -> bool:
        """Reports a CQ event from the completion thread (``SDP_CONN_LOCK_BH``).

        With deferral on and the connection owned, or slept on by a thread in
        :meth:`sleep` (which polls the same completion fds and will drain when it wakes),
        this sets ``flag`` pending and returns False without blocking. The caller must then
        neither poll nor re-arm that CQ (nor read its event), and the owner drains it when it
        releases. Otherwise
        the caller becomes the owner and gets True: it must drain the CQ and then call
        :meth:`bh_unlock`.

        With ``defer=False`` an owned connection makes this sleep like :meth:`lock`. An
        owner sleeping in :meth:`wait` has released, so the two cannot deadlock. If
        ``timeout`` expires first, the event is deferred after all (counted in
        ``deferred``) so that it is not lost.

        Args:
            flag: which CQ raised the event (one or both bits).
            timeout: only used with ``defer=False``: seconds to wait for the owner.
            wake_sleepers: also wake the sleepers when deferring to them (for an event they
                do not poll for themselves, such as a CM event).

        Returns:
            True if the caller now owns the connection and must drain.

        Raises:
            ValueError: ``flag`` is empty or has unknown bits, or ``timeout`` is negative.
            RuntimeError: ``defer=False`` and the calling thread owns the connection.
        """
        if not flag or int(flag) & ~int(_ALL_FLAGS):
            raise ValueError(f"bh_event needs SEND_CQ_PEND and/or RECV_CQ_PEND, not {flag!r}")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None, not {timeout!r}")
        with self._mutex:
            if not self._defer and self._users and self._owner == threading.get_ident():
                raise RuntimeError(
                    f"{self._label()}: bh_event(defer=False) by the owner would deadlock"
                )
            self._events += 1
            if self._defer and (self._users or self._sleepers):
                self._pending |= flag
                self._deferred += 1
                if wake_sleepers and not self._users:
                    self._wake_sleepers_locked()
                return False
            if self._acquire_locked(timeout, bh=True):
                self._bh_drains += 1
                return True
            self._pending |= flag
            self._deferred += 1
            return False

    def bh_unlock(self) -> None:
        """Ends the completion thread's ownership taken by :meth:`bh_event`.

        The same release path as :meth:`unlock`. It also drains flags set in the meantime,
        e.g. by ``bh_event`` called from inside the drain.

        Raises:
            RuntimeError: the calling thread does not own the connection.
            BaseException: whatever ``drain`` raised (ownership given up, flags restored).
        """
        self._check_caller_owns("bh_unlock")
        self._release(stop=None, keep_on_error=False)

    def bh_handle(self, flag: CqPend, timeout: float | None = None, *,
                  wake_sleepers: bool = False) -> bool:
        """Does the usual completion-thread sequence: :meth:`bh_event`, drain, :meth:`bh_unlock`.

        Returns:
            True if this call drained, False if the event was deferred to the owner.

        Raises:
            The errors of :meth:`bh_event`, and whatever ``drain`` raised. In that case
            ``flag`` is pending again and ownership is given up without draining further.
        """
        if not self.bh_event(flag, timeout, wake_sleepers=wake_sleepers):
            return False
        try:
            self._drain(flag)
        except BaseException:
            with self._mutex:
                self._pending |= flag
                self._disown_locked()
            raise
        self.bh_unlock()
        return True

    # --------------------------------------------------------------- internals

    def _label(self) -> str:
        return f"ConnLock {self._name!r}" if self._name else "ConnLock"

    def _check_caller_owns(self, what: str) -> None:
        with self._mutex:
            if not self._users:
                raise RuntimeError(f"{self._label()}: {what}() but nobody owns it")
            if self._owner != threading.get_ident():
                raise RuntimeError(f"{self._label()}: {what}() by a thread that does not own it")

    def _is_free(self) -> bool:
        return self._users == 0

    def _acquire_locked(self, timeout: float | None, *, bh: bool) -> bool:
        """Waits for users == 0 and takes ownership. Mutex held on entry and exit."""
        if self._users:
            if timeout == 0:
                return False  # a try-lock: neither sleeps nor counts as a wait
            if bh:
                self._bh_waits += 1
            else:
                self._lock_waits += 1
            self._lock_waiters += 1
            try:
                free = self._cond.wait_for(self._is_free, timeout)
            finally:
                self._lock_waiters -= 1
            if not free:
                if self._yielders:
                    self._cond.notify_all()  # a relock may be waiting for us to give up
                return False
        self._users += 1
        self._owner = threading.get_ident()
        self._acquisitions += 1
        if self._yielders:
            self._cond.notify_all()  # a relock may be waiting for someone to get in
        return True

    def _sleep_while_generation_locked(self, generation: int, deadline: float | None) -> None:
        """Sleeps until the generation moves on or the deadline passes. Mutex held."""
        while self._generation == generation:
            remaining = _remaining(deadline)
            if remaining == 0.0:
                return
            self._cond.wait(remaining)

    def _disown_locked(self, sleeper: tuple[int, int] | None = None) -> _Released:
        """Drops ownership, bumps the generation, wakes everyone. Mutex held.

        ``sleeper`` is ``(wake_fd, seen)`` from :meth:`sleep`: registered after the wake-up
        (so it does not wake itself) if nothing changed since ``seen``.
        """
        waiters = self._lock_waiters
        self._users -= 1
        self._owner = None
        self._generation += 1
        self._cond.notify_all()
        self._wake_sleepers_locked()
        slept = False
        if sleeper is not None and self._generation == sleeper[1] + 1:
            self._sleepers.append(sleeper[0])
            self._sleeps += 1
            slept = True
        return _Released(self._generation, self._acquisitions, waiters, slept)

    def _wake_sleepers_locked(self) -> None:
        """Wakes every thread in :meth:`sleep` (mutex held; a write per sleeper)."""
        if self._sleepers:
            for fd in self._sleepers:
                os.eventfd_write(fd, 1)
            self._sleepers.clear()

    def _release(self, *, stop: Callable[[], bool] | None, keep_on_error: bool,
                 sleeper: tuple[int, int] | None = None) -> _Released | None:
        """The ``tcp_release_cb`` loop, run by the owner.

        Takes and clears all pending flags in one mutex section, drains them outside it
        while still owning, and repeats. With no flag left it runs the leave hook once
        (outside the mutex, still owning), and drops ownership in the mutex section that
        finds no flag after it. Returns what that section saw, or None if ``stop()``
        became true after a drain or the hook, in which case the caller still owns the
        connection.
        """
        left = self._leave is None
        while True:
            with self._mutex:
                flags = self._pending
                if not flags and left:
                    return self._disown_locked(sleeper)
                self._pending = _NO_FLAGS
                if flags:
                    self._unlock_drains += 1
            try:
                if flags:
                    self._drain(flags)
                    left = self._leave is None
                else:
                    assert self._leave is not None
                    self._leave()
                    left = True
            except BaseException:
                with self._mutex:
                    self._pending |= flags
                    if not keep_on_error:
                        self._disown_locked()
                raise
            if stop is not None and stop():
                return None
