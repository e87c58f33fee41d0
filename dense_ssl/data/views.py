"""Host-side view geometry: crop boxes, flips, resampling, and correspondence grids.

Everything here is a small pure TensorFlow function of tensors and stateless seeds (shape [2]
int), so it runs eagerly and inside `tf.data` and gives the same result in both.

Coordinate convention (used by every function and by the grids the methods consume):
  * Continuous image coordinates: pixel k of an axis of length L covers [k, k + 1) and has its
    centre at k + 0.5; normalised coordinates divide by L, so the centre of pixel k is
    (k + 0.5) / L and the image spans [0, 1].
  * A crop is an integer box (y0, x0, h, w) of the original image. The view is that box
    resized to `size` x `size`, bilinear (`tf.image.resize`, or PIL for uint8 views as in
    torchvision's RandomResizedCrop), both with the same half-pixel convention: view coordinate
    u in [0, size) samples crop coordinate u * h / size. So view coordinate u maps to original
    coordinate (y0 + u * h / size) / H (normalised).
  * A horizontal flip is applied after the crop: view column coordinate u came from u' =
    size - u of the unflipped view.
  * The S x S grid splits the view into cells; cell (i, j) covers view pixels
    [i * size / S, (i + 1) * size / S) and its centre is at view coordinate (i + 0.5) * size / S.
    `coords[i, j]` is that centre in normalised original-image coordinates, ordered (y, x).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image
import tensorflow as tf

from dense_ssl.data import spec

# Coordinates that describe a crop: (y0, x0, h, w) as int32 pixels of the original image.
CropWindow = tf.Tensor


def sample_crop_window(seed: tf.Tensor, image_shape: tf.Tensor,
                       scale: Sequence[float] = (0.2, 1.0),
                       ratio: Sequence[float] = (3 / 4, 4 / 3),
                       attempts: int = 10) -> CropWindow:
  """Samples a crop with torchvision `RandomResizedCrop` semantics.

  Up to `attempts` candidates are drawn (area fraction uniform in `scale`, aspect ratio w/h
  log-uniform in `ratio`, sides rounded to integers); the first that fits inside the image is
  used. If none fits, the fallback is torchvision's: the central crop of the whole image with
  its aspect ratio clamped into `ratio`. All attempts are drawn at once, so the cost is fixed.

  Args:
    seed: stateless seed, int32/int64 tensor of shape [2].
    image_shape: the image's (height, width) (extra trailing entries are ignored).
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the crop aspect ratio (width / height).
    attempts: number of candidates before the central fallback.

  Returns:
    int32 tensor (y0, x0, h, w) with 1 <= h <= height and 1 <= w <= width.
  """
  height = tf.cast(image_shape[0], tf.float32)
  width = tf.cast(image_shape[1], tf.float32)
  area_seed, ratio_seed, y_seed, x_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 4))
  target_area = height * width * tf.random.stateless_uniform(
      [attempts], area_seed, minval=scale[0], maxval=scale[1])
  aspect = tf.exp(tf.random.stateless_uniform(
      [attempts], ratio_seed, minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  # tf.round rounds half to even, like Python's round() in torchvision.
  crop_w = tf.round(tf.sqrt(target_area * aspect))
  crop_h = tf.round(tf.sqrt(target_area / aspect))
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)

  in_ratio = width / height
  fallback_w = tf.where(in_ratio > ratio[1], tf.round(height * ratio[1]), width)
  fallback_h = tf.where(in_ratio < ratio[0], tf.round(width / ratio[0]), height)

  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)  # first True, or 0
  any_fits = tf.reduce_any(fits)
  h = tf.cast(tf.where(any_fits, crop_h[first], fallback_h), tf.int32)
  w = tf.cast(tf.where(any_fits, crop_w[first], fallback_w), tf.int32)
  # Rounding can push the fallback one pixel past the image; and a 1-pixel image must still
  # give a 1-pixel crop.
  h = tf.clip_by_value(h, 1, tf.cast(image_shape[0], tf.int32))
  w = tf.clip_by_value(w, 1, tf.cast(image_shape[1], tf.int32))

  image_h = tf.cast(image_shape[0], tf.int32)
  image_w = tf.cast(image_shape[1], tf.int32)
  # Offsets are uniform integers in [0, H - h] as torchvision's randint; the fallback centres.
  random_y = tf.random.stateless_uniform([], y_seed, minval=0, maxval=image_h - h + 1,
                                         dtype=tf.int32)
  random_x = tf.random.stateless_uniform([], x_seed, minval=0, maxval=image_w - w + 1,
                                         dtype=tf.int32)
  y0 = tf.where(any_fits, random_y, (image_h - h) // 2)
  x0 = tf.where(any_fits, random_x, (image_w - w) // 2)
  return tf.stack([y0, x0, h, w])


def sample_flip(seed: tf.Tensor, probability: float = 0.5) -> tf.Tensor:
  """A stateless Bernoulli(`probability`) draw: whether to flip the view horizontally."""
  return tf.random.stateless_uniform([], seed) < probability


def crop_resize_flip(image: tf.Tensor, window: CropWindow, flip: tf.Tensor,
                     size: int, antialias: bool = True) -> tf.Tensor:
  """Cuts `window` out of `image`, resizes it to `size` x `size`, flips it if `flip`.

  Resizing is bilinear via `tf.image.resize`, whose half-pixel convention is the one stated in
  the module docstring: without antialiasing a view pixel is exactly the bilinear sample of the
  crop at its centre. Antialiasing (the default, as PIL/torchvision when shrinking) widens the
  triangle filter; its discrete taps are not quite symmetric, which moves the effective sample
  point by at most a few hundredths of an original pixel.

  Args:
    image: (H, W, C) image of any real or integer dtype.
    window: int32 (y0, x0, h, w) inside the image.
    flip: scalar bool.
    size: output side in pixels.
    antialias: low-pass filter when shrinking.

  Returns:
    float32 (size, size, C) view, in the value range of `image`.
  """
  patch = tf.slice(image, tf.stack([window[0], window[1], 0]),
                   tf.stack([window[2], window[3], -1]))
  view = tf.image.resize(patch, [size, size], method="bilinear", antialias=antialias)
  return tf.where(flip, tf.reverse(view, axis=[1]), view)


def _pil_crop_resize_flip(image: np.ndarray, window: np.ndarray, flip: np.ndarray,
                          size: int) -> np.ndarray:
  y0, x0, h, w = (int(v) for v in window)
  # Cut the crop first: PIL's resize(box=...) would let the filter read pixels outside the
  # box, which crop-then-resize (and crop_resize_flip) never sees.
  view = Image.fromarray(np.ascontiguousarray(image[y0:y0 + h, x0:x0 + w])).resize(
      (size, size), Image.Resampling.BILINEAR)
  if flip:
    view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(view)


def crop_resize_flip_uint8(image: tf.Tensor, window: CropWindow, flip: tf.Tensor,
                           size: int) -> tf.Tensor:
  """`crop_resize_flip` (antialiased) of a uint8 RGB image, resampled by PIL, as uint8.

  The geometry is `crop_resize_flip`'s; the pixels are PIL's antialiased bilinear resize
  (torchvision's RandomResizedCrop on PIL images does the same), within a grey level of
  `crop_resize_flip`'s float output (PIL rounds to 8 bits between its two passes). The
  pipeline runs 2.7x faster with it than with `tf.image.resize` in float32 (benchmarks/data.py),
  and PIL releases the GIL while it resamples, so it scales with tf.data's parallel map; it
  runs through `tf.numpy_function`, eagerly and in graphs.

  Args:
    image: uint8 (H, W, 3) image.
    window: int32 (y0, x0, h, w) inside the image.
    flip: scalar bool.
    size: output side in pixels.

  Returns:
    uint8 (size, size, 3) view.
  """
  view = tf.numpy_function(
      lambda im, win, fl: _pil_crop_resize_flip(im, win, fl, size),
      [image, window, flip], tf.uint8, stateful=False)
  view.set_shape([size, size, 3])
  return view


def correspondence_grid(window: CropWindow, flip: tf.Tensor, image_shape: tf.Tensor,
                        grid: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Per output cell, its centre in normalised original-image coordinates.

  Cell (i, j) of an S x S grid has its centre at the fraction ((i + 0.5) / S, (j + 0.5) / S)
  of the view; undoing the flip and the crop gives (y0 + fy * h) / H and (x0 + fx * w) / W.
  This does not depend on the view size in pixels.

  Args:
    window: int32 (y0, x0, h, w) of the crop in the original image.
    flip: scalar bool, whether the view was flipped after cropping.
    image_shape: (H, W) of the original image (extra entries are ignored).
    grid: S, the number of cells per side.

  Returns:
    coords: float32 (S, S, 2), (y, x) in [0, 1].
    valid: bool (S, S), whether the centre lies inside the original image (always true for
      crops inside the image; kept so that zoom-out or padded crops can report it).
  """
  window = tf.cast(window, tf.float32)
  height = tf.cast(image_shape[0], tf.float32)
  width = tf.cast(image_shape[1], tf.float32)
  centres = (tf.range(grid, dtype=tf.float32) + 0.5) / grid
  fx = tf.where(flip, 1.0 - centres, centres)
  ys = (window[0] + centres * window[2]) / height
  xs = (window[1] + fx * window[3]) / width
  coords = tf.stack(tf.meshgrid(ys, xs, indexing="ij"), axis=-1)
  valid = tf.reduce_all((coords >= 0.0) & (coords <= 1.0), axis=-1)
  return coords, valid


def normalized_box(window: CropWindow, image_shape: tf.Tensor) -> tf.Tensor:
  """The crop as (y0, x0, y1, x1) in normalised original-image coordinates (float32)."""
  window = tf.cast(window, tf.float32)
  height = tf.cast(image_shape[0], tf.float32)
  width = tf.cast(image_shape[1], tf.float32)
  return tf.stack([window[0] / height, window[1] / width,
                   (window[0] + window[2]) / height, (window[1] + window[3]) / width])


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds a float image in [0, 255] to uint8 (saturating)."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


# ---------------------------------------------------------------------------------------------
# Views of one image, as a method declares them (`dense_ssl.data.spec.ViewSpec`).
#
# A crop sampler chooses every view's crop window and flip from the image (and what the source
# gives with it, e.g. object proposals), and may return arrays of its own; `make_views` then
# cuts, resizes and describes each view. Samplers are registered by name; a method names its
# own (`Method.crop_sampler`), "independent" by default.
# ---------------------------------------------------------------------------------------------


_MASK_STREAM = 7919  # folded into an example's seed for its token masks


class Sampled(NamedTuple):
  """A sampler's result: per view name, its crop window and flip; plus extra batch arrays."""
  windows: dict[str, tf.Tensor]
  flips: dict[str, tf.Tensor]
  extra: dict[str, tf.Tensor]


# (image, seed, own views, extras from the source) -> Sampled. "Own views" are those that
# sample their crop (no `same_crop_as`).
Sampler = Callable[[tf.Tensor, tf.Tensor, Sequence[spec.ViewSpec], dict[str, tf.Tensor]],
                   Sampled]
SAMPLERS: dict[str, Sampler] = {}
# Per sampler, the keys it adds: (views) -> {key: (per-example shape, dtype)}.
SAMPLER_KEYS: dict[str, Callable[[Sequence[spec.ViewSpec]], dict[str, Any]]] = {}


def register_sampler(name: str, keys: Callable[[Sequence[spec.ViewSpec]], dict[str, Any]]
                     = lambda views: {}) -> Callable[[Sampler], Sampler]:
  """Decorator: registers a crop sampler under `name`, with the extra batch keys it adds."""

  def wrap(fn: Sampler) -> Sampler:
    if name in SAMPLERS:
      raise ValueError(f"Crop sampler {name!r} is registered twice.")
    SAMPLERS[name], SAMPLER_KEYS[name] = fn, keys
    return fn

  return wrap


def sampler_keys(name: str, views: Sequence[spec.ViewSpec]) -> dict[str, Any]:
  """The extra batch keys (per-example shape, dtype) sampler `name` adds for `views`."""
  if name not in SAMPLERS:
    raise ValueError(f"Unknown crop sampler {name!r} (Method.crop_sampler); valid choices: "
                     f"{', '.join(sorted(SAMPLERS))}.")
  return SAMPLER_KEYS[name](views)


@register_sampler("independent")
def independent_crops(image: tf.Tensor, seed: tf.Tensor, views: Sequence[spec.ViewSpec],
                      extras: dict[str, tf.Tensor]) -> Sampled:
  """Every view its own random resized crop and flip (MoCo, BYOL, DINO's multi-crop).

  View i draws its window from seed i and its flip from seed n + i of the n = len(views)
  seeds split from `seed`, so adding views leaves the earlier views' draws as they were for
  the same n.
  """
  del extras
  shape = tf.shape(image)
  n = len(views)
  seeds = tf.random.experimental.stateless_split(seed, 2 * n)
  windows, flips = {}, {}
  for i, v in enumerate(views):
    windows[v.name] = sample_crop_window(seeds[i], shape, v.scale, v.ratio)
    flips[v.name] = sample_flip(seeds[n + i], 0.5 if v.flip else 0.0)
  return Sampled(windows, flips, {})


def token_mask(seed: tf.Tensor, grid: int, mask: spec.MaskSpec) -> tf.Tensor:
  """A bool (grid, grid) mask: ceil(ratio · blocks) random `block` x `block` squares, True."""
  side = grid // mask.block
  blocks = side * side
  count = int(math.ceil(mask.ratio * blocks - 1e-9))
  ranks = tf.argsort(tf.argsort(tf.random.stateless_uniform([blocks], seed)))
  coarse = tf.reshape(ranks < count, (side, side))
  return tf.repeat(tf.repeat(coarse, mask.block, axis=0), mask.block, axis=1)


def make_views(image: tf.Tensor, seed: tf.Tensor, views: Sequence[spec.ViewSpec], *,
               sampler: str = "independent",
               extras: dict[str, tf.Tensor] | None = None) -> dict[str, tf.Tensor]:
  """The views of one image with their geometry, keyed as `dense_ssl.data.spec` documents.

  Args:
    image: uint8 (H, W, 3) image.
    seed: stateless seed of shape [2], given to the sampler as it is (two independent views
      draw exactly what they drew before views were configurable); the token masks draw from
      a seed folded from it.
    views: the method's views.
    sampler: the registered crop sampler's name.
    extras: per-image arrays from the source that the sampler reads (e.g. proposals).
  """
  if sampler not in SAMPLERS:
    sampler_keys(sampler, views)  # raises, listing the choices
  own = [v for v in views if v.same_crop_as is None]
  sampled = SAMPLERS[sampler](image, seed, own, extras or {})
  mask_seed = tf.random.experimental.stateless_fold_in(seed, _MASK_STREAM)
  shape = tf.shape(image)
  mask_seeds = tf.random.experimental.stateless_split(mask_seed, len(views))
  out = dict(sampled.extra)
  for i, v in enumerate(views):
    source = v.same_crop_as or v.name
    window, flipped = sampled.windows[source], sampled.flips[source]
    out[v.name] = crop_resize_flip_uint8(image, window, flipped, v.size)
    out[f"{v.name}_box"] = normalized_box(window, shape)
    out[f"{v.name}_flip"] = flipped
    if v.grid:
      coords, valid = correspondence_grid(window, flipped, shape, v.grid)
      out[f"{v.name}_coords"], out[f"{v.name}_valid"] = coords, valid
    if v.mask is not None:
      out[f"{v.name}_mask"] = token_mask(mask_seeds[i], v.grid, v.mask)
  return out
