"""Every Triton launch the host code can make compiles for a real GPU, within the stack bound.

The interpreter tests (tests/test_triton.py) check what the kernels compute; Triton's NVIDIA
backend is stricter than its interpreter and decides registers and spills.  This runs
``python -m fastgmmdiff.kernels.compile_check`` (the kernels' own compile check: every
launch variant — covariance type × input dtype × block-table entry × flags, forward, backward
and target kernels — compiled for sm_90 and sm_80 with the compiler that ships in the triton
wheel; no GPU needed) and prints its table of registers and stack bytes per variant.  It needs
the real compiler, so it runs in a subprocess without TRITON_INTERPRET.  Triton caches the
binaries (~/.triton/cache): a second run takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ARCHS = ("90", "80")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's notice
    return env


@pytest.fixture(scope="module")
def nvidia_backend():
    r = subprocess.run([sys.executable, "-c", "from triton.backends.nvidia.compiler import CUDABackend"],
                       capture_output=True, text=True, env=_env())
    if r.returncode != 0:
        pytest.skip(f"triton's NVIDIA backend is not importable: {r.stderr.strip()[-300:]}")


def test_every_launch_variant_compiles_within_the_stack_bound(nvidia_backend, tmp_path, capsys):
    out = tmp_path / "variants.json"
    r = subprocess.run([sys.executable, "-m", "fastgmmdiff.kernels.compile_check", "--arch", *ARCHS,
                        "--jobs", str(min(4, os.cpu_count() or 1)), "--json", str(out)],
                       capture_output=True, text=True, env=_env(), timeout=1800)
    with capsys.disabled():  # the table of registers and stack per variant, in the test log
        print("\n" + r.stdout[-60000:])
    assert r.returncode == 0, f"compile check failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    rows = json.loads(out.read_text())
    kernels = {row["kernel"] for row in rows}
    assert {"_fwd_diag_kernel", "_bwd_x_diag_kernel", "_bwd_param_diag_kernel", "_fwd_full_kernel",
            "_bwd_x_full_kernel", "_bwd_param_full_kernel", "_fwd_target_kernel", "_bwd_target_kernel",
            "_fwd_target_full_kernel", "_bwd_target_full_kernel", "_segment_sum_kernel"} <= kernels
    assert {str(row["arch"]) for row in rows} == set(ARCHS)
    assert all(row["error"] is None for row in rows)


def test_the_check_catches_what_the_interpreter_lets_through(nvidia_backend, tmp_path):
    """A planted compile error (a plain module-level float read inside @triton.jit: what the
    interpreter ran and the compiler rejected in 69 of 91 launches) is reported as a failure."""
    mod = tmp_path / "planted.py"
    mod.write_text(textwrap.dedent('''
        import triton
        import triton.language as tl
        SCALE = 1.4426950408889634

        @triton.jit
        def planted(x_ptr, N, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < N) * SCALE, mask=offs < N)
    '''))
    code = textwrap.dedent(f'''
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        import planted
        from fastgmmdiff.kernels import compile_check as cc
        row = cc.compile_launch(planted.planted, (torch.zeros(8), 8), dict(BLOCK=8), 90)
        bad = cc.failures([row])
        assert len(bad) == 1 and "does not compile" in bad[0][1] and "SCALE" in row["error"], row
        print("caught")
    ''')
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0 and "caught" in r.stdout, r.stderr[-3000:]


def test_stack_bound_applies_to_float32_accumulation_only():
    from fastgmmdiff.kernels.compile_check import MAX_STACK_BYTES, failures

    row = dict(key="k", arch=90, error=None, regs=255, shared=0)
    assert failures([dict(row, fp32_acc=True, stack=MAX_STACK_BYTES)]) == []
    assert len(failures([dict(row, fp32_acc=True, stack=MAX_STACK_BYTES + 8)])) == 1
    assert failures([dict(row, fp32_acc=False, stack=4 * MAX_STACK_BYTES)]) == []
