"""Connections closed by their user but still delivering: what the kernel keeps for TCP.

``close()`` returns at once (see ``Endpoint.close``); the connection's queued bytes and
EOF then go out in the background, driven by the completion thread. A kernel socket
outlives its process for that; a usdp connection lives in the process, so at interpreter
exit we wait for the ones still delivering, each until it is done or its own background
time runs out (after which it is aborted anyway). Pure bookkeeping: no verbs here.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from typing import Protocol

log = logging.getLogger("usdp")


class Orphan(Protocol):
    """What this module needs of a closed connection: to be hashable."""

    def __hash__(self) -> int: ...


#: Beyond the last orphan's own deadline, how long exit waits (the completion thread
#: aborts an orphan at its deadline; this only bounds a wait that something went wrong in).
EXIT_SLACK = 5.0

_cond = threading.Condition()
_live: set[Orphan] = set()
_last_deadline = 0.0
_registered = False


def add(conn: Orphan, deadline: float) -> None:
    """``conn`` was closed by its user and delivers in the background until at most
    ``deadline`` (``time.monotonic()``)."""
    global _registered, _last_deadline
    with _cond:
        _live.add(conn)
        _last_deadline = max(_last_deadline, deadline)
        if not _registered:
            atexit.register(_at_exit)
            _registered = True


def _at_exit() -> None:
    wait_all(max(0.0, _last_deadline - time.monotonic()) + EXIT_SLACK)


def discard(conn: Orphan) -> None:
    """``conn`` is torn down (delivered, dead or aborted)."""
    with _cond:
        _live.discard(conn)
        _cond.notify_all()


def count() -> int:
    """How many closed connections are still delivering."""
    with _cond:
        return len(_live)


def wait_all(timeout: float | None = None) -> bool:
    """Wait until no closed connection is still delivering (at exit, so that a program's
    last ``sendall`` + ``close`` reaches the peer as it would over TCP). Each orphan ends
    by itself within its background time; ``timeout`` bounds the wait further.

    Returns:
        True if none is left.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    with _cond:
        if _live:
            log.debug("waiting for %d closed connection(s) to deliver", len(_live))
        while _live:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            _cond.wait(left if left is not None else 1.0)
        return True
