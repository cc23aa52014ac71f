#!/usr/bin/env python3
"""Soak, fault and abuse scenarios for llmproxy in Envoy (and nginx reloads), from the command
line. `make soak` runs everything with the long settings; results are printed and written as
JSON (--json). Exit status 1 when any check failed.

    python3 tests/soak/soak.py [--requests 1000000] [--only steady,abuse] [--json out.json]
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios  # noqa: E402
from common import log  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated scenarios: %s" % ",".join(scenarios.ALL))
    ap.add_argument("--requests", type=int, default=1_000_000, help="requests of the steady soak")
    ap.add_argument("--connections", type=int, default=32, help="connections of the steady soak")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(scenarios.ALL)
    params = {
        "steady": {"requests": args.requests, "connections": args.connections},
        "model_server_restart": {"down_s": 6.0, "after_s": 8.0},
        "metadata_center_faults": {"phase_s": 5.0},
        "metadata_center_rate": {"rates": (500.0, 1000.0, 2000.0, None)},
        "nginx_reload": {"duration_s": 30, "reloads": 5},
        "client_abort": {"aborts": 500},
        "abuse": {"slow_conns": 500, "slow_s": 15.0},
    }
    tmp = Path(tempfile.mkdtemp(prefix="llmproxy-soak-"))
    results = []
    try:
        for name in names:
            t0 = time.time()
            log("== %s" % name)
            try:
                r = scenarios.ALL[name](tmp / name, **params.get(name, {}))
                d = r.as_dict()
            except Exception:
                d = {"name": name, "ok": False, "numbers": {}, "checks": [
                    {"check": "scenario ran", "ok": False, "detail": traceback.format_exc()}]}
                log(d["checks"][0]["detail"])
            d["seconds"] = round(time.time() - t0, 1)
            results.append(d)
            log("== %s: %s in %.1fs" % (name, "ok" if d["ok"] else "FAILED", d["seconds"]))
    finally:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    for d in results:
        print("%-24s %-6s %6.1fs" % (d["name"], "ok" if d["ok"] else "FAILED", d["seconds"]))
        for c in d["checks"]:
            if not c["ok"]:
                print("    FAIL %s: %s" % (c["check"], c["detail"][:500]))
    sys.exit(0 if all(d["ok"] for d in results) else 1)


if __name__ == "__main__":
    main()
