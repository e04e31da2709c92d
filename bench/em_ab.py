"""Two versions of the CPU E-step kernel side by side, alternated call by call in one process.

This machine's neighbours slow whole seconds of it down (the same call takes 40 to 60 ms from
one minute to the next), so two builds timed one after the other cannot be compared; here each
version of csrc/cpu/kernels.inc (a git revision, or the working tree) is compiled into its own
namespace of one C++ program, which calls their float64 E-step (``em``, one thread) in turn on
the same data, round after round, and reports each one's min / quartile / median.  It also says
whether their sums agree bit for bit.

    python bench/em_ab.py HEAD WORKTREE                    # diag, the bench's problem, rows grouped
    python bench/em_ab.py HEAD~3 HEAD WORKTREE --cov full --rows random --rounds 40

Rows: ``random`` (the data as drawn), ``grouped`` (the order em_stats' regroup returns, read
through Problem::order, as GaussianMixture.fit's later E-steps do) or ``sorted`` (the rows copied
in that order). The data and parameters are bench_em.problem's (N = 200,000, D = 16, K = 64).
Needs g++ with AVX2 (the avx2 build of the kernels) and the versions' problem.h to match the
working tree's (the program is compiled against the working tree's).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TU = """#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>
#include <immintrin.h>
#include "cpu/problem.h"
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2")
#define FGD_NS {ns}
#define FGD_VBYTES 32
#include "{inc}"
#pragma GCC pop_options
"""

MAIN = r"""#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include "cpu/problem.h"
namespace fastgmmdiff { namespace cpu { DECLS } }
using namespace fastgmmdiff::cpu;
typedef void (*EmF)(const Problem<double>&, double*, double*, int64_t, int64_t);
typedef void (*CF)(const double*, const double*, int, int64_t, int64_t, int64_t, double*, double*);
struct Var { const char* name; EmF em; CF consts; };
static Var vars[] = { TABLE };
template <typename T> static std::vector<T> load(const std::string& f, size_t n) {
  std::vector<T> v(n);
  FILE* fp = std::fopen(f.c_str(), "rb");
  if (!fp || std::fread(v.data(), sizeof(T), n, fp) != n) { std::perror(f.c_str()); std::exit(1); }
  std::fclose(fp);
  return v;
}
int main(int argc, char** argv) {
  const std::string dir = argv[1];
  const int cov = std::atoi(argv[2]), rounds = std::atoi(argv[3]);
  const bool ordered = std::atoi(argv[4]) != 0;
  const int64_t N = std::atoll(argv[5]), K = std::atoll(argv[6]), D = std::atoll(argv[7]);
  auto X = load<double>(dir + "/x.bin", N * D), m = load<double>(dir + "/means.bin", K * D);
  auto U = load<double>(dir + "/prec.bin", cov == DIAG ? K * D : cov == SPHERICAL ? K : K * D * D);
  auto lg = load<double>(dir + "/logits.bin", K);
  auto ord = load<int64_t>(dir + "/order.bin", N);
  const int nv = sizeof(vars) / sizeof(vars[0]);
  const int64_t tiles = (N + 63) / 64, per = K + K * D + (cov == DIAG ? K * D : cov == SPHERICAL ? K : K * D * D) + 1;
  std::vector<std::vector<double>> ts(nv), outs(nv);
  for (int r = 0; r <= rounds; ++r)
    for (int v = 0; v < nv; ++v) {
      std::vector<double> a(K), lse(1);
      vars[v].consts(lg.data(), U.data(), cov, 1, K, D, a.data(), lse.data());
      Problem<double> p{1, 1, N, K, D, cov, X.data(), m.data(), U.data(), a.data()};
      if (ordered) p.order = ord.data();
      std::vector<double> acc(per, 0.0);
      const auto t0 = std::chrono::steady_clock::now();
      vars[v].em(p, acc.data(), acc.data() + per - 1, 0, tiles);
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (r == 0) outs[v] = acc;  // round 0 warms up
      else ts[v].push_back(t);
    }
  std::printf("| version | min ms | 25%% ms | median ms | sums against the first |\n|---|---|---|---|---|\n");
  for (int v = 0; v < nv; ++v) {
    auto s = ts[v];
    std::sort(s.begin(), s.end());
    double worst = 0;
    for (int64_t i = 0; i < per; ++i) {
      const double d = std::fabs(outs[v][i] - outs[0][i]) / std::max(1.0, std::fabs(outs[0][i]));
      if (!(d <= worst)) worst = d;  // NaN too
    }
    char agree[64];
    if (worst == 0) std::snprintf(agree, sizeof agree, "same bits");
    else std::snprintf(agree, sizeof agree, "%.2g relative (worst element)", worst);
    std::printf("| %s | %.2f | %.2f | %.2f | %s |\n", vars[v].name, 1e3 * s[0], 1e3 * s[s.size() / 4],
                1e3 * s[s.size() / 2], agree);
  }
}
"""


def kernel_source(rev: str, dst: str) -> None:
    """csrc/cpu/kernels.inc of git revision ``rev`` (``WORKTREE``: the file as it is) into dst."""
    if rev == "WORKTREE":
        with open(os.path.join(ROOT, "csrc/cpu/kernels.inc"), "rb") as f:
            text = f.read()
    else:
        text = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:csrc/cpu/kernels.inc"], check=True,
                              capture_output=True).stdout
    with open(dst, "wb") as f:
        f.write(text)


def build(revs: list[str], tmp: str) -> str:
    objs, decls, table, procs = [], [], [], []
    for i, rev in enumerate(revs):
        ns = f"ab{i}"
        inc = os.path.join(tmp, f"{ns}.inc")
        kernel_source(rev, inc)
        tu = os.path.join(tmp, f"{ns}.cpp")
        with open(tu, "w") as f:
            f.write(TU.format(ns=ns, inc=inc))
        obj = tu[:-4] + ".o"
        procs.append(subprocess.Popen(["g++", "-O3", "-std=c++17", "-fopenmp", "-ffp-contract=fast", "-DNDEBUG",
                                       "-w", f"-I{ROOT}/csrc", "-c", tu, "-o", obj]))
        objs.append(obj)
        decls.append(f"FASTGMMDIFF_DECLARE_KERNELS({ns})")
        table.append(f'{{"{rev}", {ns}::em, {ns}::consts}}')
    main = os.path.join(tmp, "main.cpp")
    with open(main, "w") as f:
        f.write(MAIN.replace("DECLS", " ".join(decls)).replace("TABLE", ", ".join(table)))
    subprocess.run(["g++", "-O2", "-std=c++17", "-w", f"-I{ROOT}/csrc", "-c", main, "-o", main[:-4] + ".o"],
                   check=True)
    for p in procs:
        if p.wait() != 0:
            sys.exit("compiling a kernel version failed")
    exe = os.path.join(tmp, "em_ab")
    subprocess.run(["g++", "-fopenmp", main[:-4] + ".o", *objs, "-o", exe], check=True)
    return exe


def write_problem(cov: str, rows: str, tmp: str) -> tuple[int, int, int]:
    import torch

    sys.path.insert(0, HERE)
    from bench_em import problem

    import fastgmmdiff  # noqa: F401  (em_stats, for the grouped order)
    from fastgmmdiff import convert

    X, kw = problem(cov, np.float64)
    x = torch.from_numpy(X)
    means = torch.from_numpy(kw["means_init"])
    U = convert.precision_to_prec_chol(torch.from_numpy(np.asarray(kw["precisions_init"])), cov)
    logits = torch.from_numpy(np.log(kw["weights_init"]))
    order = torch.ops.fastgmmdiff.em_stats(x, means, U, logits, cov, None, True)[4]
    if rows == "sorted":
        x = x[order]
    for name, t in (("x", x), ("means", means), ("prec", U), ("logits", logits), ("order", order)):
        t.contiguous().numpy().tofile(os.path.join(tmp, f"{name}.bin"))
    return x.shape[0], means.shape[0], means.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("revs", nargs="+", help="git revisions of csrc/cpu/kernels.inc, or WORKTREE")
    ap.add_argument("--cov", default="diag", choices=("diag", "spherical", "full"))
    ap.add_argument("--rows", default="grouped", choices=("random", "grouped", "sorted"))
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(a.revs, tmp)
        n, k, d = write_problem(a.cov, a.rows, tmp)
        cov = {"diag": 0, "spherical": 1, "full": 2}[a.cov]
        print(f"float64 E-step, one thread, {a.cov}, N = {n}, K = {k}, D = {d}, rows {a.rows}, "
              f"{a.rounds} alternated rounds")
        sys.stdout.flush()
        subprocess.run([exe, tmp, str(cov), str(a.rounds), str(int(a.rows == "grouped")), str(n), str(k), str(d)],
                       check=True)


if __name__ == "__main__":
    main()
