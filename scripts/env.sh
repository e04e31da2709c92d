# Sourced by the other scripts: create or reuse the virtual environment and install the
# package with everything the tests, benchmarks and demo need.  Works on a fresh machine with
# Python 3.10+ (torch 2.13.0 CPU is taken from the machine's disk where pip finds it there).
# A second run reuses what the first installed and built: the dependencies are installed again
# only when their list changes, the extension is rebuilt only when its sources, the build
# switches setup.py reads or torch change (stamps in the venv; FASTGMMDIFF_REBUILD=1 forces a rebuild).
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
DEPS="setuptools wheel ninja numpy scikit-learn pytest pytest-benchmark matplotlib tqdm pillow scipy triton"
if [ "$(cat "$VENV/.fastgmmdiff-deps" 2>/dev/null)" != "$DEPS" ]; then
  echo "[env] installing the test and tool dependencies" >&2
  $PIP install $DEPS
  echo "$DEPS" > "$VENV/.fastgmmdiff-deps"
fi
# What the extension build depends on: its sources, the build files, the build switches, torch.
build_key="$(python - <<'PY'
import hashlib, os, pathlib, torch
h = hashlib.sha256()
files = sorted(p for p in pathlib.Path("csrc").rglob("*") if p.is_file()) + [pathlib.Path("setup.py"), pathlib.Path("pyproject.toml")]
for p in files:
    h.update(str(p).encode()); h.update(p.read_bytes())
# the switches setup.py reads (what the build makes), not run-time ones such as
# FASTGMMDIFF_TEST_PACKAGING, which .ci/run sets and scripts/train.sh does not
for k in ("FASTGMMDIFF_CUDA_ARCHS", "FASTGMMDIFF_NATIVE", "FASTGMMDIFF_SANITIZE", "FASTGMMDIFF_SKIP_BUILD",
          "FASTGMMDIFF_SKIP_CUDA_BUILD", "FASTGMMDIFF_WITH_CUDA"):
    h.update(f"{k}={os.environ.get(k, '')}".encode())
h.update(torch.__version__.encode())
print(h.hexdigest())
PY
)"
if [ "${FASTGMMDIFF_REBUILD:-0}" = "0" ] && [ "$(cat "$VENV/.fastgmmdiff-build" 2>/dev/null)" = "$build_key" ] \
   && python -c "import fastgmmdiff, fastgmmdiff._ext as e, sys; sys.exit(e.load() is None and not __import__('os').environ.get('FASTGMMDIFF_SKIP_BUILD'))" 2>/dev/null; then
  echo "[env] fastgmmdiff is installed and its extension is up to date (FASTGMMDIFF_REBUILD=1 rebuilds)" >&2
else
  echo "[env] building and installing fastgmmdiff (pip install --no-build-isolation -e .)" >&2
  $PIP install --no-build-isolation -e . >/dev/null
  echo "$build_key" > "$VENV/.fastgmmdiff-build"
fi
