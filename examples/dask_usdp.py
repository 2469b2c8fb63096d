"""dask.distributed over RDMA: a scheduler, a worker and a client on ``usdp://``.

    python examples/dask_usdp.py 198.18.0.1          # one process, everything on one host

With usdp installed (``pip install usdp[dask]``) dask finds the ``usdp://`` backend by
itself; the CLIs work the same way::

    dask scheduler --protocol usdp --host 198.18.0.1 --port 8786
    dask worker usdp://198.18.0.1:8786 --host 198.18.0.1
    python -c 'from distributed import Client; print(Client("usdp://198.18.0.1:8786"))'
"""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np
from distributed import Client, Scheduler, Worker


async def main(host: str) -> None:
    async with Scheduler(protocol="usdp", host=host, dashboard_address=":0") as s, \
            Worker(s.address, protocol="usdp", host=host, nthreads=1), \
            Client(s.address, asynchronous=True) as client:
        print(f"scheduler at {s.address}")
        x = np.random.default_rng(0).random(8 * 1024 * 1024)  # 64 MiB
        t0 = time.perf_counter()
        [fx] = await client.scatter([x])           # to the worker, over RDMA
        y = await client.submit(lambda a: a + 1, fx)  # computed there, sent back
        dt = time.perf_counter() - t0
        assert np.array_equal(y, x + 1)
        print(f"64 MiB there and back, computed on the worker: {dt:.2f} s, result correct")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "198.18.0.1"))
