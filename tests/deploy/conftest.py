import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "envoy"))   # the Envoy harness (real Envoy processes)
sys.path.insert(0, str(HERE.parent / "common"))  # ports, fake upstreams, HTTP, metrics

import harness  # noqa: E402


@pytest.fixture(scope="session")
def module_built():
    if not harness.MODULE.exists():
        pytest.fail("%s missing: run `make envoy-module`" % harness.MODULE)
    return harness.MODULE


# a failed test's report shows the log tail of every Envoy it used
pytest_runtest_makereport = pytest.hookimpl(hookwrapper=True)(harness.log_tails_on_failure)
