#!/usr/bin/env python3
"""Draw the results of the load tool, tools/loadbench (`cargo run --release -p loadbench`; its
LOAD_JSON file), as one SVG of small multiples, next to the issue-6 targets and the reference
proxies the issue measured:

    python3 benches/chart.py target/load-results.json > docs/benchmarks.svg
    python3 benches/chart.py run1.json run2.json run3.json > docs/benchmarks.svg   # medians

Standard library only. The SVG is self-contained (no script, no external fonts) and has its own
white background, so it reads the same on light and dark pages.
"""

import json
import math
import statistics
import sys
from html import escape

# === Reference figures: all from issue #6, nowhere else ===
# The issue measured these on the same kind of machine; they are not re-measured by the bench.

PEERS = ["Traffic Server 9.2", "Squid 5.7", "http-tunnel", "tinyproxy"]

# Proxy CPU per request (a, b) or per new tunnel (c), µs, in PEERS order; None: not measured.
PEER_CPU_US = {"a": [36, 82, None, 544], "b": [22, 21, 18, 35], "c": [157, 258, 161, 453]}

# Throughput: req/s (a, b), tunnels/s (c), GB/s (d, d3). First the issue's no-proxy baseline,
# then PEERS; the issue has no http-tunnel figure for a or d3.
ISSUE_THROUGHPUT = {
    "a": [55.5e3, 27.4e3, 12.0e3, None, 1.3e3],
    "b": [53.0e3, 45.3e3, 45.2e3, 50.0e3, 27.3e3],
    "c": [7.7e3, 6.0e3, 3.8e3, 6.1e3, 1.4e3],
    "d-down": [3.81, 1.32, 1.66, 1.66, 0.47],
    "d-up": [3.82, 1.54, 1.65, 1.62, 0.44],
    "d3": [2.65, 1.31, 0.27, None, 0.42],
}

# Memory per idle tunnel (scenario e), KiB, in PEERS order.
PEER_IDLE_KIB = [35, 31, 40, 19]

# The issue-6 targets for chokepoint.
TARGET_CPU_US = {"a": 15, "b": 12, "c": 60}  # at most
TARGET_RATIO = {"a": 0.6, "b": 0.95, "c": 0.9, "d-down": 0.8, "d-up": 0.8, "d3": 0.6}  # at least
TARGET_IDLE_KIB = 10  # at most

# === Drawing ===

LABELS = {
    "a": "a: plain HTTP, keep-alive",
    "b": "b: GETs in tunnels",
    "c": "c: new tunnel + 1 GET",
    "d-down": "d: tunnel, 1 GiB down",
    "d-up": "d: tunnel, 1 GiB up",
    "d3": "d3: plain HTTP, 1 GiB down",
    "e": "e: idle tunnels",
}
WIDTH = 820
X0 = 190  # left edge of the plot area; labels are left of it
PLOT_W = 520  # the rest is room for the value printed after a bar
ROW = 17  # height of one bar's row
OURS, PEER, TARGET = "#2563eb", "#a3a3a3", "#dc2626"  # bar colours and the target line
FLOOR = "#86efac"  # client + origin without a proxy: the kernel work a proxy repeats
MEASURED = "#f59e0b"  # a peer the bench itself ran (rows `a@squid`, …): same run, same load
MEASURED_NAMES = {"squid": "Squid, this run", "trafficserver": "Traffic Server, this run"}
INK, FAINT, GRID = "#1f2937", "#6b7280", "#e5e7eb"  # text, secondary text, grid lines
FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'


def text(x, y, s, size=12, fill=INK, anchor="start", weight="normal"):
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" fill="{fill}" '
            f'text-anchor="{anchor}" font-weight="{weight}">{escape(s)}</text>')


def linear(top, step):
    """The x of a value on a scale from 0 to top, and grid lines every step."""
    ticks = [step * i for i in range(int(top / step) + 1)]
    return (lambda v: X0 + PLOT_W * min(max(v, 0), top) / top), ticks


def logarithmic(lo, hi):
    """The x of a value on a log scale from lo to hi (clipped to them), and a grid line per decade."""
    lo, hi = math.log10(lo), math.log10(hi)
    ticks = [10.0**k for k in range(round(lo), round(hi) + 1)]

    def x(v):
        return X0 + PLOT_W * (min(max(math.log10(v) if v > 0 else lo, lo), hi) - lo) / (hi - lo)

    return x, ticks


