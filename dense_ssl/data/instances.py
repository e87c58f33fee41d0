"""UniVIP's views: two scene crops whose overlap holds K object proposals, and the K instances.

The crop sampler "overlap_proposals" (`Method.crop_sampler`) reads the image's proposals (the
source's extras, `sources.with_proposals`) and chooses, as UniVIP does:

  1. up to `RETRIES` = 20 pairs of random resized crops (each scene view's scale and ratio);
     the first pair whose overlap fully contains at least K proposals is used, and K of those
     proposals are drawn at random;
  2. if no pair does, the pair with the largest overlap and K random boxes inside that overlap
     (sides 30-100% of the overlap's), flagged in the batch as `proposal_fallback` (the
     method logs the fraction as `train/proposal_fallbacks`); if even that overlap is empty
     the second crop is the first one.

Instance k of scene view `v` is the view `instance_view(v, k)`: the proposal's region of the
original image (so at the original resolution; its pixel box is rounded inwards and clipped
to the overlap, so it lies inside both crops), flipped with `v`, resized to that view's size
(96 px in UniVIP) and colour-augmented on device by that view's preset like any other view.
The boxes also come in each scene view's own normalised coordinates (after its flip), as
`<v>_inst_boxes` (K, 4) (y0, x0, y1, x1): the correspondence geometry of `views.py` maps them
back to the same original region from either view.

A method declares two scene views and K instance views per scene view, named by
`instance_view`; K is read from those names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from dense_ssl.data import spec
from dense_ssl.data import views as views_lib

RETRIES = 20
FALLBACK_KEY = spec.PROPOSAL_FALLBACK
SAMPLER = "overlap_proposals"
_RANDOM_SIDE = (0.3, 1.0)  # fallback boxes' sides as fractions of the overlap's
_INSTANCE = re.compile(r"^(?P<scene>.+)_inst(?P<k>\d+)$")
instance_view = spec.instance_view
boxes_key = spec.instance_boxes_key


def split_views(views: Sequence[spec.ViewSpec]) -> tuple[list[spec.ViewSpec],
                                                        dict[str, list[spec.ViewSpec]]]:
  """(the scene views, {scene name: its instance views in order of k}); checks the naming."""
  scenes = [v for v in views if not _INSTANCE.match(v.name)]
  found: dict[str, dict[int, spec.ViewSpec]] = {s.name: {} for s in scenes}
  for v in views:
    match = _INSTANCE.match(v.name)
    if match and match["scene"] in found:
      found[match["scene"]][int(match["k"])] = v
    elif match:
      raise ValueError(f"Instance view {v.name!r} names no scene view; scenes: "
                       f"{[s.name for s in scenes]}.")
  counts = {name: len(ks) for name, ks in found.items()}
  if len(scenes) != 2 or len(set(counts.values())) != 1 or not min(counts.values()):
    raise ValueError(f"The {SAMPLER!r} sampler needs two scene views with the same number "
                     f"K >= 1 of instance views each (named instance_view(scene, k)); got "
                     f"{counts}.")
  out = {}
  for name, ks in found.items():
    if sorted(ks) != list(range(len(ks))):
      raise ValueError(f"Instance views of {name!r} must be numbered 0..K-1, got {sorted(ks)}.")
    out[name] = [ks[k] for k in range(len(ks))]
  return scenes, out


def sampler_keys(views: Sequence[spec.ViewSpec]) -> dict[str, tuple[tuple[int, ...], Any]]:
  scenes, instances = split_views(views)
  k = len(instances[scenes[0].name])
  keys: dict[str, tuple[tuple[int, ...], Any]] = {
      boxes_key(s.name): ((k, 4), np.float32) for s in scenes}
  keys[FALLBACK_KEY] = ((), np.bool_)
  return keys


def _as_box(window: tf.Tensor) -> tf.Tensor:
  """int32 (..., 4) windows (y0, x0, h, w) -> float32 pixel boxes (y0, x0, y1, x1)."""
  w = tf.cast(window, tf.float32)
  return tf.stack([w[..., 0], w[..., 1], w[..., 0] + w[..., 2], w[..., 1] + w[..., 3]], -1)


def in_view(boxes: tf.Tensor, window: tf.Tensor, flip: tf.Tensor) -> tf.Tensor:
  """Pixel boxes (K, 4) of the original image -> normalised (y0, x0, y1, x1) in the view cut at
  `window` and flipped if `flip` (the geometry of `views.correspondence_grid`)."""
  w = tf.cast(window, tf.float32)
  y0 = (boxes[:, 0] - w[0]) / w[2]
  y1 = (boxes[:, 2] - w[0]) / w[2]
  x0 = (boxes[:, 1] - w[1]) / w[3]
  x1 = (boxes[:, 3] - w[1]) / w[3]
  x0, x1 = tf.where(flip, 1.0 - x1, x0), tf.where(flip, 1.0 - x0, x1)
  return tf.stack([y0, x0, y1, x1], axis=-1)


def _inward_pixels(boxes: tf.Tensor, overlap: tf.Tensor, height: tf.Tensor,
                   width: tf.Tensor) -> tf.Tensor:
  """Normalised boxes (K, 4) -> int32 windows (K, 4) (y0, x0, h, w) inside the pixel `overlap`
  box (y0, x0, y1, x1): rounded inwards, at least one pixel."""
  scale = tf.stack([height, width, height, width])
  px = boxes * scale
  lo = tf.math.ceil(px[:, :2] - 1e-4)
  hi = tf.math.floor(px[:, 2:] + 1e-4)
  lo = tf.clip_by_value(lo, overlap[:2], overlap[2:] - 1.0)
  hi = tf.clip_by_value(tf.maximum(hi, lo + 1.0), lo + 1.0, overlap[2:])
  return tf.cast(tf.concat([lo, hi - lo], axis=1), tf.int32)


@views_lib.register_sampler(SAMPLER, sampler_keys)
def overlap_proposals(image: tf.Tensor, seed: tf.Tensor, views: Sequence[spec.ViewSpec],
                      extras: dict[str, tf.Tensor]) -> views_lib.Sampled:
  """Two scene crops whose overlap holds K proposals, and the K instance crops (module doc)."""
  scenes, instances = split_views(views)
  k = len(instances[scenes[0].name])
  if "proposals" not in extras:
    raise ValueError(f"The {SAMPLER!r} crop sampler (UniVIP) needs object proposals per image: "
                     f"set config.data.proposals ('selective_search' or, on Fashion-MNIST "
                     f"scenes, 'garments').")
  proposals = tf.reshape(tf.cast(extras["proposals"], tf.float32), [-1, 4])
  shape = tf.shape(image)
  height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  s1, s2 = scenes
  seeds = tf.random.experimental.stateless_split(seed, 2 * RETRIES + 4)
  w1 = tf.stack([views_lib.sample_crop_window(seeds[2 * r], shape, s1.scale, s1.ratio)
                 for r in range(RETRIES)])
  w2 = tf.stack([views_lib.sample_crop_window(seeds[2 * r + 1], shape, s2.scale, s2.ratio)
                 for r in range(RETRIES)])
  b1, b2 = _as_box(w1), _as_box(w2)  # (R, 4) pixels
  overlap = tf.concat([tf.maximum(b1[:, :2], b2[:, :2]), tf.minimum(b1[:, 2:], b2[:, 2:])], 1)
  # Proposals in pixels, padded with K rows that never count (an image may have fewer than K).
  scale = tf.stack([height, width, height, width])
  props = tf.concat([proposals * scale, tf.zeros([k, 4])], axis=0)
  real = tf.concat([tf.ones([tf.shape(proposals)[0]], tf.bool), tf.zeros([k], tf.bool)], 0)
  inside = (real[None, :] & tf.reduce_all(props[None, :, :2] >= overlap[:, None, :2] - 1e-3, -1)
            & tf.reduce_all(props[None, :, 2:] <= overlap[:, None, 2:] + 1e-3, -1))  # (R, P)
  found = tf.reduce_sum(tf.cast(inside, tf.int32), axis=1) >= k
  succeeded = tf.reduce_any(found)
  sides = tf.maximum(overlap[:, 2:] - overlap[:, :2], 0.0)
  largest = tf.argmax(sides[:, 0] * sides[:, 1], output_type=tf.int32)
  r = tf.where(succeeded, tf.argmax(tf.cast(found, tf.int32), output_type=tf.int32), largest)
  window1, window2 = w1[r], w2[r]
  # Disjoint crops (only possible in the fallback): the second crop is the first.
  empty = tf.reduce_any(sides[r] <= 0.0)
  window2 = tf.where(empty, window1, window2)
  box1, box2 = _as_box(window1), _as_box(window2)
  ov = tf.concat([tf.maximum(box1[:2], box2[:2]), tf.minimum(box1[2:], box2[2:])], 0)

  # K of the contained proposals at random: random keys, the contained ones first.
  order = tf.argsort(tf.random.stateless_uniform([tf.shape(props)[0]], seeds[2 * RETRIES + 3])
                     + tf.where(inside[r], 0.0, 2.0))
  chosen = tf.gather(props, order[:k]) / scale
  # The fallback: K random boxes inside the overlap.
  u = tf.random.stateless_uniform([k, 4], seeds[2 * RETRIES + 2])
  ov_size = ov[2:] - ov[:2]
  size = ov_size * (_RANDOM_SIDE[0] + (_RANDOM_SIDE[1] - _RANDOM_SIDE[0]) * u[:, :2])
  start = ov[:2] + (ov_size - size) * u[:, 2:]
  random_boxes = tf.concat([start, start + size], axis=1) / scale
  boxes = tf.where(succeeded, chosen, random_boxes)
  inst_windows = _inward_pixels(boxes, ov, height, width)  # (K, 4) inside both crops

  flip_seeds = seeds[2 * RETRIES], seeds[2 * RETRIES + 1]
  windows = {s1.name: window1, s2.name: window2}
  flips = {s.name: views_lib.sample_flip(fs, 0.5 if s.flip else 0.0)
           for s, fs in zip(scenes, flip_seeds)}
  extra = {FALLBACK_KEY: tf.logical_not(succeeded)}
  inst_px = _as_box(inst_windows)
  for s in scenes:
    extra[boxes_key(s.name)] = in_view(inst_px, windows[s.name], flips[s.name])
    for i, v in enumerate(instances[s.name]):
      windows[v.name], flips[v.name] = inst_windows[i], flips[s.name]
  return views_lib.Sampled(windows, flips, extra)
