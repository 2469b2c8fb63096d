"""Find the file descriptor behind a pyverbs object that does not expose it.

pyverbs 44 hides the fds of ``CompChannel`` and ``CMEventChannel`` (``.fd`` arrived in
rdma-core 57), and its blocking calls (``get_cq_event``, synchronous CM) keep the GIL. We
must therefore wait on the fd with ``select``/``epoll`` ourselves and only then make the
verbs call, which then returns at once. The fd shows up in ``/proc/self/fd`` the moment
the object is created: a completion channel as ``anon_inode:[infinibandevent]``, a CM
event channel as ``/dev/infiniband/rdma_cm``. We snapshot the matching fds before and
after creating the object, under a process-wide lock so two threads creating channels at
once cannot confuse each other's fds.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import TypeVar

COMP_CHANNEL = "anon_inode:[infinibandevent]"
CM_CHANNEL = "/dev/infiniband/rdma_cm"

_T = TypeVar("_T")
_CREATE_LOCK = threading.Lock()


def _fds_matching(target: str) -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == target:
                found.add(int(name))
        except OSError:  # closed between listdir and readlink: not ours
            continue
    return found


def create_with_fd(factory: Callable[[], _T], target: str) -> tuple[_T, int]:
    """Call ``factory()`` and return its result with the one new fd linking to ``target``."""
    with _CREATE_LOCK:
        before = _fds_matching(target)
        obj = factory()
        new = _fds_matching(target) - before
    if len(new) != 1:
        raise OSError(errno.EBADF, f"expected one new {target} fd, found {sorted(new)}")
    return obj, new.pop()
