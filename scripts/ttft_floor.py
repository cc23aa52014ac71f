#!/usr/bin/env python3
"""How much of a routing policy's mean TTFT is compute and how much is waiting.

Reads the request records `llmproxy-sim compare` writes (OUT/records/NAME.jsonl, one per
policy of a run) and prints, per policy and per request kind:

- the mean TTFT measured;
- its *compute floor*: the mean TTFT every request would have had with the cache hits it got,
  run alone on an idle simulated server (its uncached prompt tokens prefilled in chunks of the
  step budget: ceil(u / budget) steps of `a` ms plus `b` ms per token, the simulator's engine
  model, docs/simulator.md);
- the rest, queueing and interference (waiting behind other requests' prefill and decode);
- the p99 TTFT measured, and the p99 of the best-of-all floor below (a bound on what any
  router's p99 could reach on this trace with the cache the best of them found);
- for multi-turn kinds: how many turns went to another server than the session's previous
  turn, and the prompt tokens recomputed beyond the turn's new tokens, on moves and on stays
  (evictions).

With several files of one run, "best of all" is the floor with, for every request, the fewest
uncached tokens any of the policies got for it (the same trace: same prompts and replies): a
bound no router reaches without more cache than the best of them found, and with no queue.

    scripts/ttft_floor.py build/bench-matrix/chat-75-s1/records/*.jsonl

The engine constants default to the simulator's (`--step-base-ms 7`, `--prefill-us-per-token
100`, `--max-num-batched-tokens 2048`); pass the fleet's own when it ran with others.
"""
import argparse
import collections
import json
import math
import os
import statistics


def load(path):
    with open(path) as f:
        return [r for r in (json.loads(line) for line in f if line.strip())
                if r["ok"] and r.get("ttft_s") is not None]


def uncached(r):
    return max(1, (r.get("prompt_tokens") or 0) - (r.get("cached_tokens") or 0))


def floor_ms(tokens, a, b, budget):
    return math.ceil(tokens / budget) * a + tokens * b


def percentile(values, q):
    """The q-quantile of values (nearest rank), as the benchmark tables report them."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def session_changes(records):
    """Turns after the first: (moves, tokens lost on moves, stays, tokens lost on stays)."""
    sessions = collections.defaultdict(list)
    for r in records:
        sessions[r["session"]].append(r)
    moves = lost_moves = stays = lost_stays = 0
    for turns in sessions.values():
        turns.sort(key=lambda r: r["turn"])
        for prev, r in zip(turns, turns[1:]):
            new = max(0, (r["prompt_tokens"] or 0) - (prev["prompt_tokens"] or 0) - prev["output_tokens"])
            lost = max(0, uncached(r) - new)
            if r["served_by"] != prev["served_by"]:
                moves, lost_moves = moves + 1, lost_moves + lost
            else:
                stays, lost_stays = stays + 1, lost_stays + lost
    return moves, lost_moves, stays, lost_stays


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", nargs="+", help="records/NAME.jsonl files of one run")
    ap.add_argument("--step-base-ms", type=float, default=7.0)
    ap.add_argument("--prefill-us-per-token", type=float, default=100.0)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    args = ap.parse_args()
    a, b, budget = args.step_base_ms, args.prefill_us_per_token / 1000.0, args.max_num_batched_tokens

    runs = {os.path.basename(p).removesuffix(".jsonl"): load(p) for p in args.records}
    keys = [{(r["session"], r["turn"]) for r in records} for records in runs.values()]
    in_all = set.intersection(*keys) if len(runs) > 1 else set()
    best = {}
    for records in runs.values():
        for r in records:
            key = (r["session"], r["turn"])
            if key in in_all:
                best[key] = min(best.get(key, math.inf), uncached(r))

    print("| policy | kind | n | TTFT mean | compute floor | queueing + interference "
          "| best-of-all floor | p99 | best-of-all floor p99 | moves (tokens lost) | stays (tokens lost) | prompt tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for name, records in runs.items():
        kinds = collections.defaultdict(list)
        for r in records:
            kinds[r["kind"]].append(r)
        for kind, rs in [("all", records)] + sorted(kinds.items()):
            ttft = statistics.mean(r["ttft_s"] * 1000 for r in rs)
            own = statistics.mean(floor_ms(uncached(r), a, b, budget) for r in rs)
            best_floors = [floor_ms(best[k], a, b, budget)
                           for k in ((r["session"], r["turn"]) for r in rs) if k in best]
            best_floor = f"{statistics.mean(best_floors):.0f}" if best_floors else "–"
            p99 = percentile([r["ttft_s"] * 1000 for r in rs], 0.99)
            best_p99 = f"{percentile(best_floors, 0.99):.0f}" if best_floors else "–"
            moves, lost_moves, stays, lost_stays = session_changes(rs)
            prompt = sum(r["prompt_tokens"] or 0 for r in rs)
            print(f"| {name} | {kind} | {len(rs)} | {ttft:.0f} | {own:.0f} | {ttft - own:.0f} "
                  f"| {best_floor} | {p99:.0f} | {best_p99} | {moves} ({lost_moves}) | {stays} ({lost_stays}) | {prompt} |")


if __name__ == "__main__":
    main()
