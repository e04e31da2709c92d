"""pytest-benchmark: a mixture-density network's loss head, ``MixtureOfGaussians`` against
``torch.distributions.MixtureSameFamily`` (PERF.md "MDN head"): −log p(y_b) of one point per
mixture, B mixtures of K diagonal components in D dimensions, forward and forward+backward
(gradients to logits, loc and scale, as a network's head needs).  Both built per call with
``validate_args=False``, as in a training step.

    python -m pytest bench/bench_mdn.py --benchmark-only          # B = 4096, K = 8, D = 2 and 16
    bash scripts/bench.sh -k mdn-head                              # with the table

Each case is first checked against MixtureSameFamily in float64 (1e-5 values, 1e-4 gradients,
relative); under ``--benchmark-disable`` (the test suite) the sizes are tiny.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributions as tdist

from fastgmmdiff import _dispatch
from fastgmmdiff.distributions import MixtureOfGaussians
from fastgmmdiff.testing import bars, elementwise_error
from workloads import quick

SIZES = [(4096, 8, 2), (4096, 8, 16)]
IMPLS = ["fgd-cpu", "fgd-torch", "fgd-cuda", "fgd-triton", "distributions"]


def _head(impl):
    if impl == "distributions":
        def run(logits, loc, scale, y):
            comp = tdist.Independent(tdist.Normal(loc, scale, validate_args=False), 1, validate_args=False)
            mix = tdist.MixtureSameFamily(tdist.Categorical(logits=logits, validate_args=False), comp,
                                          validate_args=False)
            return -mix.log_prob(y).mean()
    else:
        backend = impl.removeprefix("fgd-")

        def run(logits, loc, scale, y):
            return -MixtureOfGaussians(logits, loc, scale=scale, validate_args=False, backend=backend).log_prob(y).mean()
    return run


def _inputs(B, K, D, dev, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = dict(logits=torch.randn(B, K, generator=g), loc=torch.randn(B, K, D, generator=g),
             scale=0.3 + torch.rand(B, K, D, generator=g), y=torch.randn(B, D, generator=g))
    return {k: v.to(dev, dtype).requires_grad_(k != "y") for k, v in t.items()}


@pytest.mark.parametrize("dev", ["cpu", "cuda"])
@pytest.mark.parametrize("pass_", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,K,D", SIZES, ids=[f"B{b}-K{k}-D{d}" for b, k, d in SIZES])
def test_mdn_head(benchmark, dev, pass_, impl, B, K, D):
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if impl.startswith("fgd-"):
        name = impl.removeprefix("fgd-")
        reason = _dispatch.unavailable_reason(name)
        types = _dispatch._REGISTRY[name].device_types
        if reason is None and types is not None and dev not in types:
            reason = f"does not run {dev} tensors"
        if reason:
            pytest.skip(reason)
    if quick():
        B = 33
    run = _head(impl)
    p = _inputs(B, K, D, dev)
    leaves = [p["logits"], p["loc"], p["scale"]]
    # accuracy first, against MixtureSameFamily in float64
    p64 = {k: v.detach().double().requires_grad_(k != "y") for k, v in p.items()}
    ref = _head("distributions")(**p64)
    ref_g = torch.autograd.grad(ref, [p64["logits"], p64["loc"], p64["scale"]])
    out = run(**p)
    out_g = torch.autograd.grad(out, leaves)
    errs = {"value": elementwise_error(out, ref), **{f"grad_{n}": elementwise_error(a, b) for n, a, b in
                                            zip(("logits", "loc", "scale"), out_g, ref_g)}}
    benchmark.extra_info.update(errors=errs, device=dev)
    if impl.startswith("fgd-"):
        bar = bars(out.dtype)
        assert errs["value"] <= bar.value and max(v for k, v in errs.items() if k != "value") <= bar.grad, errs
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                run(**p)
            sync()
    else:
        def step():
            torch.autograd.grad(run(**p), leaves)
            sync()
    benchmark(step)


def round_robin(sizes=SIZES, reps: int = 300, impl: str = "fgd-cpu"):
    """fwd+bwd of ``impl`` and MixtureSameFamily alternated call by call (order flipped every
    round), medians of each: steadier than two separate timings on a noisy machine."""
    import statistics
    import time

    rows = []
    for B, K, D in sizes:
        p = _inputs(B, K, D, "cpu")
        leaves = [p["logits"], p["loc"], p["scale"]]
        runs = {name: _head(name) for name in (impl, "distributions")}
        ts = {name: [] for name in runs}
        for i in range(reps + 20):
            for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                t0 = time.perf_counter()
                torch.autograd.grad(runs[name](**p), leaves)
                if i >= 20:
                    ts[name].append(time.perf_counter() - t0)
        m = {k: statistics.median(v) * 1e3 for k, v in ts.items()}
        rows.append((B, K, D, m[impl], m["distributions"], m["distributions"] / m[impl]))
    print(f"| B | K | D | {impl} fwd+bwd ms | MixtureSameFamily ms | ratio |")
    print("|---|---|---|---|---|---|")
    for B, K, D, a, b, r in rows:
        print(f"| {B} | {K} | {D} | {a:.3f} | {b:.3f} | {r:.2f}× |")
    return rows


if __name__ == "__main__":
    round_robin()
