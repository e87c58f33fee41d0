"""Tests for dense_ssl.data.augment: each colour op does what it says, on real photos, in jit."""

from __future__ import annotations

import colorsys
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
import skimage.data

from dense_ssl.data import augment, spec

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


MOCO_V2 = dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, jitter_prob=0.8,
               grey_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0), solarize_prob=0.0)
OFF = dict(jitter_prob=0.0, grey_prob=0.0, blur_prob=0.0, solarize_prob=0.0)


@dataclasses.dataclass(frozen=True)
class AugCfg:
  """Stands in for config.augment: presets "first" and "second" (augment reads attributes)."""
  presets: dict
  mean: tuple[float, ...] = MEAN
  std: tuple[float, ...] = STD


def _cfg(first=None, second=None, **both):
  """MoCo-v2's preset for both views, with overrides for both and for each."""
  return AugCfg(presets={"first": {**MOCO_V2, **both, **(first or {})},
                         "second": {**MOCO_V2, **both, **(second or {})}})


NOTHING = _cfg(**OFF)
VIEWS = (spec.ViewSpec("view1", 64, preset="first"), spec.ViewSpec("view2", 64, preset="second"))


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
  """Four real 64 x 64 RGB photographs, uint8."""
  crops = [skimage.data.astronaut()[::8, ::8], skimage.data.chelsea()[40:296:4, 100:356:4],
           skimage.data.coffee()[:384:6, 100:484:6], skimage.data.rocket()[::6, 200:584:6]]
  return np.stack([c[:64, :64] for c in crops])


def _batch(photos):
  return {"view1": photos, "view2": photos[::-1].copy(), "view1_coords": np.zeros((4, 2, 2, 2))}


def _augment(cfg, photos, key=0, dtype=jnp.float32):
  fn = jax.jit(lambda rng, batch: augment.augment_views(rng, batch, VIEWS, cfg, dtype))
  return jax.tree.map(np.asarray, fn(jax.random.key(key), _batch(photos)))


def _unit(images):
  """Normalised images back to [0, 1]."""
  return np.asarray(images, np.float32) * np.array(STD) + np.array(MEAN)


def test_per_view_presets_identity_and_grey_then_solarize(photos):
  # view1: every probability 0, so only normalisation; view2: grey, then solarize, always.
  cfg = _cfg(second=dict(grey_prob=1.0, solarize_prob=1.0), **OFF)
  out = _augment(cfg, photos)
  expected = jax.jit(lambda x: augment.normalize(x, cfg))(photos)
  np.testing.assert_allclose(out["view1"], expected, atol=1e-6)
  np.testing.assert_allclose(_unit(out["view1"]), photos / 255.0, atol=1e-6)
  np.testing.assert_array_equal(out["view1_coords"], 0)  # other keys pass through

  grey = _unit(out["view2"])
  # ITU-R 601 luma, replicated to all channels, then pixels >= 0.5 inverted.
  np.testing.assert_allclose(grey[..., 0], grey[..., 1], atol=1e-5)
  np.testing.assert_allclose(grey[..., 0], grey[..., 2], atol=1e-5)
  luma = photos[::-1].astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
  np.testing.assert_allclose(grey[..., 0], np.where(luma < 0.5, luma, 1 - luma), atol=1e-5)
  assert (luma >= 0.5).mean() > 0.1  # the photos do have bright pixels to invert


def test_blur_kernel_size_is_ten_percent_odd():
  assert augment.blur_kernel_size(224) == 23
  assert augment.blur_kernel_size(64) == 7
  assert augment.blur_kernel_size(16) == 3


