"""What would an MR cache save? Registration cost against a copy of the same bytes.

Run inside the test bed: ``scripts/rxe-vm -- .venv/bin/python experiments/mr_cost.py``.
Prints, per size, the time of one ``ibv_reg_mr`` + ``ibv_dereg_mr`` of a caller's buffer
(what usdp's zero-copy pays per transfer and side) next to one memcpy of it, and whether
the device can drop remote rights from a live MR (``ibv_rereg_mr`` with
``IBV_REREG_MR_CHANGE_ACCESS``), which a cache keeping registrations between transfers
would need to stay least-privilege. Ratios within one run are what count.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import pyverbs.enums as e
from pyverbs.pyverbs_error import PyverbsError

from usdp._verbs import Device, UserMR

SIZES = [64 << 10, 256 << 10, 1 << 20, 4 << 20]


def _per_call(fn: Callable[[], None], n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dev", default=os.environ.get("USDP_RXE_DEV", "rxe0"))
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    dev = Device(args.dev)
    print("| size | reg+dereg | memcpy | reg ÷ memcpy |")
    print("|---:|---:|---:|---:|")
    for size in SIZES:
        src = os.urandom(size)
        dst = memoryview(bytearray(size))

        def reg(src: bytes = src) -> None:
            UserMR(dev, memoryview(src), e.IBV_ACCESS_REMOTE_READ).close()

        def copy(src: bytes = src, dst: memoryview = dst) -> None:
            dst[:] = src

        r, c = _per_call(reg, args.n), _per_call(copy, args.n)
        print(f"| {size >> 10} KiB | {r * 1e6:.0f} us | {c * 1e6:.0f} us | {r / c:.2f} |")
    mr = UserMR(dev, memoryview(os.urandom(1 << 20)), e.IBV_ACCESS_REMOTE_READ)
    try:
        mr.mr.rereg(e.IBV_REREG_MR_CHANGE_ACCESS, None, 0, 0, e.IBV_ACCESS_LOCAL_WRITE)
        print("ibv_rereg_mr(CHANGE_ACCESS): supported")
    except PyverbsError as exc:
        print(f"ibv_rereg_mr(CHANGE_ACCESS): not supported ({exc})")
    finally:
        mr.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
