"""Frozen-backbone features for the evaluators: pooled features, the final map, and C4.

The evaluators get the backbone from the method (`Method.backbone`, a `models.Backbone`) and
its variables from the method too (`Method.backbone_variables`), so they never guess where a
backbone lives in a state. Per family:

* ResNet: "pooled" = mean of the C5 map, "map" = the C5 map (stride 32), "c4" = the stride-16
  map read with flax's `capture_intermediates` from the last block of stage 3 (`layer3_{n-1}`),
  so the backbone module itself is untouched and the C5 map is the very same computation.
* ViT: "pooled" = the class token, or the mean patch token where `backbone.pool` is "mean"
  (BEiT / ConMIM's linear probe), "map" = the patch tokens on their grid (stride = patch).

The backbone runs in eval mode (BatchNorm running statistics), in float32, jitted once per
(backbone, batch shape), over fixed-size batches (the last one padded) so a whole set compiles
once. Images are uint8 and normalised by the training pipeline's own `augment.normalize`
(ImageNet mean/std unless told otherwise, as `config.augment.mean/std`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dense_ssl import models, xla_cpu
from dense_ssl.data import augment
from dense_ssl.models import resnet


class Normalization(NamedTuple):
  """Per-channel mean/std of images in [0, 1]; duck-types `config.augment` for `augment`."""
  mean: tuple[float, ...] = (0.485, 0.456, 0.406)
  std: tuple[float, ...] = (0.229, 0.224, 0.225)


# torchvision / MoCo normalisation, as configs/common.py's augment.mean / augment.std.
IMAGENET = Normalization()


def _c4_block(backbone: models.Backbone) -> str:
  if backbone.family != "resnet":
    raise ValueError(f"C4 is a ResNet's stride-16 map; {backbone.name!r} is a "
                     f"{backbone.family}: use its 'map' (with_c4=False).")
  return f"layer3_{resnet.VARIANTS[backbone.name][0][2] - 1}"


def _forward(variables: dict[str, Any], images: jax.Array, *, backbone: models.Backbone,
             with_c4: bool, norm: Normalization) -> dict[str, jax.Array]:
  model = backbone.eval_module()
  x = augment.normalize(images, norm)
  if backbone.family == "vit":
    tokens = model.apply(variables, x, train=False)
    n, h, w = x.shape[0], x.shape[1] // backbone.stride, x.shape[2] // backbone.stride
    patches = tokens[:, 1:]
    pooled = jnp.mean(patches, axis=1) if backbone.pool == "mean" else tokens[:, 0]
    return {"pooled": pooled, "map": patches.reshape(n, h, w, tokens.shape[-1])}
  if not with_c4:
    c5 = model.apply(variables, x, train=False)
    return {"map": c5, "pooled": jnp.mean(c5, axis=(1, 2))}
  block = _c4_block(backbone)
  c5, captured = model.apply(variables, x, train=False, mutable=["intermediates"],
                             capture_intermediates=lambda m, fn: m.name == block)
  c4 = captured["intermediates"][block]["__call__"][0]
  return {"map": c5, "pooled": jnp.mean(c5, axis=(1, 2)), "c4": c4}


@functools.cache
def _jitted_forward() -> Any:
  # Built on first use, not at import: the compiler options depend on the backend.
  return jax.jit(_forward, static_argnames=("backbone", "with_c4", "norm"),
                 compiler_options=xla_cpu.compiler_options())


def extract(backbone: models.Backbone, variables: dict[str, Any], images: np.ndarray, *,
            batch_size: int = 64, with_c4: bool = False,
            norm: Normalization = IMAGENET) -> dict[str, np.ndarray]:
  """Features of uint8 images (N, H, W, 3) under a frozen backbone, as float32 numpy.

  Args:
    backbone: the method's backbone.
    variables: its {"params", "batch_stats"} (`Method.backbone_variables`).
    images: uint8 RGB (N, H, W, 3), H and W multiples of the backbone's stride.
    batch_size: images per forward pass.
    with_c4: also return the stride-16 map "c4" (ResNets).
    norm: the training pipeline's normalisation (`config.augment.mean/std`).

  Returns {"pooled" (N, C), "map" (N, H/stride, W/stride, C)[, "c4"]}.
  """
  if with_c4:
    _c4_block(backbone)  # A clear error before any work.
  if images.shape[1] % backbone.stride or images.shape[2] % backbone.stride:
    raise ValueError(f"Images of {images.shape[1:3]} px do not tile into {backbone.name}'s "
                     f"stride {backbone.stride}; use sides that are multiples of it.")
  # On the device once, not once per batch (checkpoints load as host numpy arrays).
  variables = jax.device_put(dict(variables))
  chunks: dict[str, list[np.ndarray]] = {}
  for start in range(0, len(images), batch_size):
    batch = np.asarray(images[start:start + batch_size])
    pad = batch_size - len(batch)
    if pad:  # Same shape for every batch: one compilation.
      batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
    out = _jitted_forward()(variables, batch, backbone=backbone, with_c4=with_c4, norm=norm)
    for k, v in out.items():
      chunks.setdefault(k, []).append(np.asarray(v, np.float32)[:batch_size - pad])
  return {k: np.concatenate(v) for k, v in chunks.items()}


def init_variables(backbone: models.Backbone, seed: int = 0,
                   image_size: int = 64) -> dict[str, Any]:
  """A randomly initialised backbone's {"params", "batch_stats"} (the evaluators' baseline)."""
  model = backbone.eval_module()
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed), x)
  return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def reestimate_batch_stats(backbone: models.Backbone, variables: dict[str, Any],
                           images: np.ndarray, *, batch_size: int = 32,
                           norm: Normalization = IMAGENET) -> dict[str, Any]:
  """`variables` with BatchNorm's running statistics re-estimated on `images` (uint8 NHWC).

  A random init's running statistics are their initial 0 / 1, so an eval-mode forward
  normalises nothing: its probes read an un-normalised network, while a pretrained network's
  statistics were learnt on the pretraining data. This is PreciseBN (Wu & Johnson, 2021): the
  equal average, over batches of `batch_size`, of each layer's batch mean and variance in the
  train-mode forward (each layer normalised by its batch upstream, as in training). An
  exponential average would not do: the initial variance of 1 outweighs a deep layer's small
  one long after it has decayed. The weights are untouched; a backbone without BatchNorm is
  returned as it is.
  """
  if not jax.tree.leaves(variables.get("batch_stats", {})):
    return variables
  module = backbone.eval_module()

  @jax.jit
  def update(batch_stats, x):
    _, new = module.apply({"params": variables["params"], "batch_stats": batch_stats},
                          augment.normalize(x, norm), train=True, mutable=["batch_stats"])
    return new["batch_stats"]

  # Flax updates running = m * running + (1 - m) * batch: from zeros it returns (1 - m) times
  # the batch's statistics, and from ones m more, which gives the module's own m.
  zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
  ones = jax.tree.map(jnp.ones_like, variables["batch_stats"])
  starts = range(0, len(images) - batch_size + 1, batch_size)
  if not starts:
    raise ValueError(f"Re-estimating BatchNorm statistics needs at least one batch of "
                     f"{batch_size} images; got {len(images)}.")
  batches = (jnp.asarray(images[i:i + batch_size]) for i in starts)
  first = next(batches)
  total = update(zeros, first)
  keep = jax.tree.map(jnp.subtract, update(ones, first), total)
  for x in batches:
    total = jax.tree.map(jnp.add, total, update(zeros, x))
  return {**variables, "batch_stats": jax.tree.map(
      lambda t, m: t / ((1 - m) * len(starts)), total, keep)}
