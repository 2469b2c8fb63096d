"""Property test: the lock and the progress engine over simulated CQs and real threads.

The CQs here are simulations (a completion deque, a one-shot arm, solicited-only arming,
an event pipe per CQ), not verbs: what is under test is ``ConnLock`` + ``Engine`` — who
polls, who arms, who sleeps, who drains deferred events — with the real completion thread
(``usdp._progress``) and real user threads. Hypothesis varies the number of completions,
which are solicited, their pacing, the number of waiting threads, deferral and busy-poll.

Checked: no completion is lost or processed twice; no thread sleeps while work is pending
(every waiter finishes well inside its deadline); and once nobody is inside, the receive
CQ is armed or an arming timer is pending (the engine's invariant 2).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from usdp._engine import RECV, SEND, Engine
from usdp._progress import progress

if TYPE_CHECKING:
    from usdp._verbs import QPResources


class _WC:
    __slots__ = ("status", "wr_id")

    def __init__(self, wr_id: int) -> None:
        self.wr_id, self.status = wr_id, 0


class SimCQ:
    """A CQ with ``ibv_req_notify_cq`` semantics: one event per arm, for the next
    completion (the next solicited one if armed solicited-only), written to a pipe."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._queue: deque[_WC] = deque()
        self._armed = False
        self._solicited_only = False
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.events_raised = 0
        #: Runs just before an arm takes effect: a completion that lands between the
        #: owner's last poll and its arm (the race "poll after arm" exists for).
        self.before_arm: Any = None

    def complete(self, wr_id: int, solicited: bool) -> None:
        with self._mutex:
            self._queue.append(_WC(wr_id))
            if self._armed and (solicited or not self._solicited_only):
                self._armed = False
                self.events_raised += 1
                os.write(self._write_fd, b"e")

    def poll(self, n: int) -> tuple[int, list[_WC]]:
        with self._mutex:
            out = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
        return len(out), out

    def arm(self, solicited_only: bool) -> None:
        if self.before_arm is not None:
            self.before_arm()
        with self._mutex:
            self._armed, self._solicited_only = True, solicited_only

    @property
    def armed(self) -> bool:
        with self._mutex:
            return self._armed

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self._write_fd)


class SimRes:
    """The part of ``QPResources`` the engine uses."""

    def __init__(self) -> None:
        self.send_cq, self.recv_cq = SimCQ(), SimCQ()
        self.send_fd, self.recv_fd = self.send_cq.read_fd, self.recv_cq.read_fd
        self.events_read = 0

    def read_events(self, send: bool) -> int:
        fd = self.send_fd if send else self.recv_fd
        try:
            n = len(os.read(fd, 4096))
        except BlockingIOError:
            n = 0
        self.events_read += n
        return n

    def arm(self, send: bool, solicited_only: bool = False) -> None:
        (self.send_cq if send else self.recv_cq).arm(solicited_only)


def _run(count: int, solicited: list[bool], pace: list[int], waiters: int, defer: bool,
         busy_poll: float, race: bool, nap: bool = False) -> None:
    res = SimRes()
    next_id = [0]
    feed = threading.Lock()

    def deliver() -> bool:
        """The next completion, by the "hardware"; the last one is solicited (the
        protocol's rule: the last frame of a burst is)."""
        with feed:
            i = next_id[0]
            if i >= count:
                return False
            next_id[0] += 1
        res.recv_cq.complete(i, solicited[i % len(solicited)] or i == count - 1)
        return True

    if race:
        res.recv_cq.before_arm = deliver
    handled: list[int] = []
    taken = [0]  # completions consumed by waiters (under the connection lock)
    engine = Engine(cast("QPResources", res), defer=defer, solicited_only=True,
                    busy_poll=busy_poll, on_send_wc=lambda wc: None,
                    on_recv_wc=lambda wc: handled.append(wc.wr_id), after=lambda: None,
                    send_events_needed=lambda: False, sends_outstanding=lambda: False,
                    eager=lambda: False, name="sim")
    p = progress()
    p.register(res.recv_fd, lambda: engine.on_fd(RECV), edge=True)
    p.register(res.send_fd, lambda: engine.on_fd(SEND), edge=True)
    with engine.lock:
        engine.poll_all()
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            while True:
                with engine.lock:
                    engine.wait(lambda: len(handled) > taken[0] or taken[0] >= count,
                                20.0, "sim", nap=nap)
                    if taken[0] >= count:
                        return
                    taken[0] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=waiter) for _ in range(waiters)]
    for t in threads:
        t.start()
    i = 0
    while deliver():
        if pace[i % len(pace)]:
            time.sleep(pace[i % len(pace)] * 1e-4)
        i += 1
    for t in threads:
        t.join(40.0)
    try:
        assert not any(t.is_alive() for t in threads), "a waiter slept with work pending"
        assert not errors, errors
        assert sorted(handled) == list(range(count)), "a completion lost or processed twice"
        assert len(handled) == count
        # Invariant 2: nobody inside -> armed, or an arming timer pending.
        assert not engine.lock.owned
        assert res.recv_cq.armed or engine._due is not None or not defer
        assert res.events_read <= res.recv_cq.events_raised + res.send_cq.events_raised
    finally:
        engine.closed = True

        def _unregister() -> None:
            p.unregister(res.recv_fd)
            p.unregister(res.send_fd)

        p.call(_unregister)
        res.send_cq.close()
        res.recv_cq.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(count=st.integers(1, 60), solicited=st.lists(st.booleans(), min_size=1, max_size=8),
       pace=st.lists(st.integers(0, 5), min_size=1, max_size=8), waiters=st.integers(1, 3),
       defer=st.booleans(), busy_poll=st.sampled_from([0.0, 200e-6]), race=st.booleans(),
       nap=st.booleans())
def test_no_completion_lost_twice_or_slept_on(count: int, solicited: list[bool],
                                             pace: list[int], waiters: int, defer: bool,
                                             busy_poll: float, race: bool, nap: bool) -> None:
    _run(count, solicited, pace, waiters, defer, busy_poll, race, nap)


def test_idle_wait_sleeps_instead_of_spinning() -> None:
    """A wait with nothing coming ends up asleep on the fds: little CPU for a long wait."""
    res = SimRes()
    engine = Engine(cast("QPResources", res), defer=True, solicited_only=True, busy_poll=1e-3,
                    on_send_wc=lambda wc: None, on_recv_wc=lambda wc: None,
                    after=lambda: None, send_events_needed=lambda: False,
                    sends_outstanding=lambda: False, eager=lambda: False, name="idle")
    got: list[Any] = []
    cpu0 = time.thread_time()

    def sleeper() -> None:
        with engine.lock:
            try:
                engine.wait(lambda: False, 1.0, "idle")
            except TimeoutError as exc:
                got.append(exc)
        got.append(time.thread_time() - cpu0)

    t = threading.Thread(target=sleeper)
    t.start()
    t.join(30.0)
    engine.closed = True
    res.send_cq.close()
    res.recv_cq.close()
    assert isinstance(got[0], TimeoutError)
    assert engine.stats.sleeps >= 1
    # Busy-polling is bounded by busy_poll (1 ms); the rest of the second is asleep.
    assert got[1] < 0.5, got