def panel(out, y, title, groups, scale, fmt, tick_fmt):
    """Draw one metric at height y: groups are (label, target text, target, bars), bars are
    (name, value or None, ours). Returns the height below the panel."""
    x, ticks = scale
    out.append(text(16, y + 14, title, size=14, weight="bold"))
    top = y + 24
    rows = sum(1 + len(bars) for _, _, _, bars in groups)
    bottom = top + rows * ROW + 4
    for t in ticks:
        out.append(f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{bottom}" '
                   f'stroke="{GRID}"/>')
        out.append(text(x(t), bottom + 13, tick_fmt(t), size=10, fill=FAINT, anchor="middle"))
    y = top
    for label, target_text, target, bars in groups:
        out.append(text(16, y + 13, label, weight="bold"))
        group_top, y = y, y + ROW
        for name, value, kind in bars:
            ours = kind is True
            colour = {"floor": FLOOR, "measured": MEASURED}.get(kind, OURS if ours else PEER)
            out.append(text(X0 - 8, y + 12, name, size=11, anchor="end",
                            fill=INK if ours else FAINT, weight="bold" if ours else "normal"))
            if value is None:
                missing = "not in this run" if ours else "n/a"
                out.append(text(X0 + 4, y + 12, missing, size=10, fill=FAINT))
            else:
                end = x(value)
                out.append(f'<rect x="{X0}" y="{y + 3}" width="{max(end - X0, 1):.1f}" '
                           f'height="{ROW - 5}" fill="{colour}"/>')
                out.append(text(end + 4, y + 12, fmt(value), size=10,
                                fill=INK if ours else FAINT))
            y += ROW
        tx = x(target)
        out.append(f'<line x1="{tx:.1f}" y1="{group_top + ROW}" x2="{tx:.1f}" y2="{y}" '
                   f'stroke="{TARGET}" stroke-width="2" stroke-dasharray="4 3"/>')
        out.append(text(tx + 4, group_top + 13, target_text, size=10, fill=TARGET))
    return bottom + 30


def per_op(row, key="proxy_per_op"):
    value = (row or {}).get(key) or {}
    return value.get("value")


def bars(ours, peers, measured=()):
    """chokepoint's bar, the peers this run measured, then the issue's reference peers."""
    return ([("chokepoint", ours, True)] + [(n, v, "measured") for n, v in measured]
            + [(n, v, False) for n, v in zip(PEERS, peers)])


def measured_peers(rows, sid, pick):
    """(name, value) of every peer the bench ran for scenario sid, e.g. row `a@squid`."""
    found = []
    for rid, row in rows.items():
        base, _, peer = rid.partition("@")
        if base == sid and peer and not row.get("error"):
            found.append((MEASURED_NAMES.get(peer, f"{peer}, this run"), pick(row)))
    return found


