"""2-D t-SNE maps of one example's hidden states, one map per layer.

`tsne_maps` runs exact t-SNE (van der Maaten & Hinton 2008, with the optimiser of scikit-learn's
exact method: early exaggeration, momentum, per-parameter gains) with numba kernels that handle
one map per thread: the maps are independent, so the result is the same whatever the thread count.

Why this method (measured on the 2-core development machine, 13 maps x 250 points x 768 dims,
another process busy on one core):

| method                                   | time, 13 maps     | trustworthiness vs sklearn (k=5)  |
|------------------------------------------|-------------------|-----------------------------------|
| sklearn TSNE() default (Barnes-Hut)      | 1.26 s per map    | reference                         |
| openTSNE 1.0.4, FFT / Barnes-Hut, 2 jobs | 3.8 / 1.7 s/map   | -0.067 on a noise map             |
| previous batched torch version, 600 it.  | 5.9 s, one core   | about as below                    |
| this module, 400 iterations (100 early)  | 0.50 s one thread | clustered: mean +0.000, worst     |
|                                          | 0.32 s two        | -0.003; Gaussian noise: mean      |
|                                          | (600 pts: 2.4 s)  | +0.005, worst -0.014              |

Learning rate n / 48 (`_learning_rate`): scikit-learn's "auto" rule n / (4 x early exaggeration)
(Belkina et al. 2019: the step should grow with n; the 4 is the gradient's factor, here as in
sklearn) without its floor of 50, which sklearn applies to every map under 2400 points and offsets
with 1000 iterations. At 400 iterations that floor was too large a step for small maps (mean and
worst difference to sklearn over the maps, floor -> no floor): example_database2 (150 maps of about
48 points) -0.042 -0.098 -> +0.004 -0.025; Gaussian noise, 13 x 150 points: -0.042 -0.075 -> -0.001
-0.022; clustered, 13 x 30 / 50 / 100 points: -0.022 -0.075 / -0.018 -0.048 / -0.005 -0.038 ->
+0.003 -0.010 / +0.002 -0.004 / -0.000 -0.005; 250 and 600 points as good or better (noise, 250:
-0.017 -0.038 -> +0.005 -0.014), in the same time. Below 20 points single maps still differ by up to
0.1, as much as sklearn's own Barnes-Hut and exact results differ there. n / 24 and n / 12 were
about as good; 1000 iterations gained nothing once the rate fits.

Iterations, with the old learning rate 50 (clustered / noise, mean and worst difference to
sklearn): 600: +0.000 -0.003 / +0.004 -0.048; 500: +0.000 -0.001 / -0.002 -0.043; 400: +0.000 -0.004
/ -0.004 -0.030; 300: +0.000 -0.004 / -0.015 -0.032. 300 keeps within 0.02 on average but with little
margin, so 400 (with n / 48, 300 iterations lose 0.01 on noise too).
The exact O(n^2) gradient sums full rows (each pair twice) in float32: with no scattered writes
LLVM vectorises it (8 pairs per AVX2 instruction), about 2x faster than using the symmetry with
scalar code. Precisions come from a safeguarded Newton search (about 5 passes per point instead of
~25 for bisection).

torch is not used. numba compiles the kernels on first use, 10-30 s, and caches them next to this
module (or in NUMBA_CACHE_DIR, or numba's user cache directory where that is not writable); later
processes load them in about a second. `compile_in_background()` starts that work at start-up and
`wait_until_compiled(log)` says why the first map is slow when it is not done yet.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable, Optional

import numpy as np
import scipy.linalg
from numba import njit, prange, types
from threadpoolctl import threadpool_limits

PERPLEXITY = 30.0
EARLY_EXAGGERATION = 12.0

_TINY = 1e-12
# Reassociation lets LLVM vectorise the pair loop's sums; the code is the same on every call and
# every thread count, so results stay reproducible. No nnan/ninf: inputs are checked finite anyway.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


def tsne_maps(
    hidden: np.ndarray,
    seed: int = 0,
    *,
    n_iter: int = 400,
    n_early: int = 100,
    learning_rate: float | None = None,
) -> np.ndarray:
    """Embed each map's points in 2-D.

    hidden: (n_maps, n_points, dim) float, e.g. an example's hidden states
    (n_layers + 1, n_tokens, hidden). Returns float32 (n_maps, n_points, 2).

    Perplexity is 30, clipped to (n_points - 1) / 3 for small maps; the learning rate is
    n_points / 48 unless given (see the module docstring); maps of fewer than 4 points
    get their first two principal components instead (t-SNE means nothing there). Each map is
    rotated/reflected to line up with the previous one, so orientation stays steady across layers.
    Deterministic: the same input and seed give the same output, whatever the number of threads.
    `seed` seeds the tiny jitter added to the PCA initialisation, which separates identical points.
    """
    if learning_rate is not None and not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    x = np.asarray(hidden, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"hidden must be (n_maps, n_points, dim), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("hidden contains NaN or infinite values")
    n_maps, n, _ = x.shape
    if n_maps == 0 or n < 2:
        return np.zeros((n_maps, n, 2), dtype=np.float32)

    xc = x.astype(np.float64)
    xc -= xc.mean(axis=1, keepdims=True)
    # One BLAS thread: the same rounding whatever the machine's thread settings, and no stalls at
    # BLAS barriers on a busy machine (these are small matrices).
    with threadpool_limits(1, user_api="blas"):
        gram = np.ascontiguousarray(xc @ xc.transpose(0, 2, 1))
        init = _pca_init(gram)
    init /= np.maximum(init[:, :, :1].std(axis=1, keepdims=True), _TINY)
    if n < 4:
        y = init
    else:
        rng = np.random.default_rng(seed)
        y = init * 1e-4 + rng.normal(0.0, 1e-6, init.shape)
        perplexity = min(PERPLEXITY, (n - 1) / 3.0)
        lr = float(learning_rate) if learning_rate is not None else _learning_rate(n)
        p = _joint_probabilities(gram, np.log(perplexity)).astype(np.float32)
        # int / float casts: the argument types of the signatures that compile_in_background compiles.
        y = _optimise(p, np.ascontiguousarray(y), int(n_iter), int(n_early), lr, EARLY_EXAGGERATION)
    with threadpool_limits(1, user_api="blas"):
        return _align_to_previous(y).astype(np.float32)


def _learning_rate(n: int) -> float:
    """scikit-learn's "auto" learning rate n / (4 * early exaggeration), without its floor of 50
    (too large a step on small maps: see the module docstring)."""
    return n / EARLY_EXAGGERATION / 4


def _pca_init(gram: np.ndarray) -> np.ndarray:
    """First two principal components of each centred map from its Gram matrix, (B, n, 2).

    Signs fixed deterministically: each component's entry of largest magnitude is positive
    (ties: the first one).
    """
    n = gram.shape[1]
    comps = np.empty(gram.shape[:2] + (2,))
    for m, g in enumerate(gram):
        vals, vecs = scipy.linalg.eigh(g, subset_by_index=[n - 2, n - 1], driver="evr")  # ascending
        comps[m] = vecs[:, ::-1] * np.sqrt(np.maximum(vals[::-1], 0.0))
    idx = np.abs(comps).argmax(axis=1)[:, None, :]
    sign = np.sign(np.take_along_axis(comps, idx, axis=1))
    sign[sign == 0] = 1
    return comps * sign


@njit(parallel=True, cache=True, error_model="numpy")
def _joint_probabilities(gram, target_entropy):
    """Symmetric t-SNE input affinities P, (B, n, n) from Gram matrices; each map's P sums to 1.

    Conditional Gaussians over squared Euclidean distances, each point's precision found by a
    safeguarded Newton search in log space until the entropy is within 1e-5 of log(perplexity). Each row's
    distances are shifted by the nearest one and scaled by their mean (the conditional
    distribution is invariant to the shift), so one bracket of precisions fits all points.
    """
    n_maps, n, _ = gram.shape
    p = np.empty_like(gram)
    for m in prange(n_maps):
        g = gram[m]
        c = p[m]
        d = np.empty(n)
        for i in range(n):
            d_min = np.inf
            for j in range(n):
                d[j] = max(g[i, i] + g[j, j] - 2.0 * g[i, j], 0.0)
                if j != i and d[j] < d_min:
                    d_min = d[j]
            total = 0.0
            for j in range(n):
                d[j] -= d_min
                if j != i:
                    total += d[j]
            scale = max(total / (n - 1), _TINY)
            for j in range(n):
                d[j] /= scale
            # Safeguarded Newton on H(t), beta = exp(t): dH/dt = -beta^2 Var_w(d); bisection when
            # a step would leave the bracket [lo, hi] that holds the root.
            lo, hi, t = -20.0, 20.0, 0.0
            beta, sw = 1.0, 1.0
            for _ in range(64):
                beta = np.exp(t)
                sw, swd, swdd = 0.0, 0.0, 0.0
                for j in range(n):
                    if j != i:
                        w = np.exp(-d[j] * beta)
                        sw += w
                        swd += w * d[j]
                        swdd += w * d[j] * d[j]
                # The nearest neighbour has w = 1, so sw >= 1.
                mean = swd / sw
                error = np.log(sw) + beta * mean - target_entropy
                if abs(error) < 1e-5:
                    break
                if error > 0.0:  # too flat: precision must grow
                    lo = t
                else:
                    hi = t
                slope = beta * beta * max(swdd / sw - mean * mean, 0.0)
                step = t + error / slope if slope > 0.0 else lo - 1.0
                t = step if lo < step < hi else (lo + hi) / 2
            for j in range(n):
                c[i, j] = 0.0 if j == i else np.exp(-d[j] * beta) / sw
        # Rows sum to 1, so the symmetrised matrix sums to 2n.
        for i in range(n):
            c[i, i] = 0.0
            for j in range(i + 1, n):
                v = max((c[i, j] + c[j, i]) / (2.0 * n), _TINY)
                c[i, j] = v
                c[j, i] = v
    return p


@njit(parallel=True, cache=True)
def _optimise(p, y0, n_iter, n_early, learning_rate, exaggeration):
    """Gradient descent on KL(P || Q) for every map, one map per thread; y0 (B, n, 2) initialises."""
    y = np.empty_like(y0)
    for m in prange(y0.shape[0]):
        y[m] = _optimise_map(p[m], y0[m], n_iter, n_early, learning_rate, exaggeration)
    return y


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _optimise_map(p, y0, n_iter, n_early, learning_rate, exaggeration):
    """One map's optimisation; p (n, n) float32 with a zero diagonal, y0 (n, 2) float64.

    The pair sums run over full rows in float32 (both directions of each pair: no scattered
    writes, so LLVM vectorises them, 8 pairs per AVX2 instruction); coordinates, gains, updates and
    the per-row totals stay float64.
    """
    n = y0.shape[0]
    yx, yy = y0[:, 0].copy(), y0[:, 1].copy()
    fx, fy = np.empty(n, np.float32), np.empty(n, np.float32)
    ux, uy = np.zeros(n), np.zeros(n)
    gain_x, gain_y = np.ones(n), np.ones(n)
    ax, ay, rx, ry = np.empty(n), np.empty(n), np.empty(n), np.empty(n)
    zero, one = np.float32(0.0), np.float32(1.0)
    for it in range(n_iter):
        early = it < n_early
        exag = exaggeration if early else 1.0
        momentum = 0.5 if early else 0.8
        yx -= yx.mean()
        yy -= yy.mean()
        fx[:] = yx
        fy[:] = yy
        z = 0.0
        # Per point: sum_j p_ij q_ij (y_i - y_j) and sum_j q_ij^2 (y_i - y_j), q_ij = 1 / (1 + |y_i - y_j|^2).
        # j = i adds 0 to both and exactly 1 to Z, taken off below.
        for i in range(n):
            xi, yi = fx[i], fy[i]
            sax, say, srx, sry, sz = zero, zero, zero, zero, zero
            for j in range(n):
                dx = xi - fx[j]
                dy = yi - fy[j]
                q = one / (one + dx * dx + dy * dy)
                pq = p[i, j] * q
                qq = q * q
                sz += q
                sax += pq * dx
                say += pq * dy
                srx += qq * dx
                sry += qq * dy
            z += sz
            ax[i], ay[i], rx[i], ry[i] = sax, say, srx, sry
        inv_z = 1.0 / (z - n)
        # Gradient 4 sum_j (p_ij - q_ij / Z) q_ij (y_i - y_j); gains and momentum as scikit-learn's.
        for i in range(n):
            gx = 4.0 * (exag * ax[i] - rx[i] * inv_z)
            gy = 4.0 * (exag * ay[i] - ry[i] * inv_z)
            gain_x[i] = max(gain_x[i] + 0.2 if ux[i] * gx < 0.0 else gain_x[i] * 0.8, 0.01)
            gain_y[i] = max(gain_y[i] + 0.2 if uy[i] * gy < 0.0 else gain_y[i] * 0.8, 0.01)
            ux[i] = momentum * ux[i] - learning_rate * gain_x[i] * gx
            uy[i] = momentum * uy[i] - learning_rate * gain_y[i] * gy
            yx[i] += ux[i]
            yy[i] += uy[i]
    out = np.empty((n, 2))
    out[:, 0] = yx
    out[:, 1] = yy
    return out


def _align_to_previous(y: np.ndarray) -> np.ndarray:
    """Rotate/reflect each map (about its centre) to best match the previous map (Procrustes)."""
    y = y - y.mean(axis=1, keepdims=True)
    for m in range(1, y.shape[0]):
        u, _, vt = np.linalg.svd(y[m].T @ y[m - 1])
        y[m] = y[m] @ (u @ vt)
    return y


# The argument types tsne_maps passes to the kernels (compiled ahead by compile_in_background).
_JOINT_PROBABILITIES_ARGS = (types.float64[:, :, ::1], types.float64)
_OPTIMISE_ARGS = (types.float32[:, :, ::1], types.float64[:, :, ::1], types.int64, types.int64,
                  types.float64, types.float64)
# Loading the kernels from numba's cache takes 0.5-1 s; longer means they are compiling.
_CACHE_LOAD_S = 3.0

_compile_lock = threading.Lock()
_compile_done = threading.Event()
_compile_thread: Optional[threading.Thread] = None
_compile_error: Optional[Exception] = None


def compile_in_background() -> None:
    """Start compiling (first run in a checkout) or loading from numba's cache the t-SNE kernels,
    in a daemon thread, so that the first tsne_maps call does not pay for it. Idempotent and
    thread-safe: only the first call starts the thread. Only compiles (runs no kernel), so it can
    overlap tsne_maps calls in other threads: numba's compiler lock makes those wait for it.
    Call it in the process that computes the maps, not before a fork (a child forked mid-compile
    inherits numba's compiler lock held by a thread it does not have).
    """
    global _compile_thread
    with _compile_lock:
        if _compile_thread is None:
            _compile_thread = threading.Thread(target=_compile_kernels, name="vli-tsne-compile", daemon=True)
            _compile_thread.start()


def wait_until_compiled(log: Optional[Callable[[str], None]] = None) -> None:
    """Block until the t-SNE kernels are ready (starting compile_in_background if needed); if that
    takes longer than a cache load, first say why with one call of `log` (default: a line on stderr).

    Re-raises, as RuntimeError, an error the compilation raised (tsne_maps would raise it too).
    """
    compile_in_background()
    if not _compile_done.wait(_CACHE_LOAD_S):
        (log or _print_stderr)("compiling the t-SNE kernels (first run in this checkout only, "
                               "about 25 s)...")
        _compile_done.wait()
    if _compile_error is not None:
        raise RuntimeError(f"compiling the t-SNE kernels failed: {_compile_error}") from _compile_error


def _compile_kernels() -> None:
    """Compile or load (numba's cache) both kernels for tsne_maps's argument types."""
    global _compile_error
    try:
        _joint_probabilities.compile(_JOINT_PROBABILITIES_ARGS)
        _optimise.compile(_OPTIMISE_ARGS)
    except Exception as error:  # noqa: BLE001 - handed to wait_until_compiled's caller
        _compile_error = error
    finally:
        _compile_done.set()


def _print_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
