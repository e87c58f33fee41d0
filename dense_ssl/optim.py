"""Optimisers, schedules and the optimiser hooks a method can ask for, all from `config.optim`.

    name              sgd | lars | adamw
    lr                peak learning rate; with base_batch_size > 0 it is the rate at that batch
                      and scales linearly: lr x batch_size / base_batch_size (MoCo-v3, BYOL)
    schedule          cosine | constant, after warmup_epochs of linear warm-up from 0
    weight_decay      and, with weight_decay_end >= 0, a cosine from weight_decay to
                      weight_decay_end over the run (DINO 0.04 -> 0.4)
    no_decay          regexes of parameter paths ("backbone/layer1_0/bn1/scale") that get no
                      weight decay, nor LARS adaptation (BYOL: biases and norms)
    frozen            regexes of parameters that never change (MoCo-v3's patch embedding)
    freeze_early      regexes of parameters held fixed for the first freeze_early_epochs (DINO's
                      last layer in epoch 1)
    clip_grad_norm    > 0 clips the gradient to this global norm first; with
    clip_grad_per_tensor, each parameter tensor to this norm on its own (DINO's clip_gradients)

SGD follows torch.optim.SGD as MoCo/DenseCL use it (decay added to the gradient of every
parameter not in `no_decay`, before the momentum buffer); AdamW decays decoupled, scaled by
the learning rate, as torch.optim.AdamW.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "lars", "adamw")
SCHEDULES = ("cosine", "constant")
# Labels of `param_labels`.
TRAIN, NO_DECAY, FROZEN = "train", "no_decay", "frozen"


class Durations(NamedTuple):
  """A run's length in steps, resolved once from the config's `_steps`/`_epochs` keys."""
  total_steps: int
  steps_per_epoch: int
  warmup_steps: int

  def epochs_to_steps(self, epochs: float) -> int:
    return int(round(epochs * self.steps_per_epoch))


def durations(config: Any, num_examples: int) -> Durations:
  """The run's durations from `total_steps` or `total_epochs` and `optim.warmup_epochs`."""
  if (config.total_epochs > 0) == (config.total_steps > 0):
    raise ValueError(f"Set exactly one of config.total_epochs ({config.total_epochs}) and "
                     f"config.total_steps ({config.total_steps}) to a positive value.")
  steps_per_epoch = max(num_examples // config.batch_size, 1)
  total = config.total_steps or int(math.ceil(config.total_epochs * steps_per_epoch))
  warmup = int(round(config.optim.warmup_epochs * steps_per_epoch))
  return Durations(total, steps_per_epoch, warmup)


def peak_lr(optim_cfg: Any, batch_size: int) -> float:
  """`lr`, scaled by batch_size / base_batch_size when base_batch_size > 0."""
  base = optim_cfg.get("base_batch_size", 0)
  return optim_cfg.lr * batch_size / base if base > 0 else optim_cfg.lr


def learning_rate_fn(optim_cfg: Any, total_steps: int, warmup_steps: int,
                     batch_size: int | None = None) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to 0 (or constant) over the remaining steps."""
  lr = optim_cfg.lr if batch_size is None else peak_lr(optim_cfg, batch_size)
  if optim_cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, max(total_steps - warmup_steps, 1))
  elif optim_cfg.schedule == "constant":
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"Unknown config.optim.schedule={optim_cfg.schedule!r}; valid choices: "
                     f"{', '.join(SCHEDULES)}.")
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def weight_decay_fn(optim_cfg: Any, total_steps: int) -> optax.Schedule:
  """Constant `weight_decay`, or a cosine to `weight_decay_end` (when >= 0) over the run."""
  start, end = optim_cfg.weight_decay, optim_cfg.get("weight_decay_end", -1.0)
  if end < 0:
    return optax.constant_schedule(start)
  # DINO's cosine_scheduler: end + (start - end)(1 + cos(pi t / T)) / 2.
  return lambda step: end + (start - end) * 0.5 * (
      1.0 + jnp.cos(jnp.pi * jnp.asarray(step, jnp.float32) / max(total_steps, 1)))


def _path(keys: Sequence[Any]) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def _matches(patterns: Sequence[str], path: str) -> bool:
  return any(re.search(p, path) for p in patterns)


def param_labels(optim_cfg: Any, params: Any) -> Any:
  """Per parameter: FROZEN, NO_DECAY or TRAIN, from `frozen` and `no_decay` (see module doc)."""
  frozen, no_decay = tuple(optim_cfg.get("frozen", ())), tuple(optim_cfg.get("no_decay", ()))

  def label(keys, _):
    path = _path(keys)
    if _matches(frozen, path):
      return FROZEN
    return NO_DECAY if _matches(no_decay, path) else TRAIN

  return jax.tree_util.tree_map_with_path(label, params)


def _mask(labels: Any, *wanted: str) -> Any:
  return jax.tree.map(lambda label: label in wanted, labels)


class _ScheduledDecayState(NamedTuple):
  count: jax.Array


def add_decayed_weights(schedule: optax.Schedule, mask: Any) -> optax.GradientTransformation:
  """`optax.add_decayed_weights` with the decay rate a schedule of the step."""

  def init(params):
    del params
    return _ScheduledDecayState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    rate = schedule(state.count)
    updates = jax.tree.map(lambda g, p, m: g + rate * p if m else g, updates, params, mask)
    return updates, _ScheduledDecayState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
  """DINO's `clip_gradients`: each tensor g with ||g|| > max_norm is scaled by
  max_norm / (||g|| + 1e-6); the others are left as they are."""

  def update(updates, state, params=None):
    del params

    def clip(g):
      norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
      coef = max_norm / (norm + 1e-6)
      return jnp.where(coef < 1.0, g * coef.astype(g.dtype), g)

    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class _HoldState(NamedTuple):
  count: jax.Array


def hold(mask: Any, steps: int | None = None) -> optax.GradientTransformation:
  """Zeroes the updates of the masked parameters (during the first `steps` steps, or always)."""

  def init(params):
    del params
    return _HoldState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    held = jnp.asarray(True) if steps is None else state.count < steps
    updates = jax.tree.map(lambda u, m: jnp.where(held, jnp.zeros_like(u), u) if m else u,
                           updates, mask)
    return updates, _HoldState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def create_optimizer(optim_cfg: Any, lr_fn: optax.Schedule, params: Any,
                     durations: Durations) -> optax.GradientTransformation:
  """The optimiser of `optim_cfg` for `params` (whose paths the label rules read)."""
  name = optim_cfg.name
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown config.optim.name={name!r}; valid choices: "
                     f"{', '.join(OPTIMIZERS)}.")
  labels = param_labels(optim_cfg, params)
  decay_mask = _mask(labels, TRAIN)
  wd = weight_decay_fn(optim_cfg, durations.total_steps)
  scheduled_wd = optim_cfg.get("weight_decay_end", -1.0) >= 0

  if name == "sgd":
    core = [add_decayed_weights(wd, decay_mask),
            optax.sgd(lr_fn, momentum=optim_cfg.momentum, nesterov=False)]
  elif name == "lars":
    # optax.lars takes a constant rate; a scheduled one is added in front, masked the same way.
    core = [add_decayed_weights(wd, decay_mask)] if scheduled_wd else []
    core.append(optax.lars(lr_fn, weight_decay=0.0 if scheduled_wd else optim_cfg.weight_decay,
                           weight_decay_mask=decay_mask, trust_ratio_mask=decay_mask,
                           momentum=optim_cfg.momentum))
  else:  # adamw: decoupled decay scaled by the learning rate, as torch.optim.AdamW
    core = [optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2),
            add_decayed_weights(wd, decay_mask), optax.scale_by_learning_rate(lr_fn)]

  parts = []
  frozen = _mask(labels, FROZEN)
  any_frozen = any(jax.tree.leaves(frozen))
  if any_frozen:  # frozen gradients count in no norm and feed no momentum
    parts.append(hold(frozen))
  if optim_cfg.get("clip_grad_norm", 0.0) > 0:
    parts.append(clip_per_tensor(optim_cfg.clip_grad_norm)
                 if optim_cfg.get("clip_grad_per_tensor", False)
                 else optax.clip_by_global_norm(optim_cfg.clip_grad_norm))
  parts += core
  early = tuple(optim_cfg.get("freeze_early", ()))
  if early:
    mask = jax.tree_util.tree_map_with_path(lambda k, _: _matches(early, _path(k)), params)
    parts.append(hold(mask, durations.epochs_to_steps(optim_cfg.freeze_early_epochs)))
  if any_frozen:  # and no weight decay moves them
    parts.append(hold(frozen))
  return optax.chain(*parts)
