"""Momentum (EMA) update of target parameters and its schedules.

MoCo/DenseCL keep the momentum constant (0.999); BYOL, UniVIP, MoCo-v3 and ConMIM ramp it from
m0 to 1 with a half cosine. The trainer calls `momentum_at` then `update` once per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine")


def update(target: Any, online: Any, momentum: float | jax.Array) -> Any:
  """Returns m * target + (1 - m) * online, leaf-wise over `target`'s tree.

  `online` may hold extra top-level entries that have no target counterpart (a BYOL predictor,
  the UniVIP scene-instance layer); only the entries present in `target` are averaged.
  """
  if isinstance(target, Mapping) and isinstance(online, Mapping):
    missing = [k for k in target if k not in online]
    if missing:
      raise ValueError(f"Target parameters {missing} have no online counterpart; the target "
                       f"tree must be a subset of the online tree.")
    subset = {k: online[k] for k in target}
    online = subset if type(target) is dict else type(target)(subset)  # e.g. FrozenDict
  # optax's Polyak average is step*new + (1-step)*old, i.e. step = 1 - m.
  return optax.incremental_update(online, target, 1.0 - momentum)


def momentum_at(step: int | jax.Array, total_steps: int, base: float,
                schedule: str = "constant") -> jax.Array:
  """The EMA momentum at `step` (0-based).

  'constant': m = base. 'cosine' (BYOL / ConMIM): m = 1 - (1 - base)(1 + cos(pi*step/T))/2,
  which starts at `base` and approaches 1 at the last step, with no warm-up.
  """
  if schedule == "constant":
    return jnp.asarray(base, jnp.float32)
  if schedule == "cosine":
    if total_steps < 1:
      raise ValueError(f"total_steps must be positive for a cosine momentum, got {total_steps}.")
    frac = jnp.asarray(step, jnp.float32) / total_steps
    return 1.0 - (1.0 - base) * (1.0 + jnp.cos(jnp.pi * frac)) / 2.0
  raise ValueError(f"Unknown momentum schedule {schedule!r}; valid choices: {SCHEDULES}.")
