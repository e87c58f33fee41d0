"""MoCo-v2 (Chen et al., 2020): InfoNCE against a queue of momentum-encoder keys.

Query = view1 through the online encoder, key = view2 through the momentum (target) encoder,
loss = CE([q·k, q·queueᵀ]/T, label 0), then the whole global batch of keys is enqueued. The
head-level math (`head_loss`) is a pure function of the neck outputs, shared by the method and
by `dense_ssl.parity`, which feeds it the reference vectors' backbone maps.
"""

from __future__ import annotations

import abc
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssl import losses, models, queues
from dense_ssl.methods import base
from dense_ssl.models import heads

BN_MODES = ("shuffle", "sync", "none")


class Encoder(nn.Module):
  """Backbone ("backbone") + neck ("neck"); returns (C5 map, neck output)."""

  backbone: nn.Module
  neck: nn.Module

  def __call__(self, x: jax.Array, train: bool = True) -> tuple[jax.Array, Any]:
    c5 = self.backbone(x, train)
    return c5, self.neck(c5, train)


def head_loss(q_embed: jax.Array, k_embed: jax.Array, queue: queues.Queue,
              temperature: float) -> tuple[jax.Array, dict[str, Any]]:
  """MoCo-v2's objective on the raw neck outputs (N, D) of the query and the key.

  The key and the queue are stop-gradient'ed here. Logits use the queue as it was before this step; the keys
  are enqueued after. Returns (loss, aux) with aux = {"q", "k", "logits" (scaled by 1/T),
  "queue" (after the enqueue)}.
  """
  q = base.l2_normalize(q_embed.astype(jnp.float32))
  k = jax.lax.stop_gradient(base.l2_normalize(k_embed.astype(jnp.float32)))
  negatives = jax.lax.stop_gradient(queue.buffer)
  loss, logits = losses.info_nce_queue(q, k, negatives, temperature, return_logits=True)
  return loss, {"q": q, "k": k, "logits": logits, "queue": queues.enqueue(queue, k)}


def embedding_std(x: jax.Array) -> jax.Array:
  """Mean over dimensions of the batch std of L2-normalised embeddings (0 = collapse)."""
  return jnp.mean(jnp.std(base.l2_normalize(x.astype(jnp.float32)), axis=0))


class TwoEncoderMethod(abc.ABC):
  """What MoCo-v2, DenseCL and HoughCL share: config reading, the two encoder passes, init.

  Subclasses define `make_neck()`, `init_extra(rng)` and `loss(...)`.
  """

  def __init__(self, config: Any):
    method = config.method
    self.temperature = float(method.temperature)
    self.queue_size = int(method.queue_size)
    self.dim = int(method.dim)
    self.hidden = int(method.hidden)
    self.bn = str(method.bn)
    self.bn_groups = int(method.bn_groups)
    if self.bn not in BN_MODES:
      raise ValueError(f"config.method.bn={self.bn!r}; valid choices: {', '.join(BN_MODES)}.")
    if self.bn_groups < 1:
      raise ValueError(f"config.method.bn_groups={self.bn_groups} must be >= 1.")
    dtype = jnp.bfloat16 if config.model.half_precision else jnp.float32
    backbone = models.get_backbone(config.model.name, dtype=dtype,
                                   zero_init_residual=bool(config.model.zero_init_residual))
    self.encoder = Encoder(backbone=backbone, neck=self.make_neck())

  @abc.abstractmethod
  def make_neck(self) -> nn.Module:
    """The projection head after the backbone (global and, for dense methods, dense)."""

  @abc.abstractmethod
  def init_extra(self, rng: jax.Array) -> dict[str, queues.Queue]:
    """The method's non-parameter state (its queues), as `TrainState.extra`."""

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> base.Variables:
    """Online and target encoders start identical; each keeps its own BN statistics."""
    model_rng, extra_rng = jax.random.split(rng)
    variables = self.encoder.init(model_rng, batch["view1"], train=False)
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    return {"params": params, "target_params": jax.tree.map(jnp.array, params),
            "batch_stats": {"online": stats, "target": jax.tree.map(jnp.array, stats)},
            "extra": self.init_extra(extra_rng)}

  def encode(self, params: Any, state: Any, batch: dict[str, jax.Array], rng: jax.Array):
    """Query and key forward passes with per-group (optionally shuffled) BatchNorm.

    Returns ((q_map, q_out), (k_map, k_out), new batch_stats); the key side is constant.
    """
    groups = 1 if self.bn == "sync" else self.bn_groups
    shuffle_rng = rng if self.bn == "shuffle" else None
    online = {"params": params, "batch_stats": state.batch_stats["online"]}
    target = {"params": state.target_params, "batch_stats": state.batch_stats["target"]}
    q_side, q_stats = base.apply_grouped(self.encoder, online, batch["view1"], groups=groups)
    k_side, k_stats = base.apply_grouped(self.encoder, target, batch["view2"], groups=groups,
                                         shuffle_rng=shuffle_rng)
    k_side, k_stats = jax.lax.stop_gradient((k_side, k_stats))
    return q_side, k_side, {"online": q_stats, "target": k_stats}


@base.register("mocov2")
class MoCoV2(TwoEncoderMethod):
  """MoCo-v2: `NonLinearNeckV1` (avgpool, fc1, ReLU, fc2), one queue, T = 0.2."""

  def make_neck(self) -> nn.Module:
    return heads.MocoNeck(hidden=self.hidden, dim=self.dim)

  def init_extra(self, rng: jax.Array) -> dict[str, queues.Queue]:
    return {"queue": queues.create(rng, self.queue_size, self.dim)}

  def loss(self, params: Any, state: Any, batch: dict[str, jax.Array],
           rng: jax.Array) -> base.LossOutput:
    (_, q_embed), (_, k_embed), stats = self.encode(params, state, batch, rng)
    loss, aux = head_loss(q_embed, k_embed, state.extra["queue"], self.temperature)
    metrics = {"loss": loss, "std_q": embedding_std(aux["q"])}
    return loss, ({"batch_stats": stats, "extra": {"queue": aux["queue"]}}, metrics)
