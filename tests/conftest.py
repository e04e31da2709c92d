"""Shared fixtures.  Random data is drawn fresh for every run: the session seed comes from
FASTGMMDIFF_TEST_SEED when set (to replay a failure) and is printed in pytest's header."""

import os
import random
import zlib

import pytest
import torch

# Without a GPU, the Triton kernels run under Triton's CPU interpreter; it must be switched on
# before anything imports triton (tests/test_triton.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SESSION_SEED = int(os.environ.get("FASTGMMDIFF_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    import fastgmmdiff

    return [f"fastgmmdiff {fastgmmdiff.__version__} from {os.path.dirname(fastgmmdiff.__file__)}",
            f"backends: {fastgmmdiff.available_backends()}",
            f"FASTGMMDIFF_TEST_SEED={SESSION_SEED} (set it to replay this run's data)"]


def _test_seed(request) -> int:
    return (SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    """Every test starts from torch's global generator seeded with its own seed, so data drawn
    without an explicit generator is fresh each run and replays with FASTGMMDIFF_TEST_SEED."""
    torch.manual_seed(_test_seed(request))


@pytest.fixture
def seed(request):
    """A seed fresh for each run, distinct per test (mixes in the test's id)."""
    s = _test_seed(request)
    torch.manual_seed(s)
    return s


# "triton" runs CPU tensors under Triton's CPU interpreter (TRITON_INTERPRET=1, set above
# when there is no GPU): the same kernels' semantics, slowly, so the shared tests run it too.
CPU_BACKENDS = ("torch", "cpu", "triton")


def _triton_on_cpu_reason(node):
    """Why this test cannot run the Triton backend on CPU tensors here, or None."""
    from fastgmmdiff import _dispatch

    if not _dispatch._triton_interpreted():
        return "it runs CPU tensors only under TRITON_INTERPRET=1"
    if node.get_closest_marker("interpreter_heavy") is not None:
        return "too slow under Triton's CPU interpreter (tests/test_triton.py covers it at small sizes)"
    return None


@pytest.fixture
def triton_on_cpu_reason(request):
    """``_triton_on_cpu_reason`` for the requesting test (for fixtures outside this file)."""
    return _triton_on_cpu_reason(request.node)


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Every backend that runs CPU tensors; skipped (at run time) where it is unavailable."""
    from fastgmmdiff import _dispatch

    reason = _dispatch.unavailable_reason(request.param)
    if reason is None and request.param == "triton":
        reason = _triton_on_cpu_reason(request.node)
    if reason is not None:
        pytest.skip(f"backend {request.param!r} unavailable: {reason}")
    return request.param
