"""fork(): what survives it, and what must not be touched in the child.

RDMA resources do not survive fork. The child inherits the parent's verbs and CM file
descriptors, so destroying an inherited QP, CQ, MR, PD or CM id *in the child* would
destroy the parent's (the kernel objects belong to the shared open file, not to a
process); and the completion thread that serves every connection exists only in the
parent. So, in the child (``os.register_at_fork``):

* every RDMA object the parent had (devices, listeners, endpoints, the old completion
  thread's handlers) is pinned for the child's lifetime, never freed there;
* usdp starts afresh: a new completion thread on first use, a new device/PD registry,
  a budget with nothing reserved, new locks (one held by another parent thread at fork
  time would never be released in the child);
* an inherited socket raises ``InheritedSocket`` (EBADF) on every call, and ``close()``
  only marks it closed: the parent's connection goes on untouched.

Memory registered before fork: libibverbs' fork support (``ibv_fork_init``, what
``RDMAV_FORK_SAFE`` asks for) marks registered pages MADV_DONTFORK so the parent's pinned
pages are never copy-on-write shared with the child; on kernels that copy pinned pages at
fork (5.13 and later) rdma-core reports it unneeded and it costs nothing.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys
import threading
import weakref
from typing import Any

from usdp import _budget, _progress
from usdp._errors import UsdpError

log = logging.getLogger("usdp")

#: Bumped in every forked child; objects remember the value they were made under.
generation = 0
_live: weakref.WeakSet[Any] = weakref.WeakSet()  # listeners and endpoints of this process
_pinned: list[Any] = []  # inherited RDMA objects, never freed in this process


class InheritedSocket(UsdpError):
    """A usdp socket used in a process forked after it was opened."""


def inherited_error() -> InheritedSocket:
    return InheritedSocket(errno.EBADF, "usdp socket inherited across fork(): RDMA "
                           "resources do not survive fork; open a new connection in the child")


def track(obj: Any) -> None:
    """Remember a listener or endpoint, to pin it in a forked child."""
    _live.add(obj)


def _after_fork_in_child() -> None:
    global generation
    generation += 1
    keep: list[Any] = list(_live)
    keep.append(_progress._instance)  # its handlers reference every connection
    # _verbs (pyverbs) is loaded only once RDMA was used: nothing to reset before that.
    verbs = sys.modules.get("usdp._verbs")
    if verbs is not None:
        keep.extend(verbs.Device._registry.values())
    _pinned.append(keep)
    if len(_pinned) == 1:
        # An extra reference, so that not even interpreter finalization frees them.
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(_pinned))
    _live.clear()
    _progress._instance = None
    _progress._instance_lock = threading.Lock()
    if verbs is not None:
        verbs.Device._registry = {}
        verbs.Device._registry_lock = threading.Lock()
    _budget.BUDGET.reset()


def _fork_init() -> None:
    """Ask libibverbs for fork support before anything is registered."""
    # Not RDMAV_FORK_SAFE in os.environ: every child process would inherit it, and
    # librspreload (rsockets) then hands out kernel TCP sockets instead (measured: the
    # bench's rsockets contender broke).
    try:
        lib = ctypes.CDLL("libibverbs.so.1")
        rc = lib.ibv_fork_init()
    except (OSError, AttributeError) as exc:  # pragma: no cover - no libibverbs
        log.debug("ibv_fork_init unavailable: %s", exc)
        return
    if rc:
        # EINVAL: memory was registered before usdp was imported; fork stays safe on
        # kernels that copy pinned pages at fork (5.13+).
        log.debug("ibv_fork_init: %s", os.strerror(rc))


_fork_init()
os.register_at_fork(after_in_child=_after_fork_in_child)
