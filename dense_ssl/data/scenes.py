"""Fashion-MNIST scenes: small multi-object images with per-pixel labels, for evaluation.

ImageNet-scale pretraining and COCO/VOC transfer do not fit on a CPU, so the benchmark of this
codebase (benchmarks/reproduce.py) pretrains and probes on synthetic *scenes*: a canvas
(default 96x96 RGB) with 2-5 Fashion-MNIST garments at random positions and scales (a quarter
to half of the canvas side), each tinted with a random colour, on a textured background (a
tinted crop of a scikit-image texture, smooth colour noise or stripes). Several objects per
image, occlusion and clutter are exactly what dense objectives claim to handle better than
global ones, and the per-pixel labels let a dense probe measure it.

Every scene is a pure function of (seed, split, index): scene i is the same whichever n is
asked for, so `make_scenes(n, ...)` is a prefix of `make_scenes(m, ...)` for m > n.

Splits (disjoint garments, so no probe image shares a garment with pretraining):

    split         garments                                   used for
    "pretrain"    Fashion-MNIST train images 0 .. 49 999     self-supervised pretraining
    "probe_train" Fashion-MNIST train images 50 000 .. 59 999 fitting the probes
    "probe_test"  Fashion-MNIST test (t10k) images 0 .. 9 999 scoring the probes

Labels: `label_maps` hold 0 for background and 1 + class for garments (later garments occlude
earlier ones; a pixel is a garment's where the garment's coverage is at least 1/2);
`multi_hot[c]` is 1 when class c is visible anywhere in the label map.

Pure numpy (+ scikit-image for resizing and its bundled textures); no TensorFlow, so a
`tf.data` source can wrap `make_scenes` and evaluators can call it without TensorFlow.
"""

from __future__ import annotations

import colorsys
import gzip
import os
from typing import Sequence

import numpy as np

from dense_ssl import extras

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle boot")
NUM_CLASSES = len(CLASS_NAMES)
# Classes of a label map: background + the 10 garments.
NUM_SEGMENTATION_CLASSES = NUM_CLASSES + 1

# split -> (Fashion-MNIST file set, first garment, end garment, id mixed into the seeds).
SPLITS: dict[str, tuple[str, int, int, int]] = {
    "pretrain": ("train", 0, 50_000, 0),
    "probe_train": ("train", 50_000, 60_000, 1),
    "probe_test": ("test", 0, 10_000, 2),
}
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_TEXTURES = ("brick", "grass", "gravel")
_BACKGROUNDS = ("texture", "noise", "stripes")
# Garment intensity at which a pixel fully covers the background (see _place).
_COVER = 1 / 3


def _read_idx(path: str, header_ints: int) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  return np.frombuffer(data, np.uint8, offset=4 * header_ints)


