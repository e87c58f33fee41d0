"""Tests for dense_ssl.data.views: crop sampling semantics and exact correspondence grids.

Every geometric op is checked eagerly and inside tf.data (STYLE.md rule 14).
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import tensorflow as tf

from dense_ssl.data import spec, views

SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)


def _coordinate_image(height: int, width: int) -> np.ndarray:
  """Float image whose pixel (k, l) holds its own centre ((k + .5) / H, (l + .5) / W, 0)."""
  ys, xs = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width,
                       indexing="ij")
  return np.stack([ys, xs, np.zeros_like(ys)], axis=-1).astype(np.float32)


def _sample_at_cell_centres(view: np.ndarray, grid: int) -> np.ndarray:
  """Bilinear sample of `view` at the cell centres (i + .5) * size / S (half-pixel convention).

  With size / S even, each centre lies on a pixel corner: the mean of the 2 x 2 pixels there.
  """
  size = view.shape[0]
  assert (size // grid) % 2 == 0
  lo = ((np.arange(grid) + 0.5) * size / grid - 1).astype(int)
  rows = view[lo] + view[lo + 1]
  return 0.25 * (rows[:, lo] + rows[:, lo + 1])


def _eager(fn, *args):
  """fn(*args) run eagerly; outputs flattened to numpy."""
  return [np.asarray(t) for t in tf.nest.flatten(fn(*args))]


def _in_tf_data(fn, *args):
  """fn(*args) run inside a tf.data map; outputs flattened to numpy."""
  ds = tf.data.Dataset.from_tensors(tuple(tf.convert_to_tensor(a) for a in args)).map(fn)
  return [np.asarray(t) for t in tf.nest.flatten(next(iter(ds)))]


RUNNERS = pytest.mark.parametrize("run", [_eager, _in_tf_data], ids=["eager", "tf_data"])


def test_crop_windows_follow_random_resized_crop():
  height, width = 150, 200
  shape = tf.constant([height, width])
  seeds = np.stack([np.arange(300), np.full(300, 11)], axis=1)
  ds = tf.data.Dataset.from_tensor_slices(seeds).map(
      lambda s: views.sample_crop_window(s, shape, SCALE, RATIO)).batch(len(seeds))
  windows = next(iter(ds)).numpy()
  y0, x0, h, w = windows.T
  assert (h >= 1).all() and (w >= 1).all()
  assert (y0 >= 0).all() and (x0 >= 0).all()
  assert (y0 + h <= height).all() and (x0 + w <= width).all()
  # Sides are rounded, so area and aspect ratio hold up to half a pixel per side.
  area = h * w / (height * width)
  assert area.min() > SCALE[0] * 0.9 and area.max() <= 1.0
  aspect = w / h
  assert aspect.min() > RATIO[0] * 0.95 and aspect.max() < RATIO[1] * 1.05
  # Sampling really spreads over the ranges and over positions.
  assert area.min() < 0.3 and area.max() > 0.8
  assert len(set(map(tuple, windows))) > 290
  # Stateless: eagerly, the same seeds give the same windows as inside tf.data.
  for seed, window in zip(seeds[:20], windows[:20]):
    np.testing.assert_array_equal(views.sample_crop_window(seed, shape, SCALE, RATIO), window)


@RUNNERS
@pytest.mark.parametrize("shape, expected", [
    ((10, 400), (0, 193, 10, 13)),  # too wide: height kept, width = round(10 * 4/3), centred
    ((400, 10), (193, 0, 13, 10)),  # too tall: width kept, height = round(10 / (3/4))
    ((1, 1), (0, 0, 1, 1)),
])
def test_crop_window_fallback_is_central(run, shape, expected):
  (window,) = run(lambda s: views.sample_crop_window(s, tf.constant(shape), SCALE, RATIO),
                  np.array([3, 4]))
  np.testing.assert_array_equal(window, expected)


@pytest.mark.parametrize("antialias, tolerance_px", [(False, 1e-3), (True, 0.1)])
def test_grid_points_at_the_pixels_the_view_shows(antialias, tolerance_px):
  """Sampling the view at each cell centre gives back the grid's original coordinates."""
  height, width, size, grid = 157, 211, 64, 4
  image = tf.constant(_coordinate_image(height, width))

  def make(seed):
    seeds = tf.random.experimental.stateless_split(seed, 2)
    window = views.sample_crop_window(seeds[0], tf.shape(image), SCALE, RATIO)
    flip = views.sample_flip(seeds[1])
    view = views.crop_resize_flip(image, window, flip, size, antialias=antialias)
    coords, valid = views.correspondence_grid(window, flip, tf.shape(image), grid)
    return view, coords, valid, flip

  seeds = np.stack([np.arange(12), np.full(12, 5)], axis=1)
  results = list(tf.data.Dataset.from_tensor_slices(seeds).map(make).as_numpy_iterator())
  for view, coords, valid, _ in results:
    sampled = _sample_at_cell_centres(view, grid)[..., :2]
    error_px = np.abs(sampled - coords) * np.array([height, width])
    assert error_px.max() < tolerance_px, error_px.max()
    assert valid.all()
  flips = [flip for *_, flip in results]
  assert any(flips) and not all(flips)  # both branches were checked
  for seed, expected in zip(seeds[:3], results):  # eager gives the same as tf.data
    for got, want in zip(make(tf.constant(seed)), expected):
      np.testing.assert_array_equal(got, want)


