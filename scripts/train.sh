#!/usr/bin/env bash
# The main job on its embedded default: set up (or reuse) the venv, train a feature-GMM-
# conditioned diffusion model with the NGMG auxiliary classifier on the procedural `shapes`
# data (1500 steps: about five minutes on a 2-core CPU), then write a sample grid and the
# defect table into runs/shapes/.  Extra flags go to fastgmmdiff-train (see --help).
# Run again, it continues the run in runs/shapes (--resume: a finished run only re-writes its
# samples and defect table); --overwrite starts afresh, --out elsewhere starts another.
source "$(dirname "$0")/env.sh"
extra=()
case " $* " in
  *" --out "*|*" --out="*|*" --overwrite "*|*" --resume "*) ;;
  *) if [ -f runs/shapes/checkpoint.pt ]; then
       echo "[train] runs/shapes holds a run: continuing it (--resume); pass --overwrite to start afresh" >&2
       extra=(--resume)
     fi ;;
esac
python -m fastgmmdiff.diffusion --out runs/shapes "${extra[@]}" "$@"