def load_fashion_mnist(split: str, directory: str = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
  """Reads Fashion-MNIST's "train" (60 000) or "test" (10 000) idx files.

  Returns (images (N, 28, 28) uint8, labels (N,) int32 in 0..9).
  """
  if split not in _FILES:
    raise ValueError(f"Fashion-MNIST split {split!r}; valid: {', '.join(_FILES)}.")
  paths = [os.path.join(directory, name) for name in _FILES[split]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(
        f"Fashion-MNIST file(s) {', '.join(missing)} not found. Install the Debian package "
        f"with `sudo apt-get install dataset-fashion-mnist` (setup.sh does), or copy the four "
        f"*-ubyte.gz files into {directory}.")
  images = _read_idx(paths[0], 4).reshape(-1, 28, 28)
  labels = _read_idx(paths[1], 2).astype(np.int32)
  if len(images) != len(labels):
    raise ValueError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels.")
  return images, labels


def garments(split: str, directory: str = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
  """The (28x28 images, labels) a scene split draws its garments from (see SPLITS)."""
  if split not in SPLITS:
    raise ValueError(f"Scene split {split!r}; valid: {', '.join(SPLITS)}.")
  files, start, end, _ = SPLITS[split]
  images, labels = load_fashion_mnist(files, directory)
  return images[start:end], labels[start:end]


def load_textures() -> list[np.ndarray]:
  """scikit-image's bundled grey textures (brick, grass, gravel) as float32 in [0, 1]."""
  data = extras.require("skimage.data", "Drawing the Fashion-MNIST scenes")  # slow import
  return [getattr(data, name)().astype(np.float32) / 255.0 for name in _TEXTURES]


# ---------------------------------------------------------------------------------------------
# Drawing.
# ---------------------------------------------------------------------------------------------


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  transform = extras.require("skimage.transform", "Drawing the Fashion-MNIST scenes")
  # Anti-aliasing only matters when shrinking (texture crops); garments are enlarged.
  shrink = image.shape[0] > size
  return transform.resize(image, (size, size), order=1, anti_aliasing=shrink,
                          preserve_range=True).astype(np.float32)


def _random_colour(rng: np.random.Generator, value: Sequence[float],
                   saturation: Sequence[float]) -> np.ndarray:
  rgb = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*saturation), rng.uniform(*value))
  return np.asarray(rgb, np.float32)


def _background(rng: np.random.Generator, size: int,
                textures: Sequence[np.ndarray]) -> np.ndarray:
  """(size, size, 3) float32 in [0, 1]: a two-colour map of a grey pattern in [0, 1]."""
  kind = _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))]
  if kind == "texture":
    texture = textures[rng.integers(len(textures))]
    side = int(rng.integers(size, min(3 * size, texture.shape[0]) + 1))
    y, x = rng.integers(0, texture.shape[0] - side + 1, size=2)
    pattern = _resize(np.rot90(texture[y:y + side, x:x + side], rng.integers(4)), size)
  elif kind == "noise":
    # Smooth noise: a coarse Gaussian field, bilinearly enlarged.
    coarse = rng.normal(size=(int(rng.integers(3, 9)),) * 2).astype(np.float32)
    pattern = _resize(coarse, size)
  else:  # stripes: 2-8 periods across the canvas at a random angle and phase
    angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    periods = rng.uniform(2, 8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    pattern = np.sin(2 * np.pi * periods * (yy * np.sin(angle) + xx * np.cos(angle)) + phase)
  pattern = (pattern - pattern.min()) / max(float(np.ptp(pattern)), 1e-6)
  # Backgrounds are darker and less saturated than garments on average, but overlap with them.
  lo = _random_colour(rng, value=(0.05, 0.5), saturation=(0.0, 0.6))
  hi = _random_colour(rng, value=(0.3, 0.9), saturation=(0.0, 0.6))
  return lo + (hi - lo) * pattern[..., None]


def _place(rng: np.random.Generator, canvas: np.ndarray, label_map: np.ndarray,
           garment: np.ndarray, label: int, side: int,
           tint: bool = True) -> tuple[int, int, int, int]:
  """Enlarges a 28x28 uint8 garment to `side`, tints it and composites it at a random place.

  With `tint` False the garment is grey, as bright as its tint would have been (the same
  random draws, so the scene is otherwise the same).

  A pixel of intensity v covers the background with alpha = min(1, v / _COVER) and is labelled
  1 + `label` where alpha >= 1/2, overwriting (occluding) what was there. Returns the garment's
  own box (y0, x0, y1, x1) in pixels: the tight box of its alpha >= 1/2 pixels, before any
  later garment occludes it (the whole placement if none reach 1/2).
  """
  size = canvas.shape[0]
  y, x = (int(v) for v in rng.integers(0, size - side + 1, size=2))
  colour = _random_colour(rng, value=(0.6, 1.0), saturation=(0.4, 1.0))
  if not tint:
    colour = np.full(3, colour.max(), np.float32)  # HSV value = max(R, G, B)
  value = _resize(garment.astype(np.float32) / 255.0, side)
  alpha = np.clip(value / _COVER, 0.0, 1.0)[..., None]
  # Shading by intensity keeps the garment's inner detail (seams, logos) visible.
  colour = colour * (0.4 + 0.6 * value[..., None])
  region = canvas[y:y + side, x:x + side]
  region[...] = alpha * colour + (1 - alpha) * region
  covered = alpha[..., 0] >= 0.5
  label_map[y:y + side, x:x + side][covered] = label + 1
  rows, cols = np.flatnonzero(covered.any(axis=1)), np.flatnonzero(covered.any(axis=0))
  if not len(rows):
    return y, x, y + side, x + side
  return y + int(rows[0]), x + int(cols[0]), y + int(rows[-1]) + 1, x + int(cols[-1]) + 1


def _to_uint8(canvas: np.ndarray) -> np.ndarray:
  return np.round(np.clip(canvas, 0.0, 1.0) * 255).astype(np.uint8)


def _scene(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray, size: int,
           textures: Sequence[np.ndarray], num_objects: Sequence[int], scale: Sequence[float],
           pool: Sequence[np.ndarray],
           tint: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  if len(pool):
    canvas = pool[int(rng.integers(len(pool)))].copy()
  else:
    canvas = _background(rng, size, textures)
  label_map = np.zeros((size, size), np.uint8)
  boxes = []
  for _ in range(int(rng.integers(num_objects[0], num_objects[1] + 1))):
    i = int(rng.integers(len(images)))
    side = int(rng.integers(round(scale[0] * size), round(scale[1] * size) + 1))
    boxes.append(_place(rng, canvas, label_map, images[i], int(labels[i]), side, tint))
  return _to_uint8(canvas), label_map, np.asarray(boxes, np.int32).reshape(-1, 4)


def _rng(seed: int, split: str, index: int, kind: int) -> np.random.Generator:
  return np.random.default_rng([seed, SPLITS[split][3], kind, index])


def shared_backgrounds(k: int, size: int,
                       textures: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
  """The first `k` backgrounds of the fixed pool (float32 (size, size, 3) in [0, 1]).

  One pool for every seed and split: the probes' garments and scenes sit on the very
  backgrounds the pretraining scenes used, so a background is a known, class-free part of
  the domain rather than a cue that tells one pretraining scene from another. Background j
  is the same for any k > j (a prefix, like the scenes).
  """
  if k < 0:
    raise ValueError(f"background_pool must be >= 0 (0 = one background per image), got {k}.")
  textures = load_textures() if textures is None and k else textures
  return [_background(_rng(0, "pretrain", j, 2), size, textures) for j in range(k)]


def make_scenes(n: int, seed: int, split: str, size: int = 96, *, start: int = 0,
                num_objects: Sequence[int] = (2, 5), scale: Sequence[float] = (0.25, 0.5),
                background_pool: int = 0, tint: bool = True,
                directory: str = DEFAULT_DIR) -> dict[str, np.ndarray]:
  """Scenes start .. start + n - 1 of `split` (see the module docstring).

  Args:
    n: number of scenes.
    seed: scenes are a pure function of (seed, split, index).
    split: "pretrain", "probe_train" or "probe_test".
    size: canvas side in pixels.
    start: index of the first scene (a data source can generate its scenes in chunks).
    num_objects: inclusive range of garments per scene.
    scale: range of a garment's side as a fraction of the canvas side.
    background_pool: 0 draws each scene its own background; k > 0 gives each scene one of
      the k backgrounds of the fixed pool (`shared_backgrounds`, shared by every seed and
      split) at random, so that a background does not identify a scene and instance
      discrimination has to tell scenes apart by their garments (benchmarks/RESULTS.md §4f).
    tint: False draws every garment grey instead of in a random colour (a colour that tells
      one scene from another but says nothing of the class).
    directory: where the Fashion-MNIST files are.

  Returns dict(images (n, size, size, 3) uint8, label_maps (n, size, size) uint8 with
  0 = background and 1 + class, multi_hot (n, 10) uint8 of the classes visible in the map,
  boxes (n, num_objects[1], 4) int32: each garment's own box (y0, x0, y1, x1) in pixels, as
  placed (before occlusion), rows past num_boxes[i] zero, num_boxes (n,) int32).
  """
  if background_pool < 0:
    raise ValueError(f"background_pool must be >= 0 (0 = one background per scene), got "
                     f"{background_pool}.")
  images, labels = garments(split, directory)
  textures = load_textures()
  pool = shared_backgrounds(background_pool, size, textures)
  out_images = np.zeros((n, size, size, 3), np.uint8)
  out_maps = np.zeros((n, size, size), np.uint8)
  out_boxes = np.zeros((n, num_objects[1], 4), np.int32)
  num_boxes = np.zeros((n,), np.int32)
  for k in range(n):
    out_images[k], out_maps[k], boxes = _scene(_rng(seed, split, start + k, 0), images, labels,
                                               size, textures, num_objects, scale, pool, tint)
    out_boxes[k, :len(boxes)], num_boxes[k] = boxes, len(boxes)
  return dict(images=out_images, label_maps=out_maps, multi_hot=multi_hot(out_maps),
              boxes=out_boxes, num_boxes=num_boxes)


def multi_hot(label_maps: np.ndarray) -> np.ndarray:
  """(N, 10) uint8: which garment classes appear in each (N, H, W) label map."""
  present = np.stack([np.any(label_maps == c + 1, axis=(1, 2)) for c in range(NUM_CLASSES)], -1)
  return present.astype(np.uint8)


def single_garments(split: str, size: int = 64, *, n: int | None = None, seed: int = 0,
                    background_pool: int = 0, tint: bool = True,
                    directory: str = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
  """One tinted garment per image on a scene background, for the classification probes.

  Garment i of `split` (the first `n`, or all) is enlarged to 75-100% of the canvas and placed
  at a random offset on the same kind of background as the scenes, so the probes see the
  pretraining domain: one of the fixed pool's backgrounds with `background_pool` > 0, and a
  grey garment with `tint` False, as `make_scenes` draws them.

  Returns (images (n, size, size, 3) uint8, labels (n,) int32 in 0..9).
  """
  images, labels = garments(split, directory)
  n = len(images) if n is None else min(n, len(images))
  textures = load_textures()
  pool = shared_backgrounds(background_pool, size, textures)
  out = np.zeros((n, size, size, 3), np.uint8)
  for i in range(n):
    rng = _rng(seed, split, i, 1)
    canvas = (pool[int(rng.integers(len(pool)))].copy() if pool
              else _background(rng, size, textures))
    side = int(rng.integers(round(0.75 * size), size + 1))
    _place(rng, canvas, np.zeros((size, size), np.uint8), images[i], int(labels[i]), side,
           tint)
    out[i] = _to_uint8(canvas)
  return out, labels[:n]
