"""EM for ``GaussianMixture.fit``: the E-step's sufficient statistics from the fused kernels,
scikit-learn's M-step, initialisation (k-means++, k-means, random, random_from_data), and the
all-reduce that makes it distributed.

The E-step.  The gradient of Σ_n log p(x_n) with respect to the parameters is a sum over points
of responsibility-weighted terms (SPEC §1) — exactly the statistics EM needs, which the fused
backward of every backend computes without an N×K array:

    ∂/∂logits_k = N_k − π_k N                       (N_k = Σ_n r_nk)
    ∂/∂μ_k      = Λ_k S1_k                          (S1_k = Σ_n r_nk z_nk, z = x − μ_k)
    ∂/∂s_kd     = N_k/s_kd − s_kd S2_kd              (diag: S2_kd = Σ_n r_nk z²_nkd)
    ∂/∂s_k      = D N_k/s_k − s_k S2_k               (spherical: S2_k = Σ_n r_nk ‖z_nk‖²)
    ∂/∂U_k      = triu(diag(N_k/U_k,dd) − M_k U_k)   (full: M_k = Σ_n r_nk z zᵀ; tied: U shared,
                                                     N and M summed over k)

so one forward (log p, which the backward needs) and one backward over the data give N_k, S1,
S2 or M about the current means, and Σ log p, in the data's dtype (float64 for float64 data).
M is recovered from the upper triangle of M U: with Y = Uᵀ M U (symmetric),
triu(Uᵀ triu(M U)) = triu(Y), then M = U⁻ᵀ Y U⁻¹.  The sums are linear in the points, so chunks
of the data (``chunk_size``) and processes (``torch.distributed``) add their raw gradients and
counts, and the recovery runs once on the totals.

On the ``cpu`` backend (CPU parameters, float32/float64 data) the E-step is instead the
kernels' one fused pass, ``fastgmmdiff::em_stats`` (csrc/cpu/kernels.inc em64_impl for
float64 data, em_impl for float32): per tile of points every component's ℓ, the
responsibilities as their softmax (max and sum: one exp per point and component), and N_k,
S1, S2 (diag/spherical) or M = Σ r z zᵀ (full/tied) about each component's mean, added in
float64 — no forward/backward pair, no ∂x (``_e_step_fused``).  For float32 data the kernel
sums the whitened Y = Σ r y yᵀ (y = Uᵀz) and M = U⁻ᵀ Y U⁻¹ is formed here in float64, so that
every entry of M keeps its own relative accuracy.  Responsibilities below e^−100 of a point's
largest term are 0 there (float32: below e^−87.3, where its exp flushes), and the sums run over
the pairs above that only: what is left out of any N_k is under N · 3.7e−44, below half an ulp
of the 10·eps the M-step adds, for N up to 10¹².  The first E-step of a fit also returns an
order of each chunk's rows grouped by their most likely component (within windows of about 2 MB
of rows); the later ones take the rows in that order, so that a tile's points reach the same
few components and the kernel skips the softmax and sums of the others (``groups``): speed
only, the statistics are the same up to rounding.  float64 data only (``_e_step_fused`` says
why not float32 yet).

The M-step is scikit-learn's (``sklearn.mixture._gaussian_mixture``): n_k = N_k + 10·eps,
μ = Σ r x / n_k, covariances with ``reg_covar`` on the diagonal, weights n_k / Σ n_k, the
precision Cholesky factor from the covariance's Cholesky factor — written about the old means
(Σ r (x − μ)(x − μ)ᵀ = M − e S1ᵀ − S1 eᵀ + N_k e eᵀ, e = μ_new − μ_old), which is the same
number without E[x²] − μ²'s cancellation.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import convert, functional

ESTIMATE_PRECISION_ERROR = (
    "Fitting the mixture model failed because some components have ill-defined empirical covariance "
    "(for instance caused by singleton or collapsed samples). Try to decrease the number of components, "
    "increase reg_covar, or scale the input data.")


# --- distributed --------------------------------------------------------------------------------


def dist_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_sum(*tensors: Tensor) -> None:
    """In place: the sum over processes (nothing without torch.distributed)."""
    if not dist_active():
        return
    for t in tensors:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


# --- the E-step from the kernels ----------------------------------------------------------------


class Stats(NamedTuple):
    """Σ over every point (every chunk and process): Σ log p, N_k, S1 = Σ r z, S2 (diag: Σ r z²
    per d; spherical: Σ r ‖z‖²) or M = Σ r z zᵀ (full: per k; tied: summed over k), z about the
    means the E-step ran with."""
    sum_logp: Tensor
    n: int
    Nk: Tensor
    S1: Tensor
    S2: Tensor


def rows_for(chunk_size: Optional[int], K: int) -> int:
    """Rows per chunk where a [C, K] array is formed (initialisation, predictions): the given
    ``chunk_size``, or about 4M elements' worth."""
    return chunk_size or max(1024, (1 << 22) // max(K, 1))


def chunks(X: Tensor, chunk_size: Optional[int], device):
    """X in row chunks of ``chunk_size`` (all of it: None), each moved to ``device``."""
    N = X.shape[0]
    step = N if not chunk_size else chunk_size
    for i in range(0, N, max(step, 1)):
        yield X[i:i + step].to(device, non_blocking=True)


def e_step(X: Tensor, means: Tensor, prec_chol: Tensor, logits: Tensor, cov: str, *, backend: str = "auto",
           chunk_size: Optional[int] = None, groups: Optional[dict] = None) -> Stats:
    """The E-step's statistics (module docstring) for the local X [N, D] and, under
    torch.distributed, every process's; parameters are the current ones (no G axis).

    ``groups``: a dict the caller keeps over the E-steps of one fit (the same X and
    ``chunk_size``); the fused CPU E-step keeps there, per chunk, an order of its rows grouped by
    their most likely component at the first E-step, and takes the rows in that order on the
    later ones (``_e_step_fused``).  Speed only: the statistics are the same up to rounding."""
    dt = X.dtype  # the kernels run in the data's dtype; the statistics come back in the parameters'
    dev = means.device
    if _fused(backend, dev, dt):
        return _e_step_fused(X, means, prec_chol, logits, cov, chunk_size, groups)
    params = [t.detach().to(dt).requires_grad_() for t in (means, prec_chol, logits)]
    raw = [torch.zeros_like(p) for p in params]
    sum_logp = torch.zeros((), dtype=torch.float64, device=dev)
    n = 0
    for xc in chunks(X, chunk_size, dev):
        if xc.shape[0] == 0:
            continue
        with torch.enable_grad():
            lp = functional._log_prob(xc, params[0], params[1], params[2], cov, backend=backend)
            grads = torch.autograd.grad(lp.sum(), params)
        for r, g in zip(raw, grads):
            r += g
        sum_logp += lp.detach().sum(dtype=torch.float64)
        n += xc.shape[0]
    n_all = torch.tensor([float(n)], dtype=means.dtype, device=dev)
    raw = [r.to(means.dtype) for r in raw]
    sum_logp = sum_logp.to(means.dtype)
    all_sum(sum_logp, n_all, *raw)
    return recover(raw, int(n_all.item()), sum_logp, means.detach(), prec_chol.detach(), logits.detach(), cov)


def _fused(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the E-step runs as the CPU kernels' one fused pass (``fastgmmdiff::em_stats``):
    CPU parameters, float32/float64 data, and ``backend`` "cpu", or "auto" where it picks "cpu"."""
    from . import _dispatch

    if device.type != "cpu" or dtype not in (torch.float32, torch.float64) or backend not in ("auto", "cpu"):
        return False
    return _dispatch.resolve(backend, device).name == "cpu"


def _e_step_fused(X: Tensor, means: Tensor, prec_chol: Tensor, logits: Tensor, cov: str,
                  chunk_size: Optional[int], groups: Optional[dict] = None) -> Stats:
    """e_step on the CPU kernels' fused E-step (one pass over each chunk: ℓ of every component,
    the responsibilities as their softmax, and the sums about the current means in float64;
    no gradients, no N×K array).  tied runs as full with its factor shared by the components,
    and its M summed over them.

    With ``groups`` (e_step's), the kernel's tiles take each chunk's rows grouped by their most
    likely component, as the first E-step found them (the kernel's regroup): a tile's 64 points
    then reach the same few components, and the kernel skips the softmax and the sums of every
    component no point of the tile reaches (data in random order leave few such: with K = 64 in
    D = 16 a point reaches about a fifth of the components, but 64 random points reach almost
    all of them)."""
    dt, dev = X.dtype, means.device
    if dt != torch.float64:
        # float32 keeps the rows as they are: grouped, its full fit was 25% faster (diag 7%), but
        # its tile sums' float32 rounding moved, and the float32 breast-cancer full fit's
        # predict_proba went from 6.6e-5 to 1.005e-4 of scikit-learn's (bar 1e-4; at three other
        # random states of eight the ungrouped fit is over it too: that bar is at float32's own
        # limit; bench/RESULTS.md)
        groups = None
    K, D = means.shape
    U = prec_chol.detach()
    kernel_cov = "full" if cov == "tied" else cov
    if cov == "tied":
        U = U.expand(K, D, D)
    args = [t.detach().to(dt).contiguous() for t in (means, U, logits)]
    acc = None
    n = 0
    for i, xc in enumerate(chunks(X, chunk_size, dev)):
        if xc.shape[0] == 0:
            continue
        order = None if groups is None else groups.get(i)
        regroup = groups is not None and order is None
        *part, nxt = torch.ops.fastgmmdiff.em_stats(xc.contiguous(), *args, kernel_cov, order, regroup)
        if regroup:
            groups[i] = nxt
        acc = list(part) if acc is None else [a + b for a, b in zip(acc, part)]
        n += xc.shape[0]
    if acc is None:
        z = torch.zeros((), dtype=torch.float64)
        acc = [z, torch.zeros(K, dtype=torch.float64), torch.zeros(K, D, dtype=torch.float64),
               torch.zeros((K, D) if cov == "diag" else (K,) if cov == "spherical" else (K, D, D), dtype=torch.float64)]
    if kernel_cov == "full":  # upper triangles of M = Σ r z zᵀ (float64 data) or the whitened Y
        Su = acc[3].triu()
        if cov == "tied":  # summed over the components (float32: their shared U)
            Su = Su.sum(0)
        # float32: unwhitened in float64 with U as the kernel used it (rounded to float32)
        acc[3] = _symmetric(Su) if dt == torch.float64 else _unwhiten(prec_chol.detach().to(dt).double(), Su)
    sum_logp, Nk, S1, S2 = (a.to(means.dtype) for a in acc)
    n_all = torch.tensor([float(n)], dtype=means.dtype, device=dev)
    all_sum(sum_logp, n_all, Nk, S1, S2)
    return Stats(sum_logp, int(n_all.item()), Nk, S1, S2)


def _lower_inv_t(U: Tensor, B: Tensor) -> Tensor:
    """U⁻ᵀ B for upper triangular U (batched)."""
    return torch.linalg.solve_triangular(U.transpose(-1, -2), B, upper=False)


def _symmetric(Au: Tensor) -> Tensor:
    """The symmetric matrix whose upper triangle is Au's (batched)."""
    return Au + Au.transpose(-1, -2) - torch.diag_embed(torch.diagonal(Au, dim1=-2, dim2=-1))


def _unwhiten(U: Tensor, Yu: Tensor) -> Tensor:
    """M = U⁻ᵀ Y U⁻¹ (symmetric) from the upper triangle Yu of the symmetric Y = Uᵀ M U."""
    Y = _symmetric(Yu)
    B = _lower_inv_t(U, Y)  # U⁻ᵀ Y
    M = _lower_inv_t(U, B.transpose(-1, -2)).transpose(-1, -2)  # U⁻ᵀ Y U⁻¹
    return 0.5 * (M + M.transpose(-1, -2))


def recover(raw, n: int, sum_logp: Tensor, means: Tensor, U: Tensor, logits: Tensor, cov: str) -> Stats:
    """N_k, S1 and S2/M from the summed gradients ``raw`` = (∂means, ∂prec_chol, ∂logits)."""
    gm, gU, gl = raw
    D = means.shape[-1]
    Nk = gl + torch.softmax(logits, -1) * n
    if cov in ("diag", "spherical"):
        s = U if cov == "diag" else U[:, None]
        S1 = gm / (s * s)
        if cov == "diag":
            S2 = (Nk[:, None] / U - gU) / U
        else:
            S2 = (D * Nk / U - gU) / U
        return Stats(sum_logp, n, Nk, S1, S2)
    Us = U if cov == "full" else U.expand(means.shape[0], D, D)
    S1 = _lower_inv_t(Us, torch.linalg.solve_triangular(Us, gm[..., None], upper=True))[..., 0]  # Λ⁻¹ ∂μ
    W = Nk if cov == "full" else Nk.sum()
    diag = torch.diagonal(U, dim1=-2, dim2=-1)
    MU = (torch.diag_embed(W[..., None] / diag) - gU).triu()  # triu(M U)
    Yu = (U.transpose(-1, -2) @ MU).triu()  # triu(Uᵀ M U)
    return Stats(sum_logp, n, Nk, S1, _unwhiten(U, Yu))


# --- the M-step ---------------------------------------------------------------------------------


class Params(NamedTuple):
    weights: Tensor  # [K]
    means: Tensor  # [K, D]
    covariances: Tensor  # diag [K, D], spherical [K], full [K, D, D], tied [D, D]
    prec_chol: Tensor  # same shapes: 1/σ or the upper factor U with Λ = U Uᵀ


def m_step(st: Stats, means: Tensor, cov: str, reg_covar: float, eps: float) -> Params:
    """scikit-learn's M-step from the statistics about ``means`` (module docstring); ``eps``: the
    data dtype's machine epsilon (n_k = N_k + 10·eps)."""
    nk = st.Nk + 10 * eps
    new_means = (st.Nk[:, None] * means + st.S1) / nk[:, None]
    e = new_means - means
    # scikit-learn's diag/spherical/tied formulas are Σ r x²/n_k − μ² (Σ r x xᵀ − n_k μ μᵀ): with
    # n_k = N_k + ε that is (Σ r (x − μ)² + ε μ²)/n_k — the same number, without the cancellation
    tiny = 10 * eps * new_means * new_means
    if cov == "diag" or cov == "spherical":
        if cov == "diag":
            c = (st.S2 - 2 * e * st.S1 + st.Nk[:, None] * e * e + tiny) / nk[:, None] + reg_covar
        else:
            c = (st.S2 - 2 * (e * st.S1).sum(-1) + st.Nk * (e * e).sum(-1) + tiny.sum(-1)) / nk / means.shape[-1] \
                + reg_covar
        return Params(nk / nk.sum(), new_means, c, precision_cholesky(c, cov))
    outer = e[:, :, None] * st.S1[:, None, :]
    scatter = -outer - outer.transpose(-1, -2) + st.Nk[:, None, None] * e[:, :, None] * e[:, None, :]
    D = means.shape[-1]
    eye = torch.eye(D, dtype=means.dtype, device=means.device)
    if cov == "full":
        c = (st.S2 + scatter) / nk[:, None, None] + reg_covar * eye
    else:
        tied_tiny = 10 * eps * new_means.T @ new_means
        c = (st.S2 + scatter.sum(0) + tied_tiny) / nk.sum() + reg_covar * eye
    c = 0.5 * (c + c.transpose(-1, -2))
    return Params(nk / nk.sum(), new_means, c, precision_cholesky(c, cov))


def precision_cholesky(covariances: Tensor, cov: str) -> Tensor:
    """scikit-learn's ``_compute_precision_cholesky`` (``convert.covariance_to_prec_chol``), with
    scikit-learn's error where a covariance is not positive definite."""
    try:
        return convert.covariance_to_prec_chol(covariances, cov)
    except ValueError:
        raise ValueError(ESTIMATE_PRECISION_ERROR) from None


# --- statistics of given responsibilities (initialisation) --------------------------------------


def params_from_resp(X: Tensor, resp_fn, K: int, cov: str, reg_covar: float, *, chunk_size: Optional[int],
                     device) -> Params:
    """scikit-learn's ``_estimate_gaussian_parameters`` for responsibilities given chunk by
    chunk (``resp_fn(i0, xc)`` → [C, K] for the rows from i0), two passes (means, then the
    scatter about them), summed over processes; weights are n_k, not normalised (as there).
    tied is scikit-learn's (Xᵀ X − Σ_k n_k μ_k μ_kᵀ) / Σ n_k, which assumes each row of resp sums
    to 1 — not so for the one-hot initialisations (random_from_data, k-means++), where it gives
    scikit-learn's (broad) starting covariance all the same."""
    D = X.shape[1]
    dt = torch.float64
    eps = torch.finfo(X.dtype).eps  # scikit-learn's n_k + 10·eps is in the data's dtype
    chunk_size = rows_for(chunk_size, K)
    nk = torch.zeros(K, dtype=dt, device=device)
    sx = torch.zeros(K, D, dtype=dt, device=device)
    i0 = 0
    for xc in chunks(X, chunk_size, device):
        r = resp_fn(i0, xc)
        xc = xc.to(dt)
        nk += r.sum(0)
        sx += r.T @ xc
        i0 += xc.shape[0]
    all_sum(nk, sx)
    nk = nk + 10 * eps
    means = sx / nk[:, None]
    if cov in ("diag", "spherical"):
        s2 = torch.zeros(K, D, dtype=dt, device=device)
    elif cov == "full":
        s2 = torch.zeros(K, D, D, dtype=dt, device=device)
    else:
        s2 = torch.zeros(D, D, dtype=dt, device=device)
    i0 = 0
    for xc in chunks(X, chunk_size, device):
        xc = xc.to(dt)
        if cov == "tied":  # scikit-learn's tied formula: Xᵀ X unweighted (rows of resp need not sum to 1)
            s2 += xc.T @ xc
            continue
        r = resp_fn(i0, xc)
        for k in range(K):
            z = xc - means[k]
            if cov in ("diag", "spherical"):
                s2[k] += r[:, k] @ (z * z)
            else:
                s2[k] += (z * r[:, k, None]).T @ z
        i0 += xc.shape[0]
    all_sum(s2)
    if cov == "tied":
        s2 = s2 - (nk * means.T) @ means
    eye = torch.eye(D, dtype=dt, device=device)
    if cov in ("diag", "spherical"):
        s2 = s2 + 10 * eps * means * means  # as in m_step: scikit-learn's Σ r x²/n_k − μ²
    if cov == "diag":
        c = s2 / nk[:, None] + reg_covar
    elif cov == "spherical":
        c = (s2 / nk[:, None] + reg_covar).mean(1)
    elif cov == "full":
        c = s2 / nk[:, None, None] + reg_covar * eye
    else:
        c = s2 / nk.sum() + reg_covar * eye
    return Params(nk, means, c, precision_cholesky(c, cov))


# --- k-means++ and k-means (initialisation) -----------------------------------------------------


def _sq_dist(xc: Tensor, centres: Tensor) -> Tensor:
    """‖x − c‖² [C, K], z formed before squaring for small K, the expansion otherwise (clamped
    at 0: k-means only compares them)."""
    if centres.shape[0] <= 8:
        return ((xc[:, None, :] - centres[None]) ** 2).sum(-1)
    d = (xc * xc).sum(1, keepdim=True) - 2 * xc @ centres.T + (centres * centres).sum(1)
    return d.clamp_min_(0)


def _offsets(n_local: int, device) -> tuple:
    """(this process's first global row, every process's row count)."""
    if not dist_active():
        return 0, [n_local]
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(sizes, torch.tensor([n_local], dtype=torch.int64, device=device))
    counts = [int(s) for s in sizes]
    return sum(counts[:torch.distributed.get_rank()]), counts


def _row(X: Tensor, g: int, counts, device) -> Tensor:
    """Global row g of the data spread over the processes (broadcast from its owner)."""
    if not dist_active():
        return X[g].to(device)
    owner, start = 0, 0
    while g >= start + counts[owner]:
        start += counts[owner]
        owner += 1
    buf = X[g - start].to(device) if torch.distributed.get_rank() == owner else \
        torch.empty(X.shape[1], dtype=X.dtype, device=device)
    torch.distributed.broadcast(buf, src=owner)
    return buf


def kmeans_plusplus(X: Tensor, K: int, rng, *, chunk_size: Optional[int], device) -> tuple:
    """k-means++ seeding (Arthur & Vassilvitskii): the first centre uniform over the points,
    each next one drawn with probability ∝ the squared distance to the nearest centre so far.
    ``rng`` is a numpy RandomState shared by every process (same draws everywhere); returns
    (centres [K, D], their global row indices)."""
    _, counts = _offsets(X.shape[0], device)
    n = sum(counts)
    chunk_size = rows_for(chunk_size, K)
    first = int(rng.randint(n))
    centres = [_row(X, first, counts, device)]
    idx = [first]
    best = None
    for _ in range(1, K):
        c = centres[-1][None]
        parts = []
        for xc in chunks(X, chunk_size, device):
            parts.append(_sq_dist(xc, c)[:, 0])
        d = torch.cat(parts) if parts else torch.zeros(0, dtype=X.dtype, device=device)
        best = d if best is None else torch.minimum(best, d)
        local = best.sum().reshape(1)
        totals = local.repeat(len(counts))
        if dist_active():
            totals = torch.zeros(len(counts), dtype=X.dtype, device=device)
            totals[torch.distributed.get_rank()] = local
            all_sum(totals)
        total = float(totals.sum())
        if total <= 0:  # fewer distinct points than K: any point not chosen yet
            g = next(i for i in range(n) if i not in idx)
        else:
            u = rng.uniform() * total
            cum = torch.cumsum(totals, 0)
            owner = min(int((cum <= u).sum()), len(counts) - 1)
            u_local = u - (float(cum[owner - 1]) if owner else 0.0)
            g_local = 0
            if not dist_active() or torch.distributed.get_rank() == owner:
                cl = torch.cumsum(best, 0)
                g_local = min(int((cl <= u_local).sum()), best.shape[0] - 1)
            if dist_active():
                t = torch.tensor([g_local], dtype=torch.int64, device=device)
                torch.distributed.broadcast(t, src=owner)
                g_local = int(t)
            g = sum(counts[:owner]) + g_local
        idx.append(g)
        centres.append(_row(X, g, counts, device))
    return torch.stack(centres), idx


def kmeans(X: Tensor, K: int, rng, *, chunk_size: Optional[int], device, max_iter: int = 300,
           tol: float = 1e-4) -> Tensor:
    """Lloyd's k-means from k-means++ seeds, summed over processes; stops when the centres move
    less than ``tol`` × the data's mean variance (scikit-learn's criterion).  Returns the
    centres [K, D]; ``assign`` gives the labels."""
    centres, _ = kmeans_plusplus(X, K, rng, chunk_size=chunk_size, device=device)
    chunk_size = rows_for(chunk_size, K)
    dt = X.dtype
    D = X.shape[1]
    s1 = torch.zeros(D, dtype=dt, device=device)
    s2 = torch.zeros(D, dtype=dt, device=device)
    for xc in chunks(X, chunk_size, device):
        s1 += xc.sum(0)
        s2 += (xc * xc).sum(0)
    cnt = torch.tensor([float(X.shape[0])], dtype=dt, device=device)
    all_sum(s1, s2, cnt)
    var = (s2 / cnt - (s1 / cnt) ** 2).clamp_min(0).mean()
    limit = float(tol * var)
    for _ in range(max_iter):
        sums = torch.zeros(K, D, dtype=dt, device=device)
        count = torch.zeros(K, dtype=dt, device=device)
        for xc in chunks(X, chunk_size, device):
            lab = _sq_dist(xc, centres).argmin(1)
            sums.index_add_(0, lab, xc)
            count.index_add_(0, lab, torch.ones_like(lab, dtype=dt))
        all_sum(sums, count)
        new = torch.where(count[:, None] > 0, sums / count.clamp_min(1)[:, None], centres)
        shift = float(((new - centres) ** 2).sum())
        centres = new
        if shift <= limit:
            break
    return centres


def assign(xc: Tensor, centres: Tensor) -> Tensor:
    return _sq_dist(xc, centres).argmin(1)


def one_hot(labels: Tensor, K: int, dtype) -> Tensor:
    return torch.nn.functional.one_hot(labels, K).to(dtype)


def n_parameters(cov: str, K: int, D: int) -> int:
    """scikit-learn's ``_n_parameters``: covariance, mean and weight parameters."""
    cov_params = {"full": K * D * (D + 1) / 2.0, "diag": K * D, "tied": D * (D + 1) / 2.0, "spherical": K}[cov]
    return int(cov_params + D * K + K - 1)


def log_resp_chunks(X: Tensor, means, prec_chol, logits, cov, chunk_size, device):
    """(ℓ_nk − log p_n) per chunk of X, [C, K] each: log responsibilities (predict_proba,
    predict), never all N×K at once unless asked for."""
    from ._torch_ops import component_log_prob

    cv = "full" if cov == "tied" else cov
    U = prec_chol.expand(means.shape[0], *prec_chol.shape) if cov == "tied" else prec_chol
    for xc in chunks(X, rows_for(chunk_size, means.shape[0]), device):
        ell = component_log_prob(xc[None], means[None], U[None], logits[None], cv)[0]
        yield ell - torch.logsumexp(ell, -1, keepdim=True)

