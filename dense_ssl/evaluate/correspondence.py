"""Correspondence accuracy of frozen C5 features on held-out view pairs.

Pairs are two views of "probe_test" Fashion-MNIST scenes cut by the training pipeline's own
host geometry (`dense_ssl.data.views.two_views`: random resized crops and flips, with their
correspondence grids), with a fixed seed per pair. Each view's C5 map (S x S, S = view size /
32), L2-normalised per cell, is matched cell to cell by DenseCL's argmax similarity and by
HoughCL's Hough voting (`dense_ssl.matchers`), and scored against the geometric ground truth
exactly as the dense methods score themselves online (`densecl.correspondence_metrics`):
`<matcher>_acc` within one cell, `<matcher>_acc_exact` the very cell, and `chance_acc` what a
uniformly random match would get within one cell. Accuracies pool all valid cells of all pairs.

`views` is TensorFlow code (it also runs inside tf.data); it is imported only when pairs are
made, so the other evaluators run without TensorFlow.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from dense_ssl.data import scenes
from dense_ssl.evaluate import base, features
from dense_ssl.methods import base as methods_base
from dense_ssl.methods import densecl, houghcl

MATCHERS = {"argmax": densecl.argmax_matcher, "hough": houghcl.hough_matcher}
# Keys of `densecl.correspondence_metrics`, renamed per matcher.
_METRICS = {"corr_acc": "acc", "corr_acc_exact": "acc_exact"}


def make_pairs(images: np.ndarray, *, seed: int, image_size: int,
               scale: Sequence[float] = (0.4, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
               flip: bool = True) -> dict[str, np.ndarray]:
  """Two views of every image with the training geometry; pair i uses the seed (seed, i).

  Returns the batch keys of the pipeline (view1/2 uint8, coords1/2, valid1/2, box1/2, flip1/2)
  stacked over images, grid S = image_size // 32.
  """
  from dense_ssl.data import views  # pylint: disable=g-import-not-at-top  (TensorFlow)
  pairs = [views.two_views(image, np.array([seed, i], np.int64), image_size=image_size,
                           grid=image_size // 32, scale=tuple(scale), ratio=tuple(ratio),
                           flip=flip)
           for i, image in enumerate(images)]
  return {k: np.stack([np.asarray(p[k]) for p in pairs]) for k in pairs[0]}


def cell_features(model_name: str, variables: Any, images: np.ndarray,
                  batch_size: int = 64) -> np.ndarray:
  """(N, S², C) L2-normalised C5 cells, row-major, as the dense methods match them."""
  c5 = features.extract(model_name, variables, images, batch_size=batch_size)["c5"]
  return np.asarray(methods_base.l2_normalize(jnp.asarray(c5.reshape(len(c5), -1,
                                                                     c5.shape[-1]))))


def match_pairs(model_name: str, variables: Any, pairs: dict[str, np.ndarray],
                matchers: Sequence[str] = ("argmax", "hough"),
                batch_size: int = 64) -> dict[str, np.ndarray]:
  """{matcher: (N, S²) key cell chosen for each query cell of view1}."""
  grid = pairs["coords1"].shape[1]
  f1 = cell_features(model_name, variables, pairs["view1"], batch_size)
  f2 = cell_features(model_name, variables, pairs["view2"], batch_size)
  return {m: np.asarray(MATCHERS[m](jnp.asarray(f1), jnp.asarray(f2), grid)[0])
          for m in matchers}


def score(matches: dict[str, np.ndarray], pairs: dict[str, np.ndarray]) -> dict[str, float]:
  """{"<matcher>_acc", "<matcher>_acc_exact", "chance_acc"} against the geometric truth."""
  grid = pairs["coords1"].shape[1]
  batch = {k: jnp.asarray(pairs[k]) for k in ("coords1", "coords2", "box2", "valid1")}
  out = {}
  for name, match in matches.items():
    metrics = densecl.correspondence_metrics(jnp.asarray(match), batch, grid)
    out.update({f"{name}_{v}": float(metrics[k]) for k, v in _METRICS.items()})
    out["chance_acc"] = float(metrics["corr_acc_chance"])
  return out


@base.register("correspondence")
class Correspondence:
  """Accuracy of argmax / Hough matching of frozen C5 cells (see the module docstring)."""

  def __init__(self, model_name: str, *, num_pairs: int = 256, scene_size: int = 96,
               image_size: int = 128, crop_scale: Sequence[float] = (0.4, 1.0),
               matchers: Sequence[str] = ("argmax", "hough"), batch_size: int = 64,
               seed: int = 0, data_dir: str = scenes.DEFAULT_DIR):
    unknown = sorted(set(matchers) - set(MATCHERS))
    if unknown:
      raise ValueError(f"Unknown matcher(s) {', '.join(unknown)}; valid: {', '.join(MATCHERS)}.")
    self.model_name, self.matchers, self.batch_size = model_name, tuple(matchers), batch_size
    self.num_pairs, self.scene_size, self.image_size = num_pairs, scene_size, image_size
    self.crop_scale, self.seed, self.data_dir = tuple(crop_scale), seed, data_dir
    self._pairs = None

  def pairs(self) -> dict[str, np.ndarray]:
    """The held-out pairs, made once."""
    if self._pairs is None:
      images = scenes.make_scenes(self.num_pairs, self.seed, "probe_test", self.scene_size,
                                  directory=self.data_dir)["images"]
      self._pairs = make_pairs(images, seed=self.seed, image_size=self.image_size,
                               scale=self.crop_scale)
    return self._pairs

  def run(self, state_or_variables: Any) -> Iterator[tuple[str, float]]:
    pairs = self.pairs()
    matches = match_pairs(self.model_name, state_or_variables, pairs, self.matchers,
                          self.batch_size)
    yield from score(matches, pairs).items()
