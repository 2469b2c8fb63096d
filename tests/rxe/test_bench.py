"""Smoke run of the benchmark suite (``scripts/bench``) with a tiny sweep, so that the
script cannot rot: one size, a fraction of a second per measurement, four contenders
(usdp, Python TCP across the veth pair, Python on rsockets through librspreload, whose
worker refuses to run unless it really holds an rsocket, and perftest's ib_write_bw).
Checks that the JSON, the Markdown and the PNG are written and carry a number for every
contender. Not a timed test: the numbers themselves are not judged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CONTENDERS = ["usdp-bcopy", "tcp", "rspreload", "ib_write_bw"]


def test_bench_smoke(rxe_dev: str, host_a: str, tmp_path: Path) -> None:
    if os.environ.get("USDP_HOSTS", "1") != "1":
        pytest.skip("the smoke run uses the one-host bed's veth namespace")
    out = tmp_path / "bench"
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl")}
    p = subprocess.run(
        [sys.executable, "-m", "usdptools.bench", "--hosts", "1", "--sizes", "4K",
         "--contenders", *CONTENDERS, "--seconds", "0.2", "--stream-bytes", "256K",
         "--lat-iters", "20", "--out", str(out)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "[bench   1/" in p.stderr  # the progress display
    doc = json.loads((out / "results.json").read_text())
    by = {(r["contender"], r["mode"]): r for r in doc["results"]}
    assert not [r for r in doc["results"] if r.get("error")]
    for c in CONTENDERS:
        assert by[(c, "stream")]["bytes_per_s"] > 0, c
    for c in ("usdp-bcopy", "tcp", "rspreload"):
        r = by[(c, "pingpong")]
        assert 0 < r["rtt_p50_us"] <= r["rtt_p99_us"], c
    assert by[("usdp-bcopy", "stream")]["client_stats"]["frames_out"] > 0
    assert by[("usdp-bcopy", "stream")]["server_stats"]["frames_in"] > 0
    assert "bw/ib_write_bw" in doc["ratios"][0] and "bw/tcp" in doc["ratios"][0]
    md = (out / "results.md").read_text()
    for label in ("usdp BCopy", "Python TCP", "ib_write_bw", "usdp ÷ ib_write_bw"):
        assert label in md, label
    assert "emulated" in md or os.environ.get("USDP_IN_VM") != "1"
    png = (out / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
