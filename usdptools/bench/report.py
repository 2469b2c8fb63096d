"""The benchmark's outputs: results.json, results.md (goals, tables and ratios), plot.png.

Every table is of medians over the run's rounds (``summary.aggregate``); results.json keeps
the per-round measurements too (``runs``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from usdptools.bench import summary

MiB = 1 << 20
USDP = "usdp-bcopy"
STREAM_VS = ["ib_write_bw", "ib_send_bw", "rstream", "rspreload", "tcp"]
LAT_VS = ["ib_send_lat", "rstream", "rspreload", "tcp"]


def _size(n: int) -> str:
    for unit, f in (("MiB", MiB), ("KiB", 1024)):
        if n >= f and n % f == 0:
            return f"{n // f} {unit}"
    return f"{n} B"


def _index(results: list[dict[str, Any]]) -> dict[tuple[str, str, int], dict[str, Any]]:
    return {(r["contender"], r["mode"], r["size"]): r for r in results if not r.get("error")}


def _rtt(r: dict[str, Any] | None) -> float | None:
    if r is None:
        return None
    v = r.get("rtt_p50_us") or r.get("rtt_mean_us")
    return float(v) if v else None


def zcopy_active(results: list[dict[str, Any]]) -> bool:
    """Whether any usdp ZCopy measurement really moved data zero-copy."""
    for r in results:
        if r["contender"] == "usdp-zcopy" and not r.get("error"):
            for side in ("client_stats", "server_stats"):
                if r.get(side, {}).get("zcopy_sends", 0) > 0:
                    return True
    return False


def deferral(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Completion-channel events per 1000 frames (both ends summed), defer on vs off: the
    median over rounds of each round's ratio; the counts are the median round's."""
    idx = _index(results)
    rows = []
    for (c, mode, size), r in sorted(idx.items(), key=lambda kv: kv[0][2]):
        if c != USDP or mode != "stream":
            continue
        off = idx.get(("usdp-nodefer", "stream", size))
        row: dict[str, Any] = {"size": size}
        for tag, rr in (("on", r), ("off", off)):
            if rr is None:
                continue
            cs, ss = rr.get("client_stats", {}), rr.get("server_stats", {})
            events = cs.get("channel_events", 0) + ss.get("channel_events", 0)
            frames = cs.get("frames_out", 0) + ss.get("frames_out", 0)
            row[f"events_{tag}"] = events
            row[f"frames_{tag}"] = frames
            row[f"per1000_{tag}"] = rr.get("events_per_1000_frames")
            row[f"deferred_{tag}"] = cs.get("drains_deferred", 0) + ss.get("drains_deferred", 0)
        if row.get("per1000_on") and row.get("per1000_off"):
            row["reduction"] = row["per1000_off"] / row["per1000_on"]
        rows.append(row)
    return rows


