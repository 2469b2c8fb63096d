"""The benchmark's pure rules: round order, medians over rounds, CPU per MiB, the goals
of issue 10, and the report files built from them (synthetic measurements, no device)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pyroute2", reason="the bench's runner needs the test bed's pyroute2")

from usdptools.bench import report, summary
from usdptools.bench.runner import LABELS

MiB = 1 << 20


def test_rotation_puts_every_contender_in_every_position() -> None:
    items = ["a", "b", "c", "d"]
    orders = [summary.rotation(items, r) for r in range(len(items))]
    assert orders[0] == items
    assert orders[1] == ["b", "c", "d", "a"]
    for pos in range(len(items)):
        assert sorted(o[pos] for o in orders) == items
    for o in orders:
        assert sorted(o) == items
    assert summary.rotation(items, 5) == orders[1]
    assert summary.rotation([], 3) == []


def test_median_skips_unmeasured_values() -> None:
    assert summary.median([3.0, None, 1.0, 100.0]) == 3.0
    assert summary.median([4.0, 1.0]) == 2.5
    assert summary.median([None, None]) is None
    assert summary.median([]) is None


@pytest.mark.parametrize(("value", "op", "target", "want"), [
    (1.0, "<=", 1.0, "met"), (1.01, "<=", 1.0, "not met"), (0.5, "<=", 0.8, "met"),
    (0.9, ">=", 0.9, "met"), (0.89, ">=", 0.9, "not met"), (1.0, ">", 1.0, "not met"),
    (1.1, ">", 1.0, "met"), (None, ">=", 10.0, "not measured"),
])
def test_goal_evaluation(value: float | None, op: str, target: float, want: str) -> None:
    assert summary.evaluate(value, op, target) == want


def _py(c: str, mode: str, size: int, rnd: int, n: int, bw: float, rtt: float = 0.0,
        cpu: float = 0.1, events: int | None = None, frames: int = 1000) -> dict[str, Any]:
    """A Python worker's measurement as the runner records it."""
    r: dict[str, Any] = {"contender": c, "mode": mode, "size": size, "round": rnd, "n": n,
                         "seconds": 1.0, "bytes_per_s": bw,
                         "client_cpu": {"user": cpu, "sys": 0.0},
                         "server_cpu": {"user": cpu / 2, "sys": cpu / 2}}
    if mode == "pingpong":
        r.update(rtt_p50_us=rtt, rtt_p99_us=2 * rtt, rtt_mean_us=rtt)
    if events is not None:
        r["client_stats"] = {"channel_events": events, "frames_out": frames}
        r["server_stats"] = {"channel_events": events, "frames_out": frames}
    return r


