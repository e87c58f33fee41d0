"""Dense (per-pixel) linear probe on frozen feature maps, scored by mIoU on held-out scenes.

The maps: a ResNet's C5 (+ C4 with `use_c4`), a ViT's patch tokens on their grid.

The probe is fitted on "probe_train" Fashion-MNIST scenes and scored on "probe_test" scenes
(`dense_ssl.data.scenes`), over 11 classes: background and the 10 garments.

Each feature map is standardised per channel (statistics over all training pixels), and the
classifier is linear on the maps bilinearly upsampled (half-pixel centres, as
`F.interpolate(align_corners=False)`) to the label map's resolution. Upsampling is linear per
channel, so this equals upsampling each level's logits `W_l · f_l`, which is what is computed:
the probe never materialises full-resolution features. Training: AdamW, cross-entropy averaged
over pixels, minibatches of scenes, a fixed number of steps. mIoU is the mean over classes
that occur in the ground truth or the prediction of TP / (TP + FP + FN), accumulated over the
whole test set (the mmsegmentation convention).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dense_ssl import models
from dense_ssl.data import scenes
from dense_ssl.evaluate import base, classification, features


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
  """(K, K) int64 counts, rows = ground-truth class, columns = predicted class."""
  index = gt.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
  return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(confusion: np.ndarray) -> tuple[float, np.ndarray]:
  """(mIoU, per-class IoU); a class absent from both prediction and truth is NaN, not 0."""
  tp = np.diag(confusion).astype(np.float64)
  union = confusion.sum(0) + confusion.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
  return float(np.nanmean(iou)), iou


def miou_standard_error(pred: np.ndarray, gt: np.ndarray, num_classes: int, *,
                        resamples: int = 200, seed: int = 0) -> float:
  """Bootstrap standard error of the mIoU of (N, H, W) predictions over their N test scenes.

  mIoU pools pixels over scenes, so it has no closed-form sampling error like an accuracy's
  sqrt(p(1-p)/n): the scenes are resampled with replacement and the mIoU recomputed.
  """
  per_scene = np.stack([confusion_matrix(p, g, num_classes) for p, g in zip(pred, gt)])
  rng = np.random.default_rng(seed)
  n = len(per_scene)
  draws = [iou_from_confusion(per_scene[rng.integers(0, n, n)].sum(0))[0]
           for _ in range(resamples)]
  return float(np.std(draws, ddof=1))


def _logits(params: dict[str, Any], maps: Sequence[jax.Array],
            out_hw: tuple[int, int]) -> jax.Array:
  logits = params["b"]
  for w, f in zip(params["w"], maps):
    low = jnp.einsum("nhwc,ck->nhwk", f, w)
    logits = logits + jax.image.resize(low, (f.shape[0], *out_hw, w.shape[-1]), "bilinear")
  return logits


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "batch_size"))
def fit_dense(maps: Sequence[jax.Array], labels: jax.Array, *, num_classes: int, steps: int,
              batch_size: int, lr: float, weight_decay: float,
              rng: jax.Array) -> dict[str, Any]:
  """Per-pixel linear classifier {"w": [(C_l, K)], "b": (K,)} on standardised maps.

  Args:
    maps: per level (N, h_l, w_l, C_l) feature maps of the N training scenes.
    labels: (N, H, W) integer label maps.
    num_classes, steps, batch_size, lr, weight_decay: the problem and AdamW's schedule.
    rng: draws the minibatches (scenes with replacement).
  """
  params = {"w": [jnp.zeros((f.shape[-1], num_classes)) for f in maps],
            "b": jnp.zeros((num_classes,))}
  tx = optax.adamw(lr, weight_decay=weight_decay)
  out_hw = labels.shape[1:]

  def loss_fn(p, idx):
    logits = _logits(p, [f[idx] for f in maps], out_hw)
    target = labels[idx].astype(jnp.int32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

  def step(carry, key):
    p, opt_state = carry
    idx = jax.random.randint(key, (batch_size,), 0, labels.shape[0])
    grads = jax.grad(loss_fn)(p, idx)
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(rng, steps))
  return params


_predict = jax.jit(lambda p, maps, out_hw: jnp.argmax(_logits(p, maps, out_hw), axis=-1),
                   static_argnums=2)


def predict_dense(params: dict[str, Any], maps: Sequence[np.ndarray], out_hw: tuple[int, int],
                  batch_size: int = 64) -> np.ndarray:
  """(N, H, W) int32 class map per scene."""
  out = [_predict(params, [f[s:s + batch_size] for f in maps], tuple(out_hw))
         for s in range(0, len(maps[0]), batch_size)]
  return np.asarray(jnp.concatenate(out), np.int32)


@dataclasses.dataclass(frozen=True)
class DenseResult:
  """The probe's score and what it was computed from (for figures)."""
  miou: float
  miou_se: float  # bootstrap over the test scenes (`miou_standard_error`)
  pixel_acc: float
  iou: np.ndarray  # (11,), NaN for classes absent from truth and prediction
  images: np.ndarray  # (N, H, W, 3) uint8 test scenes
  label_maps: np.ndarray  # (N, H, W) ground truth
  predictions: np.ndarray  # (N, H, W)

  def scores(self) -> dict[str, float]:
    """The numbers the probe reports (`DenseProbe.run`)."""
    return {"miou": self.miou, "miou_se": self.miou_se, "pixel_acc": self.pixel_acc}


