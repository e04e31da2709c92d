#!/usr/bin/env bash
# The main job on its embedded default: set up (or reuse) the venv, then run the demo.
source "$(dirname "$0")/env.sh"
python -m fastgmmdiff.demo "$@"
