#!/usr/bin/env python3
"""Plot the TTFT CDF of every run in a results.json written by `llmproxy-sim compare`.

usage: ttft_cdf.py RESULTS_JSON OUT_PNG
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        doc = json.load(f)
    runs = doc.get("runs", [])
    if not runs:
        print("no runs in", argv[1], file=sys.stderr)
        return 1
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    styles = ["-", "--", ":", "-."]
    for i, run in enumerate(runs):
        s = run["summary"]
        xs = sorted(t * 1e3 for t in run["ttft_s"])
        if not xs:
            continue
        n = len(xs)
        ys = [(i + 1) / n for i in range(n)]
        label = f'{s["label"]} (mean {s["ttft_s"]["mean"] * 1e3:.0f} ms, p99 {s["ttft_s"]["p99"] * 1e3:.0f} ms)'
        ax.step(xs, ys, where="post", label=label, linestyle=styles[(i // 10) % len(styles)])
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(doc.get("title", "TTFT"))

    labels = [r["summary"]["label"] for r in runs]
    hit = [(r["summary"].get("fleet_hit_rate") or r["summary"].get("client_hit_rate") or 0) * 100 for r in runs]
    bars = bx.barh(labels, hit, color="tab:green")
    bx.bar_label(bars, fmt="%.1f%%", fontsize=8)
    bx.set_xlim(0, 100)
    bx.invert_yaxis()
    bx.set_xlabel("fleet prefix-cache hit rate (%)")
    bx.set_title("cache hit rate")
    w = doc.get("workload", {})
    fig.text(0.01, 0.01, f'rate {w.get("rate")} req/s, {w.get("duration")} s, seed {w.get("seed")}', fontsize=7, color="gray")
    fig.tight_layout()
    fig.savefig(argv[2], dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
