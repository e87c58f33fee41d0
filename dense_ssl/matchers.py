"""Matchers between the cells of two views, and the geometric ground truth they are scored on.

All matchers run under stop-gradient and return integer indices: for each query cell i (view 1,
row-major p = h*S + w) the chosen key cell j (view 2). `geometric` derives the true match from
the correspondence grids of the data pipeline, so every dense method can report how often its
learned matcher agrees with geometry. `sinkhorn` (UniVIP's transport plan) lives here too: it
is a soft matcher, also without gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def _similarity(f1: jax.Array, f2: jax.Array) -> jax.Array:
  # Full float32 precision: on GPUs the default would round to TF32, which can flip argmaxes.
  f1 = jax.lax.stop_gradient(f1).astype(jnp.float32)
  f2 = jax.lax.stop_gradient(f2).astype(jnp.float32)
  return jnp.einsum("nic,njc->nij", f1, f2, precision=_HIGHEST)


def argmax_similarity(f1: jax.Array, f2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """DenseCL's matcher: for each query cell, the key cell of highest cosine similarity.

  Args:
    f1, f2: (N, P, C) L2-normalised backbone features of the query and key views.

  Returns (idx (N, P) int32, sim (N, P_query, P_key)); ties go to the lowest key index.
  """
  sim = _similarity(f1, f2)
  return jnp.argmax(sim, axis=-1).astype(jnp.int32), sim


# ---------------------------------------------------------------------------------------------
# HoughCL (METHODS.md §1): each candidate pair (i, j) votes with its ReLU'd similarity for the
# grid offset pos(j) - pos(i); a pair's confidence is its similarity times its offset's votes.
# ---------------------------------------------------------------------------------------------


def offset_bins(grid: int) -> np.ndarray:
  """(S², S²) int32: bin(i, j) = (dy + S-1)(2S-1) + (dx + S-1) for d = pos(j) - pos(i)."""
  y, x = np.divmod(np.arange(grid * grid), grid)
  dy = y[None, :] - y[:, None]
  dx = x[None, :] - x[:, None]
  return ((dy + grid - 1) * (2 * grid - 1) + dx + grid - 1).astype(np.int32)


def _offset_one_hot(grid: int) -> np.ndarray:
  """(S, S, 2S-1) float32: E[a, c, o] = 1 iff c - a = o - (S-1) (one axis of the offset)."""
  a, c = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  return np.eye(2 * grid - 1, dtype=np.float32)[c - a + grid - 1]


class HoughMatch(NamedTuple):
  """The HoughCL match and its intermediates (all without gradient)."""
  match: jax.Array  # (N, P) int32, key cell per query cell
  fallback: jax.Array  # (N, P) bool, rows decided by plain argmax similarity
  sim: jax.Array  # (N, P, P)
  w: jax.Array  # (N, P, P) ReLU(sim)
  hough: jax.Array  # (N, (2S-1)²) vote mass per offset bin
  conf: jax.Array  # (N, P, P) w * hough[bin(i, j)]


def hough_voting(f1: jax.Array, f2: jax.Array, grid: int) -> HoughMatch:
  """HoughCL's matcher (METHODS.md §1) on (N, S², C) L2-normalised backbone features.

  match[n, i] = argmax_j w[n,i,j]·H[n, bin(i,j)] (first occurrence on ties); a query whose
  similarities are all <= 0 has an all-zero confidence row and falls back to argmax_j sim.
  """
  n, cells, _ = f1.shape
  if cells != grid * grid or f2.shape[:2] != (n, cells):
    raise ValueError(f"hough_voting needs features of shape (N, {grid}², C) for a grid of "
                     f"{grid}; got {f1.shape} and {f2.shape}.")
  dense_idx, sim = argmax_similarity(f1, f2)
  w = jax.nn.relu(sim)
  # H[n, dy, dx] = Σ w[n, (y1,x1), (y2,x2)] over y2-y1 = dy, x2-x1 = dx: two one-hot
  # contractions (no scatter), exact sums of the votes.
  one_hot = _offset_one_hot(grid)
  hough = jnp.einsum("nabcd,aco,bdp->nop", w.reshape(n, grid, grid, grid, grid), one_hot,
                     one_hot, precision=_HIGHEST).reshape(n, -1)
  conf = w * hough[:, offset_bins(grid)]
  # ReLU gives exact zeros, so an all-zero row is an exact test for "no positive similarity".
  fallback = jnp.max(conf, axis=-1) == 0
  match = jnp.where(fallback, dense_idx, jnp.argmax(conf, axis=-1)).astype(jnp.int32)
  return HoughMatch(match=match, fallback=fallback, sim=sim, w=w, hough=hough, conf=conf)


# ---------------------------------------------------------------------------------------------
# HoughCL revision 2 (METHODS.md §1b): centred cells, ReLU(cos)^p votes, a Gaussian-smoothed
# Hough space read as the mean vote per bin, and optionally a mirrored-offset family of bins.
# ---------------------------------------------------------------------------------------------


def mirror_bins(grid: int) -> np.ndarray:
  """(S², S²) int32: bin_m(i, j) = (dy + S-1)(2S-1) + (x_i + x_j), the offsets of a pair of
  views of which one is flipped horizontally (x_j = S-1 - x_i + dx' maps to one sum)."""
  y, x = np.divmod(np.arange(grid * grid), grid)
  dy = y[None, :] - y[:, None]
  return ((dy + grid - 1) * (2 * grid - 1) + x[:, None] + x[None, :]).astype(np.int32)


def _sum_one_hot(grid: int) -> np.ndarray:
  """(S, S, 2S-1) float32: M[a, c, o] = 1 iff a + c = o (the mirrored x axis of a bin)."""
  a, c = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  return np.eye(2 * grid - 1, dtype=np.float32)[a + c]


def gaussian_smoothing(bins: int, side: int) -> np.ndarray:
  """(bins, bins) float32 matrix A with (A h)[o] = Σ_t g[t] h[o + t]: a 1-D Gaussian of `side`
  taps, σ = side / (2·2.354), normalised to sum 1, zero padding, same size. The 2-D kernel of
  §1b is the outer product of two such kernels, so smoothing a space H is A·H·Aᵀ."""
  if side < 1 or side % 2 == 0:
    raise ValueError(f"The Hough smoothing side must be a positive odd number (a centred "
                     f"kernel), got {side}; e.g. config.method.hough_smooth_side=3 (1 = none).")
  half = side // 2
  taps = np.arange(-half, half + 1, dtype=np.float64)
  sigma = side / (2 * 2.354)
  g = np.exp(-taps**2 / (2 * sigma**2))
  g /= g.sum()
  o = np.arange(bins)
  t = o[None, :] - o[:, None]  # (A)[o, o'] = g[o' - o]
  return np.where(np.abs(t) <= half, g[np.clip(t + half, 0, side - 1)], 0.0).astype(np.float32)


def centre_cells(f1: jax.Array, f2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Step 0 of §1b: L2-normalised cells minus their grid position's mean over the batch and both
  views, normalised again. The mean runs over the whole (global) batch axis: under `jit` on a
  sharded batch XLA reduces across devices, so the result does not depend on the device count."""
  l2n = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  f1 = l2n(jax.lax.stop_gradient(f1).astype(jnp.float32))
  f2 = l2n(jax.lax.stop_gradient(f2).astype(jnp.float32))
  mu = 0.5 * (jnp.mean(f1, axis=0) + jnp.mean(f2, axis=0))
  return l2n(f1 - mu), l2n(f2 - mu)


class HoughParams(NamedTuple):
  """Revision 2's parameters (METHODS.md §1b), as `config.method.hough_*` sets them."""
  power: float = 3.0
  smooth_side: int = 3
  kappa: float = 3.0
  mirror: bool = False


class HoughMatchV2(NamedTuple):
  """The revision-2 match and its intermediates (all without gradient)."""
  match: jax.Array  # (N, P) int32
  fallback: jax.Array  # (N, P) bool, rows decided by argmax of the centred similarity
  sim: jax.Array  # (N, P, P) centred cosine
  w: jax.Array  # (N, P, P) ReLU(sim)^p
  hough: jax.Array  # (N, (2S-1)²) mean vote per offset bin, smoothed and shrunk (Hbar)
  geo: jax.Array  # (N, P, P) Hbar[bin(i,j)] (+ Hbar_m[bin_m(i,j)] with mirror)
  conf: jax.Array  # (N, P, P) w * geo


def _mean_votes(w5: jax.Array, first: np.ndarray, second: np.ndarray, smooth: np.ndarray,
                w_mean: jax.Array, kappa: float) -> jax.Array:
  """Steps 3-5 for one family of bins: (N, B, B) Hbar = (G∗H + κ·w̄) / (G∗cnt + κ)."""
  hough = jnp.einsum("nabcd,aco,bdp->nop", w5, first, second, precision=_HIGHEST)
  count = np.einsum("ac,bd,aco,bdp->op", np.ones(first.shape[:2]), np.ones(second.shape[:2]),
                    first.astype(np.float64), second.astype(np.float64))
  smoothed = jnp.einsum("or,nrs,ps->nop", smooth, hough, smooth, precision=_HIGHEST)
  count = (smooth.astype(np.float64) @ count @ smooth.T.astype(np.float64)).astype(np.float32)
  return (smoothed + kappa * w_mean[:, None, None]) / (count + kappa)


def hough_voting_v2(f1: jax.Array, f2: jax.Array, grid: int,
                    params: HoughParams = HoughParams()) -> HoughMatchV2:
  """HoughCL's matcher, revision 2 (METHODS.md §1b), on (N, S², C) backbone cells of one batch.

  f1, f2 need not be normalised (step 0 normalises, then centres over the batch). conf[n,i,j] =
  w[n,i,j]·geo[n,i,j]; match = first argmax_j of conf, or of the centred sim where a query has
  no positive vote (an all-zero conf row).
  """
  n, cells, _ = f1.shape
  if cells != grid * grid or f2.shape[:2] != (n, cells):
    raise ValueError(f"hough_voting_v2 needs features of shape (N, {grid}², C) for a grid of "
                     f"{grid}; got {f1.shape} and {f2.shape}.")
  if params.power <= 0 or params.kappa < 0:
    raise ValueError(f"Hough revision 2 needs power > 0 and kappa >= 0, got power="
                     f"{params.power}, kappa={params.kappa} (config.method.hough_power, "
                     f"hough_kappa).")
  g1, g2 = centre_cells(f1, f2)
  sim = jnp.einsum("nic,njc->nij", g1, g2, precision=_HIGHEST)
  power = float(params.power)
  w = jax.nn.relu(sim) ** (int(power) if power.is_integer() else power)
  w5 = w.reshape(n, grid, grid, grid, grid)
  w_mean = jnp.mean(w, axis=(1, 2))
  bins = 2 * grid - 1
  smooth = gaussian_smoothing(bins, int(params.smooth_side))
  offset = _offset_one_hot(grid)
  kappa = float(params.kappa)
  hough = _mean_votes(w5, offset, offset, smooth, w_mean, kappa).reshape(n, -1)
  geo = hough[:, offset_bins(grid)]
  if params.mirror:
    hough_m = _mean_votes(w5, offset, _sum_one_hot(grid), smooth, w_mean, kappa)
    geo = geo + hough_m.reshape(n, -1)[:, mirror_bins(grid)]
  conf = w * geo
  fallback = jnp.max(conf, axis=-1) == 0
  match = jnp.where(fallback, jnp.argmax(sim, axis=-1), jnp.argmax(conf, axis=-1))
  return HoughMatchV2(match=match.astype(jnp.int32), fallback=fallback, sim=sim, w=w,
                      hough=hough, geo=geo, conf=conf)


# ---------------------------------------------------------------------------------------------
# Ground truth from the correspondence grids, and the accuracy of a matcher against it.
# ---------------------------------------------------------------------------------------------


def geometric(coords1: jax.Array, coords2: jax.Array, box2: jax.Array,
              valid1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The true key cell of every query cell, from where both grids sit in the original image.

  Args:
    coords1, coords2: (N, S, S, 2) centres (y, x) of each view's output cells in normalised
      original-image coordinates (flips are already in the grids).
    box2: (N, 4) key crop box (y0, x0, y1, x1) in the same coordinates.
    valid1: (N, S, S) bool, query cells that hold image content.

  Returns (gt_idx (N, S²) int32, valid (N, S²) bool): the key cell whose centre is nearest to
  the query cell's centre (on a regular grid, the cell that contains it), valid when the query
  centre lies inside the key crop.
  """
  n = coords1.shape[0]
  c1 = jax.lax.stop_gradient(coords1).reshape(n, -1, 2).astype(jnp.float32)
  c2 = jax.lax.stop_gradient(coords2).reshape(n, -1, 2).astype(jnp.float32)
  dist = jnp.sum(jnp.square(c1[:, :, None, :] - c2[:, None, :, :]), axis=-1)
  gt_idx = jnp.argmin(dist, axis=-1).astype(jnp.int32)
  y, x = c1[..., 0], c1[..., 1]
  y0, x0, y1, x1 = (box2[:, i:i + 1] for i in range(4))
  inside = (y >= y0) & (y <= y1) & (x >= x0) & (x <= x1)
  return gt_idx, inside & valid1.reshape(n, -1).astype(bool)


def correspondence_accuracy(pred_idx: jax.Array, gt_idx: jax.Array, valid: jax.Array,
                            grid: int, tolerance: int = 1) -> jax.Array:
  """Fraction of valid query cells whose predicted key cell is within `tolerance` cells of the
  true one (Chebyshev distance on the S×S grid; 0 = exact). 0 when no cell is valid."""
  py, px = jnp.divmod(pred_idx, grid)
  gy, gx = jnp.divmod(gt_idx, grid)
  hit = (jnp.abs(py - gy) <= tolerance) & (jnp.abs(px - gx) <= tolerance) & valid
  return jnp.sum(hit) / jnp.maximum(jnp.sum(valid), 1)


def chance_accuracy(gt_idx: jax.Array, valid: jax.Array, grid: int,
                    tolerance: int = 1) -> jax.Array:
  """Expected `correspondence_accuracy` of a uniformly random match: per valid query cell, the
  share of the S² key cells within `tolerance` of the true cell (clipped at the grid border)."""
  gy, gx = jnp.divmod(gt_idx, grid)
  span = lambda g: jnp.minimum(g + tolerance, grid - 1) - jnp.maximum(g - tolerance, 0) + 1
  p_hit = (span(gy) * span(gx)) / (grid * grid)
  return jnp.sum(jnp.where(valid, p_hit, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


# ---------------------------------------------------------------------------------------------
# Optimal transport (UniVIP, METHODS.md §2).
# ---------------------------------------------------------------------------------------------


def sinkhorn(cost: jax.Array, row: jax.Array, col: jax.Array, *, eps: float = 0.1,
             n_iter: int = 50) -> jax.Array:
  """Log-domain Sinkhorn plan, exactly `n_iter` iterations, rows first, no gradient.

  Args:
    cost: (..., M, L) transport cost.
    row: (..., M) row marginal; col: (..., L) column marginal (each summing to 1).
    eps: entropic regularisation.
    n_iter: iterations (the reference is this exact iteration, not a converged plan).

  Returns the plan P (..., M, L) = exp(-C/eps + f_m + g_l); its column sums equal `col`.
  """
  log_kernel = -jax.lax.stop_gradient(cost).astype(jnp.float32) / eps
  log_row = jnp.log(jax.lax.stop_gradient(row).astype(jnp.float32))
  log_col = jnp.log(jax.lax.stop_gradient(col).astype(jnp.float32))

  def body(_, potentials):
    f, g = potentials
    f = log_row - jax.nn.logsumexp(log_kernel + g[..., None, :], axis=-1)
    g = log_col - jax.nn.logsumexp(log_kernel + f[..., :, None], axis=-2)
    return f, g

  f, g = jax.lax.fori_loop(0, n_iter, body, (jnp.zeros_like(log_row), jnp.zeros_like(log_col)))
  return jnp.exp(log_kernel + f[..., :, None] + g[..., None, :])
