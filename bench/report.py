#!/usr/bin/env python3
"""Turns bench/results/runs.jsonl (one sc-bench JSON document per line) into summary.md (the
table, medians with the min-max spread over repeats, and ratios against socketcluster-server 20)
and PNG plots. Usage: report.py RUNS.jsonl OUT_DIR"""
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = [
    "sc-rs-1w1b", "sc-rs-1w1b-t1", "sc-rs-1w1b-proxy", "sc-rs", "uws", "sc20", "sc14",
    "sc-rs-1w1b-tls", "sc20-tls",
]
NAMES = {
    "sc-rs-1w1b": "sc-rs (1 worker, 1 broker)",
    "sc-rs-1w1b-t1": "sc-rs 1w+1b, [worker] threads = 1",
    "sc-rs-1w1b-proxy": "sc-rs 1w+1b, [balancer] handoff = false",
    "sc-rs": "sc-rs (2 workers, 1 broker)",
    "uws": "uWebSockets.js (uws-sc-lite)",
    "sc20": "socketcluster-server 20",
    "sc14": "socketcluster 14 (1w+1b)",
    "sc-rs-1w1b-tls": "sc-rs wss (TLS on the balancer, 1w+1b)",
    "sc20-tls": "socketcluster-server 20 wss (Node https)",
}
COLORS = {
    "sc-rs-1w1b": "#d62728",
    "sc-rs-1w1b-t1": "#e377c2",
    "sc-rs-1w1b-proxy": "#7f7f7f",
    "sc-rs": "#ff7f0e",
    "uws": "#9467bd",
    "sc20": "#1f77b4",
    "sc14": "#2ca02c",
    "sc-rs-1w1b-tls": "#8c564b",
    "sc20-tls": "#17becf",
}
# Same-run ratios drawn when both servers ran: (ours, theirs).
RATIOS = [
    ("sc-rs-1w1b", "uws"),
    ("sc-rs-1w1b-t1", "uws"),
    ("sc-rs-1w1b", "sc-rs-1w1b-proxy"),
    ("sc-rs-1w1b", "sc20"),
    ("sc-rs", "sc20"),
    ("sc-rs-1w1b-tls", "sc20-tls"),
]


def load(path):
    runs = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            runs.append(json.loads(line))
    return runs


def kind(run):
    """Which table row a run belongs to."""
    s, p = run["scenario"], run["params"]
    if s == "fanout":
        if p["rate"] == 0:
            return "fanout-burst"
        # The paced scenario (1000 x 20/s, 32-byte payloads) apart from the 64-byte sweep.
        if p["rate"] == 20 and p["payload"] == 32 and p["subscribers"] == 1000:
            return "paced"
        return f"fanout-rate-{p['rate']:g}"
    return s


def program_us(program):
    """A program's CPU per delivery (us), None for servers without that program."""

    def get(run):
        res = run["result"]
        cpu = res.get("server_cpu_by_program", {}).get(program)
        if cpu is None or not res["delivered"]:
            return None
        return cpu * 1e6 / res["delivered"]

    return get


def program_kb(program):
    """A program's idle RSS per connection (KB), None for servers without that program."""
    return lambda run: run["result"].get("rss_kb_per_connection_by_program", {}).get(program)


balancer_us = program_us("sc-balancer")


def spread(values, fmt):
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}-{fmt(max(values))})"


