"""Image-level probes on frozen pooled features (ResNet: mean of C5; ViT: class token, or the
mean patch token with `config.model.pool = "mean"`): a linear classifier and a k-NN classifier.

Both classify single Fashion-MNIST garments on scene backgrounds
(`dense_ssl.data.scenes.single_garments`): fitted on (or voting with) garments of the
"probe_train" split, scored on garments of "probe_test"; neither split shares a garment with
the "pretrain" scenes.

* linear: features standardised with the training set's per-dimension mean/std (an affine-free
  BatchNorm, as MAE's linear probe), then softmax regression trained with AdamW on the full
  training set for a fixed number of steps; top-1 accuracy.
* k-NN (InstDisc / DINO protocol): cosine similarity to every training feature, the k = 20
  nearest neighbours vote for their class with weight exp(similarity / 0.07); top-1 accuracy.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dense_ssl import models
from dense_ssl.data import scenes
from dense_ssl.evaluate import base, features


def standardize(train: np.ndarray, *others: np.ndarray,
                eps: float = 1e-6) -> tuple[np.ndarray, ...]:
  """Scales every array by the per-channel (last axis) mean and std of `train`."""
  axes = tuple(range(train.ndim - 1))
  mean = train.mean(axis=axes)
  std = train.std(axis=axes) + eps
  return tuple((x - mean) / std for x in (train, *others))


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def fit_linear(x: jax.Array, y: jax.Array, *, num_classes: int, steps: int, lr: float,
               weight_decay: float) -> dict[str, jax.Array]:
  """Softmax regression {"w" (C, K), "b" (K,)} by full-batch AdamW from zeros (deterministic)."""
  params = {"w": jnp.zeros((x.shape[-1], num_classes)), "b": jnp.zeros((num_classes,))}
  tx = optax.adamw(lr, weight_decay=weight_decay)

  def loss_fn(p):
    logits = x @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, _):
    p, opt_state = carry
    grads = jax.grad(loss_fn)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  return params


def knn_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *,
                num_classes: int, k: int = 20, temperature: float = 0.07,
                chunk: int = 256) -> np.ndarray:
  """Weighted k-NN class of each test row (cosine similarity, weights exp(sim / T)).

  Ties between classes go to the lowest class index; with fewer than k training rows, all vote.
  """
  normalize = lambda a: a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  train_x, test_x = normalize(train_x.astype(np.float64)), normalize(test_x.astype(np.float64))
  k = min(k, len(train_x))
  preds = []
  for start in range(0, len(test_x), chunk):
    sim = test_x[start:start + chunk] @ train_x.T
    nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sim, nearest, axis=1) / temperature)
    votes = np.zeros((len(sim), num_classes))
    np.add.at(votes, (np.arange(len(sim))[:, None], train_y[nearest]), weights)
    preds.append(np.argmax(votes, axis=1))
  return np.concatenate(preds)


class _GarmentProbe:
  """Data and features shared by the linear and k-NN probes (the data is made once)."""

  def __init__(self, backbone: models.Backbone, *, num_train: int, num_test: int,
               image_size: int, batch_size: int, seed: int, background_pool: int, tint: bool,
               data_dir: str):
    self.backbone = backbone
    self.num_train, self.num_test = num_train, num_test
    self.image_size, self.batch_size = image_size, batch_size
    self.seed, self.data_dir = seed, data_dir
    self.background_pool, self.tint = background_pool, tint
    self._data = None

  def data(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels)."""
    if self._data is None:
      make = functools.partial(scenes.single_garments, size=self.image_size, seed=self.seed,
                               background_pool=self.background_pool, tint=self.tint,
                               directory=self.data_dir)
      self._data = (*make("probe_train", n=self.num_train), *make("probe_test", n=self.num_test))
    return self._data

  def pooled(self, variables: Any) -> tuple[np.ndarray, ...]:
    """(train features, train labels, test features, test labels), pooled features."""
    train_images, train_y, test_images, test_y = self.data()
    extract = functools.partial(features.extract, self.backbone, variables,
                                batch_size=self.batch_size)
    return extract(train_images)["pooled"], train_y, extract(test_images)["pooled"], test_y


@base.register("linear")
class LinearProbe(_GarmentProbe):
  """Top-1 of a linear classifier on frozen pooled features (see the module docstring)."""

  def __init__(self, backbone: models.Backbone, *, num_train: int = 5000, num_test: int = 2000,
               image_size: int = 64, steps: int = 500, lr: float = 1e-2,
               weight_decay: float = 1e-4, batch_size: int = 64, seed: int = 0,
               background_pool: int = 0, tint: bool = True,
               data_dir: str = scenes.DEFAULT_DIR):
    super().__init__(backbone, num_train=num_train, num_test=num_test, image_size=image_size,
                     batch_size=batch_size, seed=seed, background_pool=background_pool,
                     tint=tint, data_dir=data_dir)
    self.steps, self.lr, self.weight_decay = steps, lr, weight_decay

  def run(self, variables: Any) -> Iterator[tuple[str, float]]:
    train_x, train_y, test_x, test_y = self.pooled(variables)
    train_x, test_x = standardize(train_x, test_x)
    params = fit_linear(train_x, train_y, num_classes=scenes.NUM_CLASSES, steps=self.steps,
                        lr=self.lr, weight_decay=self.weight_decay)
    pred = np.argmax(np.asarray(test_x @ params["w"] + params["b"]), axis=-1)
    yield "top1", float(np.mean(pred == test_y))


@base.register("knn")
class KNN(_GarmentProbe):
  """Top-1 of weighted k-NN on frozen pooled features (see the module docstring)."""

  def __init__(self, backbone: models.Backbone, *, num_train: int = 5000, num_test: int = 2000,
               image_size: int = 64, k: int = 20, temperature: float = 0.07,
               batch_size: int = 64, seed: int = 0, background_pool: int = 0,
               tint: bool = True, data_dir: str = scenes.DEFAULT_DIR):
    super().__init__(backbone, num_train=num_train, num_test=num_test, image_size=image_size,
                     batch_size=batch_size, seed=seed, background_pool=background_pool,
                     tint=tint, data_dir=data_dir)
    self.k, self.temperature = k, temperature

  def run(self, variables: Any) -> Iterator[tuple[str, float]]:
    train_x, train_y, test_x, test_y = self.pooled(variables)
    pred = knn_predict(train_x, train_y, test_x, num_classes=scenes.NUM_CLASSES, k=self.k,
                       temperature=self.temperature)
    yield "top1", float(np.mean(pred == test_y))
