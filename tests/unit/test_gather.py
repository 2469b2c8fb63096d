"""sendmsg's chunking (pure): order kept, small buffers joined, large ones not copied."""

from __future__ import annotations

import os

import pytest

from usdp._socket import _GATHER_JOIN, _GATHER_SMALL, _gather


@pytest.mark.parametrize("sizes", [[], [0], [1], [5, 7, 9], [_GATHER_SMALL] * 3,
                                   [1, _GATHER_SMALL * 2, 3, 4, _GATHER_SMALL - 1] * 5,
                                   [_GATHER_SMALL - 1] * 20])
def test_gather_keeps_bytes_and_order(sizes: list[int]) -> None:
    bufs = [os.urandom(n) for n in sizes]
    chunks = _gather(bufs)
    assert b"".join(bytes(c) for c in chunks) == b"".join(bufs)
    assert all(len(c) > 0 for c in chunks)
    for c in chunks:
        if len(c) < _GATHER_SMALL:
            continue
        # A chunk at least _GATHER_SMALL long is either one caller buffer (not copied) or
        # a join of small ones that stays within _GATHER_JOIN.
        assert any(c.obj is b for b in bufs) or len(c) <= _GATHER_JOIN


def test_gather_joins_small_neighbours_into_few_chunks() -> None:
    big = b"y" * 40000
    bufs = [bytearray(b"x" * 100) for _ in range(50)] + [memoryview(big)]
    chunks = _gather(bufs)
    assert len(chunks) == 2 and len(chunks[0]) == 5000 and chunks[1].obj is big