def main():
    runs_path, out = sys.argv[1], Path(sys.argv[2])
    runs = load(runs_path)
    by = defaultdict(lambda: defaultdict(list))
    for r in runs:
        by[kind(r)][r["label"]].append(r)
    servers = [s for s in ORDER if any(s in v for v in by.values())]

    metrics = [
        ("paced", "paced 1000 subs x 20/s, 32 B: server CPU us/delivery (whole tree)", lambda r: r["result"]["server_cpu_us_per_delivery"], "f2", False),
        ("paced", "  of which sc-balancer", balancer_us, "f2", False),
        ("paced", "  of which sc-worker", program_us("sc-worker"), "f2", False),
        ("paced", "paced p50 latency ms (every delivery, all subscribers)", lambda r: r["result"]["latency"]["p50_ms"], "f2", False),
        ("paced", "paced p99 latency ms (every delivery, all subscribers)", lambda r: r["result"]["latency"]["p99_ms"], "f2", False),
        ("paced", "paced lost + errors", lambda r: r["result"]["lost"] + r["result"]["errors"], "i", False),
        ("fanout-burst", "fan-out deliveries/s, burst, 1000 subs", lambda r: r["result"]["deliveries_per_sec"], "k", True),
        ("fanout-burst", "server CPU us/delivery, burst", lambda r: r["result"]["server_cpu_us_per_delivery"], "f2", False),
        ("fanout-burst", "lost + errors, burst", lambda r: r["result"]["lost"] + r["result"]["errors"], "i", False),
        ("fanout-rate-20", "p50 latency ms at 20k deliveries/s", lambda r: r["result"]["latency"]["p50_ms"], "f1", False),
        ("fanout-rate-20", "p99 latency ms at 20k deliveries/s", lambda r: r["result"]["latency"]["p99_ms"], "f1", False),
        ("fanout-rate-20", "server CPU us/delivery at 20k/s", lambda r: r["result"]["server_cpu_us_per_delivery"], "f2", False),
        ("fanout-rate-20", "  of which sc-balancer", lambda r: balancer_us(r), "f2", False),
        ("fanout-rate-200", "p50 latency ms, 100 subs x 200 msg/s (20k/s)", lambda r: r["result"]["latency"]["p50_ms"], "f2", False),
        ("fanout-rate-200", "p99 latency ms, 100 subs x 200 msg/s (20k/s)", lambda r: r["result"]["latency"]["p99_ms"], "f2", False),
        ("fanout-rate-200", "server CPU us/delivery, 100 x 200/s", lambda r: r["result"]["server_cpu_us_per_delivery"], "f2", False),
        ("channels", "channels deliveries/s (1000 own + shared)", lambda r: r["result"]["deliveries_per_sec"], "k", True),
        ("channels", "channels p99 latency ms", lambda r: r["result"]["latency"]["p99_ms"], "f1", False),
        ("rpc", "rpc echo calls/s (50 clients)", lambda r: r["result"]["calls_per_sec"], "k", True),
        ("rpc", "rpc p99 ms", lambda r: r["result"]["latency"]["p99_ms"], "f2", False),
        ("idle", "idle RSS KB per connection (5000, whole tree)", lambda r: r["result"]["rss_kb_per_connection"], "f2", False),
        ("idle", "  of which sc-balancer", program_kb("sc-balancer"), "f2", False),
        ("idle", "  of which sc-worker", program_kb("sc-worker"), "f2", False),
        ("connect", "handshakes/s (3000, 100 in flight)", lambda r: r["result"]["handshakes_per_sec"], "k", True),
        ("connect", "handshake p99 ms", lambda r: r["result"]["latency"]["p99_ms"], "f1", False),
    ]
    fmts = {
        "k": lambda v: f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}",
        "f1": lambda v: f"{v:.1f}",
        "f2": lambda v: f"{v:.2f}",
        "i": lambda v: f"{v:.0f}",
    }
    header = "| metric | " + " | ".join(NAMES[s] for s in servers)
    ratio_cols = [(a, b) for a, b in RATIOS if a in servers and b in servers]
    header += "".join(f" | {a} / {b}" for a, b in ratio_cols) + " |"
    lines = [header, "|" + "---|" * (1 + len(servers) + len(ratio_cols))]
    for key, title, get, fmt, higher in metrics:
        if key not in by:
            continue
        cells, medians = [], {}
        for s in servers:
            vals = [v for v in (get(r) for r in by[key].get(s, [])) if v is not None]
            cells.append(spread(vals, fmts[fmt]))
            if vals:
                medians[s] = statistics.median(vals)
        row = f"| {title} | " + " | ".join(cells)
        for ours, theirs in ratio_cols:
            a, b = medians.get(ours), medians.get(theirs)
            row += f" | {a / b:.2f}x" if a is not None and b else " | -"
        lines.append(row + " |")
    loads = [float(r["load_before"].split()[0]) for r in runs if r.get("load_before")]
    n_rep = max((len(v) for d in by.values() for v in d.values()), default=0)
    lines.append("")
    lines.append(
        f"Median of up to {n_rep} runs per cell, (min-max) over the rounds. Ratios are of the medians, same run "
        f"(for latency, CPU and memory, lower is better). 1-minute load average at the start of each run: "
        f"{min(loads, default=0):.2f} to {max(loads, default=0):.2f}."
    )
    table = "\n".join(lines)
    (out / "summary.md").write_text(table + "\n")
    print(table)

    plot_sweep(by, servers, out)
    plot_bars(by, servers, out, "fanout-burst", lambda r: r["result"]["deliveries_per_sec"] / 1000,
              "deliveries/s (thousands)", "Fan-out burst: 1000 subscribers", "fanout_throughput.png")
    plot_bars(by, servers, out, "idle", lambda r: r["result"]["rss_kb_per_connection"],
              "KB of RSS per connection (all processes)", "Idle connections: memory (5000)", "idle_rss.png")


def plot_sweep(by, servers, out):
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = False
    for s in servers:
        points = defaultdict(list)
        for key, per in by.items():
            if not key.startswith("fanout-rate-"):
                continue
            if any(r["params"]["subscribers"] != 1000 for r in per.get(s, [])):
                continue
            for r in per.get(s, []):
                res = r["result"]
                if res["latency"]["count"] == 0:
                    continue
                offered = r["params"]["rate"] * r["params"]["subscribers"]
                points[offered].append((res["latency"]["p50_ms"], res["latency"]["p99_ms"], res["lost"] + res["errors"]))
        if not points:
            continue
        xs = sorted(points)
        p50 = [statistics.median(p[0] for p in points[x]) for x in xs]
        p99 = [statistics.median(p[1] for p in points[x]) for x in xs]
        k = [x / 1000 for x in xs]
        ax.plot(k, p99, "-o", color=COLORS[s], label=f"{NAMES[s]} p99")
        ax.plot(k, p50, "--", marker=".", color=COLORS[s], alpha=0.7, label=f"{NAMES[s]} p50")
        drawn = True
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered deliveries/s (thousands): 1000 subscribers x publish rate")
    ax.set_ylabel("publish-to-delivery latency (ms)")
    ax.set_title("Fan-out latency against rate (same machine, same run)")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_rate.png", dpi=110)
    plt.close(fig)


def plot_bars(by, servers, out, key, get, ylabel, title, name):
    if key not in by:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    labels, meds, lo, hi, colors = [], [], [], [], []
    for s in servers:
        vals = [get(r) for r in by[key].get(s, [])]
        if not vals:
            continue
        m = statistics.median(vals)
        labels.append(NAMES[s].replace(" (", "\n("))
        meds.append(m)
        lo.append(m - min(vals))
        hi.append(max(vals) - m)
        colors.append(COLORS[s])
    ax.bar(labels, meds, yerr=[lo, hi], color=colors, capsize=4)
    for i, m in enumerate(meds):
        ax.text(i, m, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
