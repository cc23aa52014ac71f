#!/usr/bin/env python3
"""How much each part of `prefix_cost`'s cost shows in the TTFT a request really got.

    .venv/bin/python scripts/ttft_fit.py LOG.jsonl...

LOG is a gateway's request log written with `log.include_candidates` (the routing benchmark's
`decision_log=true`: `$BENCH_OUT/envoy/NAME.requests.jsonl`). For the streamed requests of each
log, a least-squares fit of the TTFT (ms) on what the router saw of the endpoint it chose: the
uncached characters of the request's own prompt (its length × (1 − expected cache ratio)), the
uncached characters queued there in other requests' prefill, the requests in flight there, and
a constant. `prefix_cost` charges a queued character as much as one of the request's own; the
fit says what one cost in the run. Then the mean TTFT by how much was queued. numpy (in the
venv with `make sim-plot-deps`).
"""
import json
import sys

import numpy as np


def main(paths):
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for path in paths:
        rows, ttft = [], []
        with open(path) as f:
            for line in filter(str.strip, f):
                d = json.loads(line)
                pick = d.get("pick")
                if not pick or d.get("ttft_ms") is None or not d.get("stream"):
                    continue
                chosen = {c["endpoint"]: c for c in pick["candidates"]}.get(d.get("endpoint"))
                if chosen is None or "cache_ratio" not in chosen:
                    continue
                own = d["prompt_chars"] * (1.0 - chosen["cache_ratio"])
                rows.append([own, chosen["uncached_prefill_chars"], chosen["in_flight"], 1.0])
                ttft.append(d["ttft_ms"])
        if len(ttft) < 10:
            print(f"{path}: {len(ttft)} streamed picks with candidates, too few to fit")
            continue
        x, y = np.array(rows), np.array(ttft)
        own, queued, per_request, const = np.linalg.lstsq(x, y, rcond=None)[0]
        print(f"{path}: {len(y)} requests; ms per 1,000 uncached chars of its own prompt "
              f"{own * 1e3:.1f}, per 1,000 queued {queued * 1e3:.1f} (ratio {queued / own:.2f}); "
              f"per request in flight {per_request:.1f}; constant {const:.0f}")
        for lo, hi in [(0, 1), (1, 5_000), (5_000, 20_000), (20_000, float("inf"))]:
            m = (x[:, 1] >= lo) & (x[:, 1] < hi)
            if m.any():
                print(f"  queued {lo:,}–{hi:,} chars: {m.sum()} requests, mean TTFT {y[m].mean():.0f} ms, "
                      f"mean own uncached {x[m, 0].mean():,.0f}, mean queued {x[m, 1].mean():,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