def ratios(results: list[dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    idx = _index(results)
    rows = []
    for s in sizes:
        row: dict[str, Any] = {"size": s}
        u = idx.get((USDP, "stream", s))
        for other in STREAM_VS:
            o = idx.get((other, "stream", s))
            if u and o and o.get("bytes_per_s"):
                row[f"bw/{other}"] = u["bytes_per_s"] / o["bytes_per_s"]
        ul = _rtt(idx.get((USDP, "pingpong", s)))
        for other in LAT_VS:
            ol = _rtt(idx.get((other, "pingpong", s)))
            if ul and ol:
                row[f"rtt/{other}"] = ul / ol
        rows.append(row)
    return rows


def cpu(results: list[dict[str, Any]], sizes: list[int],
        contenders: list[str]) -> list[dict[str, Any]]:
    """CPU seconds (user + sys, client + server) per MiB moved, medians, per size: keys
    ``<contender>/<mode>`` where measured."""
    idx = _index(results)
    rows = []
    for s in sizes:
        row: dict[str, Any] = {"size": s}
        for c in contenders:
            for mode in ("stream", "pingpong"):
                r = idx.get((c, mode, s))
                if r is not None and r.get("cpu_s_per_mib") is not None:
                    row[f"{c}/{mode}"] = r["cpu_s_per_mib"]
        rows.append(row)
    return rows


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def goals_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    """The "Goals (issue 10)" table: one row per goal, measured value, goal, met or not."""
    hosts = "one host" if meta["hosts"] == 1 else f"{meta['hosts']} hosts"
    out = [f"## Goals (issue 10), {hosts}", "",
           f"Medians over {meta.get('rounds', 1)} round(s); usdp = usdp BCopy; "
           "ratios are usdp ÷ other unless said.", "",
           "| metric | measured | goal | status |", "|---|---:|---|---|"]
    for g in rows:
        val = _f(g["value"])
        if g.get("note"):
            val += f" ({g['note']})"
        out.append(f"| {g['metric']} | {val} | {g['goal']} | {g['status']} |")
    return out


def markdown(meta: dict[str, Any], results: list[dict[str, Any]],
             labels: dict[str, str], runs: list[dict[str, Any]] | None = None) -> str:
    """results.md from the medians (``results``) and the per-round measurements."""
    runs = results if runs is None else runs
    idx = _index(results)
    sizes: list[int] = meta["sizes"]
    zc = zcopy_active(results)
    lab = dict(labels)
    if not zc:
        lab["usdp-zcopy"] = "usdp ZCopy (inactive)"
    cs = list(meta["contenders"])
    out = [f"# usdp benchmark, {meta['hosts']} host(s), {meta['started']}", ""]
    out.append(f"Placement: {meta['placement']}.")
    out.append("")
    n = meta.get("rounds", 1)
    out.append(f"{n} interleaved round(s), the contenders' order rotating per round; every "
               "number below is the median over the rounds that succeeded.")
    out.append("")
    if meta.get("emulated"):
        out.append("**The test bed is an emulated VM (qemu TCG): absolute numbers mean "
                   "nothing; compare ratios within this run.**")
        out.append("")
    if "usdp-zcopy" in cs:
        out.append(f"usdp ZCopy = `Options(zcopy_threshold={meta['zcopy_threshold']})`; "
                   + ("zero-copy sends were counted (`zcopy_sends` > 0)." if zc else
                      "**zero-copy was not active** in this build (no `zcopy_sends` "
                      "counter > 0): it measured the BCopy path again."))
        out.append("")
    out += goals_markdown(meta, summary.goals(results, sizes))
    out.append("")
    stream_cs = [c for c in cs if (c, "stream") in {(k[0], k[1]) for k in idx}]
    out.append("## Streaming throughput, MiB/s (one direction)")
    out.append("")
    out.append("| size | " + " | ".join(lab[c] for c in stream_cs) + " |")
    out.append("|---:|" + "---:|" * len(stream_cs))
    for s in sizes:
        cells = []
        for c in stream_cs:
            r = idx.get((c, "stream", s))
            cells.append(_f(r["bytes_per_s"] / MiB if r else None))
        out.append(f"| {_size(s)} | " + " | ".join(cells) + " |")
    lat_cs = [c for c in cs if (c, "pingpong") in {(k[0], k[1]) for k in idx}]
    if lat_cs:
        out += ["", "## Ping-pong round trip, µs: p50 / p99 (rstream: mean only)", ""]
        out.append("| size | " + " | ".join(lab[c] for c in lat_cs) + " |")
        out.append("|---:|" + "---:|" * len(lat_cs))
        for s in sizes:
            cells = []
            for c in lat_cs:
                r = idx.get((c, "pingpong", s))
                if r is None:
                    cells.append("-")
                elif r.get("rtt_p50_us"):
                    cells.append(f"{r['rtt_p50_us']:.0f} / {r['rtt_p99_us']:.0f}")
                else:
                    cells.append(f"{r['rtt_mean_us']:.0f} (mean)")
            out.append(f"| {_size(s)} | " + " | ".join(cells) + " |")
    rr = ratios(results, sizes)
    bw_keys = [k for k in (f"bw/{o}" for o in STREAM_VS) if any(k in r for r in rr)]
    lat_keys = [k for k in (f"rtt/{o}" for o in LAT_VS) if any(k in r for r in rr)]
    if bw_keys or lat_keys:
        out += ["", "## Ratios (usdp = usdp BCopy)", "",
                "Throughput: usdp ÷ other (> 1: usdp faster). Round trip p50: usdp ÷ other "
                "(< 1: usdp faster; rstream's is its mean).", ""]
        heads = [f"MiB/s usdp ÷ {lab[k[3:]]}" for k in bw_keys] + \
            [f"RTT usdp ÷ {lab[k[4:]]}" for k in lat_keys]
        out.append("| size | " + " | ".join(heads) + " |")
        out.append("|---:|" + "---:|" * len(heads))
        for r in rr:
            out.append(f"| {_size(r['size'])} | "
                       + " | ".join(_f(r.get(k)) for k in bw_keys + lat_keys) + " |")
    dd = deferral(results)
    if any("per1000_off" in d for d in dd):
        out += ["", "## Lock deferral: completion-channel events per 1000 frames",
                "", "Saturating usdp stream; `stats()['channel_events']` of both ends ÷ "
                "frames sent by both ends (data and credit updates).", "",
                "| size | defer on | defer off | off ÷ on | deferred drains (on) |",
                "|---:|---:|---:|---:|---:|"]
        for d in dd:
            out.append(f"| {_size(d['size'])} | {_f(d.get('per1000_on'), '{:.1f}')} | "
                       f"{_f(d.get('per1000_off'), '{:.1f}')} | {_f(d.get('reduction'))} | "
                       f"{d.get('deferred_on', '-')} |")
    cc = cpu(results, sizes, cs)
    ckeys = [f"{c}/{m}" for c in cs for m in ("stream", "pingpong")
             if any(f"{c}/{m}" in r for r in cc)]
    if ckeys:
        out += ["", "## CPU seconds per MiB moved (user + sys, client + server)", "",
                "Each side's `getrusage(RUSAGE_SELF)` over its timed part (all threads); "
                "a ping-pong moves its bytes both ways.", ""]
        out.append("| size | " + " | ".join(
            f"{lab[k.split('/')[0]]} {'stream' if k.endswith('stream') else 'ping-pong'}"
            for k in ckeys) + " |")
        out.append("|---:|" + "---:|" * len(ckeys))
        for r in cc:
            out.append(f"| {_size(r['size'])} | "
                       + " | ".join(_f(r.get(k), "{:.3g}") for k in ckeys) + " |")
    torn = [r for r in runs if r.get("teardown_error")]
    if torn:
        out += ["", "## Warnings: errors after a measurement (kept: the server had confirmed "
                "every byte)", ""]
        for r in torn:
            out.append(f"- {lab[r['contender']]} {r['mode']} {_size(r['size'])}, round "
                       f"{r.get('round', 0) + 1}: {r['teardown_error'][:200]}")
    failed = [r for r in runs if r.get("error")]
    if failed:
        out += ["", "## Failed measurements", ""]
        for r in failed:
            first = r["error"].replace("\n", " ")[:200]
            out.append(f"- {lab[r['contender']]} {r['mode']} {_size(r['size'])}, round "
                       f"{r.get('round', 0) + 1}: {first}")
    out += ["", f"Command: `{meta['command']}`; {meta['wall_seconds']:.0f} s."]
    return "\n".join(out) + "\n"


def plot(path: Path, meta: dict[str, Any], results: list[dict[str, Any]],
         labels: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = _index(results)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 5))
    for c in meta["contenders"]:
        pts = sorted((s, r["bytes_per_s"] / MiB) for (cc, m, s), r in idx.items()
                     if cc == c and m == "stream" and r.get("bytes_per_s"))
        if pts:
            ax1.plot(*zip(*pts, strict=True), marker="o", label=labels[c])
        lat = sorted((s, v) for (cc, m, s), r in idx.items()
                     if cc == c and m == "pingpong" and (v := _rtt(r)))
        if lat:
            ax2.plot(*zip(*lat, strict=True), marker="o", label=labels[c])
        cpu_pts = sorted((s, r["cpu_s_per_mib"]) for (cc, m, s), r in idx.items()
                         if cc == c and m == "stream" and r.get("cpu_s_per_mib"))
        if cpu_pts:
            ax3.plot(*zip(*cpu_pts, strict=True), marker="o", label=labels[c])
    for ax, title, unit in ((ax1, "streaming throughput", "MiB/s"),
                            (ax2, "ping-pong round trip p50", "µs"),
                            (ax3, "stream CPU per MiB (client + server)", "CPU s/MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size, bytes")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    emu = " — emulated VM: compare ratios, not absolute values" if meta.get("emulated") else ""
    fig.suptitle(f"usdp benchmark, {meta['hosts']} host(s), medians of "
                 f"{meta.get('rounds', 1)} round(s){emu}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out: Path, meta: dict[str, Any], runs: list[dict[str, Any]],
          labels: dict[str, str]) -> str:
    """Write results.json, results.md and plot.png into ``out``; return the Markdown.
    ``runs``: every measurement of every round; the outputs report their medians
    (results.json: ``results`` the medians, ``runs`` the rounds)."""
    out.mkdir(parents=True, exist_ok=True)
    results = summary.aggregate(runs)
    sizes = meta["sizes"]
    doc = {"meta": meta, "zcopy_active": zcopy_active(results), "results": results,
           "runs": runs, "ratios": ratios(results, sizes), "deferral": deferral(results),
           "cpu_s_per_mib": cpu(results, sizes, meta["contenders"]),
           "goals": summary.goals(results, sizes)}
    (out / "results.json").write_text(json.dumps(doc, indent=1))
    md = markdown(meta, results, labels, runs)
    (out / "results.md").write_text(md)
    plot(out / "plot.png", meta, results, labels)
    return md
