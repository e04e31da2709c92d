#!/usr/bin/env bash
# The main job on its embedded default: set up (or reuse) the venv, train a feature-GMM-
# conditioned diffusion model with the NGMG auxiliary classifier on the procedural `shapes`
# data (1500 steps: about five minutes on a 2-core CPU), then write a sample grid and the
# defect table into runs/shapes/.  Extra flags go to fastgmmdiff-train (see --help).
source "$(dirname "$0")/env.sh"
python -m fastgmmdiff.diffusion --out runs/shapes "$@"
