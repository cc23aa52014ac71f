#!/usr/bin/env python3
"""What a gateway's picks expected of the cache, against what the engines had.

    scripts/decision_log_summary.py LOG.jsonl RECORDS.jsonl

LOG is the gateway's request log written with `log.include_candidates` (the routing benchmark's
`decision_log=true`: `$BENCH_OUT/envoy/NAME.requests.jsonl`), RECORDS the same policy's request
records of the run (`$BENCH_OUT/records/NAME.jsonl`), joined by `x-request-id` = SESSION-TURN.

1. Picks that left the candidate the router expected to hold the most of the prompt by more
   than 1,000 characters, and what that candidate had more of (uncached prefill queued,
   requests in flight, eviction share): the hits the router traded for load, as it saw them.
2. Per request kind, the share of the prompt tokens the router expected cached on the endpoint
   it chose (its logged `cache_ratio`) against the share the engine reported
   (`cached_tokens / prompt_tokens` of the answer's usage), and the requests where the two
   differ by more than 0.3 either way: a copy the router believed in and the engine had evicted,
   or one it did not know of.
"""
import collections
import json
import sys


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with open(argv[2]) as f:
        kind = {f"{r['session']}-{r['turn']}": r["kind"] for r in map(json.loads, filter(str.strip, f))}
    with open(argv[1]) as f:
        lines = [d for d in map(json.loads, filter(str.strip, f)) if d.get("pick")]
    picks, left, traded, prompt_chars = 0, collections.Counter(), 0.0, 0
    per_kind = collections.defaultdict(lambda: {"n": 0, "expected": 0.0, "actual": 0, "tokens": 0,
                                                 "over": 0, "under": 0})
    for d in lines:
        weighed = {c["endpoint"]: c for c in d["pick"]["candidates"]}
        chosen = weighed.get(d.get("endpoint"))
        if chosen is None or "cache_ratio" not in chosen:
            continue
        picks += 1
        prompt_chars += d["prompt_chars"]
        best = max(weighed.values(), key=lambda c: c["cache_ratio"])
        gap = (best["cache_ratio"] - chosen["cache_ratio"]) * d["prompt_chars"]
        if gap > 1000:
            traded += gap
            more = [name for name, key in (("uncached prefill queued", "uncached_prefill_chars"),
                                           ("requests in flight", "in_flight"),
                                           ("eviction share", "eviction_share"))
                    if best[key] > chosen[key]]
            left[", ".join(more) or "nothing"] += 1
        if d.get("prompt_tokens") and d.get("cached_tokens") is not None:
            k = per_kind[kind.get(d.get("request_id"), "?")]
            actual = d["cached_tokens"] / d["prompt_tokens"]
            k["n"] += 1
            k["expected"] += chosen["cache_ratio"] * d["prompt_tokens"]
            k["actual"] += d["cached_tokens"]
            k["tokens"] += d["prompt_tokens"]
            k["over"] += chosen["cache_ratio"] - actual > 0.3
            k["under"] += actual - chosen["cache_ratio"] > 0.3
    print(f"{argv[1]}: {picks} picks; {sum(left.values())} left the most-cached candidate by more "
          f"than 1,000 chars ({100 * traded / max(prompt_chars, 1):.1f} % of the prompt chars)")
    for why, n in left.most_common():
        print(f"  {n}: it had more {why}")
    print("| kind | requests | expected cached | engine's cached | expected > engine's + 0.3 | engine's > expected + 0.3 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, k in sorted(per_kind.items()):
        t = max(k["tokens"], 1)
        print(f"| {name} | {k['n']} | {100 * k['expected'] / t:.1f} % | {100 * k['actual'] / t:.1f} % "
              f"| {k['over']} | {k['under']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
