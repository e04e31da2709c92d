"""Compile every launch of the Triton kernels for a real GPU, on a machine without one.

Triton's CPU interpreter (``TRITON_INTERPRET=1``, the test mode of ``tests/test_triton.py``)
checks what the kernels compute, not what the compiler accepts: it ran kernels that Triton's
NVIDIA backend rejects (a module-level float read inside ``@triton.jit``), and it says nothing
of registers or spills.  This module closes that gap without a GPU or a driver:

1. **Record** every launch the host code (``gmm.log_prob_fwd/bwd``,
   ``log_prob_target_fwd/bwd``) makes, by running it on small CPU tensors with the launches
   recorded instead of run: every covariance type × input dtype (float32, float64, bfloat16,
   float16) × D = 1 … 130 (the whole block table, the one-block/chunked boundary of the full
   kernels at 64 and several chunks past it) × per-mixture and shared x.
2. **Group** the launches into variants: kernel × argument dtypes × ``tl.constexpr`` values ×
   ``num_warps`` — everything the host code chooses.  Integer arguments are specialised as
   Triton does at launch (value 1, multiples of 16); each variant is compiled with its least
   specialised recorded launch, the generic code path.
3. **Compile** each variant with Triton's NVIDIA backend (``triton.compile(ASTSource(...),
   target=GPUTarget("cuda", arch, 32))``: ptxas and cuobjdump ship in the triton wheel) and
   read registers, stack and shared memory from the cubin (``cuobjdump
   --dump-resource-usage``).

A variant fails if it does not compile, or if it accumulates in float32 (float32, bfloat16
and float16 inputs) and uses more than ``MAX_STACK_BYTES`` of stack per thread: a kernel that
spills kilobytes per thread runs many times slower than its arithmetic.  float64 variants are
reported, not bounded (their register budget is halved by design).

    python -m fastgmmdiff.kernels.compile_check [--arch 90 80] [--jobs 2] [--json PATH]

Run without ``TRITON_INTERPRET=1`` (the module refuses otherwise: the interpreter replaces the
kernels).  Exit status 1 when a variant fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

MAX_STACK_BYTES = 64
DTYPES = ("float32", "float64", "bfloat16", "float16")
COVS = ("diag", "spherical", "full")
D_RANGE = range(1, 131)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def record_launches():
    """Every launch the host code makes over the grid of the module docstring, as a list of
    ``(kernel, args, kwargs)``; nothing is run on a device."""
    if _interpreted():
        raise RuntimeError("compile_check needs the real Triton compiler: unset TRITON_INTERPRET")
    import torch

    from . import gmm

    launches = []

    class _Record:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    saved = gmm._launch
    gmm._launch = _Record
    try:
        gen = torch.Generator().manual_seed(0)
        G, N, K = 2, 50, 5
        for cov in COVS:
            for dname in DTYPES:
                dtype = getattr(torch, dname)
                for D in D_RANGE:
                    x = torch.randn(G, N, D, generator=gen).to(dtype)
                    m = torch.randn(G, K, D, generator=gen).to(dtype)
                    shape = {"diag": (G, K, D), "spherical": (G, K), "full": (G, K, D, D)}[cov]
                    p = (0.5 + torch.rand(shape, generator=gen)).to(dtype)
                    p = p.triu() if cov == "full" else p
                    lg = torch.randn(G, K, generator=gen).to(dtype)
                    t = torch.randint(0, K, (G, N), generator=gen)
                    for xs in (x, x[:1]):  # per-mixture x, shared x
                        lp = gmm.log_prob_fwd(xs, m, p, lg, cov)
                        gmm.log_prob_bwd(torch.ones_like(lp), xs, m, p, lg, lp, cov)
                        lt = gmm.log_prob_target_fwd(xs, m, p, t, cov)
                        gmm.log_prob_target_bwd(torch.ones_like(lt), xs, m, p, t, lt, cov)
    finally:
        gmm._launch = saved
    return launches


def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    target = GPUTarget("cuda", arch, 32)
    return target, make_backend(target)


def _specialise(kernel, args, kwargs, backend):
    """Triton's own launch-time specialisation of (args, kwargs): (bound, specialization, options)."""
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    return binder(*args, **kwargs)


