"""Unit tests of ConnLock's state machine, run against a fake CQ and a fake completion thread.

A fake is the right tool here: ConnLock is pure threading logic. FakeCQ models the two verbs
facts the lock relies on. Arming is one-shot (a completion on an armed CQ raises one event
and disarms it), and arming says nothing about completions already queued. FakeIO.drain
follows the drain contract: poll until empty, re-arm, poll again. It also checks from the
outside that only the owner drains, that a CQ is never drained by two threads at once, and
that every completion is processed exactly once.

No test sleeps to synchronise. Threads are joined with a bound, and where a test needs
another thread to have reached a state, it polls an observable condition with a deadline
(poll_until).
"""

from __future__ import annotations

import functools
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from usdp._lock import ConnLock, CqPend, LockStats

SEND = CqPend.SEND_CQ_PEND
RECV = CqPend.RECV_CQ_PEND
BOTH = SEND | RECV
JOIN_TIMEOUT = 30.0  # generous: only reached if something deadlocked


# --------------------------------------------------------------------------- fakes


class FakeCQ:
    """A completion queue with one-shot arming. Starts armed, as after setup."""

    def __init__(self) -> None:
        self._m = threading.Lock()
        self._queue: list[int] = []
        self.armed = True
        self.polls = 0
        self.arms = 0

    def push(self, item: int) -> bool:
        """Adds a completion; returns True if that raised an event (and disarmed)."""
        with self._m:
            self._queue.append(item)
            if self.armed:
                self.armed = False
                return True
            return False

    def poll(self) -> list[int]:
        with self._m:
            self.polls += 1
            items, self._queue = self._queue, []
            return items

    def arm(self) -> None:
        with self._m:
            self.armed = True
            self.arms += 1

    def __len__(self) -> int:
        with self._m:
            return len(self._queue)


class Exclusive:
    """Records a violation if two sections that need the connection ever overlap."""

    def __init__(self, violations: list[str]) -> None:
        self._m = threading.Lock()
        self._holder: str | None = None
        self._violations = violations

    def enter(self, who: str) -> None:
        with self._m:
            if self._holder is not None:
                self._violations.append(f"{who} entered while {self._holder} was inside")
            self._holder = who

    def exit(self) -> None:
        with self._m:
            self._holder = None

    def section(self, who: str, spins: int = 3) -> None:
        self.enter(who)
        for _ in range(spins):
            time.sleep(0)  # a yield, to widen the window for another thread to barge in
        self.exit()


DrainHook = Callable[[CqPend, "FakeIO"], None]


class FakeIO:
    """The I/O layer: two CQs, an event channel, and the drain callback."""

    def __init__(self) -> None:
        self.cqs: dict[CqPend, FakeCQ] = {SEND: FakeCQ(), RECV: FakeCQ()}
        self.events: queue.Queue[CqPend | None] = queue.Queue()
        self.violations: list[str] = []
        self.exclusive = Exclusive(self.violations)
        self.drain_calls: list[CqPend] = []
        self.before_arm: list[DrainHook] = []  # one-shot hooks run inside the next drain
        self.after_drain: list[DrainHook] = []
        self._m = threading.Lock()
        self._processed: Counter[int] = Counter()
        self._draining: set[CqPend] = set()
        self._lock: ConnLock | None = None

    def make_lock(self, *, defer: bool = True) -> ConnLock:
        self._lock = ConnLock(self.drain, defer=defer, name="test")
        return self._lock

    @property
    def lock(self) -> ConnLock:
        assert self._lock is not None
        return self._lock

    def complete(self, flag: CqPend, item: int) -> bool:
        """The hardware: queue a completion, and deliver an event if the CQ was armed."""
        fired = self.cqs[flag].push(item)
        if fired:
            self.events.put(flag)
        return fired

    def next_event(self) -> CqPend:
        """Takes the next event off the channel (the test plays the BH)."""
        flag = self.events.get_nowait()
        assert flag is not None
        return flag

    def processed(self) -> Counter[int]:
        with self._m:
            return Counter(self._processed)

    def count(self, item: int) -> int:
        with self._m:
            return self._processed[item]

    def total(self) -> int:
        with self._m:
            return sum(self._processed.values())

    def reached(self, goal: int) -> bool:
        return self.total() >= goal

    def _process(self, items: list[int]) -> None:
        with self._m:
            self._processed.update(items)

    def drain(self, flags: CqPend) -> None:
        if not self.lock.owned_by_caller:
            self.violations.append(f"drain({flags!r}) by a thread that does not own the lock")
        with self._m:
            self.drain_calls.append(flags)
        self.exclusive.enter(f"drain({flags!r})")
        try:
            for flag in (SEND, RECV):
                if not flags & flag:
                    continue
                with self._m:
                    if flag in self._draining:
                        self.violations.append(f"{flag!r} drained by two threads at once")
                    self._draining.add(flag)
                cq = self.cqs[flag]
                self._process(cq.poll())
                while self.before_arm:
                    self.before_arm.pop(0)(flag, self)
                cq.arm()
                self._process(cq.poll())
                with self._m:
                    self._draining.discard(flag)
        finally:
            self.exclusive.exit()
        while self.after_drain:
            self.after_drain.pop(0)(flags, self)


