"""SimCLR (Chen et al., ICML 2020) on ViTs, with DILEMMA as an option.

One encoder (ViT -> class token -> projector "head") on both views; loss = NT-Xent
(`losses.nt_xent`, the official loss_a + loss_b) with T = 0.1 and 2N - 2 negatives per row
drawn from the **global** batch: under `jit` the batch is one array over every device and
process, so the similarity matrix spans them all, which is what the official code's
cross-replica all-gather builds (tests/test_vit_methods.py checks 1 vs 8 devices and the loss
against a single-device numpy computation). Both views go through one forward pass, so the
projector's BatchNorm takes its statistics over all 2N views (SimCLR's global BN).

With `config.method.dilemma.enabled` both views are student views, each sparse and partly
mislocated with its own draw, and the loss adds λ · (bce_view1 + bce_view2)/2. SimCLR has no
teacher to see the full views; this project's choice (the paper gives no detail) keeps both
branches sparse, so the step costs what the sparse tokens cost.

Config keys: `method.temperature`, `dim`, `hidden`, `num_layers` (the projector), `dilemma`,
and SingleEncoder's.
"""

from __future__ import annotations

from typing import Any

import jax

from dense_ssl import losses
from dense_ssl.methods import base, families, vit_hosts
from dense_ssl.models import heads

VIEWS = ("view1", "view2")


@base.register("simclr")
class SimCLR(vit_hosts.ViTHost, families.SingleEncoder):
  """SimCLR: a projection MLP on the class token, NT-Xent over the global batch."""

  def __init__(self, config: Any, durations: Any = None):
    super().__init__(config, durations)
    m = config.method
    self.temperature = float(m.temperature)
    self.encoder = vit_hosts.Encoder(
        backbone=self.backbone.module,
        head=heads.ProjectionMLP(int(m.num_layers), int(m.hidden), int(m.dim)),
        dilemma_head=self.dilemma_head())

  def views(self) -> tuple[base.ViewSpec, ...]:
    d = self.config.data
    common = dict(size=int(d.image_size), scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio),
                  flip=bool(d.flip), preset="simclr")
    return tuple(base.ViewSpec(name, **common) for name in VIEWS)

  def loss(self, params: Any, state: base.MethodState, batch: dict[str, jax.Array],
           rng: jax.Array) -> base.LossOutput:
    x = vit_hosts.stack_views(batch, VIEWS)
    kwargs, labels = self.student_kwargs(rng, x)
    out, stats = self.online(params, state, x, batch_kwargs=kwargs)
    z = vit_hosts.unstack(out["z"], len(VIEWS))
    ctr = losses.nt_xent(z[:, 0], z[:, 1], self.temperature)
    metrics = {"ctr": ctr, "std_z": families.embedding_std(z[:, 0])}
    loss = ctr
    if self.dilemma.enabled:
      logits, labels = (vit_hosts.unstack(a, len(VIEWS)) for a in (out["dilemma"], labels))
      extra_loss, dilemma_metrics = self.dilemma_terms(
          [logits[:, v] for v in range(len(VIEWS))], [labels[:, v] for v in range(len(VIEWS))])
      loss = loss + extra_loss
      metrics.update(dilemma_metrics)
    metrics["loss"] = loss
    return loss, base.StepOutput(batch_stats={"online": stats}, extra=state.extra,
                                 metrics=metrics)
