"""The CUDA sources compile with nvcc (this machine has nvcc but no GPU), and no kernel spills.

Compile only, for sm_90 (H100/H200) and sm_80 (A100), against the installed torch's headers, with
``-Xptxas -v``: registers, stack and spill bytes of every kernel instance are printed, and a
kernel that spills fails the test (a spilling kernel runs many times slower than its
arithmetic).  What the kernels compute is tested on this CPU by tests/test_cuda_emulation.py;
bench/gpu_check.sh runs them on a GPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch.utils.cpp_extension as ce

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("90", "80")


def _nvcc():
    home = ce.CUDA_HOME
    cand = Path(home) / "bin" / "nvcc" if home else None
    return str(cand) if cand and cand.exists() else shutil.which("nvcc")


def parse_ptxas(log: str) -> list:
    """Per kernel instance (ptxas -v): dict(arch, name, regs, stack, spill_stores, spill_loads)."""
    rows, cur = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\w+)'", line)
        if m:
            cur = dict(name=m.group(1), arch=m.group(2), regs=None, stack=0, spill_stores=0, spill_loads=0)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
    names = [r["name"] for r in rows]
    if names and shutil.which("c++filt"):
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
        for r, n in zip(rows, out):
            r["name"] = n
    return rows


@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu")))
def test_cuda_source_compiles_without_spills(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    includes = ce.include_paths() + [sysconfig.get_paths()["include"], str(ROOT / "csrc")]
    # A CPU build of torch ships c10/cuda headers but not the one its CMake generates for CUDA
    # builds; supply it as a CUDA build of torch has it.
    gen = tmp_path / "inc" / "c10" / "cuda" / "impl"
    gen.mkdir(parents=True)
    (gen / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes.append(str(tmp_path / "inc"))
    # Device code as setup.py builds it (ptxas optimises at -O3 unless -G); host code at -O0.
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [nvcc, "-c", "-std=c++17", "-O0", *gencode, "-lineinfo", "-Xptxas", "-v", "-DFASTGMMDIFF_WITH_CUDA",
           "-D_GLIBCXX_USE_CXX11_ABI=1", "-Xcudafe", "--diag_suppress=20012",
           *[f"-I{p}" for p in includes], str(ROOT / "csrc" / "cuda" / source), "-o", str(tmp_path / "out.o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"nvcc failed:\n{r.stderr[-6000:]}"
    assert (tmp_path / "out.o").stat().st_size > 0
    rows = parse_ptxas(r.stdout + r.stderr)
    assert rows, "no ptxas report (-Xptxas -v)"
    print(f"\n{'arch':6} {'regs':>4} {'stack':>5} {'spills':>7}  kernel")
    for k in rows:
        print(f"{k['arch']:6} {k['regs']:>4} {k['stack']:>5} {k['spill_stores'] + k['spill_loads']:>7}  {k['name']}")
    assert {k["arch"] for k in rows} == {f"sm_{a}" for a in ARCHS}
    spills = [k for k in rows if k["spill_stores"] or k["spill_loads"]]
    assert not spills, "kernels spill registers:\n" + "\n".join(
        f"{k['arch']} {k['name']}: {k['spill_stores']} B stores, {k['spill_loads']} B loads" for k in spills)
