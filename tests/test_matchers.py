"""Tests for dense_ssl.matchers: similarity/Hough matching, geometric ground truth, Sinkhorn."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_ssl import matchers


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _grid_coords(box, grid, flip=False):
  """(S, S, 2) cell centres (y, x) of a crop `box` = (y0, x0, y1, x1), as views.py defines them."""
  y0, x0, y1, x1 = box
  centres = (np.arange(grid) + 0.5) / grid
  ys = y0 + centres * (y1 - y0)
  xs = x0 + centres * (x1 - x0)
  if flip:
    xs = xs[::-1]
  return np.stack(np.meshgrid(ys, xs, indexing="ij"), -1).astype(np.float32)


def _geometric(boxes1, boxes2, grid, flips2=None):
  flips2 = flips2 or [False] * len(boxes1)
  c1 = np.stack([_grid_coords(b, grid) for b in boxes1])
  c2 = np.stack([_grid_coords(b, grid, f) for b, f in zip(boxes2, flips2)])
  valid1 = np.ones(c1.shape[:3], bool)
  return matchers.geometric(c1, c2, np.asarray(boxes2, np.float32), valid1)


# --- argmax / Hough --------------------------------------------------------------------------


def test_argmax_similarity_picks_the_most_similar_key_cell_without_gradient():
  rng = np.random.default_rng(0)
  f1, f2 = _unit(rng.normal(size=(2, 9, 5))), _unit(rng.normal(size=(2, 9, 5)))
  idx, sim = matchers.argmax_similarity(f1, f2)
  np.testing.assert_allclose(sim, np.einsum("nic,njc->nij", f1, f2), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(idx, np.argmax(np.einsum("nic,njc->nij", f1, f2), -1))
  assert idx.dtype == jnp.int32
  g = jax.grad(lambda a: jnp.sum(matchers.argmax_similarity(a, f2)[1]))(jnp.asarray(f1))
  np.testing.assert_array_equal(g, 0.0)


def test_offset_bins_layout():
  for grid in (2, 3, 5):
    bins = matchers.offset_bins(grid)
    assert bins.shape == (grid**2, grid**2)
    zero = (2 * grid - 1) * (grid - 1) + grid - 1
    np.testing.assert_array_equal(np.diag(bins), zero)
    assert bins.min() == 0 and bins.max() == (2 * grid - 1) ** 2 - 1
    # Cell 0 -> cell S²-1 is the offset (S-1, S-1): the last bin.
    assert bins[0, -1] == (2 * grid - 1) ** 2 - 1


@pytest.mark.parametrize("grid", [3, 4])
def test_hough_voting_matches_a_brute_force_reference(grid):
  rng = np.random.default_rng(grid)
  cells = grid * grid
  f1, f2 = _unit(rng.normal(size=(2, cells, 6))), _unit(rng.normal(size=(2, cells, 6)))
  out = matchers.hough_voting(f1, f2, grid)
  sim = np.einsum("nic,njc->nij", f1, f2)
  w = np.maximum(sim, 0)
  hough = np.zeros((2, (2 * grid - 1) ** 2))
  for n, i, j in itertools.product(range(2), range(cells), range(cells)):
    dy, dx = j // grid - i // grid, j % grid - i % grid
    hough[n, (dy + grid - 1) * (2 * grid - 1) + dx + grid - 1] += w[n, i, j]
  conf = w * hough[:, matchers.offset_bins(grid)]
  np.testing.assert_allclose(out.hough, hough, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.conf, conf, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out.match, np.argmax(conf, -1))
  assert out.match.dtype == jnp.int32


def test_hough_voting_recovers_a_translation_that_argmax_misses():
  # View 2 is view 1 shifted by one column plus noise; its last column (new content) holds an
  # exact copy of one query cell. Votes for the common offset outweigh the copy's similarity.
  grid, dim = 4, 32
  rng = np.random.default_rng(1)
  content = _unit(rng.normal(size=(grid, grid + 1, dim)))
  f1 = content[:, :grid].reshape(1, -1, dim)
  f2 = content[:, 1:].copy()
  f2 = _unit(f2 + 0.3 * rng.normal(size=f2.shape))
  f2[0, grid - 1] = content[3, 1]  # a copy of query cell (3, 1) at the wrong place
  f2 = f2.reshape(1, -1, dim)
  out = matchers.hough_voting(f1, f2, grid)
  dense_idx, _ = matchers.argmax_similarity(f1, f2)
  query = 3 * grid + 1
  assert int(dense_idx[0, query]) == grid - 1  # the copy wins on similarity alone
  assert int(out.match[0, query]) == 3 * grid + 0  # Hough: shifted by one column
  for y, x in itertools.product(range(grid), range(1, grid)):
    assert int(out.match[0, y * grid + x]) == y * grid + x - 1


def test_hough_voting_falls_back_to_argmax_when_no_similarity_is_positive():
  grid, dim = 3, 8
  rng = np.random.default_rng(2)
  f2 = rng.normal(size=(1, 9, dim))
  f2[..., 0] = np.abs(f2[..., 0]) + 3.0
  f2[0, 7, 0] = 0.3  # the least negative key for the query below
  f2 = _unit(f2)
  f1 = rng.normal(size=(1, 9, dim))
  f1[..., 0] = np.abs(f1[..., 0]) + 3.0  # other queries agree with every key
  f1 = _unit(f1)
  f1[0, 4] = -np.eye(dim)[0]  # similarity -f2[j, 0] < 0 to every key
  out = matchers.hough_voting(f1, f2, grid)
  assert bool(out.fallback[0, 4]) and np.asarray(out.conf[0, 4]).max() == 0
  assert int(out.match[0, 4]) == 7  # argmax similarity, not the all-zero row's index 0
  np.testing.assert_array_equal(np.flatnonzero(out.fallback[0]), [4])


def test_hough_voting_rejects_a_wrong_grid():
  f = np.ones((1, 9, 4), np.float32)
  with pytest.raises(ValueError, match="grid"):
    matchers.hough_voting(f, f, 4)


# --- Hough revision 2 (METHODS.md §1b) -------------------------------------------------------


def _position_coded_views(rng, *, n=8, grid=5, dim=32, shift=1, noise=0.5, code=2.0,
                          flip=False):
  """C5-like cells: per-image content plus a strong code of the absolute grid position shared
  by every image (what makes revision 1 pick the zero offset). View 2 sees the content shifted
  `shift` columns left (flipped horizontally first with `flip`), plus noise; returns f1, f2
  and the true key cell of every query cell (-1 where it left the view)."""
  content = rng.normal(size=(n, grid, grid + shift, dim))
  position = 0.0 + code * rng.normal(size=(grid, grid, dim))
  f1 = content[:, :, :grid] + position
  seen = content[:, :, shift:]  # key column x shows content column x + shift
  if flip:
    seen = seen[:, :, ::-1]  # key column x shows content column S-1-x + shift
  f2 = seen + position + noise * rng.normal(size=seen.shape)
  truth = np.full((grid, grid), -1)
  for y, x in itertools.product(range(grid), range(grid)):
    key_x = (grid - 1 - (x - shift)) if flip else x - shift
    if 0 <= key_x < grid:
      truth[y, x] = y * grid + key_x
  return (np.maximum(f1, 0).reshape(n, -1, dim), np.maximum(f2, 0).reshape(n, -1, dim),
          truth.reshape(-1))


def _hit_rate(match, truth):
  keep = truth >= 0
  return float(np.mean(np.asarray(match)[:, keep] == truth[keep]))


def test_revision_2_recovers_a_shift_that_revision_1_sends_to_the_zero_offset():
  f1, f2, truth = _position_coded_views(np.random.default_rng(0))
  grid = 5
  l2n = lambda x: jnp.asarray(_unit(x), jnp.float32)
  v1 = matchers.hough_voting(l2n(f1), l2n(f2), grid).match
  v2 = matchers.hough_voting_v2(f1, f2, grid)
  identity = np.arange(grid * grid)
  assert np.mean(np.asarray(v1) == identity) > 0.9  # the position code wins
  assert _hit_rate(v2.match, truth) > 0.9
  assert np.mean(np.asarray(v2.match) == identity) < 0.1
  assert not np.any(v2.fallback)


def test_mirrored_offsets_recover_a_flipped_view():
  f1, f2, truth = _position_coded_views(np.random.default_rng(1), noise=0.8, flip=True)
  plain = matchers.hough_voting_v2(f1, f2, 5)
  mirror = matchers.hough_voting_v2(f1, f2, 5, matchers.HoughParams(mirror=True))
  assert _hit_rate(mirror.match, truth) > 0.9
  assert _hit_rate(mirror.match, truth) > _hit_rate(plain.match, truth) + 0.05


def test_revision_2_centres_over_the_global_batch_on_8_devices():
  """The per-position mean is over the whole batch: sharding it over 8 devices (and jit's
  cross-device reduction) gives the single-device result."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  f1, f2, _ = _position_coded_views(np.random.default_rng(2), n=16, noise=1.0)
  f1, f2 = jnp.asarray(f1, jnp.float32), jnp.asarray(f2, jnp.float32)
  params = matchers.HoughParams(mirror=True)
  fn = jax.jit(lambda a, b: matchers.hough_voting_v2(a, b, 5, params))
  one = fn(f1, f2)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharded = NamedSharding(mesh, PartitionSpec("data"))
  eight = fn(jax.device_put(f1, sharded), jax.device_put(f2, sharded))
  assert len(eight.match.sharding.device_set) == 8
  np.testing.assert_array_equal(eight.match, one.match)
  np.testing.assert_allclose(eight.sim, one.sim, atol=1e-6)
  np.testing.assert_allclose(eight.conf, one.conf, rtol=1e-5, atol=1e-7)
  # A per-shard mean (two images per device) would centre differently.
  per_shard = [matchers.centre_cells(f1[i:i + 2], f2[i:i + 2])[0] for i in range(0, 16, 2)]
  assert float(jnp.max(jnp.abs(jnp.concatenate(per_shard) - matchers.centre_cells(f1, f2)[0]))) \
      > 1e-2


