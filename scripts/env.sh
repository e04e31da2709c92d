# Sourced by the other scripts: create or reuse the virtual environment and install the
# package with everything the tests, benchmarks and demo need.  Works on a fresh machine with
# Python 3.10+ (torch 2.13.0 CPU is taken from the machine's disk where pip finds it there).
#   FASTGMMDIFF_VENV   venv folder (default .venv in the repository)
#   FASTGMMDIFF_SKIP_CUDA_BUILD, MAX_JOBS, ...   passed to the extension build (see setup.py)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
VENV="${FASTGMMDIFF_VENV:-$REPO/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating virtual environment $VENV" >&2
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
PIP="python -m pip -q --disable-pip-version-check"
python -c "import torch" 2>/dev/null || { echo "[env] installing torch==2.13.0" >&2; $PIP install torch==2.13.0; }
$PIP install setuptools wheel ninja numpy scikit-learn pytest pytest-benchmark matplotlib tqdm pillow scipy triton
echo "[env] building and installing fastgmmdiff (pip install --no-build-isolation -e .)" >&2
$PIP install --no-build-isolation -e . >/dev/null
