"""``usdp://`` for dask.distributed: scheduler, workers and clients talk over RDMA.

Installed with ``pip install usdp[dask]``; dask finds the backend through the
``distributed.comm.backends`` entry point, so nothing needs importing by hand::

    from distributed import Client, Scheduler, Worker
    async with Scheduler(protocol="usdp", host="198.18.0.1") as s, \\
            Worker(s.address, host="198.18.0.1"), Client(s.address, asynchronous=True) as c:
        ...

This package imports distributed; ``import usdp`` never imports it.
"""

from __future__ import annotations

from usdp.dask._backend import PREFIX, USDPBackend, USDPConnector, USDPListener
from usdp.dask._comm import USDPComm

__all__ = ["PREFIX", "USDPBackend", "USDPComm", "USDPConnector", "USDPListener"]
