"""Full fine-tuning of a ViT with layer-wise learning-rate decay (BEiT's and ConMIM's protocol,
at the scale of the garment probes).

The whole backbone and a linear head on the mean of the patch tokens (BEiT's mean pooling) are
trained with AdamW on the "probe_train" garments (`dense_ssl.data.scenes.single_garments`, the
linear probe's data, random horizontal flips), and scored top-1 on "probe_test". Layer-wise
decay (BEiT's `get_num_layer_for_vit`): the patch embedding and the tokens are layer 0, block i
is layer i + 1, the final norm and the head are layer depth + 1, and layer k trains at
lr · decay^(depth + 1 - k); its weight decay scales with it (torch AdamW's param groups).
Weight decay skips biases, norms, LayerScale, the tokens and the bias tables (BEiT's
`no_weight_decay`). Stochastic depth runs at the backbone's own `drop_path`.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dense_ssl import models
from dense_ssl.data import augment, scenes
from dense_ssl.evaluate import base, features

_EMBEDDINGS = ("cls_token", "mask_token", "pos_embed", "patch_embed")
_NO_DECAY = re.compile(r"(bias|scale|ls\d|cls_token|mask_token|pos_embed|table)$")


def layer_id(path: str, depth: int) -> int:
  """BEiT's layer number of a fine-tuned parameter ("backbone/block3/attn/..." -> 4)."""
  parts = path.split("/")
  top = parts[1] if parts[0] == "backbone" and len(parts) > 1 else None
  if top in _EMBEDDINGS:
    return 0
  block = re.fullmatch(r"block(\d+)", top or "")
  return int(block.group(1)) + 1 if block else depth + 1


def _path(keys: Any) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in keys)


def layer_scales(params: Any, depth: int, decay: float) -> Any:
  """Per parameter, its learning-rate factor decay^(depth + 1 - layer_id) (module doc)."""
  return jax.tree_util.tree_map_with_path(
      lambda k, _: float(decay**(depth + 1 - layer_id(_path(k), depth))), params)


def _scale_by_tree(factors: Any) -> optax.GradientTransformation:
  return optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda updates, state, params=None: (jax.tree.map(lambda u, f: u * f, updates, factors),
                                           state))


def optimizer(params: Any, lr_fn: optax.Schedule, *, depth: int, layer_decay: float,
              weight_decay: float) -> optax.GradientTransformation:
  """AdamW whose step (decay included) is scaled per layer by `layer_scales`."""
  decay_mask = jax.tree_util.tree_map_with_path(
      lambda k, p: np.ndim(p) > 1 and not _NO_DECAY.search(_path(k)), params)
  return optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay, decay_mask),
                     optax.scale_by_learning_rate(lr_fn),
                     _scale_by_tree(layer_scales(params, depth, layer_decay)))


class Classifier(nn.Module):
  """The backbone, mean of its patch tokens, a linear `head` (zero-initialised)."""

  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    tokens = self.backbone(x, train)
    pooled = jnp.mean(tokens[:, 1:].astype(jnp.float32), axis=1)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(pooled)


@base.register("finetune")
class FineTune:
  """Top-1 after full fine-tuning with layer-wise lr decay (see the module docstring)."""

  def __init__(self, backbone: models.Backbone, *, num_train: int = 5000, num_test: int = 2000,
               image_size: int = 64, steps: int = 300, batch_size: int = 64, lr: float = 1e-3,
               warmup_steps: int = 30, layer_decay: float = 0.65, weight_decay: float = 0.05,
               seed: int = 0, background_pool: int = 0, tint: bool = True,
               data_dir: str = scenes.DEFAULT_DIR):
    if backbone.family != "vit":
      raise ValueError(f"The finetune evaluator decays the learning rate over a ViT's blocks; "
                       f"{backbone.name!r} is a {backbone.family}: use the linear probe.")
    self.backbone = backbone
    self.num_train, self.num_test, self.image_size = num_train, num_test, image_size
    self.steps, self.batch_size, self.lr, self.warmup_steps = steps, batch_size, lr, warmup_steps
    self.layer_decay, self.weight_decay, self.seed, self.data_dir = (layer_decay, weight_decay,
                                                                     seed, data_dir)
    self.background_pool, self.tint = background_pool, tint

  def _data(self) -> tuple[np.ndarray, ...]:
    make = functools.partial(scenes.single_garments, size=self.image_size, seed=self.seed,
                             background_pool=self.background_pool, tint=self.tint,
                             directory=self.data_dir)
    return (*make("probe_train", n=self.num_train), *make("probe_test", n=self.num_test))

  def run(self, variables: Any) -> Iterator[tuple[str, float]]:
    train_x, train_y, test_x, test_y = self._data()
    module = self.backbone.eval_module()
    model = Classifier(module, scenes.NUM_CLASSES)
    head = model.init(jax.random.key(self.seed), jnp.zeros((1, *train_x.shape[1:]),
                                                           jnp.float32))["params"]["head"]
    params = {"backbone": jax.tree.map(jnp.asarray, dict(variables["params"])), "head": head}
    lr_fn = optax.join_schedules(
        [optax.linear_schedule(0.0, self.lr, max(self.warmup_steps, 1)),
         optax.cosine_decay_schedule(self.lr, max(self.steps - self.warmup_steps, 1))],
        [max(self.warmup_steps, 1)])
    tx = optimizer(params, lr_fn, depth=module.depth, layer_decay=self.layer_decay,
                   weight_decay=self.weight_decay)
    norm = features.IMAGENET

    @jax.jit
    def step(params, opt_state, images, labels, rng):
      flip_rng, drop_rng = jax.random.split(rng)
      flip = jax.random.bernoulli(flip_rng, 0.5, (images.shape[0], 1, 1, 1))
      x = augment.normalize(jnp.where(flip, images[:, :, ::-1], images), norm)

      def loss_fn(p):
        logits = model.apply({"params": p}, x, train=True, rngs={"dropout": drop_rng})
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def predict(params, images):
      return jnp.argmax(model.apply({"params": params}, augment.normalize(images, norm)), -1)

    opt_state = tx.init(params)
    order = np.random.default_rng(self.seed)
    rng = jax.random.key(self.seed)
    loss = jnp.zeros(())
    for i in range(self.steps):
      idx = order.choice(len(train_x), self.batch_size, replace=len(train_x) < self.batch_size)
      params, opt_state, loss = step(params, opt_state, train_x[idx], train_y[idx],
                                     jax.random.fold_in(rng, i))
    preds = []
    for start in range(0, len(test_x), self.batch_size):
      batch = test_x[start:start + self.batch_size]
      pad = self.batch_size - len(batch)
      batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
      preds.append(np.asarray(predict(params, batch))[:self.batch_size - pad])
    yield "top1", float(np.mean(np.concatenate(preds) == test_y))
    yield "train_loss", float(loss)
