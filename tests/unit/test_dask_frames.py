"""The usdp:// dask message layout (``usdp.dask._frames``): prelude and gather writes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("distributed")

from usdp.dask._frames import (
    COUNT_SIZE,
    GATHER_MIN,
    MAX_FRAMES,
    FrameError,
    gather,
    pack_prelude,
    unpack_count,
    unpack_lengths,
)


@given(st.lists(st.integers(0, 1 << 40), max_size=50))
def test_prelude_round_trip(lengths: list[int]) -> None:
    p = pack_prelude(lengths)
    assert len(p) == COUNT_SIZE * (len(lengths) + 1)
    n = unpack_count(p[:COUNT_SIZE])
    assert n == len(lengths)
    assert unpack_lengths(p[COUNT_SIZE:], n) == lengths


def test_hostile_prelude_is_refused_before_allocating() -> None:
    with pytest.raises(FrameError, match="frames"):
        unpack_count((MAX_FRAMES + 1).to_bytes(8, "little"))
    with pytest.raises(FrameError, match="bytes"):
        unpack_lengths((1 << 62).to_bytes(8, "little"), 1)
    with pytest.raises(FrameError):
        pack_prelude([0] * (MAX_FRAMES + 1))


def test_gather_joins_small_frames_and_passes_large_ones_uncopied() -> None:
    big1 = memoryview(bytearray(b"a" * GATHER_MIN))
    big2 = memoryview(bytearray(b"b" * (3 * GATHER_MIN)))
    small = [memoryview(b"x" * 10), memoryview(b""), memoryview(b"y" * 20)]
    frames = [small[0], small[1], big1, small[2], big2]
    prelude = pack_prelude([len(f) for f in frames])
    pieces = gather(prelude, frames)
    assert pieces[0] == prelude + b"x" * 10
    assert pieces[1] is big1 and pieces[3] is big2  # the caller's memory, not copies
    assert pieces[2] == b"y" * 20
    assert b"".join(pieces) == prelude + b"".join(frames)


@given(st.lists(st.integers(0, 3 * GATHER_MIN), max_size=8))
def test_gather_preserves_the_stream(sizes: list[int]) -> None:
    frames = [memoryview(bytes([i % 251]) * n) for i, n in enumerate(sizes)]
    prelude = pack_prelude(sizes)
    assert b"".join(gather(prelude, frames)) == prelude + b"".join(frames)


def test_import_usdp_does_not_import_dask() -> None:
    code = "import sys, usdp; assert 'distributed' not in sys.modules and 'dask' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
