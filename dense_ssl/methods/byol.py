"""BYOL (Grill et al., NeurIPS 2020): an online network predicts its EMA target's projection.

Online = backbone -> average pool -> projector (Linear 2048->4096, BN, ReLU, Linear ->256) ->
predictor (256->4096->256, same form); target = EMA of the backbone and the projector
(momentum 0.99 -> 1 on a half cosine), never differentiated. Each view goes through both
networks and the loss is the symmetric regression of normalised vectors,

    L = mean_n ||l2n(p1) - l2n(z2')||² + mean_n ||l2n(p2) - l2n(z1')||²  (each 2 - 2cos),

on BYOL's asymmetric views: both get colour jitter (0.4, 0.4, 0.2, 0.1; p 0.8) and greyscale
(p 0.2); view 1 is always blurred and never solarised, view 2 blurred with p 0.1 and solarised
with p 0.2 (presets "byol1"/"byol2" of `config.augment.presets`). BatchNorm statistics span
the whole global batch (`method.bn="sync"`), as BYOL's cross-replica BN.

Config keys: `method.dim`, `method.hidden`, and MomentumPair's (`momentum`,
`momentum_schedule`, `bn`, `bn_groups`). UniVIP (univip.py) builds on this class.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssl import losses
from dense_ssl.methods import base, families
from dense_ssl.models import heads


class Encoder(nn.Module):
  """Backbone ("backbone") -> pool -> projector ("projector") [-> predictor ("predictor")].

  Returns {"projection": (N, dim)} plus {"prediction": (N, dim)} when `online`: the target
  network is this module without its predictor.
  """

  backbone: nn.Module
  projector: nn.Module
  predictor: nn.Module

  def __call__(self, x: jax.Array, train: bool = True, *,
               online: bool = True) -> dict[str, jax.Array]:
    c5 = self.backbone(x, train)
    # Pool in float32: the heads compute in float32 whatever the backbone's dtype.
    pooled = jnp.mean(c5.astype(jnp.float32), axis=(1, 2))
    z = self.projector(pooled, train)
    out = {"projection": z}
    if online:
      out["prediction"] = self.predictor(z, train)
    return out


def head_loss(p1: jax.Array, p2: jax.Array, z1: jax.Array, z2: jax.Array) -> jax.Array:
  """BYOL's symmetric loss: 2 - 2cos(p1, z2) + 2 - 2cos(p2, z1), each a batch mean.

  `p1`, `p2` are the online predictions of views 1 and 2; `z1`, `z2` the target projections
  (stop-gradient'ed here).
  """
  sg = jax.lax.stop_gradient
  return losses.byol_regression(p1, sg(z2)) + losses.byol_regression(p2, sg(z1))


class TwoNetworks(families.MomentumPair):
  """The BYOL network pair: views "view1"/"view2" (presets byol1/byol2) and the encoder.

  `forward` runs a list of equally sized batches through the online and the target networks,
  each batch with its own BatchNorm statistics as in BYOL (one forward per view). With
  whole-batch statistics (`method.bn="sync"`, the recipe) the batches are vmapped through one
  application of each network (half the compile time of one trace per view; the running
  statistics get the batches' mean update); otherwise they go one after the other with the
  statistics chained. Subclasses (UniVIP) pass more views through the same networks.
  """

  online_only = ("predictor",)

  def __init__(self, config: Any, durations: Any = None):
    super().__init__(config, durations)
    m = config.method
    self.dim, self.hidden = int(m.dim), int(m.hidden)
    self.encoder = Encoder(backbone=self.backbone.module,
                           projector=heads.MLPHead(hidden=self.hidden, dim=self.dim),
                           predictor=heads.MLPHead(hidden=self.hidden, dim=self.dim))

  def views(self) -> tuple[base.ViewSpec, ...]:
    d = self.config.data
    common = dict(size=int(d.image_size), scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio),
                  flip=bool(d.flip))
    return (base.ViewSpec("view1", preset="byol1", **common),
            base.ViewSpec("view2", preset="byol2", **common))

  def _stacked(self, variables: Any, images: list[jax.Array],
                online: bool) -> tuple[list[dict[str, jax.Array]], Any]:
    """The encoder on each batch of `images` (vmapped; BN statistics per batch, over all of
    it): (outputs per batch, batch statistics updated by the batches' mean)."""

    def one(x):
      out, updated = self.encoder.apply(variables, x, train=True, mutable=["batch_stats"],
                                        online=online)
      return out, updated["batch_stats"]

    out, stats = jax.vmap(one)(jnp.stack(images))
    return ([jax.tree.map(lambda o, i=i: o[i], out) for i in range(len(images))],
            jax.tree.map(lambda s: jnp.mean(s, axis=0), stats))

  def forward(self, params: Any, state: base.MethodState, images: list[jax.Array],
              rng: jax.Array) -> tuple[list[dict[str, jax.Array]], list[jax.Array], Any]:
    """Online outputs and target projections of each batch of `images`, and the new
    batch statistics {"online", "target"} after all of them."""
    if self.bn == "sync":
      online_out, online_stats = self._stacked(
          {"params": params, "batch_stats": state.batch_stats["online"]}, images, True)
      target_out, target_stats = jax.lax.stop_gradient(self._stacked(
          {"params": state.target_params, "batch_stats": state.batch_stats["target"]}, images,
          False))
      return (online_out, [t["projection"] for t in target_out],
              {"online": online_stats, "target": target_stats})
    online_stats, target_stats = state.batch_stats["online"], state.batch_stats["target"]
    online_out, target_out = [], []
    for i, x in enumerate(images):
      st = state._replace(batch_stats={"online": online_stats, "target": target_stats})
      out, online_stats = self.online(params, st, x)
      st = st._replace(batch_stats={"online": online_stats, "target": target_stats})
      target, target_stats = self.target(st, x, jax.random.fold_in(rng, i))
      online_out.append(out)
      target_out.append(target["projection"])
    return online_out, target_out, {"online": online_stats, "target": target_stats}


@base.register("byol")
class BYOL(TwoNetworks):
  """BYOL: the symmetric regression of each view's prediction onto the other's target."""

  def loss(self, params: Any, state: base.MethodState, batch: dict[str, jax.Array],
           rng: jax.Array) -> base.LossOutput:
    (o1, o2), (z1, z2), stats = self.forward(params, state, [batch["view1"], batch["view2"]],
                                             rng)
    loss = head_loss(o1["prediction"], o2["prediction"], z1, z2)
    metrics = {"loss": loss, "std_p": families.embedding_std(o1["prediction"]),
               "std_z": families.embedding_std(z1)}
    return loss, base.StepOutput(batch_stats=stats, extra={}, metrics=metrics)
