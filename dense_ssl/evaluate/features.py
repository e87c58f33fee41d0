"""Frozen-backbone features for the evaluators: pooled C5, the C5 map and the C4 map.

The backbone runs in eval mode (BatchNorm running statistics), in float32, jitted once per
(backbone, batch shape), over fixed-size batches (the last one padded) so a whole set compiles
once. Images are uint8 and normalised by the training pipeline's own `augment.normalize`
(ImageNet mean/std unless told otherwise, as `config.augment.mean/std`).

C4 (stride 16) is not an output of `dense_ssl.models.resnet.ResNet`, which returns C5 only; it
is read with flax's `capture_intermediates` from the last block of stage 3 (`layer3_{n-1}`),
so the backbone module itself is untouched and the C5 map is the very same computation.
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


def backbone_variables(state_or_variables: Any) -> dict[str, Any]:
  """{"params", "batch_stats"} of the online backbone, from any of the forms evaluators get:

  * a `TrainState` (params {"backbone", "neck"}, batch_stats {"online": {"backbone", ...}}),
  * a raw checkpoint tree (`checkpoint.load_raw`) or `method.init` output: the same as dicts,
  * backbone variables already: {"params": backbone params, "batch_stats": ...}.
  """
  if hasattr(state_or_variables, "params"):
    params, stats = state_or_variables.params, state_or_variables.batch_stats
  else:
    params = state_or_variables["params"]
    stats = state_or_variables.get("batch_stats", {})
  if "backbone" in params:
    params = params["backbone"]
    stats = stats.get("online", {}).get("backbone", {})
  return {"params": params, "batch_stats": stats}


def _c4_block(model_name: str) -> str:
  if model_name not in resnet.VARIANTS:
    raise ValueError(f"The evaluators read ResNet feature maps; {model_name!r} is not a ResNet "
                     f"(valid: {', '.join(sorted(resnet.VARIANTS))}).")
  return f"layer3_{resnet.VARIANTS[model_name][0][2] - 1}"


def _forward(variables: dict[str, Any], images: jax.Array, *, model_name: str, with_c4: bool,
             norm: Normalization) -> dict[str, jax.Array]:
  model = models.get_backbone(model_name)
  x = augment.normalize(images, norm)
  if not with_c4:
    c5 = model.apply(variables, x, train=False)
    return {"c5": c5, "pooled": jnp.mean(c5, axis=(1, 2))}
  block = _c4_block(model_name)
  c5, captured = model.apply(variables, x, train=False, mutable=["intermediates"],
                             capture_intermediates=lambda m, fn: m.name == block)
  c4 = captured["intermediates"][block]["__call__"][0]
  return {"c5": c5, "pooled": jnp.mean(c5, axis=(1, 2)), "c4": c4}


@functools.cache
def _jitted_forward() -> Any:
  # Built on first use, not at import: the compiler options depend on the backend.
  return jax.jit(_forward, static_argnames=("model_name", "with_c4", "norm"),
                 compiler_options=xla_cpu.compiler_options())


def extract(model_name: str, variables: Any, images: np.ndarray, *, batch_size: int = 64,
            with_c4: bool = False,
            norm: Normalization = IMAGENET) -> dict[str, np.ndarray]:
  """Features of uint8 images (N, H, W, 3) under a frozen backbone, as float32 numpy.

  Args:
    model_name: backbone name (`dense_ssl.models.names()`, ResNets).
    variables: anything `backbone_variables` accepts.
    images: uint8 RGB (N, H, W, 3), H and W multiples of 32.
    batch_size: images per forward pass.
    with_c4: also return the stride-16 map "c4" (N, H/16, W/16, C4).
    norm: the training pipeline's normalisation (`config.augment.mean/std`).

  Returns {"pooled" (N, C), "c5" (N, H/32, W/32, C)[, "c4"]}.
  """
  _c4_block(model_name)  # A clear error for non-ResNets before any work.
  # On the device once, not once per batch (checkpoints load as host numpy arrays).
  variables = jax.device_put(backbone_variables(variables))
  chunks: dict[str, list[np.ndarray]] = {}
  for start in range(0, len(images), batch_size):
    batch = np.asarray(images[start:start + batch_size])
    pad = batch_size - len(batch)
    if pad:  # Same shape for every batch: one compilation.
      batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
    out = _jitted_forward()(variables, batch, model_name=model_name, with_c4=with_c4, norm=norm)
    for k, v in out.items():
      chunks.setdefault(k, []).append(np.asarray(v, np.float32)[:batch_size - pad])
  return {k: np.concatenate(v) for k, v in chunks.items()}


def init_variables(model_name: str, seed: int = 0, image_size: int = 64) -> dict[str, Any]:
  """A randomly initialised backbone's {"params", "batch_stats"} (the evaluators' baseline)."""
  model = models.get_backbone(model_name)
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return dict(jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed), x))
