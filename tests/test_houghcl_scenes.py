"""HoughCL's revision-2 matcher finds geometry on real images (issue 20, METHODS.md §1b).

Held-out Fashion-MNIST scenes ("probe_test") are cut into two 224 px views each by the training
pipeline's own geometry (random resized crops and independent flips, with correspondence grids:
`correspondence.make_pairs`), so the C5 grid is 7x7 as at ResNet-50/224. Two ResNet-18s:
random init, and one trained for 30 Adam steps of garment classification on "probe_train"
scenes (a short supervised fit stands in for pretraining, which is far too slow on 2 CPU cores
for a test; no pretrained checkpoint ships with the repository). For both, revision 2's
accuracy (within one cell and exact) must beat DenseCL's argmax and its share of identity
matches must be under half of revision 1's (which sits at 99 % at random init). At random init
it must also beat the identity baseline; the supervised proxy does not reach the identity's
level with any matcher, so that comparison needs a pretrained backbone (not asserted here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dense_ssl import models
from dense_ssl.data import scenes
from dense_ssl.evaluate import correspondence, features

MODEL = "resnet18"
BACKBONE = models.Backbone(MODEL, models.get_backbone(MODEL))
NUM_PAIRS, VIEW = 96, 224


@pytest.fixture(scope="module")
def pairs():
  images = scenes.make_scenes(NUM_PAIRS, 0, "probe_test", 96)["images"]
  return correspondence.make_pairs(images, seed=0, image_size=VIEW, stride=BACKBONE.stride)


@pytest.fixture(scope="module")
def random_init():
  return features.init_variables(BACKBONE, seed=0)


@pytest.fixture(scope="module")
def trained(random_init):
  """30 Adam steps of garment classification on 64 px "probe_train" garments."""
  images, labels = scenes.single_garments("probe_train", size=64, n=512)
  model, norm, tx = BACKBONE.module, features.IMAGENET, optax.adam(1e-3)

  def loss_fn(params, stats, x, y):
    x = (x.astype(jnp.float32) / 255.0 - jnp.asarray(norm.mean)) / jnp.asarray(norm.std)
    c5, updates = model.apply({"params": params["backbone"], "batch_stats": stats}, x,
                              train=True, mutable=["batch_stats"])
    logits = jnp.mean(c5, axis=(1, 2)) @ params["head"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), \
        updates["batch_stats"]

  @jax.jit
  def step(params, stats, opt_state, x, y):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  params = {"backbone": random_init["params"], "head": jnp.zeros((512, scenes.NUM_CLASSES))}
  stats, opt_state = random_init["batch_stats"], tx.init(params)
  rng, losses = np.random.default_rng(0), []
  for _ in range(30):
    idx = rng.integers(0, len(images), 32)
    params, stats, opt_state, loss = step(params, stats, opt_state, images[idx], labels[idx])
    losses.append(float(loss))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3  # it did learn
  return {"params": params["backbone"], "batch_stats": stats}


def _scores(variables, pairs):
  assert pairs["view1_coords"].shape[1:3] == (7, 7)
  return correspondence.score(correspondence.match_pairs(BACKBONE, variables, pairs), pairs)


def test_revision_2_beats_argmax_identity_and_revision_1_at_random_init(random_init, pairs):
  r = _scores(random_init, pairs)
  print("random_init", {k: round(v, 3) for k, v in sorted(r.items())})
  assert r["hough_acc"] > r["argmax_acc"] + 0.03, r
  assert r["hough_acc"] > r["identity_acc"] + 0.05, r
  assert r["hough_acc_exact"] > r["argmax_acc_exact"], r
  assert r["hough_v1_identity"] > 0.9, r  # revision 1 collapses onto the zero offset
  assert r["hough_identity"] < 0.5 * r["hough_v1_identity"], r
  assert r["chance_acc"] < r["identity_acc"]


def test_revision_2_beats_argmax_and_leaves_the_zero_offset_when_trained(trained, pairs):
  # With this short supervised proxy (trained on 64 px garments, matched at 224 px) every
  # matcher falls below the identity baseline, revision 2 included (measured 0.44 vs 0.49),
  # so that comparison is asserted at random init only; see the module docstring.
  r = _scores(trained, pairs)
  print("trained", {k: round(v, 3) for k, v in sorted(r.items())})
  assert r["hough_acc"] > r["argmax_acc"], r
  assert r["hough_acc_exact"] > r["argmax_acc_exact"], r
  assert r["hough_identity"] < 0.5 * r["hough_v1_identity"], r
