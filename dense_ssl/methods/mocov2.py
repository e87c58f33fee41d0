"""MoCo-v2 (Chen et al., 2020): InfoNCE against a queue of momentum-encoder keys.

Query = view1 through the online encoder, key = view2 through the momentum (target) encoder,
loss = CE([q·k, q·queueᵀ]/T, label 0), then the whole global batch of keys is enqueued. The
head-level math (`head_loss`) is a pure function of the neck outputs, shared by the method and
by its parity check (methods/densecl.py, whose vectors hold a MoCo-v2 block).

Config keys: `method.temperature`, `queue_size`, `dim`, `hidden`, and MomentumPair's.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssl import losses, queues
from dense_ssl.methods import base, families
from dense_ssl.models import heads


class Encoder(nn.Module):
  """Backbone ("backbone") + neck ("neck"); returns (C5 map, neck output).

  MoCo's key encoder is the whole query encoder, so `online` changes nothing here.
  """

  backbone: nn.Module
  neck: nn.Module

  def __call__(self, x: jax.Array, train: bool = True, *, online: bool = True
               ) -> tuple[jax.Array, Any]:
    del online
    c5 = self.backbone(x, train)
    return c5, self.neck(c5, train)


def head_loss(q_embed: jax.Array, k_embed: jax.Array, queue: queues.Queue,
              temperature: float) -> tuple[jax.Array, dict[str, Any]]:
  """MoCo-v2's objective on the raw neck outputs (N, D) of the query and the key.

  The key and the queue are stop-gradient'ed here. Logits use the queue as it was before this
  step; the keys are enqueued after. Returns (loss, aux) with aux = {"q", "k", "logits"
  (scaled by 1/T), "queue" (after the enqueue)}.
  """
  q = losses.l2_normalize(q_embed.astype(jnp.float32))
  k = jax.lax.stop_gradient(losses.l2_normalize(k_embed.astype(jnp.float32)))
  negatives = jax.lax.stop_gradient(queue.buffer)
  loss, logits = losses.info_nce_queue(q, k, negatives, temperature, return_logits=True)
  return loss, {"q": q, "k": k, "logits": logits, "queue": queues.enqueue(queue, k)}


class TwoViewQueueMethod(families.MomentumPair):
  """What MoCo-v2, DenseCL and HoughCL share: two MoCo-v2 views, a neck, queues.

  Views `view1` (query) and `view2` (key) at `config.data.image_size` with the data config's
  crop scale/ratio and flip, preset "mocov2", each with its correspondence grid. Subclasses
  define `make_neck()` and `loss`; `init_extra` creates one queue per name in `queue_names`.
  """

  uses_queues = True
  queue_names: tuple[str, ...] = ("queue",)

  def __init__(self, config: Any, durations: Any = None):
    super().__init__(config, durations)
    m = config.method
    self.temperature = float(m.temperature)
    self.dim, self.hidden = int(m.dim), int(m.hidden)
    self.encoder = Encoder(backbone=self.backbone.module, neck=self.make_neck())

  def make_neck(self) -> nn.Module:
    return heads.MocoNeck(hidden=self.hidden, dim=self.dim)

  def views(self) -> tuple[base.ViewSpec, ...]:
    d = self.config.data
    size = int(d.image_size)
    common = dict(size=size, scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio),
                  flip=bool(d.flip), preset="mocov2", grid=size // self.backbone.stride)
    return (base.ViewSpec("view1", **common), base.ViewSpec("view2", **common))

  def init_extra(self, rng: jax.Array) -> dict[str, queues.Queue]:
    keys = jax.random.split(rng, len(self.queue_names)) if len(self.queue_names) > 1 else [rng]
    return {name: queues.create(key, self.queue_size, self.dim)
            for name, key in zip(self.queue_names, keys)}

  def encode(self, params: Any, state: base.MethodState, batch: dict[str, jax.Array],
             rng: jax.Array):
    """Query (online) and key (target) passes: ((q_map, q_out), (k_map, k_out), batch_stats)."""
    q_side, q_stats = self.online(params, state, batch["view1"])
    k_side, k_stats = self.target(state, batch["view2"], rng)
    return q_side, k_side, {"online": q_stats, "target": k_stats}


@base.register("mocov2")
class MoCoV2(TwoViewQueueMethod):
  """MoCo-v2: `NonLinearNeckV1` (avgpool, fc1, ReLU, fc2), one queue, T = 0.2."""

  def loss(self, params: Any, state: base.MethodState, batch: dict[str, jax.Array],
           rng: jax.Array) -> base.LossOutput:
    (_, q_embed), (_, k_embed), stats = self.encode(params, state, batch, rng)
    loss, aux = head_loss(q_embed, k_embed, state.extra["queue"], self.temperature)
    metrics = {"loss": loss, "std_q": families.embedding_std(aux["q"])}
    return loss, base.StepOutput(batch_stats=stats, extra={"queue": aux["queue"]},
                                 metrics=metrics)
