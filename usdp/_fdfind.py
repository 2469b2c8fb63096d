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

import ctypes
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


# Where the fd sits in the C struct behind the pyverbs object: pyverbs 44 keeps the C
# pointer at offset 40 of the Python object; ``struct rdma_event_channel`` starts with the
# fd, ``struct ibv_comp_channel`` has it after the context pointer.
_CPTR_OFFSET = 40
_FD_OFFSET = {CM_CHANNEL: 0, COMP_CHANNEL: 8}


def _fd_from_struct(obj: object, target: str) -> int | None:
    """Read the fd out of the C struct, and check it with one readlink."""
    try:
        ptr = ctypes.c_void_p.from_address(id(obj) + _CPTR_OFFSET).value
        if not ptr:
            return None
        fd = ctypes.c_int.from_address(ptr + _FD_OFFSET[target]).value
        return fd if os.readlink(f"/proc/self/fd/{fd}") == target else None
    except (OSError, ValueError):
        return None


def create_with_fd(factory: Callable[[], _T], target: str) -> tuple[_T, int]:
    """Call ``factory()`` and return its result with the one new fd linking to ``target``.

    Fast path: read the fd from the C struct and verify it (one system call). Scanning
    ``/proc/self/fd`` costs a readlink per open fd, which adds up with many connections.
    """
    obj = factory()
    fd = _fd_from_struct(obj, target)
    if fd is not None:
        return obj, fd
    del obj
    with _CREATE_LOCK:
        before = _fds_matching(target)
        obj = factory()
        new = _fds_matching(target) - before
    if len(new) != 1:
        raise OSError(errno.EBADF, f"expected one new {target} fd, found {sorted(new)}")
    return obj, new.pop()