@base.register("dense")
class DenseProbe:
  """mIoU of a per-pixel linear probe on frozen maps (see the module docstring)."""

  def __init__(self, backbone: models.Backbone, *, num_train: int = 1000, num_test: int = 500,
               image_size: int = 96, use_c4: bool = True, steps: int = 500,
               train_batch_size: int = 16, lr: float = 1e-2, weight_decay: float = 1e-4,
               batch_size: int = 64, seed: int = 0, background_pool: int = 0,
               tint: bool = True, data_dir: str = scenes.DEFAULT_DIR):
    self.backbone = backbone
    self.num_train, self.num_test, self.image_size = num_train, num_test, image_size
    self.use_c4, self.steps, self.train_batch_size = use_c4, steps, train_batch_size
    self.lr, self.weight_decay = lr, weight_decay
    self.batch_size, self.seed, self.data_dir = batch_size, seed, data_dir
    self.background_pool, self.tint = background_pool, tint
    self._data = None

  def data(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(train scenes, test scenes), made once."""
    if self._data is None:
      make = functools.partial(scenes.make_scenes, seed=self.seed, size=self.image_size,
                               background_pool=self.background_pool, tint=self.tint,
                               directory=self.data_dir)
      self._data = (make(self.num_train, split="probe_train"),
                    make(self.num_test, split="probe_test"))
    return self._data

  def _maps(self, variables: Any, images: np.ndarray) -> list[np.ndarray]:
    with_c4 = self.use_c4 and self.backbone.family == "resnet"
    out = features.extract(self.backbone, variables, images, batch_size=self.batch_size,
                           with_c4=with_c4)
    return [out["map"], out["c4"]] if with_c4 else [out["map"]]

  def evaluate(self, variables: Any) -> DenseResult:
    """Fits the probe on the training scenes and scores it on the test scenes."""
    train, test = self.data()
    levels = zip(self._maps(variables, train["images"]), self._maps(variables, test["images"]))
    train_maps, test_maps = zip(*(classification.standardize(a, b) for a, b in levels))
    params = fit_dense(list(train_maps), train["label_maps"],
                       num_classes=scenes.NUM_SEGMENTATION_CLASSES, steps=self.steps,
                       batch_size=self.train_batch_size, lr=self.lr,
                       weight_decay=self.weight_decay, rng=jax.random.key(self.seed))
    gt = test["label_maps"]
    pred = predict_dense(params, list(test_maps), gt.shape[1:], self.batch_size)
    confusion = confusion_matrix(pred, gt, scenes.NUM_SEGMENTATION_CLASSES)
    miou, iou = iou_from_confusion(confusion)
    return DenseResult(miou=miou,
                       miou_se=miou_standard_error(pred, gt, scenes.NUM_SEGMENTATION_CLASSES),
                       pixel_acc=float(np.trace(confusion) / confusion.sum()),
                       iou=iou, images=test["images"], label_maps=gt, predictions=pred)

  def run(self, variables: Any) -> Iterator[tuple[str, float]]:
    yield from self.evaluate(variables).scores().items()