@RUNNERS
def test_flip_mirrors_view_and_grid(run):
  image = skimage.data.chelsea()
  window = np.array([20, 40, 200, 260], np.int32)

  def make(image, window, flip):
    view = views.crop_resize_flip(image, window, flip, 32)
    coords, _ = views.correspondence_grid(window, flip, tf.shape(image), 4)
    return view, coords

  plain_view, plain_coords = run(make, image, window, np.array(False))
  flip_view, flip_coords = run(make, image, window, np.array(True))
  np.testing.assert_array_equal(flip_view, plain_view[:, ::-1])
  np.testing.assert_allclose(flip_coords, plain_coords[:, ::-1])
  # Unflipped: x grows along columns, y along rows, from inside the crop box.
  assert (np.diff(plain_coords[..., 1], axis=1) > 0).all()
  assert (np.diff(plain_coords[..., 0], axis=0) > 0).all()
  np.testing.assert_allclose(plain_coords[0, 0], [(20 + 200 / 8) / 300, (40 + 260 / 8) / 451],
                             rtol=1e-6)


@RUNNERS
@pytest.mark.parametrize("size", [48, 224])  # crops both shrink and grow at 224
def test_pil_views_match_the_tf_resize(run, size):
  """The uint8 (PIL) views are the float (tf.image.resize) views to within rounding."""
  photo = skimage.data.astronaut()  # 512 x 512: crops from 0.2 to 1.0 of it
  for seed in range(6):
    window = views.sample_crop_window(tf.constant([seed, 2]), tf.shape(photo), SCALE, RATIO)
    flip = np.array(seed % 2 == 1)
    fast, = run(lambda im, win, fl: (views.crop_resize_flip_uint8(im, win, fl, size),),
                photo, window.numpy(), flip)
    reference = views.crop_resize_flip(photo, window, flip, size).numpy()
    assert fast.dtype == np.uint8 and fast.shape == (size, size, 3)
    error = np.abs(fast.astype(np.float32) - reference)
    # PIL rounds to 8 bits between its horizontal and vertical passes.
    assert error.max() <= 2.0 and error.mean() < 0.5, (seed, error.max(), error.mean())


def _spec(size, grid, name, **kw):
  return spec.ViewSpec(name, size, scale=SCALE, ratio=RATIO, grid=grid, **kw)


@RUNNERS
def test_two_views_of_a_photo_are_consistent(run):
  photo = skimage.data.coffee()
  size, grid = 64, 2
  specs = (_spec(size, grid, "view1"), _spec(size, grid, "view2"))

  def make(image, seed):
    return views.make_views(image, seed, specs)

  keys = sorted(spec.batch_shapes(specs, 1))  # tf.nest flattens dicts in sorted key order
  values = dict(zip(keys, run(make, photo, np.array([7, 1]))))
  assert values["view1"].shape == (size, size, 3) and values["view1"].dtype == np.uint8
  assert values["view1_coords"].shape == (grid, grid, 2)
  assert values["view2_valid"].shape == (grid, grid)
  assert not np.array_equal(values["view1_box"], values["view2_box"])  # independent crops
  height, width = photo.shape[:2]
  for v in ("view1", "view2"):
    # The box and flip describe exactly the view that was produced.
    box = values[v + "_box"] * np.array([height, width, height, width])
    window = np.round([box[0], box[1], box[2] - box[0], box[3] - box[1]]).astype(np.int32)
    expected = views.crop_resize_flip_uint8(photo, window, values[v + "_flip"], size)
    np.testing.assert_array_equal(values[v], expected)
    coords, _ = views.correspondence_grid(window, values[v + "_flip"], photo.shape, grid)
    np.testing.assert_allclose(values[v + "_coords"], coords, rtol=1e-6)


def test_independent_views_draw_from_the_split_seed():
  """View i's crop comes from seed i, its flip from seed n + i, of n = 2·views split seeds."""
  photo = tf.constant(skimage.data.astronaut()[::4, ::4])
  seed = tf.constant([3, 9], tf.int64)
  specs = (_spec(32, 2, "view1"), _spec(32, 2, "view2"))
  out = views.make_views(photo, seed, specs)
  seeds = tf.random.experimental.stateless_split(seed, 4)
  for i, v in enumerate(specs):
    window = views.sample_crop_window(seeds[i], tf.shape(photo), SCALE, RATIO)
    np.testing.assert_allclose(out[v.name + "_box"], views.normalized_box(window, tf.shape(photo)))
    assert bool(out[v.name + "_flip"]) == bool(views.sample_flip(seeds[2 + i]))


