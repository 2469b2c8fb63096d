"""The completion thread: usdp's "bottom half".

One daemon thread per process waits with ``epoll`` on every connection's completion
channels and CM event channel (``select``/``epoll`` release the GIL; pyverbs' own blocking
calls would not). When an fd is ready it calls that fd's handler, which takes the event
and then goes through the connection's ``ConnLock`` BH path: drain now if no user call
holds the connection, else only set the pending flag for the user's unlock to drain.

Why one thread for all connections: a thread per connection would cost a stack and a
context switch per event each, and under the GIL they could not run in parallel anyway.
One epoll loop scales to thousands of connections and keeps the event order per fd.

Connections are torn down *on this thread* (``call``): the thread may be between
``epoll`` returning an fd and the handler reading from it, and destroying a channel under
it would be a use-after-free in C.
"""

from __future__ import annotations

import contextlib
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
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name="usdp-bh", daemon=True)
        self._thread.start()

    @property
    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def register(self, fd: int, handler: Callable[[], None]) -> None:
        """Call ``handler()`` on this thread whenever ``fd`` is readable."""
        self._handlers[fd] = handler
        self._epoll.register(fd, select.EPOLLIN)

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

    def _run(self) -> None:
        next_tick = time.monotonic() + TICK
        while True:
            timeout = max(0.0, next_tick - time.monotonic()) if self._tickers else -1
            try:
                ready = self._epoll.poll(timeout)
            except InterruptedError:
                continue
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
