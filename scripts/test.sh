#!/usr/bin/env bash
# The test suite: set up (or reuse) the venv, then run pytest.  Any failure, and "no tests
# collected" (pytest exit 5), fails this script.  The compiled CPU kernels are built by the
# set-up, so their absence is a failure here (FASTGMMDIFF_REQUIRE_CPU_KERNELS=0 relaxes it).
source "$(dirname "$0")/env.sh"
export FASTGMMDIFF_REQUIRE_CPU_KERNELS="${FASTGMMDIFF_REQUIRE_CPU_KERNELS:-1}"
python -m pytest --benchmark-disable "$@"
