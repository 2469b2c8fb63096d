"""Tools that develop and measure usdp, kept out of the ``usdp`` wheel.

* ``usdptools.testbed``: the rxe test bed (qemu VMs with soft-RoCE, native veth links,
  the two-host agent, the junit count check).
* ``usdptools.bench``: ``scripts/bench``, usdp side by side with TCP, rsockets and perftest.

They import from a source checkout (the repository root is on ``sys.path`` under the
editable install ``scripts/bootstrap`` makes); ``pip install usdp`` is the library alone.
"""