def variants() -> dict:
    """{variant key: (kernel, args, kwargs)} — one launch per variant, the least specialised
    (the specialisation rules are the same for every CUDA architecture)."""
    _, backend = _backend(90)
    out, rank = {}, {}
    for kernel, args, kwargs in record_launches():
        bound, spec, _ = _specialise(kernel, args, kwargs, backend)
        ptrs = [f"{p.name}:{s[0]}" for p, s in zip(kernel.params, spec) if s[0].startswith("*")]
        consts = [f"{k}={v}" for k, v in sorted(kwargs.items())]
        key = f"{kernel.fn.__name__}({', '.join(ptrs)}; {', '.join(consts)})"
        n_spec = sum(1 for p, s in zip(kernel.params, spec) if not p.is_constexpr and (s[0] == "constexpr" or s[1]))
        if key not in out or n_spec < rank[key]:
            out[key], rank[key] = (kernel, args, kwargs), n_spec
    return out


_CUOBJDUMP = None
_VARIANTS: dict = {}


def _resource_usage(cubin: bytes) -> dict:
    global _CUOBJDUMP
    if _CUOBJDUMP is None:
        import triton

        _CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    return dict(zip(("regs", "stack", "shared", "local"), map(int, m.groups())))


def compile_launch(kernel, args, kwargs, arch: int, key: str = None) -> dict:
    """Compile one launch ``kernel[grid](*args, **kwargs)`` for sm_<arch> as Triton would at
    that launch; a dict of its resources (regs, stack, shared, local) or its error."""
    import triton
    from triton.compiler import ASTSource

    target, backend = _backend(arch)
    bound, spec, opts = _specialise(kernel, args, kwargs, backend)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    acc = str(kwargs.get("ACC", ""))
    row = dict(key=key or kernel.fn.__name__, kernel=kernel.fn.__name__, arch=arch, fp32_acc="fp64" not in acc,
               num_warps=options.num_warps)
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        row.update(_resource_usage(compiled.asm["cubin"]))
        row["error"] = None
    except Exception as e:  # a compile error is a result, reported per variant
        row["error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def compile_variant(key: str, arch: int, kernel_name: str = None, args=(), kwargs=None) -> dict:
    """Compile one variant for sm_<arch>: by key (looked up in :func:`variants`) or given as
    (kernel name in gmm, args, kwargs)."""
    from . import gmm

    if kernel_name is None:
        if not _VARIANTS:
            _VARIANTS.update(variants())
        kernel, args, kwargs = _VARIANTS[key]
    else:
        kernel = getattr(gmm, kernel_name)
    return compile_launch(kernel, args, kwargs, arch, key)


def failures(rows: list) -> list:
    """The rows that fail the check (module docstring), with why."""
    bad = []
    for r in rows:
        if r["error"]:
            bad.append((r, "does not compile: " + r["error"].splitlines()[0]))
        elif r["fp32_acc"] and r["stack"] > MAX_STACK_BYTES:
            bad.append((r, f"{r['stack']} B of stack per thread (bound {MAX_STACK_BYTES} B)"))
    return bad


def run(archs=(90, 80), jobs: int = 1) -> list:
    """Compile every variant for every arch; the list of result rows."""
    if not _VARIANTS:
        _VARIANTS.update(variants())
    if jobs <= 1:
        return [compile_variant(k, a) for a in archs for k in sorted(_VARIANTS)]
    import multiprocessing

    # Workers get the recorded launch itself (kernel name, CPU tensors, kwargs), so they need
    # not record again; spawn: they import torch and triton afresh (no fork of a process with
    # threads).  Slow variants first, so that the pool ends together.
    tasks = [(k, a, _VARIANTS[k][0].fn.__name__, _VARIANTS[k][1], _VARIANTS[k][2])
             for a in archs for k in sorted(_VARIANTS, key=lambda k: ("_full" not in k, "_bwd" not in k, k))]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        return list(ex.map(compile_variant, *zip(*tasks)))


def table(rows: list) -> str:
    lines = [f"{'arch':>4} {'regs':>4} {'stack':>5} {'smem':>6} {'s':>5}  variant"]
    for r in sorted(rows, key=lambda r: (r["arch"], r["key"])):
        if r["error"]:
            lines.append(f"sm{r['arch']}  FAILED  {r['key']}: {r['error'].splitlines()[0][:200]}")
        else:
            lines.append(f"sm{r['arch']} {r['regs']:>4} {r['stack']:>5} {r['shared']:>6} {r['seconds']:>5}  {r['key']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="SM versions (90: H100/H200, 80: A100)")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    ap.add_argument("--json", help="write every result row here")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = run(tuple(a.arch), a.jobs)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = failures(rows)
    n = len(rows)
    print(f"\n{n - len(bad)} of {n} launch variants pass (sm_{', sm_'.join(map(str, a.arch))}; "
          f"stack bound {MAX_STACK_BYTES} B for float32 accumulation) in {time.perf_counter() - t0:.0f} s")
    for r, why in bad:
        print(f"FAIL sm{r['arch']} {r['key']}: {why}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
