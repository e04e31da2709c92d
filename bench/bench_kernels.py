"""pytest-benchmark suite: every fastgmmdiff backend against the naive peers on the named
workloads of PERF.md, forward and forward+backward, for gmm_log_prob and ngmg_loss.

    bash scripts/bench.sh                       # CPU suite (a few minutes), JSON + table + plot
    python -m pytest bench --benchmark-only     # the same, by hand

With ``--benchmark-disable`` (the test suite) every case runs once at tiny sizes, the GPU
workloads on CPU tensors and the Triton backend under its CPU interpreter too, so that the
benchmark code a GPU run depends on has run before it gets there.

Each case is first checked against the float64 reference (fastgmmdiff.testing tolerances): a
fastgmmdiff backend outside them fails; a peer outside them is timed and flagged in the
results (its error is in extra_info).  On CUDA the timed callable ends with a synchronize and
peak memory is recorded; cases whose naive intermediates would not fit are skipped.
"""

from __future__ import annotations

import pytest
import torch

from workloads import (ARGS, OPS, WORKLOADS, check, implementations, make_inputs, peak_elems_naive,
                       quick, within_tolerance)

DEVICES = ["cpu", "cuda"]
IMPLS = ["fgd-torch", "fgd-cpu", "fgd-cuda", "fgd-triton", "naive", "matmul", "compile",
         "distributions", "sklearn", "pykeops"]


def _cases():
    for dev in DEVICES:
        for w in WORKLOADS.values():
            if w.device not in ("any", dev) and not (w.device == "cuda" and dev == "cpu"):
                continue
            for op in OPS.get(w.name, ("log_prob", "ngmg")):
                for pass_ in ("fwd", "fwdbwd"):
                    for impl in IMPLS:
                        yield pytest.param(dev, w.name, op, pass_, impl,
                                           id=f"{dev}-{w.name}-{op}-{pass_}-{impl}")


def _skip_reason(dev, w, op, pass_, impl):
    if dev == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    if w.device == "cuda" and dev == "cpu" and not quick():
        return "a GPU workload: on CPU only in quick mode (--benchmark-disable), at tiny sizes"
    if impl == "pykeops":
        try:
            import pykeops  # noqa: F401
        except ImportError:
            return "pykeops not installed"
    impls = implementations(dev)
    if impl not in impls:
        return f"{impl} does not run on {dev} here"
    if impl == "sklearn" and (op != "log_prob" or pass_ != "fwd" or w.G is not None):
        return "scikit-learn: forward log-density of one mixture only"
    if impl == "matmul" and w.cov == "full" and not quick() and w.N * w.K * w.D > 2**31:
        return "matmul expansion materialises N·K·D for full covariance"
    if not quick() and impl == "fgd-torch" and w.name in ("diag-large", "full", "full-xl"):
        return "the torch backend is the fallback, not a contender at this size (minutes per call)"
    if not quick() and impl == "fgd-cuda" and w.name == "full-xl":
        return "the CUDA backend is the latency path; full-xl is the Triton backend's workload"
    if impl == "distributions" and w.target and op == "ngmg":
        return "torch.distributions has no per-point component selection"
    if impl in ("naive", "compile", "distributions") and not quick():
        need = peak_elems_naive(w) * 4 * (3 if pass_ == "fwdbwd" else 1)
        budget = (torch.cuda.mem_get_info()[0] if dev == "cuda" else 8 << 30) * 0.8
        if need > budget:
            return f"N·K·D intermediates need ~{need / 2**30:.0f} GiB"
    return None


@pytest.mark.parametrize("dev,wname,op,pass_,impl", list(_cases()))
def test_kernel(benchmark, dev, wname, op, pass_, impl):
    w = WORKLOADS[wname]
    reason = _skip_reason(dev, w, op, pass_, impl)
    if reason:
        pytest.skip(reason)
    fns = implementations(dev)[impl]()
    if op not in fns:
        pytest.skip(f"{impl} has no {op}")
    fn = fns[op]
    p = make_inputs(w, dev, requires_grad=(pass_ == "fwdbwd"))
    if impl == "sklearn":
        run_sk = fn(p, w.cov)
        from workloads import reference_value
        from fastgmmdiff.testing import elementwise_error

        ref, _ = reference_value(w, op, p)
        errs = {"value": elementwise_error(run_sk(), ref)}
        benchmark.extra_info.update(errors=errs, within_tolerance=within_tolerance(errs))
        benchmark(run_sk)
        return
    try:
        errs = check(w, op, fn, p, pass_)
    except NotImplementedError as e:
        pytest.skip(str(e))
    ok = within_tolerance(errs)
    benchmark.extra_info.update(errors=errs, within_tolerance=ok, device=dev,
                                card=torch.cuda.get_device_name() if dev == "cuda" else "cpu")
    if impl.startswith("fgd-"):
        assert ok, f"{impl} outside tolerance on {wname}/{op}: {errs}"

    params = [p[k] for k in ARGS if p[k].requires_grad]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                fn(p, w.cov)
            sync()
    else:
        def run():
            out = fn(p, w.cov)
            torch.autograd.grad(out.sum(), params, allow_unused=True)
            sync()

    if dev == "cuda":
        run()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    benchmark(run)
    if dev == "cuda":
        benchmark.extra_info["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