class Worker:
    """A named daemon thread whose exception is re-raised by join()."""

    def __init__(self, target: Callable[[], object], name: str) -> None:
        self.error: BaseException | None = None
        self.result: object = None
        self._target = target
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self.result = self._target()
        except BaseException as exc:
            self.error = exc

    def start(self) -> Worker:
        self._thread.start()
        return self

    def join(self, timeout: float = JOIN_TIMEOUT) -> object:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"{self._thread.name} did not finish (deadlock?)"
        if self.error is not None:
            raise self.error
        return self.result


def run_in_thread(target: Callable[[], object], name: str = "helper") -> object:
    return Worker(target, name).start().join()


class FakeBH:
    """The completion thread: takes events off the channel and calls bh_handle."""

    def __init__(self, io: FakeIO, *, bh_timeout: float | None = None) -> None:
        self.io = io
        self.bh_timeout = bh_timeout
        self.handled: list[tuple[CqPend, bool]] = []
        self._worker = Worker(self._loop, "fake-bh")

    def _loop(self) -> None:
        while True:
            flag = self.io.events.get(timeout=JOIN_TIMEOUT)
            if flag is None:
                return
            self.handled.append((flag, self.io.lock.bh_handle(flag, self.bh_timeout)))

    def start(self) -> FakeBH:
        self._worker.start()
        return self

    def stop(self) -> None:
        self.io.events.put(None)
        self._worker.join()


