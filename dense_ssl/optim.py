"""Optimisers and learning-rate schedules (optax)."""

from __future__ import annotations

from typing import Any

import jax
import optax

OPTIMIZERS = ("sgd", "lars", "adamw")
SCHEDULES = ("cosine", "constant")


def learning_rate_fn(optim_cfg: Any, total_steps: int, warmup_steps: int) -> optax.Schedule:
  """Linear warm-up from 0, then cosine decay to 0 (or constant) over the remaining steps."""
  lr = optim_cfg.lr
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


def _decay_mask(params: Any) -> Any:
  """Weight decay on kernels only (used by LARS/AdamW recipes; SGD recipes decay everything)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def create_optimizer(optim_cfg: Any, lr_fn: optax.Schedule) -> optax.GradientTransformation:
  """The optimiser named by `optim_cfg.name`.

  SGD follows torch.optim.SGD as MoCo/DenseCL use it: decay added to the gradient of every
  parameter (BatchNorm and biases included) before the momentum buffer.
  """
  name, wd = optim_cfg.name, optim_cfg.weight_decay
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(wd),
                       optax.sgd(lr_fn, momentum=optim_cfg.momentum, nesterov=False))
  if name == "lars":
    return optax.lars(lr_fn, weight_decay=wd, weight_decay_mask=_decay_mask,
                      trust_ratio_mask=_decay_mask, momentum=optim_cfg.momentum)
  if name == "adamw":
    return optax.adamw(lr_fn, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=wd,
                       mask=_decay_mask)
  raise ValueError(f"Unknown config.optim.name={name!r}; valid choices: {', '.join(OPTIMIZERS)}.")