def test_cpu_per_mib_counts_a_ping_pong_both_ways() -> None:
    s = summary.cpu_per_mib(_py("tcp", "stream", 1024, 0, MiB // 1024, 1.0, cpu=0.5))
    assert s["client_cpu_s_per_mib"] == pytest.approx(0.5)
    assert s["server_cpu_s_per_mib"] == pytest.approx(0.5)
    assert s["cpu_s_per_mib"] == pytest.approx(1.0)
    p = summary.cpu_per_mib(_py("tcp", "pingpong", 1024, 0, MiB // 1024, 1.0, 5.0, cpu=0.5))
    assert p["cpu_s_per_mib"] == pytest.approx(0.5)
    c_tool = {"contender": "rstream", "mode": "stream", "size": 64, "n": 10}
    assert summary.cpu_per_mib(c_tool) == {}


def test_events_per_1000_frames_needs_both_ends() -> None:
    r = _py("usdp-bcopy", "stream", 64, 0, 10, 1.0, events=5, frames=1000)
    assert summary.events_per_1000_frames(r) == pytest.approx(5.0)
    del r["server_stats"]
    assert summary.events_per_1000_frames(r) is None


def test_aggregate_takes_medians_and_keeps_the_rounds() -> None:
    raw = [_py("tcp", "stream", 64, 0, 100, 30.0, cpu=0.3),
           _py("tcp", "stream", 64, 1, 100, 10.0, cpu=0.1),
           _py("tcp", "stream", 64, 2, 100, 20.0, cpu=0.9),
           {"contender": "rstream", "mode": "stream", "size": 64, "round": 0, "error": "x"},
           {"contender": "rstream", "mode": "stream", "size": 64, "round": 1,
            "bytes_per_s": 7.0, "n": 8, "note": "one"},
           {"contender": "rstream", "mode": "stream", "size": 64, "round": 2, "error": "y"}]
    raw[1]["client_stats"] = {"tag": 1}
    raw[2]["client_stats"] = {"tag": 2}
    agg = {(r["contender"], r["size"]): r for r in summary.aggregate(raw)}
    t = agg[("tcp", 64)]
    assert t["bytes_per_s"] == 20.0
    assert t["per_round"]["bytes_per_s"] == [30.0, 10.0, 20.0]
    assert t["rounds"] == 3 and t["rounds_failed"] == 0
    assert t["client_stats"] == {"tag": 2}  # the round whose throughput is the median
    mib = 100 * 64 / MiB
    assert t["cpu_s_per_mib"] == pytest.approx(0.6 / mib)  # medians of each round's ratio
    r = agg[("rstream", 64)]
    assert r["bytes_per_s"] == 7.0 and r["rounds"] == 1 and r["rounds_failed"] == 2
    assert r["errors"] == ["x", "y"] and r["note"] == "one"
    assert "cpu_s_per_mib" not in r
    gone = summary.aggregate([{"contender": "tcp", "mode": "stream", "size": 64,
                               "error": "e1"}])
    assert gone == [{"contender": "tcp", "mode": "stream", "size": 64, "rounds": 0,
                     "rounds_failed": 1, "error": "e1"}]


def _run() -> list[dict[str, Any]]:
    """Two rounds of a small synthetic run at 64 B, 64 KiB and 1 MiB."""
    raw: list[dict[str, Any]] = []
    for rnd in range(2):
        for s in (64, 64 * 1024, MiB):
            raw += [_py("usdp-bcopy", "stream", s, rnd, 100, 2.0 * s, events=10),
                    _py("usdp-nodefer", "stream", s, rnd, 100, 2.0 * s, events=200),
                    _py("usdp-bcopy", "pingpong", s, rnd, 100, 1.0, rtt=100.0),
                    _py("tcp", "stream", s, rnd, 100, 1.0 * s),
                    _py("tcp", "pingpong", s, rnd, 100, 1.0, rtt=200.0),
                    {"contender": "ib_write_bw", "mode": "stream", "size": s, "round": rnd,
                     "bytes_per_s": 4.0 * s, "n": 8}]
    return raw


def test_goals_from_a_run() -> None:
    rows = {g["metric"]: g for g in summary.goals(summary.aggregate(_run()),
                                                  [64, 64 * 1024, MiB])}
    g = rows["64 B ping-pong p50, usdp ÷ Python TCP"]
    assert g["value"] == pytest.approx(0.5) and g["status"] == "met" and g["goal"] == "≤ 1"
    assert rows["64 B ping-pong p50, usdp ÷ Python+rspreload"]["status"] == "not measured"
    assert rows["64 B stream MiB/s, usdp ÷ Python TCP"]["status"] == "met"
    assert "stretch" in rows["64 B stream MiB/s, usdp ÷ rstream"]["goal"]
    for s in ("64 B", "64 KiB"):
        d = rows[f"{s} stream, channel events per 1000 frames, defer off ÷ on"]
        assert d["value"] == pytest.approx(20.0) and d["status"] == "met"
    w = rows["1 MiB stream, usdp ÷ ib_write_bw"]
    assert w["value"] == pytest.approx(0.5) and w["status"] == "not met"
    c = rows["1 MiB stream, CPU s/MiB, usdp ÷ Python TCP"]
    assert c["value"] == pytest.approx(1.0) and c["status"] == "met" and c["goal"] == "printed"
    assert rows["64 B stream, CPU s/MiB, usdp ÷ Python+rspreload"]["status"] == \
        "not measured"
    assert all(g["status"] in ("met", "not met", "not measured") for g in rows.values())


def test_report_files_carry_medians_cpu_and_goals(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = _run()
    contenders = ["usdp-bcopy", "usdp-nodefer", "tcp", "ib_write_bw"]
    meta = {"hosts": 1, "placement": "synthetic", "started": "now", "emulated": True,
            "sizes": [64, 64 * 1024, MiB], "contenders": contenders, "rounds": 2,
            "zcopy_threshold": 65536, "command": "test", "wall_seconds": 1.0}
    md = report.write(tmp_path, meta, runs, LABELS)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert len(doc["runs"]) == len(runs)
    assert len(doc["results"]) == len(runs) // 2
    assert all(r["rounds"] == 2 for r in doc["results"])
    assert doc["cpu_s_per_mib"][0]["tcp/stream"] > 0
    assert {g["status"] for g in doc["goals"]} <= {"met", "not met", "not measured"}
    assert (tmp_path / "results.md").read_text() == md
    assert "## Goals (issue 10), one host" in md
    assert "| 1 MiB stream, usdp ÷ ib_write_bw | 0.50 | ≥ 0.9 | not met |" in md
    assert "## CPU seconds per MiB moved" in md
    assert "median" in md
    assert (tmp_path / "plot.png").read_bytes().startswith(b"\x89PNG")


def test_report_lists_failed_rounds_and_teardown_errors(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    runs = _run()
    runs[0]["teardown_error"] = "ConnectionReset: peer disconnected"
    runs.append({"contender": "tcp", "mode": "stream", "size": 64, "round": 2,
                 "error": "client exited early"})
    meta = {"hosts": 2, "placement": "synthetic", "started": "now", "sizes": [64],
            "contenders": ["usdp-bcopy", "tcp"], "rounds": 3, "zcopy_threshold": 0,
            "command": "test", "wall_seconds": 1.0}
    md = report.write(tmp_path, meta, runs, LABELS)
    assert "## Goals (issue 10), 2 hosts" in md
    assert "usdp BCopy stream 64 B, round 1: ConnectionReset: peer disconnected" in md
    assert "Python TCP stream 64 B, round 3: client exited early" in md
    doc = json.loads((tmp_path / "results.json").read_text())
    tcp = next(r for r in doc["results"] if (r["contender"], r["mode"], r["size"])
               == ("tcp", "stream", 64))
    assert tcp["rounds"] == 2 and tcp["rounds_failed"] == 1


def test_rstream_rate_comes_from_its_bytes_and_time() -> None:
    from usdptools.bench import runner

    out = ("name      bytes   xfers   iters   total       time     Gb/sec    usec/xfer\n"
           "custom    64      20k     1       2.4m        8.00s      0.00     202.91\n")
    r = runner._parse_rstream(out, moved=2 * 20000 * 64)
    assert r["bytes_per_s"] == pytest.approx(2 * 20000 * 64 / 8.0)
    assert r["rtt_mean_us"] == pytest.approx(2 * 202.91)
