"""The benchmark suite (``scripts/bench``, ``python -m usdptools.bench``): usdp against TCP,
rsockets (Python under librspreload and C ``rstream``) and perftest, on one rxe link."""