def test_gaussian_blur_matches_scipy_and_removes_high_frequencies(photos):
  image = photos[0] / 255.0
  blur = jax.jit(augment.gaussian_blur, static_argnums=2)
  sigma, size = 1.5, 7
  ours = np.asarray(blur(jnp.asarray(image, jnp.float32), sigma, size))
  # scipy 'mirror' = reflect without repeating the edge, as jnp.pad(mode='reflect').
  reference = ndimage.gaussian_filter(image, sigma=(sigma, sigma, 0), mode="mirror",
                                      truncate=(size // 2) / sigma)
  np.testing.assert_allclose(ours, reference, atol=1e-5)

  def high_frequency_energy(x):
    return np.mean(np.diff(x, axis=0) ** 2) + np.mean(np.diff(x, axis=1) ** 2)

  energies = [high_frequency_energy(np.asarray(blur(jnp.asarray(image, jnp.float32), s, 7)))
              for s in (0.1, 0.5, 1.0, 2.0)]
  assert energies[0] == pytest.approx(high_frequency_energy(image), rel=1e-4)  # ~identity
  assert all(a > b for a, b in zip(energies, energies[1:]))
  assert energies[-1] < 0.3 * energies[0]


def test_colour_adjustments_keep_what_they_should(photos):
  x = jnp.asarray(photos[1] / 255.0, jnp.float32)
  luma = lambda im: np.asarray(augment.grayscale(im))[..., 0]

  bright = np.asarray(jax.jit(augment.adjust_brightness)(x, 0.5))
  np.testing.assert_allclose(bright, np.asarray(x) * 0.5, atol=1e-6)

  low_contrast = jax.jit(augment.adjust_contrast)(x, 0.5)
  assert luma(low_contrast).mean() == pytest.approx(luma(x).mean(), abs=1e-5)
  assert luma(low_contrast).std() == pytest.approx(0.5 * luma(x).std(), rel=1e-4)

  desaturated = jax.jit(augment.adjust_saturation)(x, 0.5)
  np.testing.assert_allclose(luma(desaturated), luma(x), atol=1e-5)  # luma unchanged
  no_colour = np.asarray(jax.jit(augment.adjust_saturation)(x, 0.0))
  np.testing.assert_allclose(no_colour[..., 0], no_colour[..., 2], atol=1e-6)

  shifted = np.asarray(jax.jit(augment.adjust_hue)(x, 0.1))
  # A hue rotation keeps each pixel's value (max) and chroma (max - min).
  np.testing.assert_allclose(shifted.max(-1), np.asarray(x).max(-1), atol=1e-5)
  np.testing.assert_allclose(shifted.max(-1) - shifted.min(-1),
                             np.asarray(x).max(-1) - np.asarray(x).min(-1), atol=1e-5)
  assert np.abs(shifted - np.asarray(x)).mean() > 0.01
  red = jnp.asarray([[[1.0, 0.0, 0.0]]])
  np.testing.assert_allclose(augment.adjust_hue(red, 1 / 3), [[[0.0, 1.0, 0.0]]], atol=1e-6)


def test_hsv_conversion_matches_colorsys():
  rgb = np.random.default_rng(0).random((500, 3)).astype(np.float32)
  rgb[:10] = rgb[:10, :1]  # greys, where hue is undefined
  hsv = np.asarray(jax.jit(augment.rgb_to_hsv)(rgb))
  np.testing.assert_allclose(hsv, [colorsys.rgb_to_hsv(*p) for p in rgb], atol=1e-6)
  np.testing.assert_allclose(jax.jit(augment.hsv_to_rgb)(hsv), rgb, atol=1e-6)


def test_brightness_jitter_scales_each_example_by_one_factor(photos):
  preset = augment.preset_from_config(
      _cfg(contrast=0.0, saturation=0.0, hue=0.0, jitter_prob=1.0, grey_prob=0.0,
           blur_prob=0.0).presets, "first")
  uniforms = jax.random.uniform(jax.random.key(3), (4, 8))
  x = jnp.asarray(photos / 255.0, jnp.float32)
  out = np.asarray(jax.jit(jax.vmap(augment.color_jitter, (0, 0, None)), static_argnums=2)(
      uniforms, x, preset))
  factors = []
  for before, after in zip(np.asarray(x), out):
    unclipped = (after < 1.0) & (before > 0.05)
    ratio = after[unclipped] / before[unclipped]
    assert ratio.std() < 1e-4
    factors.append(ratio.mean())
  assert min(factors) >= 0.6 - 1e-4 and max(factors) <= 1.4 + 1e-4
  assert len(set(np.round(factors, 3))) == 4  # one factor per example


def test_colour_jitter_applies_the_four_adjustments_in_each_examples_order(photos):
  """The one-hue-pass jitter equals torchvision's sequence: the four ops one after another.

  240 draws on real photos cover every one of the 24 orders several times; the reference
  applies the public adjust_* functions in each example's own order with its own factors.
  """
  preset = augment.preset_from_config(_cfg().presets, "first")
  count = 240
  uniforms = np.asarray(jax.random.uniform(jax.random.key(7), (count, 8)))
  images = np.asarray(np.repeat(photos, count // len(photos), axis=0) / 255.0, np.float32)
  out = np.asarray(jax.jit(jax.vmap(augment.color_jitter, (0, 0, None)), static_argnums=2)(
      uniforms, images, preset))
  ops = (augment.adjust_brightness, augment.adjust_contrast, augment.adjust_saturation,
         augment.adjust_hue)
  lows = np.array([0.6, 0.6, 0.6, -0.1])
  highs = np.array([1.4, 1.4, 1.4, 0.1])
  orders = set()
  for u, image, result in zip(uniforms, images, out):
    factors = lows + u[:4] * (highs - lows)
    order = tuple(int(i) for i in np.argsort(u[4:]))
    orders.add(order)
    expected = jnp.asarray(image)
    for op in order:
      expected = ops[op](expected, jnp.float32(factors[op]))
    np.testing.assert_allclose(result, np.asarray(expected), atol=2e-6, err_msg=str(order))
  assert len(orders) == 24


def test_moco_v2_recipe_is_random_per_example_and_deterministic_per_key(photos):
  cfg = _cfg()
  same = np.repeat(photos[:1, ::4, ::4], 64, axis=0)  # 64 copies of one 16 x 16 photo
  views = tuple(dataclasses.replace(v, size=16) for v in VIEWS)
  fn = jax.jit(lambda rng, batch: augment.augment_views(rng, batch, views, cfg, jnp.bfloat16))
  batch = {"view1": same, "view2": same}
  a = fn(jax.random.key(0), batch)
  b = fn(jax.random.key(0), batch)
  c = fn(jax.random.key(1), batch)
  # The trainer feeds batches sharded over devices: the layout must not change the views.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  d = fn(jax.random.key(0), jax.device_put(batch, sharded))
  assert d["view1"].sharding.is_equivalent_to(sharded, 4)
  for name in ("view1", "view2"):
    np.testing.assert_allclose(np.asarray(d[name], np.float32),
                               np.asarray(a[name], np.float32), atol=2e-2)
  assert a["view1"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(a["view1"], np.float32),
                                np.asarray(b["view1"], np.float32))
  assert not np.array_equal(np.asarray(a["view1"], np.float32),
                            np.asarray(c["view1"], np.float32))
  views = _unit(np.asarray(a["view1"], np.float32))
  assert np.isfinite(views).all()
  # Each example draws its own ops: only the few left untouched by all ops (p = 0.2 * 0.8 *
  # 0.5 = 8%) can coincide.
  assert len({v.tobytes() for v in np.asarray(a["view1"], np.float32)}) > 48
  assert not np.array_equal(np.asarray(a["view1"]), np.asarray(a["view2"]))
  # Greyscale happens with p = 0.2 (64 draws: about 13, far from 0 and from 64).
  grey = np.abs(views[..., 0] - views[..., 2]).max(axis=(1, 2)) < 0.02
  assert 3 <= grey.sum() <= 26


def test_presets_are_checked():
  incomplete = {k: v for k, v in MOCO_V2.items() if k != "grey_prob"}
  with pytest.raises(ValueError, match=r"missing keys \['grey_prob'\]"):
    augment.preset_from_config({"p": incomplete}, "p")
  with pytest.raises(ValueError, match="Unknown augmentation preset 'q'.*defines p"):
    augment.preset_from_config({"p": MOCO_V2}, "q")


def test_views_of_two_sizes_get_their_own_presets(photos):
  """Three views, two sizes, three presets: each view is augmented by its own preset only."""
  cfg = AugCfg(presets={"plain": {**MOCO_V2, **OFF}, "grey": {**MOCO_V2, **OFF, "grey_prob": 1.0},
                        "solar": {**MOCO_V2, **OFF, "solarize_prob": 1.0}})
  views = (spec.ViewSpec("a", 64, preset="grey"), spec.ViewSpec("b", 32, preset="plain"),
           spec.ViewSpec("c", 32, preset="solar"))
  small = photos[:, ::2, ::2].copy()
  batch = {"a": photos, "b": small, "c": small}
  out = jax.tree.map(np.asarray, jax.jit(lambda r, b: augment.augment_views(r, b, views, cfg))(
      jax.random.key(0), batch))
  grey = np.asarray(augment.grayscale(jnp.asarray(photos / 255.0, jnp.float32)))
  np.testing.assert_allclose(_unit(out["a"]), np.broadcast_to(grey, photos.shape), atol=1e-5)
  np.testing.assert_allclose(_unit(out["b"]), small / 255.0, atol=1e-6)
  np.testing.assert_allclose(_unit(out["c"]), np.where(small / 255.0 < 0.5, small / 255.0,
                                                       1.0 - small / 255.0), atol=1e-5)

