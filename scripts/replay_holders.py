#!/usr/bin/env python3
"""Did a router send each request of a replayed trace to the server holding its prefix?

    scripts/replay_holders.py TRACE.jsonl [--start-s S] [--block-tokens N] [--token-scale X] RECORDS.jsonl...

TRACE is the Mooncake-format trace given to `llmproxy-sim --replay` (with the same
`--replay-start-s`), RECORDS the per-policy request records of a `compare` run
(`$BENCH_OUT/records/NAME.jsonl`). Request `session` i of a replay is the i-th record of the
trace at or after the start, in time order (docs/simulator.md). For every request, in the order
the requests were sent, the script finds each server's longest prefix of the request's block ids
among the requests that server had already been sent (an infinite cache: an upper bound of what
it holds), and counts the requests that had a holder of at least two blocks and went elsewhere,
with the prompt tokens that choice gave up. A router that reads the cache right and never trades
it for load sends none away.

`--decisions NAME=LOG` reads the request log of policy NAME's gateway written with
`log.include_candidates` (the routing benchmark's `decision_log=true`: `$BENCH_OUT/envoy/NAME.requests.jsonl`)
and says, for each request NAME sent away, what the router saw: whether it knew the holder held
more of the prompt than the endpoint it chose, and if so what outweighed it (more requests in
flight there, more uncached prefill queued, a higher eviction share, a lower cache trust).
"""
import argparse
import collections
import json
import statistics


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("records", nargs="+")
    ap.add_argument("--start-s", type=float, default=0.0)
    ap.add_argument("--block-tokens", type=int, default=512)
    ap.add_argument("--token-scale", type=float, default=0.25)
    ap.add_argument("--decisions", action="append", default=[], metavar="NAME=LOG")
    a = ap.parse_args()
    decisions = {}
    for spec in a.decisions:
        name, _, path = spec.partition("=")
        with open(path) as f:
            decisions[name] = {
                d["request_id"]: d for d in map(json.loads, filter(str.strip, f)) if d.get("pick")
            }
    with open(a.trace) as f:
        trace = [json.loads(line) for line in f if line.strip()]
    window = sorted(
        (r for r in trace if r["timestamp"] >= a.start_s * 1e3), key=lambda r: r["timestamp"]
    )
    block = max(1, round(a.block_tokens * a.token_scale))
    reasons = []
    print("| policy | requests with a holder | sent to it | sent away | tokens given up (share of prompt tokens) | median per away |")
    print("|---|---:|---:|---:|---|---:|")
    for path in a.records:
        name = path.rsplit("/", 1)[-1].removesuffix(".jsonl")
        with open(path) as f:
            rows = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r["sent_s"])
        held = collections.defaultdict(set)
        servers = sorted({r["served_by"] for r in rows if r.get("served_by")})
        holder = away = 0
        lost = []
        prompt_tokens = 0
        seen = decisions.get(name)
        why = collections.Counter()
        for row in rows:
            if not row.get("ok") or not row.get("served_by"):
                continue
            ids = tuple(window[row["session"]]["hash_ids"])
            prompt_tokens += row["prompt_tokens"]
            depth = {}
            for s in servers:
                k = 0
                while k < len(ids) and ids[: k + 1] in held[s]:
                    k += 1
                depth[s] = k
            best = max(depth.values(), default=0)
            chosen = row["served_by"]
            if best >= 2:
                holder += 1
                if depth[chosen] < best:
                    away += 1
                    lost.append((best - depth[chosen]) * block)
                    if seen is not None:
                        holders = [s for s in servers if depth[s] == best]
                        why[reason(seen.get(f"{row['session']}-{row['turn']}"), holders, chosen)] += 1
            for k in range(1, len(ids) + 1):
                held[chosen].add(ids[:k])
        share = 100.0 * sum(lost) / max(prompt_tokens, 1)
        median = statistics.median(lost) if lost else 0
        print(f"| {name} | {holder} | {holder - away} | {away} | {sum(lost):,} ({share:.1f} %) | {median:,.0f} |")
        if seen is not None:
            reasons.append((name, why))
    for name, why in reasons:
        print(f"\n{name}: what the router saw when it sent a request away from the holder")
        for r, n in why.most_common():
            print(f"- {n}: {r}")


def reason(line, holders, chosen):
    """Why the logged pick `line` chose `chosen` over the best of `holders` (served_by names)."""
    if line is None:
        return "no decision logged"
    pick = line["pick"]
    if pick["decided_by"] != "algorithm":
        return "decided by " + pick["decided_by"]
    view = {c["endpoint"]: c for c in pick["candidates"]}
    there = view.get(chosen)
    held = [view[h] for h in holders if h in view]
    if there is None or not held:
        return "holder or choice not among the candidates"
    h = max(held, key=lambda c: c.get("score", 0))
    if h["cache_ratio"] <= there["cache_ratio"]:
        return "did not see more of the prompt on the holder (its claim forgotten, aged or distrusted)"
    terms = []
    if h["in_flight"] > there["in_flight"]:
        terms.append("more in flight")
    if h["uncached_prefill_chars"] > there["uncached_prefill_chars"]:
        terms.append("more uncached prefill queued")
    if h["eviction_share"] > there["eviction_share"]:
        terms.append("higher eviction share")
    margin = there.get("score", 0) - h.get("score", 0)
    share = margin / max(line["prompt_chars"], 1)
    band = "< 1 %" if share < 0.01 else "1-10 %" if share < 0.1 else ">= 10 %"
    terms = ", ".join(terms) or "nothing (a draw)"
    return f"saw the holder's cache, outweighed by: {terms} (by {band} of the prompt)"


if __name__ == "__main__":
    main()
