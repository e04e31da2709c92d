"""bench/ helpers import each other as plain modules; quick mode when timing is disabled."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    # `pytest --benchmark-disable` (the test suite, CI) runs every case once on tiny sizes,
    # so the benchmark code is exercised without timing anything.
    if config.getoption("benchmark_disable", default=False):
        os.environ.setdefault("FASTGMMDIFF_BENCH_QUICK", "1")
