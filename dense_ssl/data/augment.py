"""Photometric augmentation as pure jnp functions, run on device inside `jit`.

The host pipeline only crops and flips (`views.py`); colour changes happen here, per example,
with a preset per view as in BYOL/DetCon: each `ViewSpec` names one of `config.augment.presets`. The ops follow torchvision's MoCo-v2 recipe on images in [0, 1]:

  ColorJitter(brightness, contrast, saturation, hue) with probability jitter_prob, the four
  adjustments in a random order per example; RandomGrayscale(grey_prob) with ITU-R 601 luma;
  GaussianBlur(sigma ~ U(blur_sigma)) with probability blur_prob, kernel 10% of the image
  side (odd, 23 at 224), separable, reflect padding; solarize (threshold 0.5) with
  probability solarize_prob. Then mean/std normalisation.

Every op is computed for every example and selected with `jnp.where`, so nothing branches on
traced values. `aug_cfg` is any object with the attributes listed in `augment_views` (e.g.
`config.augment`); its values must be Python constants (they are static under `jit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# ITU-R BT.601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


class ViewPreset(NamedTuple):
  """The augmentation settings of one view."""
  brightness: float
  contrast: float
  saturation: float
  hue: float
  jitter_prob: float
  grey_prob: float
  blur_prob: float
  blur_sigma: tuple[float, float]
  solarize_prob: float


# A preset that changes nothing (ConMIM's student: crop and flip only).
PLAIN = ViewPreset(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, jitter_prob=0.0,
                   grey_prob=0.0, blur_prob=0.0, blur_sigma=(0.1, 2.0), solarize_prob=0.0)


def preset_from_config(presets: Any, name: str) -> ViewPreset:
  """The preset `name` of `config.augment.presets` (a mapping of name -> ViewPreset fields)."""
  if name not in presets:
    raise ValueError(f"Unknown augmentation preset {name!r}; config.augment.presets defines "
                     f"{', '.join(sorted(presets))}.")
  fields = dict(presets[name])
  unknown = sorted(set(fields) - set(ViewPreset._fields))
  missing = sorted(set(ViewPreset._fields) - set(fields))
  if unknown or missing:
    raise ValueError(f"config.augment.presets.{name}: unknown keys {unknown}, missing keys "
                     f"{missing}; a preset sets exactly {', '.join(ViewPreset._fields)}.")
  fields["blur_sigma"] = tuple(float(x) for x in fields["blur_sigma"])
  return ViewPreset(**{k: fields[k] if k == "blur_sigma" else float(fields[k])
                       for k in ViewPreset._fields})


def grayscale(image: jax.Array) -> jax.Array:
  """(..., 3) RGB -> (..., 1) ITU-R 601 luma."""
  return jnp.tensordot(image, jnp.asarray(_LUMA, image.dtype), axes=[[-1], [0]])[..., None]


def rgb_to_hsv(image: jax.Array) -> jax.Array:
  """(..., 3) RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn)."""
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  value = jnp.max(image, axis=-1)
  chroma = value - jnp.min(image, axis=-1)
  grey = chroma == 0
  saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1.0), 0.0)
  safe = jnp.where(grey, 1.0, chroma)
  hue = jnp.where(value == r, (g - b) / safe,
                  jnp.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
  hue = jnp.where(grey, 0.0, hue / 6.0) % 1.0
  return jnp.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(image: jax.Array) -> jax.Array:
  """(..., 3) HSV in [0, 1] -> RGB, by f(n) = v - v s clip(min(k, 4 - k), 0, 1), k = (n + 6h) % 6."""
  hue, saturation, value = image[..., 0:1], image[..., 1:2], image[..., 2:3]
  k = (jnp.asarray([5.0, 3.0, 1.0], image.dtype) + 6.0 * hue) % 6.0
  return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def _blend(image: jax.Array, other: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image: jax.Array, factor: jax.Array) -> jax.Array:
  return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
  return _blend(image, jnp.mean(grayscale(image)), factor)


def adjust_saturation(image: jax.Array, factor: jax.Array) -> jax.Array:
  return _blend(image, grayscale(image), factor)


def _wrap6(x: jax.Array) -> jax.Array:
  return x - 6.0 * jnp.floor(x / 6.0)


def adjust_hue(image: jax.Array, shift: jax.Array) -> jax.Array:
  """Rotates the hue by `shift` turns: `hsv_to_rgb` of `rgb_to_hsv` with hue + shift.

  Fused into one pass in RGB (value and chroma are kept, saturation is never formed), with
  hue in sixths of a turn: the HSV round trip costs 10x a brightness change on CPUs, and the
  colour jitter evaluates it once per slot.
  """
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  value = jnp.maximum(jnp.maximum(r, g), b)
  chroma = value - jnp.minimum(jnp.minimum(r, g), b)
  safe = jnp.where(chroma > 0, chroma, 1.0)
  hue6 = jnp.where(value == r, (g - b) / safe,
                   jnp.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
  hue6 = hue6 + 6.0 * shift
  channels = []
  for n in (5.0, 3.0, 1.0):
    k = _wrap6(n + hue6)
    channels.append(value - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
  return jnp.stack(channels, axis=-1)


def _linear_adjustment(image: jax.Array, op: jax.Array, factor: jax.Array,
                       active: jax.Array) -> jax.Array:
  """Brightness (op 0), contrast (1) or saturation (2) by `factor` where `active`, else identity.

  The three are one blend, clip(a x + b grey(x) + c mean(grey(x)), 0, 1), with per-example
  coefficients: (f, 0, 0), (f, 0, 1 - f), (f, 1 - f, 0); (1, 0, 0) leaves an image in [0, 1]
  as it is. So a slot costs one fused pass whichever operation it holds.
  """
  grey = grayscale(image)
  a = jnp.where(active, factor, 1.0)
  b = jnp.where(active & (op == 2), 1.0 - factor, 0.0)
  c = jnp.where(active & (op == 1), 1.0 - factor, 0.0)
  return jnp.clip(a * image + b * grey + c * jnp.mean(grey), 0.0, 1.0)


def color_jitter(uniforms: jax.Array, image: jax.Array, preset: ViewPreset) -> jax.Array:
  """torchvision ColorJitter on one (H, W, 3) image in [0, 1]: four adjustments, random order.

  Factors: brightness/contrast/saturation ~ U[max(0, 1 - x), 1 + x], hue shift ~ U[-h, h].

  Under vmap each example has its own order, so nothing can be skipped per example: every
  slot computes what any example might do there. The hue rotation, the costly one, comes once
  per example, so it is computed once, between the linear adjustments that precede it (slots
  0-2) and those that follow it (slots 1-3): six cheap passes and one hue rotation, where a
  `switch` per slot costs four of each (measured 3.9x less jitter time at 96 px on a CPU).

  Args:
    uniforms: 8 independent U[0, 1) draws: the 4 factors, then 4 whose argsort is the order.
    image: (H, W, 3) float image in [0, 1].
    preset: the view's settings.
  """
  strengths = jnp.stack([jnp.asarray(preset.brightness), jnp.asarray(preset.contrast),
                         jnp.asarray(preset.saturation)]).astype(jnp.float32)
  hue = jnp.asarray(preset.hue, jnp.float32)
  lows = jnp.concatenate([jnp.maximum(0.0, 1.0 - strengths), -hue[None]])
  highs = jnp.concatenate([1.0 + strengths, hue[None]])
  factors = lows + uniforms[:4] * (highs - lows)
  order = jnp.argsort(uniforms[4:])  # order[slot] = the operation applied in that slot
  hue_slot = jnp.argmax(order == 3)
  for slot in range(3):
    image = _linear_adjustment(image, order[slot], factors[order[slot]], slot < hue_slot)
  image = adjust_hue(image, factors[3])
  for slot in range(1, 4):
    image = _linear_adjustment(image, order[slot], factors[order[slot]], slot > hue_slot)
  return image


def blur_kernel_size(image_size: int) -> int:
  """10% of the image side, made odd (23 at 224, 7 at 64), at least 3."""
  return max(3, 2 * (int(0.1 * image_size) // 2) + 1)


def gaussian_blur(image: jax.Array, sigma: jax.Array, kernel_size: int) -> jax.Array:
  """Separable Gaussian blur of one (H, W, C) image, reflect-padded at the borders.

  Written as weighted sums of shifted slices, which XLA fuses into one pass per axis: a
  convolution whose kernel differs per example becomes, under vmap, a grouped convolution with
  batch x channels groups, 10x slower on CPUs.
  """
  radius = kernel_size // 2
  taps = jnp.arange(-radius, radius + 1, dtype=image.dtype)
  kernel = jnp.exp(-0.5 * (taps / sigma) ** 2)
  kernel = kernel / jnp.sum(kernel)
  height, width = image.shape[0], image.shape[1]
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
  rows = sum(kernel[i] * padded[i:i + height] for i in range(kernel_size))
  return sum(kernel[i] * rows[:, i:i + width] for i in range(kernel_size))


def solarize(image: jax.Array, threshold: float = 0.5) -> jax.Array:
  return jnp.where(image < threshold, image, 1.0 - image)


# U[0, 1) draws that one view of one example uses: 4 gates, blur sigma, 8 for the jitter.
NUM_UNIFORMS = 13


def augment_image(uniforms: jax.Array, image: jax.Array, preset: ViewPreset) -> jax.Array:
  """All colour ops of one view on one (H, W, 3) float image in [0, 1].

  `preset`'s fields may be traced scalars (the two views' presets are vmapped together).
  """
  gates = uniforms[:5]  # 4 op gates and the blur sigma
  image = jnp.where(gates[0] < preset.jitter_prob,
                    color_jitter(uniforms[5:NUM_UNIFORMS], image, preset), image)
  image = jnp.where(gates[1] < preset.grey_prob,
                    jnp.broadcast_to(grayscale(image), image.shape), image)
  low, high = preset.blur_sigma
  sigma = low + gates[4] * (high - low)
  blurred = gaussian_blur(image, sigma, blur_kernel_size(image.shape[1]))
  image = jnp.where(gates[2] < preset.blur_prob, blurred, image)
  image = jnp.where(gates[3] < preset.solarize_prob, solarize(image), image)
  return image


def normalize(images: jax.Array, aug_cfg: Any, dtype: Any = jnp.float32) -> jax.Array:
  """uint8 (or [0, 255] float) images -> (x / 255 - mean) / std in `dtype` (for evaluation)."""
  return _standardize(jnp.asarray(images, jnp.float32) / 255.0, tuple(aug_cfg.mean),
                      tuple(aug_cfg.std), dtype)


def _standardize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...],
                 dtype: Any) -> jax.Array:
  return ((images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)).astype(dtype)


def augment_views(rng: jax.Array, batch: dict[str, Any], views: Sequence[Any], aug_cfg: Any,
                  dtype: Any = jnp.float32) -> dict[str, Any]:
  """Colour-augments and normalises every view of a batch by its preset (inside `jit`).

  Args:
    rng: a PRNG key.
    batch: the pipeline's batch; each view `v.name` is uint8 (B, H, W, 3).
    views: the method's `ViewSpec`s (name, size, preset).
    aug_cfg: `config.augment`: `presets` (name -> ViewPreset fields), `mean`, `std`.
    dtype: dtype of the returned views.

  Views of one size go through one vmapped program with their presets as per-view data (half
  the compile time of tracing each view). Per group, one (B, V, 13) uniform draw gives each
  example and view its own random numbers; the first group draws from `rng` itself and group g
  from fold_in(rng, g), so a two-view method draws what the two-view trainer drew.

  Returns a shallow copy of `batch` with the views as normalised `dtype` images.
  """
  groups: dict[int, list[Any]] = {}
  for v in views:
    groups.setdefault(int(v.size), []).append(v)
  out = dict(batch)
  for g, members in enumerate(groups.values()):
    presets = [preset_from_config(aug_cfg.presets, v.preset) for v in members]
    stacked = jax.tree.map(lambda *xs: jnp.asarray(xs, jnp.float32), *presets)
    # Stacking on a new axis 1 keeps the batch axis (the one sharded over devices) in front.
    images = jnp.stack([batch[v.name] for v in members], axis=1).astype(jnp.float32) / 255.0
    key = rng if g == 0 else jax.random.fold_in(rng, g)
    uniforms = jax.random.uniform(key, (*images.shape[:2], NUM_UNIFORMS))
    per_view = jax.vmap(augment_image, in_axes=(0, 0, 0))
    result = jax.vmap(per_view, in_axes=(0, 0, None))(uniforms, images, stacked)
    # Clipping and stop_gradient: the result is input data, never a function to differentiate.
    result = jax.lax.stop_gradient(_standardize(jnp.clip(result, 0.0, 1.0), tuple(aug_cfg.mean),
                                                tuple(aug_cfg.std), dtype))
    for i, v in enumerate(members):
      out[v.name] = result[:, i]
  return out