def render(results):
    rows = {r["id"]: r for r in results.get("rows", [])}

    def label(sid):
        return rows[sid]["label"] if sid in rows else LABELS[sid]

    # Each CPU group ends with what client and origin together spent per exchange without a
    # proxy in this run: a proxy is both a server and a client, so it repeats that kernel work.
    cpu = [(label(s), f"target ≤ {TARGET_CPU_US[s]} µs", TARGET_CPU_US[s],
            bars(per_op(rows.get(s)), PEER_CPU_US[s], measured_peers(rows, s, per_op))
            + [("both ends, no proxy", per_op(rows.get(f"{s}-noproxy"), "load_per_op"), "floor")])
           for s in ("a", "b", "c")]
    ratio = []
    for s, (base, *peers) in ISSUE_THROUGHPUT.items():
        ours = (rows.get(s) or {}).get("ratio")
        ratio.append((label(s), f"target ≥ {TARGET_RATIO[s]}×", TARGET_RATIO[s],
                      bars(ours, [None if p is None else p / base for p in peers],
                           measured_peers(rows, s, lambda r: r.get("ratio")))))
    idle = [(label("e"), f"target ≤ {TARGET_IDLE_KIB} KiB", TARGET_IDLE_KIB,
             bars(per_op(rows.get("e")), PEER_IDLE_KIB, measured_peers(rows, "e", per_op)))]
    top_cpu = max([1000.0] + [v for *_, b in cpu for _, v, _ in b if v is not None])
    top_ratio = max([1.0] + [v for *_, b in ratio for _, v, _ in b if v is not None])
    top_idle = max([40.0] + [v for *_, b in idle for _, v, _ in b if v is not None])

    out = []
    stamp = results.get("timestamp")
    when = stamp[:16].replace("T", " ") + " UTC" if stamp else "date unknown"
    commit = "commit " + (results.get("commit") or "unknown")
    if results.get("dirty"):
        commit += " + uncommitted changes"
    out.append(text(16, 26, "chokepoint load benchmark (issue #6)", size=18, weight="bold"))
    secs = results.get("load_secs")
    runs = results.get("runs", 1)
    settings = (f"{when} · {commit} · {'?' if secs is None else f'{secs:g}'} s per window · "
                + (f"median of {runs} runs · " if runs > 1 else "")
                + f"nproc {results.get('nproc', '?')}"
                + (", proxy and load pinned to separate cores" if results.get("pinned") else ""))
    out.append(text(16, 46, settings, size=11, fill=FAINT))
    legend = [(OURS, "chokepoint"), (MEASURED, "peer, same run"),
              (PEER, "reference proxies (issue #6)"), (FLOOR, "client + origin, no proxy")]
    x = 16
    for colour, name in legend:
        out.append(f'<rect x="{x}" y="58" width="12" height="12" fill="{colour}"/>')
        out.append(text(x + 18, 68, name, size=11))
        x += 30 + 6.5 * len(name)
    out.append(f'<line x1="{x}" y1="64" x2="{x + 20}" y2="64" stroke="{TARGET}" '
               f'stroke-width="2" stroke-dasharray="4 3"/>')
    out.append(text(x + 26, 68, "issue-6 target", size=11))

    y = panel(out, 86, "Proxy CPU per request (a, b) or per new tunnel (c), µs: lower is better; "
              "log scale", cpu, logarithmic(1, 10 ** math.ceil(math.log10(top_cpu))),
              lambda v: f"{v:.1f} µs" if v < 100 else f"{v:.0f} µs", lambda t: f"{t:g}")
    y = panel(out, y, "Throughput as a fraction of the same load without a proxy: higher is "
              "better; linear", ratio, linear(top_ratio * 1.05, 0.2), lambda v: f"{v:.2f}×",
              lambda t: f"{t:.1f}×")
    y = panel(out, y, "Memory per idle tunnel, KiB: lower is better; linear", idle,
              linear(top_idle * 1.05, 10), lambda v: f"{v:.1f} KiB", lambda t: f"{t:.0f}")

    notes = [
        "Reference proxies: the issue's own measurements on the same kind of machine, not this "
        "run. Their ratios divide",
        "by the issue's no-proxy baseline; chokepoint's by the no-proxy run of this bench.",
        "Both ends, no proxy: CPU of this run's load client and origin together per exchange "
        "without a proxy. A proxy is",
        "the server of one connection and the client of another, so it repeats that kernel work.",
    ]
    if any("@" in r["id"] for r in results.get("rows", [])):
        notes.append("Peers marked \"this run\" were started by the bench itself and given the same "
                     "load, pinned to the same core.")
    busy = [r["id"] for r in results.get("rows", []) if r.get("busy_note")]
    if busy:
        line = "Other processes (or the kernel's softirq threads) were busy during:"
        for rid in busy:
            if len(line) > 100:
                notes.append(line)
                line = "  "
            line += f" {rid},"
        notes.append(line.rstrip(",") + " (see the notes of the runs).")
    for note in notes:
        out.append(text(16, y, note, size=11, fill=FAINT))
        y += 15
    height = y + 6
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" {FONT}>\n'
            f'<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>')
    return "\n".join([head] + out + ["</svg>", ""])


def median_of(runs):
    """One results object from several runs of the same commit: every figure of a row is the
    median over the runs that have that row; settings and notes come from the first run."""
    merged = dict(runs[0])
    merged["runs"] = len(runs)
    rows = []
    for row in runs[0].get("rows", []):
        same = [r for run in runs for r in run.get("rows", []) if r["id"] == row["id"]]
        out = dict(row)
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out[key] = statistics.median(r[key] for r in same if r.get(key) is not None)
            elif isinstance(value, dict) and "value" in value:
                values = [r[key]["value"] for r in same if r.get(key)]
                out[key] = dict(value, value=statistics.median(values))
        out["busy_note"] = "; ".join(r["busy_note"] for r in same if r.get("busy_note")) or None
        rows.append(out)
    merged["rows"] = rows
    return merged


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: python3 benches/chart.py RESULTS.json [MORE.json ...] > docs/benchmarks.svg")
    runs = []
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as f:
            runs.append(json.load(f))
    sys.stdout.write(render(runs[0] if len(runs) == 1 else median_of(runs)))


if __name__ == "__main__":
    main()
