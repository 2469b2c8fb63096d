"""The completion thread: usdp's "bottom half".

One daemon thread per process waits with ``epoll`` on every connection's completion
channels and CM event channel (``select``/``epoll`` release the GIL; pyverbs' own blocking
calls would not). When an fd is ready it calls that fd's handler, which takes the event
and then goes through the connection's ``ConnLock`` BH path: drain now if no user call
holds the connection, else only set the pending flag for the user's unlock to drain.

Why one thread for all connections: a thread per connection would cost a stack and a
context switch per event each, and under the GIL they could not run in parallel anyway.
One epoll loop scales to thousands of connections and keeps the event order per fd.

Timers (``schedule``) serve the progress engine's *arming delay*: a connection that a user
left with an un-armed CQ (because the user polls it itself and will likely be back) is
armed here a little later if nobody came back by then, as OFED SDP's
``SDP_RX_ARMING_DELAY`` does. Scheduling costs a write to the wake pipe only when the new
deadline is earlier than the one the thread sleeps until.

Connections are torn down *on this thread* (``call``): the thread may be between
``epoll`` returning an fd and the handler reading from it, and destroying a channel under
it would be a use-after-free in C.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("usdp.progress")

#: Granularity of keepalive checks (seconds); intervals are rounded up to it.
TICK = 0.25


class ProgressThread:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._tickers: set[Callable[[float], None]] = set()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._timer_lock = threading.Lock()
        self._wait_until = float("inf")  # when the loop's current epoll wait ends
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="usdp-bh", daemon=True)
        self._thread.start()

    @property
    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def register(self, fd: int, handler: Callable[[], None], *, edge: bool = False) -> None:
        """Call ``handler()`` on this thread whenever ``fd`` is readable.

        With ``edge`` the fd is watched edge-triggered: the handler runs once per new event
        written to it, and may leave the event unread (for a user thread that owns or
        sleeps on the connection to read) without the loop spinning on it.
        """
        self._handlers[fd] = handler
        self._epoll.register(fd, select.EPOLLIN | (select.EPOLLET if edge else 0))

    def schedule(self, when: float, fn: Callable[[], None]) -> None:
        """Call ``fn()`` on this thread at ``time.monotonic()`` ``when``, or a little later."""
        with self._timer_lock:
            heapq.heappush(self._timers, (when, next(self._timer_seq), fn))
            wake = when < self._wait_until
            if wake:
                self._wait_until = when
        if wake:
            os.write(self._wake_w, b"s")

    def unregister(self, fd: int) -> None:
        """Only on this thread (inside ``call``), so no handler runs for a closed fd."""
        assert self.on_thread
        self._handlers.pop(fd, None)
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            self._epoll.unregister(fd)

    def call(self, fn: Callable[[], Any], timeout: float | None = 30.0) -> Any:
        """Run ``fn`` on the completion thread and return its result."""
        if self.on_thread:
            return fn()
        fut: Future[Any] = Future()
        self._calls.append((fn, fut))
        os.write(self._wake_w, b"x")
        return fut.result(timeout)

    def add_ticker(self, tick: Callable[[float], None]) -> None:
        """Call ``tick(now)`` on this thread about every TICK seconds (keepalive)."""
        self._tickers.add(tick)
        os.write(self._wake_w, b"t")  # recompute the poll timeout

    def remove_ticker(self, tick: Callable[[float], None]) -> None:
        self._tickers.discard(tick)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while True:
            with self._timer_lock:
                if not self._timers or self._timers[0][0] > now:
                    return
                _, _, fn = heapq.heappop(self._timers)
            try:
                fn()
            except Exception:
                log.exception("timer callback failed")

    def _run(self) -> None:
        next_tick = time.monotonic() + TICK
        while True:
            until = next_tick if self._tickers else float("inf")
            with self._timer_lock:
                if self._timers:
                    until = min(until, self._timers[0][0])
                self._wait_until = until
            timeout = -1.0 if until == float("inf") else max(0.0, until - time.monotonic())
            try:
                ready = self._epoll.poll(timeout)
            except InterruptedError:
                continue
            with self._timer_lock:
                self._wait_until = -1.0  # awake: a new timer needs no pipe write
            self._run_timers()
            if self._tickers and time.monotonic() >= next_tick:
                now = time.monotonic()
                next_tick = now + TICK
                for tick in list(self._tickers):
                    try:
                        tick(now)
                    except Exception:
                        log.exception("keepalive tick failed")
            for fd, _mask in ready:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                handler = self._handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler()
                except Exception:  # one connection's failure must not stop the others
                    log.exception("completion handler for fd %d failed", fd)
            while self._calls:
                fn, fut = self._calls.popleft()
                try:
                    fut.set_result(fn())
                except BaseException as exc:
                    fut.set_exception(exc)


_instance: ProgressThread | None = None
_instance_lock = threading.Lock()


def progress() -> ProgressThread:
    """The process's completion thread, started on first use."""
    global _instance
    with _instance_lock:
        if _instance is None:
            _instance = ProgressThread()
        return _instance