def poll_until(condition: Callable[[], bool], what: str, timeout: float = JOIN_TIMEOUT) -> None:
    """Waits for another thread to reach an observable state, with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.0005)


def assert_quiescent(io: FakeIO, items: range) -> None:
    lock = io.lock
    assert io.violations == []
    assert not lock.owned
    assert lock.pending == CqPend(0)
    assert io.events.empty()
    for flag, cq in io.cqs.items():
        assert len(cq) == 0, f"{flag!r} still holds completions"
        assert cq.armed, f"{flag!r} left unarmed"
    processed = io.processed()
    assert set(processed) == set(items)
    assert set(processed.values()) <= {1}, "a completion was processed twice"


def assert_accounting(stats: LockStats) -> None:
    assert stats.events == stats.deferred + stats.bh_drains
    assert stats.unlock_drains <= stats.deferred


@pytest.fixture
def io() -> FakeIO:
    io = FakeIO()
    io.make_lock()
    return io


# ------------------------------------------------------------ the BH side


def test_bh_event_while_unlocked_is_drained_by_the_bh(io: FakeIO) -> None:
    lock = io.lock
    assert io.complete(RECV, 1)
    flag = io.next_event()

    def bh() -> None:
        assert lock.bh_event(flag) is True
        assert lock.owned_by_caller
        io.drain(flag)
        lock.bh_unlock()

    run_in_thread(bh, "bh")
    assert io.drain_calls == [RECV]
    assert io.cqs[RECV].polls == 2 and io.cqs[RECV].arms == 1
    assert_quiescent(io, range(1, 2))
    s = lock.stats()
    assert (s.events, s.deferred, s.bh_drains, s.unlock_drains) == (1, 0, 1, 0)
    assert s.generation == 1  # bh_unlock bumped it for waiters


def test_bh_event_while_owned_only_sets_the_flag(io: FakeIO) -> None:
    lock = io.lock
    recv = io.cqs[RECV]
    assert lock.lock()
    assert io.complete(RECV, 1)
    assert run_in_thread(lambda: lock.bh_handle(io.next_event()), "bh") is False
    # Neither polled nor re-armed: the CQ stays quiet while the user owns the connection.
    assert (recv.polls, recv.arms, recv.armed) == (0, 0, False)
    assert lock.pending == RECV
    assert not io.complete(RECV, 2)  # unarmed: no second event
    assert io.total() == 0 and io.drain_calls == []

    lock.unlock()
    assert io.drain_calls == [RECV]  # exactly once, for both completions
    assert (recv.polls, recv.arms) == (2, 1)
    assert_quiescent(io, range(1, 3))
    s = lock.stats()
    assert (s.events, s.deferred, s.bh_drains, s.unlock_drains) == (1, 1, 0, 1)


def test_deferred_events_on_both_cqs_fold_into_one_drain(io: FakeIO) -> None:
    lock = io.lock
    with lock:
        assert io.complete(SEND, 1)
        assert io.complete(RECV, 2)
        for _ in range(2):
            assert lock.bh_handle(io.next_event()) is False
        assert lock.bh_event(RECV) is False  # a spurious event on an owned connection
        assert lock.pending == BOTH
    assert io.drain_calls == [BOTH]
    assert_quiescent(io, range(1, 3))
    s = lock.stats()
    assert (s.events, s.deferred, s.unlock_drains) == (3, 3, 1)


@pytest.mark.parametrize("when", ["after_arm", "before_arm"])
def test_event_during_unlock_drain_is_not_lost(io: FakeIO, when: str) -> None:
    lock = io.lock
    bh = FakeBH(io).start()
    try:
        assert lock.lock()
        assert io.complete(RECV, 1)
        poll_until(lambda: lock.pending == RECV, "the BH to defer the first event")

        def arrive(flag: CqPend, io: FakeIO) -> None:
            # A completion lands while the owner drains, and the BH handles its event
            # (if any) before the drain returns.
            fired = io.complete(RECV, 2)
            assert fired == (when == "after_arm")
            if fired:
                poll_until(lambda: lock.pending == RECV, "the BH to defer the second event")

        if when == "after_arm":
            io.after_drain.append(arrive)
        else:
            io.before_arm.append(arrive)
        lock.unlock()
    finally:
        bh.stop()
    if when == "after_arm":
        # The first drain had already polled; the flag set during it made unlock loop.
        assert io.drain_calls == [RECV, RECV]
        assert lock.stats().unlock_drains == 2
    else:
        # No event (the CQ was unarmed); the poll after re-arming found it.
        assert io.drain_calls == [RECV]
    assert all(not drained for _, drained in bh.handled)
    assert_quiescent(io, range(1, 3))


def test_bh_event_rejects_bad_flags(io: FakeIO) -> None:
    with pytest.raises(ValueError):
        io.lock.bh_event(CqPend(0))
    with pytest.raises(ValueError):
        io.lock.bh_event(CqPend(4))
    assert io.lock.stats().events == 0


def test_bh_event_from_inside_a_bh_drain_is_drained_at_bh_unlock(io: FakeIO) -> None:
    lock = io.lock

    def send_event_inside(flags: CqPend, io: FakeIO) -> None:
        assert lock.bh_event(SEND) is False  # the BH owns: deferred to its own bh_unlock

    io.after_drain.append(send_event_inside)
    io.complete(RECV, 1)
    io.complete(SEND, 2)
    assert lock.bh_handle(io.next_event()) is True  # RECV: SEND is deferred inside
    assert io.drain_calls == [RECV, SEND]
    io.next_event()  # the SEND CQ's own event, now stale: a harmless spurious drain
    assert lock.bh_handle(SEND) is True
    assert_quiescent(io, range(1, 3))


# ------------------------------------------------------------ process context


def test_relock_drains_deferred_events_and_keeps_ownership(io: FakeIO) -> None:
    lock = io.lock
    assert lock.lock()
    io.complete(SEND, 1)
    assert lock.bh_handle(io.next_event()) is False
    generation = lock.generation
    lock.relock()
    assert lock.owned_by_caller
    assert io.drain_calls == [SEND] and io.count(1) == 1
    assert lock.generation == generation + 1
    assert lock.stats().unlock_drains == 1
    lock.unlock()
    assert io.drain_calls == [SEND]  # nothing left to drain
    assert_quiescent(io, range(1, 2))


def test_relock_lets_a_waiting_thread_in(io: FakeIO) -> None:
    lock = io.lock
    order: list[str] = []
    assert lock.lock()

    def other() -> None:
        assert lock.lock(timeout=JOIN_TIMEOUT)
        order.append("other")
        lock.unlock()

    waiter = Worker(other, "waiter").start()
    poll_until(lambda: lock.stats().lock_waits == 1, "the other thread to wait in lock()")
    lock.relock()
    order.append("relocker")
    lock.unlock()
    waiter.join()
    assert order == ["other", "relocker"]


def test_relock_without_waiters_does_not_wait(io: FakeIO) -> None:
    lock = io.lock
    with lock:
        lock.relock()
        assert lock.owned_by_caller
    assert lock.stats().lock_waits == 0


def test_lock_waits_for_the_owner_and_times_out(io: FakeIO) -> None:
    lock = io.lock
    assert lock.lock()
    started = time.monotonic()
    assert run_in_thread(lambda: lock.lock(timeout=0.05)) is False
    assert time.monotonic() - started >= 0.05
    assert run_in_thread(lambda: lock.lock(timeout=0)) is False
    assert lock.stats().lock_waits == 1  # timeout=0 is a try-lock: it never sleeps
    lock.unlock()

    def take_and_release() -> None:
        assert lock.lock(timeout=0)
        lock.unlock()

    run_in_thread(take_and_release)
    assert not lock.owned


def test_lock_blocks_until_unlock(io: FakeIO) -> None:
    lock = io.lock
    assert lock.lock()
    got = threading.Event()

    def other() -> None:
        assert lock.lock(timeout=JOIN_TIMEOUT)
        got.set()
        lock.unlock()

    worker = Worker(other, "other").start()
    poll_until(lambda: lock.stats().lock_waits == 1, "the other thread to wait")
    assert not got.is_set()
    lock.unlock()
    worker.join()
    assert got.is_set()


def test_context_manager_releases_on_exception(io: FakeIO) -> None:
    lock = io.lock
    with pytest.raises(KeyError), lock as held:
        assert held is lock and lock.owned_by_caller
        raise KeyError("boom")
    assert not lock.owned


def test_misuse_is_reported(io: FakeIO) -> None:
    lock = io.lock
    with pytest.raises(RuntimeError, match="nobody owns"):
        lock.unlock()
    with pytest.raises(RuntimeError, match="nobody owns"):
        lock.wait(lambda: True, 0)
    with pytest.raises(ValueError):
        lock.lock(timeout=-1)
    with lock:
        with pytest.raises(RuntimeError, match="not reentrant"):
            lock.lock()
        with pytest.raises(RuntimeError, match="does not own"):
            run_in_thread(lock.unlock)
        with pytest.raises(RuntimeError, match="does not own"):
            run_in_thread(lock.relock)
        with pytest.raises(ValueError):
            lock.wait(lambda: True, -1)
        assert lock.owned_by_caller
        assert run_in_thread(lambda: lock.owned_by_caller) is False
        assert run_in_thread(lambda: lock.owned) is True
    assert lock.users == 0


def test_repr_shows_state(io: FakeIO) -> None:
    lock = io.lock
    assert repr(lock) == "<ConnLock 'test' users=0 pending=0 generation=0>"
    with lock:
        lock.bh_event(BOTH)
        assert "users=1" in repr(lock)
        assert "SEND_CQ_PEND" in repr(lock) and "RECV_CQ_PEND" in repr(lock)


# ------------------------------------------------------------------ wait()


def test_wait_returns_at_once_if_the_predicate_holds(io: FakeIO) -> None:
    lock = io.lock
    with lock:
        generation = lock.generation
        assert lock.wait(lambda: True, timeout=0) is True
        assert lock.generation == generation  # never released
        assert lock.owned_by_caller


def test_wait_wakes_on_notify(io: FakeIO) -> None:
    lock = io.lock
    ready = threading.Event()

    def closer() -> None:
        poll_until(lambda: not lock.owned, "the owner to sleep in wait()")
        ready.set()
        lock.notify()

    with lock:
        worker = Worker(closer, "closer").start()
        assert lock.wait(ready.is_set, timeout=JOIN_TIMEOUT) is True
        assert lock.owned_by_caller
    worker.join()


def test_wait_returns_when_a_deferred_drain_makes_the_predicate_true(io: FakeIO) -> None:
    lock = io.lock
    with lock:
        io.complete(RECV, 7)
        assert lock.bh_handle(io.next_event()) is False
        generation = lock.generation
        assert lock.wait(lambda: io.count(7) == 1, timeout=JOIN_TIMEOUT) is True
        assert lock.owned_by_caller
        assert lock.generation == generation  # drained while still owning; never let go
    assert_quiescent(io, range(7, 8))
    assert lock.stats().unlock_drains == 1


def test_wait_wakes_when_a_bh_drain_makes_the_predicate_true(io: FakeIO) -> None:
    lock = io.lock
    bh = FakeBH(io).start()

    def data_arrives() -> None:
        poll_until(lambda: not lock.owned, "the owner to sleep in wait()")
        io.complete(RECV, 1)

    try:
        with lock:
            worker = Worker(data_arrives, "nic").start()
            assert lock.wait(lambda: io.count(1) == 1, timeout=JOIN_TIMEOUT) is True
            assert lock.owned_by_caller
        worker.join()
    finally:
        bh.stop()
    assert bh.handled == [(RECV, True)]  # the connection was free: the BH polled itself
    s = lock.stats()
    assert (s.deferred, s.bh_drains) == (0, 1)
    assert_quiescent(io, range(1, 2))


def test_wait_times_out_holding_the_lock(io: FakeIO) -> None:
    lock = io.lock
    with lock:
        started = time.monotonic()
        assert lock.wait(lambda: False, timeout=0.05) is False
        assert time.monotonic() - started >= 0.05
        assert lock.owned_by_caller
        assert lock.wait(lambda: False, timeout=0) is False
        assert lock.owned_by_caller


def test_wait_does_not_lose_a_notify_issued_before_the_release(io: FakeIO) -> None:
    # The state changes and notify() runs after predicate() read it but before wait()
    # releases. A generation captured only at the release would sleep until the timeout.
    lock = io.lock
    state = {"ready": False, "calls": 0}

    def predicate() -> bool:
        value = state["ready"]
        state["calls"] += 1
        if state["calls"] == 1:

            def change() -> None:
                state["ready"] = True
                lock.notify()

            run_in_thread(change, "changer")
        return bool(value)

    with lock:
        started = time.monotonic()
        assert lock.wait(predicate, timeout=JOIN_TIMEOUT) is True
        assert time.monotonic() - started < JOIN_TIMEOUT / 2
    assert state["calls"] == 2


def test_wait_does_not_lose_a_notify_racing_with_it(io: FakeIO) -> None:
    lock = io.lock
    for _ in range(200):
        ready = threading.Event()

        def change(ready: threading.Event = ready) -> None:
            ready.set()
            lock.notify()

        with lock:
            worker = Worker(change, "changer").start()
            assert lock.wait(ready.is_set, timeout=JOIN_TIMEOUT) is True
        worker.join()


def test_wait_wakes_when_another_users_unlock_drains_a_deferred_event(io: FakeIO) -> None:
    # While the first user sleeps in wait(), a second user takes the lock; an event
    # deferred behind the second user is drained at its unlock, which wakes the first.
    lock = io.lock

    def other_user() -> None:
        poll_until(lambda: not lock.owned, "the first user to sleep in wait()")
        with lock:
            io.complete(SEND, 1)
            assert lock.bh_handle(io.next_event()) is False

    with lock:
        worker = Worker(other_user, "other-user").start()
        assert lock.wait(lambda: io.count(1) == 1, timeout=JOIN_TIMEOUT) is True
        assert lock.owned_by_caller
    worker.join()
    assert_quiescent(io, range(1, 2))
    s = lock.stats()
    assert (s.deferred, s.unlock_drains, s.bh_drains) == (1, 1, 0)


# ------------------------------------------------------- drain raising


class DrainError(Exception):
    pass


def failing_once(io: FakeIO) -> None:
    def boom(flags: CqPend, io: FakeIO) -> None:
        raise DrainError

    io.after_drain.append(boom)


def test_unlock_gives_up_ownership_when_drain_raises(io: FakeIO) -> None:
    lock = io.lock
    assert lock.lock()
    io.complete(RECV, 1)
    assert lock.bh_handle(io.next_event()) is False
    failing_once(io)
    with pytest.raises(DrainError):
        lock.unlock()
    assert not lock.owned
    assert lock.pending == RECV  # retried by the next owner
    with lock:
        pass
    assert io.drain_calls == [RECV, RECV]
    assert_quiescent(io, range(1, 2))


@pytest.mark.parametrize("call", ["relock", "wait"])
def test_relock_and_wait_keep_ownership_when_drain_raises(io: FakeIO, call: str) -> None:
    lock = io.lock
    with lock:
        io.complete(RECV, 1)
        assert lock.bh_handle(io.next_event()) is False
        failing_once(io)
        with pytest.raises(DrainError):
            if call == "relock":
                lock.relock()
            else:
                lock.wait(lambda: False, timeout=JOIN_TIMEOUT)
        assert lock.owned_by_caller
        assert lock.pending == RECV
    assert_quiescent(io, range(1, 2))


def test_bh_handle_gives_up_ownership_when_drain_raises(io: FakeIO) -> None:
    lock = io.lock
    io.complete(RECV, 1)
    failing_once(io)
    with pytest.raises(DrainError):
        lock.bh_handle(io.next_event())
    assert not lock.owned
    assert lock.pending == RECV
    with lock:
        pass
    assert_quiescent(io, range(1, 2))


# ------------------------------------------------------------ defer=False


def test_no_defer_bh_waits_for_the_owner_and_polls_itself() -> None:
    io = FakeIO()
    lock = io.make_lock(defer=False)
    assert lock.lock()
    io.complete(RECV, 1)
    bh = Worker(lambda: lock.bh_handle(io.next_event()), "bh").start()
    poll_until(lambda: lock.stats().bh_waits == 1, "the BH to wait for the owner")
    assert io.cqs[RECV].polls == 0 and lock.pending == CqPend(0)
    lock.unlock()
    assert bh.join() is True
    assert io.drain_calls == [RECV]
    s = lock.stats()
    assert (s.events, s.deferred, s.bh_drains, s.unlock_drains, s.bh_waits) == (1, 0, 1, 0, 1)
    assert_quiescent(io, range(1, 2))


def test_no_defer_bh_gets_in_while_the_owner_waits() -> None:
    io = FakeIO()
    lock = io.make_lock(defer=False)
    bh = FakeBH(io).start()
    try:
        with lock:
            io.complete(RECV, 1)  # the BH may reach bh_event before or after wait() lets go
            assert lock.wait(lambda: io.count(1) == 1, timeout=JOIN_TIMEOUT) is True
    finally:
        bh.stop()
    assert bh.handled == [(RECV, True)]
    assert lock.stats().deferred == 0
    assert_quiescent(io, range(1, 2))


def test_no_defer_bh_timeout_falls_back_to_deferring() -> None:
    io = FakeIO()
    lock = io.make_lock(defer=False)
    with lock:
        io.complete(RECV, 1)
        flag = io.next_event()
        assert run_in_thread(lambda: lock.bh_handle(flag, timeout=0.01)) is False
        assert lock.pending == RECV
        with pytest.raises(RuntimeError, match="deadlock"):
            lock.bh_event(RECV)  # the owner itself, with defer=False
    s = lock.stats()
    assert (s.events, s.deferred, s.bh_waits, s.unlock_drains) == (1, 1, 1, 1)
    assert_accounting(s)
    assert_quiescent(io, range(1, 2))


# ------------------------------------------------------------ counters


def test_stats_count_each_path() -> None:
    io = FakeIO()
    lock = io.make_lock()
    assert lock.stats() == LockStats(0, 0, 0, 0, 0, 0, 0)
    io.complete(SEND, 1)
    assert lock.bh_handle(io.next_event())  # a BH drain; bh_unlock: generation 1
    with lock:
        io.complete(SEND, 2)
        io.complete(RECV, 3)
        assert not lock.bh_handle(io.next_event())  # deferred
        assert not lock.bh_handle(io.next_event())  # deferred
        assert run_in_thread(lambda: lock.lock(timeout=0.01)) is False  # one lock wait
        assert run_in_thread(lambda: lock.lock(timeout=0)) is False  # a try: not a wait
        lock.relock()  # one unlock drain for SEND|RECV; generation 2
        assert io.count(2) == io.count(3) == 1
        lock.notify()  # generation 3
        assert not lock.bh_event(RECV)  # a spurious event, deferred
        assert lock.wait(lambda: True, timeout=0)  # holds at once: no release
        assert not lock.wait(lambda: False, timeout=0)  # drains RECV; generation 4
    # unlock: nothing pending; generation 5
    s = lock.stats()
    assert s == LockStats(
        events=4,
        deferred=3,
        bh_drains=1,
        unlock_drains=2,
        lock_waits=1,
        bh_waits=0,
        generation=5,
    )
    assert_accounting(s)
    assert_quiescent(io, range(1, 4))


# ------------------------------------------------------------ hammering


@pytest.mark.parametrize("defer", [True, False], ids=["defer", "no-defer"])
def test_hammer_every_completion_processed_exactly_once(defer: bool) -> None:
    io = FakeIO()
    lock = io.make_lock(defer=defer)
    n_users, iterations, n_producers, per_producer = 4, 250, 2, 1500

    def user(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(iterations):
            op = rng.randrange(5)
            if op == 0:
                with lock:
                    io.exclusive.section("user")
            elif op == 1:
                assert lock.lock(timeout=JOIN_TIMEOUT)
                io.exclusive.section("user")
                lock.relock()
                assert lock.owned_by_caller
                io.exclusive.section("user")
                lock.unlock()
            elif op == 2:
                with lock:
                    goal = io.total() + 1
                    lock.wait(functools.partial(io.reached, goal), timeout=0.002)
                    assert lock.owned_by_caller
                    io.exclusive.section("user")
            elif op == 3:
                if lock.lock(timeout=0):
                    io.exclusive.section("user")
                    lock.unlock()
            else:
                lock.notify()

    def producer(index: int) -> None:
        base = index * per_producer
        for i in range(per_producer):
            io.complete(SEND if i % 3 else RECV, base + i)

    bh = FakeBH(io).start()
    workers = [Worker(functools.partial(user, s), f"user-{s}") for s in range(n_users)]
    workers += [Worker(functools.partial(producer, p), f"producer-{p}") for p in range(n_producers)]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    finally:
        bh.stop()
    assert_quiescent(io, range(n_producers * per_producer))
    s = lock.stats()
    assert_accounting(s)
    assert s.events == len(bh.handled)
    if not defer:
        assert s.deferred == 0 and s.unlock_drains == 0


# ------------------------------------------------------------ stateful model


class ConnLockMachine(RuleBasedStateMachine):
    """Single-threaded interleavings of user calls, completions and BH events.

    With deferral on, nothing here blocks, so one thread can play every role. After every
    step: a CQ that holds completions is unarmed, and someone owes it a drain (an event is
    queued for the BH, or its flag is pending); nothing is processed twice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.io = FakeIO()
        self.lock = self.io.make_lock()
        self.user_owns = False
        self.next_item = 0
        self.queued: list[CqPend] = []  # the BH's view of the event channel

    def _take_events(self) -> None:
        while not self.io.events.empty():
            flag = self.io.next_event()
            assert flag is not None
            self.queued.append(flag)

    @rule(flag=st.sampled_from([SEND, RECV]))
    def completion(self, flag: CqPend) -> None:
        self.io.complete(flag, self.next_item)
        self.next_item += 1
        self._take_events()

    @rule(flag=st.sampled_from([SEND, RECV, BOTH]))
    def spurious_event(self, flag: CqPend) -> None:
        self.queued.append(flag)

    @precondition(lambda self: bool(self.queued))
    @rule(data=st.data())
    def bh_event(self, data: st.DataObject) -> None:
        flag = self.queued.pop(data.draw(st.integers(0, len(self.queued) - 1)))
        assert self.lock.bh_handle(flag) is (not self.user_owns)
        self._take_events()

    @precondition(lambda self: not self.user_owns)
    @rule()
    def lock_(self) -> None:
        assert self.lock.lock(timeout=0)
        self.user_owns = True

    @precondition(lambda self: self.user_owns)
    @rule()
    def unlock(self) -> None:
        self.lock.unlock()
        self.user_owns = False
        self._take_events()

    @precondition(lambda self: self.user_owns)
    @rule()
    def relock(self) -> None:
        self.lock.relock()
        self._take_events()

    @precondition(lambda self: self.user_owns)
    @rule()
    def wait(self) -> None:
        assert self.lock.wait(lambda: False, timeout=0) is False
        self._take_events()

    @invariant()
    def ownership_matches(self) -> None:
        assert self.lock.owned is self.user_owns
        if not self.user_owns:
            assert self.lock.pending == CqPend(0)

    @invariant()
    def no_completion_can_get_stuck(self) -> None:
        pending = self.lock.pending
        for flag, cq in self.io.cqs.items():
            if len(cq):
                assert not cq.armed
            if not cq.armed:
                assert flag in self.queued or flag & pending, f"{flag!r} owes no drain"
        assert set(self.io.processed().values()) <= {1}
        assert self.io.violations == []

    def teardown(self) -> None:
        if self.user_owns:
            self.lock.unlock()
        while self.queued:
            assert self.lock.bh_handle(self.queued.pop(0)) is True
        assert_quiescent(self.io, range(self.next_item))
        assert_accounting(self.lock.stats())


ConnLockMachine.TestCase.settings = settings(max_examples=150, deadline=None)
TestConnLockMachine = ConnLockMachine.TestCase