def test_gaussian_smoothing_is_the_normalised_2d_kernel():
  a = matchers.gaussian_smoothing(9, 3)
  space = np.zeros((9, 9), np.float32)
  space[4, 4] = 1.0
  kernel = (a @ space @ a.T)[3:6, 3:6]
  sigma = 3 / (2 * 2.354)
  t = np.arange(-1, 2)
  ref = np.exp(-(t[:, None]**2 + t[None]**2) / (2 * sigma**2))
  np.testing.assert_allclose(kernel, ref / ref.sum(), rtol=1e-6)
  np.testing.assert_allclose((a @ space @ a.T).sum(), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(matchers.gaussian_smoothing(5, 1), np.eye(5))
  for side in (0, 2, 4):
    with pytest.raises(ValueError, match="odd"):
      matchers.gaussian_smoothing(9, side)


def test_mirror_bins_layout():
  grid = 4
  bins = matchers.mirror_bins(grid)
  y, x = np.divmod(np.arange(grid * grid), grid)
  # A horizontally mirrored pair (same row, x_j = S-1-x_i) lands in one bin for every cell.
  mirrored = y * grid + (grid - 1 - x)
  assert len(set(bins[np.arange(grid * grid), mirrored])) == 1
  assert bins.min() == 0 and bins.max() == (2 * grid - 1) ** 2 - 1


def test_revision_2_has_no_gradient_and_rejects_bad_input():
  rng = np.random.default_rng(3)
  f1, f2 = (jnp.asarray(rng.normal(size=(2, 9, 4)), jnp.float32) for _ in range(2))
  g = jax.grad(lambda a: jnp.sum(matchers.hough_voting_v2(a, f2, 3).conf))(f1)
  np.testing.assert_array_equal(g, 0.0)
  with pytest.raises(ValueError, match="grid of 4"):
    matchers.hough_voting_v2(f1, f2, 4)
  with pytest.raises(ValueError, match="hough_power"):
    matchers.hough_voting_v2(f1, f2, 3, matchers.HoughParams(power=0.0))


# --- geometric ground truth ------------------------------------------------------------------


def test_geometric_same_box_is_the_identity():
  gt, valid = _geometric([(0.1, 0.2, 0.7, 0.9)], [(0.1, 0.2, 0.7, 0.9)], 4)
  np.testing.assert_array_equal(gt[0], np.arange(16))
  assert bool(np.all(valid))


def test_geometric_flipped_second_view_mirrors_the_columns():
  box = (0.0, 0.1, 0.8, 0.9)
  gt, valid = _geometric([box], [box], 5, flips2=[True])
  h, w = np.divmod(np.arange(25), 5)
  np.testing.assert_array_equal(gt[0], h * 5 + (4 - w))
  assert bool(np.all(valid))


def test_geometric_disjoint_boxes_have_no_valid_cell():
  _, valid = _geometric([(0.0, 0.0, 0.4, 0.4)], [(0.5, 0.5, 1.0, 1.0)], 4)
  assert not bool(np.any(valid))


def test_geometric_zoomed_key_view():
  # Key crop = the top-left quadrant of the query crop: query cell (y, x) with y, x < 2 lies in
  # key cell (2y + 1, 2x + 1)'s neighbourhood; cells outside the quadrant are invalid.
  gt, valid = _geometric([(0.0, 0.0, 1.0, 1.0)], [(0.0, 0.0, 0.5, 0.5)], 4)
  for y, x in itertools.product(range(4), range(4)):
    inside = y < 2 and x < 2
    assert bool(valid[0, y * 4 + x]) == inside
    if inside:
      gy, gx = divmod(int(gt[0, y * 4 + x]), 4)
      # centre (y+.5)/4 in the image = (2y+1)/4 in the key crop: on the border of key cells
      # 2y and 2y+1; either is nearest, never anything else.
      assert gy in (2 * y, 2 * y + 1) and gx in (2 * x, 2 * x + 1)


def test_geometric_respects_valid1():
  box = (0.0, 0.0, 1.0, 1.0)
  c = _grid_coords(box, 3)[None]
  valid1 = np.ones((1, 3, 3), bool)
  valid1[0, 0, 0] = False
  _, valid = matchers.geometric(c, c, np.asarray([box], np.float32), valid1)
  assert not bool(valid[0, 0]) and bool(np.all(valid[0, 1:]))


# --- accuracy --------------------------------------------------------------------------------


def test_correspondence_accuracy_with_tolerance():
  grid = 4
  gt = jnp.asarray([[5, 5, 5, 5]])
  pred = jnp.asarray([[5, 6, 10, 15]])  # exact, 1 cell right, 1 diagonal, 2 diagonal
  valid = jnp.asarray([[True, True, True, True]])
  assert float(matchers.correspondence_accuracy(pred, gt, valid, grid, 0)) == 0.25
  assert float(matchers.correspondence_accuracy(pred, gt, valid, grid, 1)) == 0.75
  assert float(matchers.correspondence_accuracy(pred, gt, valid, grid, 2)) == 1.0
  masked = jnp.asarray([[False, True, False, True]])
  assert float(matchers.correspondence_accuracy(pred, gt, masked, grid, 1)) == 0.5
  assert float(matchers.correspondence_accuracy(pred, gt, masked & False, grid, 1)) == 0.0


@pytest.mark.parametrize("tolerance", [0, 1, 2])
def test_chance_accuracy_is_the_mean_over_all_constant_guesses(tolerance):
  grid = 5
  rng = np.random.default_rng(3)
  gt = jnp.asarray(rng.integers(0, grid * grid, size=(2, 7)))
  valid = jnp.asarray(rng.random((2, 7)) < 0.7)
  # A uniformly random match is a uniform mixture of the S² constant predictions.
  expected = np.mean([float(matchers.correspondence_accuracy(jnp.full_like(gt, j), gt, valid,
                                                             grid, tolerance))
                      for j in range(grid * grid)])
  np.testing.assert_allclose(matchers.chance_accuracy(gt, valid, grid, tolerance), expected,
                             rtol=1e-6)


# --- Sinkhorn --------------------------------------------------------------------------------


def test_sinkhorn_marginals_and_no_gradient():
  rng = np.random.default_rng(4)
  cost = jnp.asarray(rng.random((2, 4, 5)), jnp.float32)
  row = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 4)), jnp.float32))
  col = jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 5)), jnp.float32))
  plan = matchers.sinkhorn(cost, row, col, eps=0.1, n_iter=50)
  assert bool(jnp.all(plan >= 0))
  np.testing.assert_allclose(plan.sum(-2), col, rtol=1e-5)  # columns are updated last
  converged = matchers.sinkhorn(cost, row, col, eps=0.1, n_iter=2000)
  np.testing.assert_allclose(converged.sum(-1), row, rtol=1e-4)
  g = jax.grad(lambda c: jnp.sum(matchers.sinkhorn(c, row, col) * c))(cost)
  np.testing.assert_allclose(g, plan, rtol=1e-6)  # only the explicit factor c differentiates


def test_sinkhorn_prefers_cheap_pairs():
  cost = 1.0 - jnp.eye(3)[None]
  uniform = jnp.full((1, 3), 1 / 3)
  plan = matchers.sinkhorn(cost, uniform, uniform, eps=0.05, n_iter=200)
  np.testing.assert_allclose(np.diag(plan[0]), 1 / 3, atol=1e-3)
