"""The single training-state pytree."""

from __future__ import annotations

from typing import Any

import flax
import jax
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue bit-for-bit: saved whole in every checkpoint.

  `target_params` is the momentum (EMA) copy of the parts of `params` a method keeps one of
  ({} for methods without a target); `batch_stats` holds BatchNorm running statistics per encoder;
  `extra` holds method state that is neither parameter nor optimiser state (queues, centres).
  """
  step: jax.Array
  params: Any
  target_params: Any
  batch_stats: Any
  opt_state: Any
  extra: Any
  rng: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, variables: dict[str, Any], tx: optax.GradientTransformation,
             rng: jax.Array) -> "TrainState":
    params = variables["params"]
    return cls(step=jax.numpy.zeros((), jax.numpy.int32), params=params,
               target_params=variables.get("target_params", {}),
               batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
               extra=variables.get("extra", {}), rng=rng, tx=tx)
