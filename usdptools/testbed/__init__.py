"""The project's rxe test bed: native rxe on a veth pair, or a qemu VM that brings one.

Nothing here is part of the transport; it exists so that every test runs on a real rxe
device through real pyverbs, on machines whose kernel has no RDMA at all.
"""
