"""MoCo v3 (Chen, Xie & He, ICCV 2021) on ViTs, with DILEMMA as an option.

Each of the two views goes through the online encoder (ViT -> class token -> 3-layer projector
"head" -> 2-layer predictor) and the momentum encoder (ViT -> projector, the EMA of the online
ones); loss = ctr(q1, k2) + ctr(q2, k1) with ctr(q, k) = CE(l2n(q)·l2n(k)ᵀ / T, arange) · 2T
(`losses.moco_v3_contrastive`), T = 0.2 for ViTs. The keys are the whole global batch: under
`jit` the batch is one global array over all devices and processes, so this is the official
all-gather with labels offset by rank·N, and 1 device computes what 8 do
(tests/test_vit_methods.py). Each view is its own forward pass, so BatchNorm (SyncBN in the
official ViT runs: `bn="sync"`) takes its statistics per view, as there.

With `config.method.dilemma.enabled` the online encoder sees each view sparse and partly
mislocated (methods/dilemma.py) and the loss is `dilemma.total_loss`: the contrastive terms
plus λ·(bce_view1 + bce_view2)/2; the momentum encoder sees the full views.

Config keys: `method.temperature`, `dim`, `hidden` (the MLPs' width), `dilemma`, and
MomentumPair's. The recipe (frozen patch embedding, AdamW, warm-up) is configs/mocov3.py.
"""

from __future__ import annotations

from typing import Any

import jax

from dense_ssl import losses
from dense_ssl.methods import base, dilemma, families, vit_hosts
from dense_ssl.models import heads


@base.register("mocov3")
class MoCoV3(vit_hosts.ViTHost, families.MomentumPair):
  """MoCo v3: projector (3 layers) and predictor (2 layers, online only), symmetric loss."""

  online_only = ("predictor", "dilemma_head")

  def __init__(self, config: Any, durations: Any = None):
    super().__init__(config, durations)
    m = config.method
    self.temperature = float(m.temperature)
    dim, hidden = int(m.dim), int(m.hidden)
    self.encoder = vit_hosts.Encoder(
        backbone=self.backbone.module, head=heads.ProjectionMLP(3, hidden, dim),
        predictor=heads.ProjectionMLP(2, hidden, dim), dilemma_head=self.dilemma_head())

  def views(self) -> tuple[base.ViewSpec, ...]:
    """BYOL's asymmetric pair, as MoCo v3's augmentation1/augmentation2 (configs/mocov3.py)."""
    d = self.config.data
    common = dict(size=int(d.image_size), scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio),
                  flip=bool(d.flip))
    return (base.ViewSpec("view1", preset="mocov3_view1", **common),
            base.ViewSpec("view2", preset="mocov3_view2", **common))

  def loss(self, params: Any, state: base.MethodState, batch: dict[str, jax.Array],
           rng: jax.Array) -> base.LossOutput:
    target_rng, *view_rngs = jax.random.split(rng, 3)
    queries, keys, labels = [], [], []
    online_stats, target_stats = state.batch_stats["online"], state.batch_stats["target"]
    for name, view_rng in zip(("view1", "view2"), view_rngs):
      x = batch[name]
      # BatchNorm running statistics follow the forward passes in order, as in PyTorch.
      k, target_stats = self.target(_with_stats(state, target=target_stats), x,
                                    jax.random.fold_in(target_rng, len(keys)))
      kwargs, view_labels = self.student_kwargs(view_rng, x)
      q, online_stats = self.online(params, _with_stats(state, online=online_stats), x,
                                    batch_kwargs=kwargs)
      queries.append(q)
      keys.append(k["z"])
      labels.append(view_labels)
    q1, q2 = (q["q"] for q in queries)
    k1, k2 = keys
    metrics = {"std_q": families.embedding_std(q1)}
    if self.dilemma.enabled:
      logits = tuple(q["dilemma"] for q in queries)
      loss, aux = dilemma.total_loss(q1, q2, k1, k2, logits, tuple(labels),
                                     temperature=self.temperature, lam=self.dilemma.lam)
      metrics["ctr"] = aux["ctr_q1k2"] + aux["ctr_q2k1"]
      metrics.update(self.dilemma_terms(logits, labels)[1])
    else:
      loss = (losses.moco_v3_contrastive(q1, k2, self.temperature)
              + losses.moco_v3_contrastive(q2, k1, self.temperature))
      metrics["ctr"] = loss
    metrics["loss"] = loss
    stats = {"online": online_stats, "target": target_stats}
    return loss, base.StepOutput(batch_stats=stats, extra=state.extra, metrics=metrics)


def _with_stats(state: base.MethodState, **sides: Any) -> base.MethodState:
  """`state` with some sides' ("online", "target") batch statistics replaced."""
  return state._replace(batch_stats={**state.batch_stats, **sides})
