"""A per-process budget of registered (pinned) memory, so that peers cannot make us pin
without bound.

A connection's rings are registered before any data flows, and on the passive side before
the peer has proven anything: without a bound, a burst of Hellos would pin memory until
``ibv_reg_mr`` fails (RLIMIT_MEMLOCK) or the machine swaps. Every connection reserves its
rings' first segment here first, and every later growth of a ring its new segment (a
refused growth leaves the ring as it is); a reservation beyond the budget is refused,
which the listener turns into ``Reject(NO_RESOURCES)`` (the client sees ECONNREFUSED) and
``connect`` into ENOBUFS. Sans-I/O: only counts bytes.
"""

from __future__ import annotations

import errno
import os
import resource
import threading

from usdp._errors import UsdpError

#: The default budget when RLIMIT_MEMLOCK does not bound us more tightly.
DEFAULT_BUDGET = 1 << 30


def default_budget(memlock: int | None = None, privileged: bool | None = None) -> int:
    """1 GiB, or 3/4 of a finite RLIMIT_MEMLOCK when the process is not root (root's
    registrations ignore that limit). ``Options.mr_budget`` (``USDP_MR_BUDGET``, read by
    ``Options.from_env``) overrides it."""
    if memlock is None:
        memlock = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    if privileged is None:
        privileged = os.geteuid() == 0
    if privileged or memlock == resource.RLIM_INFINITY or memlock < 0:
        return DEFAULT_BUDGET
    return min(DEFAULT_BUDGET, memlock * 3 // 4)


class Budget:
    """Bytes reserved against a limit; ``reserve`` fails instead of going over."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    def reserve(self, nbytes: int, limit: int, what: str) -> None:
        """Take ``nbytes`` from the budget ``limit`` (bytes, > 0).

        Raises:
            UsdpError: ENOBUFS if the process would then hold more than ``limit``.
        """
        if nbytes < 0:
            raise ValueError(f"reserve({nbytes})")
        with self._lock:
            if self._used + nbytes > limit:
                raise UsdpError(errno.ENOBUFS, f"{what}: {nbytes} B of registered memory "
                                f"would exceed the budget ({self._used} of {limit} B used; "
                                f"Options.mr_budget / USDP_MR_BUDGET)")
            self._used += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self._used = max(0, self._used - nbytes)

    def reset(self) -> None:
        """After fork: the child holds none of the parent's registrations."""
        self._lock = threading.Lock()
        self._used = 0


#: The process's registered memory (connection rings).
BUDGET = Budget()
