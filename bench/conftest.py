"""bench/ helpers import each other as plain modules; quick mode when timing is disabled."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    # `pytest --benchmark-disable` (the test suite, CI) runs every case once on tiny sizes,
    # so the benchmark code is exercised without timing anything: without a GPU that includes
    # the GPU workloads on CPU tensors and the Triton backend under its CPU interpreter (which
    # must be switched on before anything imports triton or fastgmmdiff).
    if config.getoption("benchmark_disable", default=False):
        os.environ.setdefault("FASTGMMDIFF_BENCH_QUICK", "1")
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