def test_views_are_a_function_of_the_seed():
  photo = tf.constant(skimage.data.astronaut()[::4, ::4])
  specs = (_spec(32, 2, "view1"), _spec(32, 2, "view2"))
  a = views.make_views(photo, tf.constant([3, 9]), specs)
  b = views.make_views(photo, tf.constant([3, 9]), specs)
  c = views.make_views(photo, tf.constant([4, 9]), specs)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["view1_box"], c["view1_box"])


def test_no_flip_when_disabled():
  photo = tf.constant(skimage.data.astronaut()[::8, ::8])

  def flips(enabled):
    specs = (spec.ViewSpec("v", 8, flip=enabled),)
    return [bool(views.make_views(photo, tf.constant([s, 0]), specs)["v_flip"])
            for s in range(8)]

  assert any(flips(True))
  assert not any(flips(False))


@RUNNERS
def test_multi_crop_shared_crops_and_token_masks(run):
  """2 global + 3 local views of two sizes, a view sharing another's crop, a blocked mask."""
  photo = skimage.data.chelsea()
  mask = spec.MaskSpec(ratio=0.75, block=2)
  specs = (_spec(64, 4, "g1", mask=mask), _spec(64, 4, "g2"),
           *(spec.ViewSpec(f"l{i}", 32, scale=(0.05, 0.4)) for i in range(3)),
           spec.ViewSpec("g1_strong", 64, same_crop_as="g1", grid=4))
  keys = sorted(spec.batch_shapes(specs, 1))
  values = dict(zip(keys, run(lambda im, sd: views.make_views(im, sd, specs), photo,
                              np.array([5, 2]))))
  for v in specs:
    assert values[v.name].shape == (v.size, v.size, 3)
  boxes = {tuple(np.round(values[v.name + "_box"], 6)) for v in specs}
  assert len(boxes) == 5  # five crops; the strong view shares g1's
  np.testing.assert_array_equal(values["g1_strong_box"], values["g1_box"])
  np.testing.assert_array_equal(values["g1_strong"], values["g1"])
  np.testing.assert_array_equal(values["g1_strong_coords"], values["g1_coords"])
  local_area = [np.prod(values[f"l{i}_box"][2:] - values[f"l{i}_box"][:2]) for i in range(3)]
  assert max(local_area) <= 0.4 + 1e-3
  m = values["g1_mask"]
  assert m.shape == (4, 4) and m.sum() == 12  # ceil(0.75 * 4) blocks of 2 x 2
  blocks = m.reshape(2, 2, 2, 2).transpose(0, 2, 1, 3).reshape(4, 4)
  assert set(blocks.sum(1)) <= {0, 4}  # whole blocks


def test_a_registered_sampler_chooses_the_crops_and_adds_keys():
  photo = tf.constant(skimage.data.astronaut()[::4, ::4])

  def centre(image, seed, own, extras):
    del seed, extras
    h, w = image.shape[0], image.shape[1]
    window = tf.constant([h // 4, w // 4, h // 2, w // 2], tf.int32)
    return views.Sampled({v.name: window for v in own},
                         {v.name: tf.constant(False) for v in own},
                         {"tag": tf.constant([1.0, 2.0])})

  name = "test_centre_crops"
  if name not in views.SAMPLERS:
    views.register_sampler(name, lambda specs: {"tag": ((2,), np.float32)})(centre)
  specs = (spec.ViewSpec("a", 16), spec.ViewSpec("b", 8))
  out = views.make_views(photo, tf.constant([1, 1]), specs, sampler=name)
  np.testing.assert_allclose(out["a_box"], [0.25, 0.25, 0.75, 0.75])
  np.testing.assert_allclose(out["b_box"], out["a_box"])
  np.testing.assert_allclose(out["tag"], [1.0, 2.0])
  assert views.sampler_keys(name, specs) == {"tag": ((2,), np.float32)}
  with pytest.raises(ValueError, match="Unknown crop sampler 'nope'.*independent"):
    views.make_views(photo, tf.constant([1, 1]), specs, sampler="nope")


def test_view_specs_are_checked():
  with pytest.raises(ValueError, match="unique"):
    spec.check_views([spec.ViewSpec("a", 8), spec.ViewSpec("a", 8)])
  with pytest.raises(ValueError, match="token mask but no grid"):
    spec.check_views([spec.ViewSpec("a", 8, mask=spec.MaskSpec())])
  with pytest.raises(ValueError, match="same_crop_as='c'"):
    spec.check_views([spec.ViewSpec("a", 8, same_crop_as="c")])
  with pytest.raises(ValueError, match="preset 'byol1'.*defined: mocov2"):
    spec.check_views([spec.ViewSpec("a", 8, preset="byol1")], {"mocov2": {}})
