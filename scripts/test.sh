#!/usr/bin/env bash
# The test suite: set up (or reuse) the venv, then run pytest.  Any failure, and "no tests
# collected" (pytest exit 5), fails this script.
source "$(dirname "$0")/env.sh"
python -m pytest "$@"
