"""Short versions of the soak, fault and abuse scenarios (make test-soak, CI): the same code as
`make soak` (tests/soak/scenarios.py) with small counts. Each test fails with the list of the
scenario's failed checks; the measured numbers are printed (pytest -s shows them)."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenarios  # noqa: E402

SHORT = {
    "steady": {"requests": 40_000, "warmup": 8_000, "prefix_index_capacity": 5_000, "connections": 16},
    "model_server_restart": {"before_s": 2.0, "down_s": 3.0, "after_s": 4.0, "eject_ms": 1000},
    "metadata_center_faults": {"phase_s": 2.0, "rate": 300},
    "metadata_center_rate": {"rates": (200.0,), "seconds": 4.0},
    "envoy_hot_restart": {},
    "nginx_reload": {"duration_s": 8, "reloads": 2},
    "client_abort": {"aborts": 100},
    "abuse": {"slow_conns": 100, "slow_s": 2.0, "concurrent_big": 4},
}


@pytest.mark.parametrize("name", list(SHORT))
def test_scenario(name, tmp_path):
    res = scenarios.ALL[name](tmp_path, **SHORT[name])
    print("\n%s: %s" % (name, json.dumps(res.numbers, default=str)[:4000]))
    assert res.checks, "no check ran"
    assert res.ok, "%s failed: %s" % (name, res.failures())
