"""Correspondence accuracy of frozen backbone features on held-out view pairs.

Pairs are two views of "probe_test" Fashion-MNIST scenes cut by the training pipeline's own
host geometry (`dense_ssl.data.views.make_views`: random resized crops and flips, with their
correspondence grids), with a fixed seed per pair. Each view's final map (S x S, S = view size
/ stride: a ResNet's C5, a ViT's patch tokens), L2-normalised per cell, is matched cell to cell
by DenseCL's argmax similarity, by HoughCL's Hough voting (`hough`: revision 2 of METHODS.md
§1b, its cells centred over all pairs as one batch; `hough_v1`: revision 1) and by the identity
(each query cell matched to the key cell at its own grid position, a baseline), and scored
against the geometric ground truth exactly as the dense methods score themselves online
(`densecl.correspondence_metrics`):
`<matcher>_acc` within one cell, `<matcher>_acc_exact` the very cell, `<matcher>_identity` the
share of its matches equal to the identity's, and `chance_acc` what a uniformly random match
would get within one cell. Accuracies pool all valid cells of all pairs.

`views` is TensorFlow code (it also runs inside tf.data); it is imported only when pairs are
made, so the other evaluators run without TensorFlow.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from dense_ssl import losses, models
from dense_ssl.data import scenes, spec
from dense_ssl.evaluate import base, features
from dense_ssl.methods import densecl, houghcl

def identity_matcher(f_q: Any, f_k: Any, grid: int) -> tuple[Any, None]:
  """The baseline: every query cell to the key cell at the same grid position."""
  del f_k
  return jnp.broadcast_to(jnp.arange(grid * grid, dtype=jnp.int32), f_q.shape[:2]), None


MATCHERS = {"argmax": densecl.argmax_matcher, "hough": houghcl.hough_v2_matcher,
            "hough_v1": houghcl.hough_matcher, "identity": identity_matcher}
DEFAULT_MATCHERS = ("argmax", "hough", "hough_v1", "identity")
# Keys of `densecl.correspondence_metrics`, renamed per matcher.
_METRICS = {"corr_acc": "acc", "corr_acc_exact": "acc_exact"}


def make_pairs(images: np.ndarray, *, seed: int, image_size: int, stride: int = 32,
               scale: Sequence[float] = (0.4, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
               flip: bool = True) -> dict[str, np.ndarray]:
  """Two views ("view1", "view2") of every image with the training geometry; pair i uses the
  seed (seed, i).

  Returns the pipeline's batch keys for the two views (`dense_ssl.data.spec`), stacked over
  images, grid S = image_size // stride.
  """
  from dense_ssl.data import views  # pylint: disable=g-import-not-at-top  (TensorFlow)
  view = dict(size=image_size, scale=tuple(scale), ratio=tuple(ratio), flip=flip,
              grid=image_size // stride)
  specs = (spec.ViewSpec("view1", **view), spec.ViewSpec("view2", **view))
  pairs = [views.make_views(image, np.array([seed, i], np.int64), specs)
           for i, image in enumerate(images)]
  return {k: np.stack([np.asarray(p[k]) for p in pairs]) for k in pairs[0]}


def cell_features(backbone: models.Backbone, variables: Any, images: np.ndarray,
                  batch_size: int = 64) -> np.ndarray:
  """(N, S², C) L2-normalised cells of the final map, row-major, as dense methods match them."""
  fmap = features.extract(backbone, variables, images, batch_size=batch_size)["map"]
  return np.asarray(losses.l2_normalize(jnp.asarray(fmap.reshape(len(fmap), -1,
                                                                 fmap.shape[-1]))))


def match_pairs(backbone: models.Backbone, variables: Any, pairs: dict[str, np.ndarray],
                matchers: Sequence[str] = DEFAULT_MATCHERS,
                batch_size: int = 64) -> dict[str, np.ndarray]:
  """{matcher: (N, S²) key cell chosen for each query cell of view1}."""
  grid = pairs["view1_coords"].shape[1]
  f1 = cell_features(backbone, variables, pairs["view1"], batch_size)
  f2 = cell_features(backbone, variables, pairs["view2"], batch_size)
  return {m: np.asarray(MATCHERS[m](jnp.asarray(f1), jnp.asarray(f2), grid)[0])
          for m in matchers}


def score(matches: dict[str, np.ndarray], pairs: dict[str, np.ndarray]) -> dict[str, float]:
  """{"<matcher>_acc", "<matcher>_acc_exact", "<matcher>_identity", "chance_acc"} against the
  geometric truth."""
  grid = pairs["view1_coords"].shape[1]
  batch = {k: jnp.asarray(pairs[k])
           for k in ("view1_coords", "view2_coords", "view2_box", "view1_valid")}
  out = {}
  for name, match in matches.items():
    metrics = densecl.correspondence_metrics(jnp.asarray(match), batch, grid)
    out.update({f"{name}_{v}": float(metrics[k]) for k, v in _METRICS.items()})
    out[f"{name}_identity"] = float(np.mean(np.asarray(match) == np.arange(grid * grid)))
    out["chance_acc"] = float(metrics["corr_acc_chance"])
  return out


@base.register("correspondence")
class Correspondence:
  """Accuracy of argmax / Hough / identity matching of frozen cells (the module docstring)."""

  def __init__(self, backbone: models.Backbone, *, num_pairs: int = 256, scene_size: int = 96,
               image_size: int = 128, crop_scale: Sequence[float] = (0.4, 1.0),
               matchers: Sequence[str] = DEFAULT_MATCHERS, batch_size: int = 64,
               seed: int = 0, background_pool: int = 0, tint: bool = True,
               data_dir: str = scenes.DEFAULT_DIR):
    unknown = sorted(set(matchers) - set(MATCHERS))
    if unknown:
      raise ValueError(f"Unknown matcher(s) {', '.join(unknown)}; valid: {', '.join(MATCHERS)}.")
    self.backbone, self.matchers, self.batch_size = backbone, tuple(matchers), batch_size
    self.num_pairs, self.scene_size, self.image_size = num_pairs, scene_size, image_size
    self.crop_scale, self.seed, self.data_dir = tuple(crop_scale), seed, data_dir
    self.background_pool, self.tint = background_pool, tint
    self._pairs = None

  def pairs(self) -> dict[str, np.ndarray]:
    """The held-out pairs, made once."""
    if self._pairs is None:
      images = scenes.make_scenes(self.num_pairs, self.seed, "probe_test", self.scene_size,
                                  background_pool=self.background_pool, tint=self.tint,
                                  directory=self.data_dir)["images"]
      self._pairs = make_pairs(images, seed=self.seed, image_size=self.image_size,
                               stride=self.backbone.stride, scale=self.crop_scale)
    return self._pairs

  def run(self, variables: Any) -> Iterator[tuple[str, float]]:
    pairs = self.pairs()
    matches = match_pairs(self.backbone, variables, pairs, self.matchers, self.batch_size)
    yield from score(matches, pairs).items()
