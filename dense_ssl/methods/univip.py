"""UniVIP (Li et al., CVPR 2022): scene-scene, scene-instance and instance-instance learning.

BYOL's two networks (byol.py) on two scene views whose overlap holds K object proposals
(`dense_ssl.data.instances`, crop sampler "overlap_proposals"), plus the K instances of each
view, cropped and resized to `method.instance_size` (96 px):

  * online: both scenes -> p1, p2; view 1's instances -> o (N, K, D) (after the predictor);
  * target: both scenes -> z1, z2; view 2's instances -> t (N, K, D) (projections);
  * scene-scene: BYOL's symmetric loss; scene-instance: I = Linear(concat_k o_k) (the online-only
    layer "scene_instance", K·D -> D) against z1 and z2; instance-instance: Σ P·(2 - 2cos(o_m,
    t_l)) with P the entropic optimal-transport plan between the two views' instances (log-
    domain Sinkhorn, ε = 0.1, 50 iterations, marginals from each side's agreement with the
    other side's scenes, no gradient through P), METHODS.md §2, each term in BYOL's 2 - 2cos
    form (METHODS.md: the gradients are twice the paper form's).

Instance k of both views is the same proposal, so the plan's mass on its diagonal
(`train/plan_diagonal`) says how often the transport pairs an instance with itself.
The three objectives are pure functions of the embeddings below, with their parity check.

Config keys: `method.num_instances` (K), `method.instance_size`, `method.sinkhorn_eps`,
`method.sinkhorn_iters`, and BYOL's.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dense_ssl import losses, matchers, parity
from dense_ssl.data import spec
from dense_ssl.methods import base, byol, families
from dense_ssl.models import heads

def univip_marginals(o: jax.Array, t: jax.Array, p_scene: jax.Array, z_scene: jax.Array,
                     floor: float = 1e-8) -> dict[str, jax.Array]:
  """UniVIP's transport marginals from scene/instance agreement (METHODS.md §2).

  Args:
    o, t: (N, K, D) online instance outputs and target instance projections.
    p_scene: (N, D) mean of the two online scene outputs, (p1 + p2) / 2.
    z_scene: (N, D) mean of the two target scene projections, (z1 + z2) / 2.
    floor: added before normalising so an all-clamped side stays finite.

  Returns {"b_raw", "a_raw", "row", "col"}: raw (ReLU'd dot products) and normalised weights;
  rows are online instances (weighted by the target scene), columns target instances.
  """
  b_raw = jax.nn.relu(jnp.einsum("nmd,nd->nm", losses.at_least_f32(o), losses.at_least_f32(z_scene)))
  a_raw = jax.nn.relu(jnp.einsum("nld,nd->nl", losses.at_least_f32(t), losses.at_least_f32(p_scene)))
  row = (b_raw + floor) / jnp.sum(b_raw + floor, axis=-1, keepdims=True)
  col = (a_raw + floor) / jnp.sum(a_raw + floor, axis=-1, keepdims=True)
  return {"b_raw": b_raw, "a_raw": a_raw, "row": row, "col": col}


def ot_instance_loss(o: jax.Array, t: jax.Array, row: jax.Array, col: jax.Array, *,
                     eps: float = 0.1, n_iter: int = 50,
                     byol_form: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
  """UniVIP instance-instance loss: -Σ P·cos between online and target instances, batch mean.

  The plan P = sinkhorn(1 - cos, row, col) is a constant (stop-gradient); the gradient flows
  through the cosines only. `byol_form` uses Σ P·(2 - 2cos) instead of -Σ P·cos.

  Returns (loss, {"cos_ot", "cost", "plan", "per_image"}).
  """
  cos_ot = jnp.einsum("nmd,nld->nml", losses.l2_normalize(losses.at_least_f32(o)), losses.l2_normalize(losses.at_least_f32(t)))
  cost = 1.0 - cos_ot
  plan = matchers.sinkhorn(cost, row, col, eps=eps, n_iter=n_iter)
  per_pair = 2.0 - 2.0 * cos_ot if byol_form else -cos_ot
  per_image = jnp.sum(plan * per_pair, axis=(1, 2))
  return jnp.mean(per_image), {"cos_ot": cos_ot, "cost": cost, "plan": plan,
                               "per_image": per_image}


def univip_losses(o: jax.Array, t: jax.Array, p1: jax.Array, p2: jax.Array, z1: jax.Array,
                  z2: jax.Array, instance: jax.Array, *, eps: float = 0.1, n_iter: int = 50,
                  floor: float = 1e-8, byol_form: bool = False) -> dict[str, jax.Array]:
  """UniVIP's three terms and their sum (METHODS.md §2).

  Args:
    o, t: (N, K, D) online instance outputs (after the predictor) and target projections.
    p1, p2: (N, D) online scene outputs; z1, z2: (N, D) target scene projections (the caller
      stops the gradient of t, z1, z2).
    instance: (N, D) the scene-instance embedding I = Linear(concat_k o_k).
    eps, n_iter, floor: Sinkhorn regularisation, iterations and the marginals' floor.
    byol_form: use 2 - 2cos (BYOL's convention) instead of the paper's -cos for every term.

  Returns {"scene", "scene_instance", "instance", "total"} and the instance loss's
  intermediates ("cos_ot", "cost", "plan", "per_image", "b_raw", "a_raw", "row", "col").
  """
  pair = losses.byol_regression if byol_form else losses.negative_cosine
  marginals = univip_marginals(o, t, (p1 + p2) / 2, (z1 + z2) / 2, floor)
  instance_loss, ot = ot_instance_loss(o, t, marginals["row"], marginals["col"], eps=eps,
                                       n_iter=n_iter, byol_form=byol_form)
  out = {"scene": pair(p1, z2) + pair(p2, z1),
         "scene_instance": pair(instance, z1) + pair(instance, z2),
         "instance": instance_loss, **ot, **marginals}
  out["total"] = out["scene"] + out["scene_instance"] + out["instance"]
  return out


# ---------------------------------------------------------------------------------------------
# The method.
# ---------------------------------------------------------------------------------------------

SCENES = ("view1", "view2")


def scene_instance_layer(dim: int, num_instances: int) -> nn.Dense:
  """The scene-instance Linear (K·D -> D), PyTorch's default nn.Linear initialisation."""
  return nn.Dense(dim, kernel_init=heads.torch_conv_kernel_init,
                  bias_init=heads.torch_bias_init(num_instances * dim))


@base.register("univip")
class UniVIP(byol.TwoNetworks):
  """UniVIP on BYOL (module docstring)."""

  crop_sampler = "overlap_proposals"
  online_only = ("predictor", "scene_instance")

  def __init__(self, config: Any, durations: Any = None):
    super().__init__(config, durations)
    m = config.method
    self.num_instances, self.instance_size = int(m.num_instances), int(m.instance_size)
    self.eps, self.n_iter = float(m.sinkhorn_eps), int(m.sinkhorn_iters)
    self.layer = scene_instance_layer(self.dim, self.num_instances)

  @classmethod
  def check_config(cls, config: Any, num_devices: int) -> None:
    super().check_config(config, num_devices)
    m = config.method
    if m.num_instances < 1 or m.sinkhorn_iters < 1 or m.sinkhorn_eps <= 0:
      raise ValueError(f"config.method.num_instances={m.num_instances} and sinkhorn_iters="
                       f"{m.sinkhorn_iters} must be >= 1 and sinkhorn_eps={m.sinkhorn_eps} > 0.")
    if not config.data.get("proposals", ""):
      raise ValueError("UniVIP crops instances from object proposals: set "
                       "config.data.proposals ('selective_search', or 'garments' on "
                       "config.data.source='fmnist_scenes').")

  def views(self) -> tuple[base.ViewSpec, ...]:
    scenes = super().views()
    inst = [base.ViewSpec(spec.instance_view(s.name, k), self.instance_size, flip=False,
                          preset=s.preset)
            for s in scenes for k in range(self.num_instances)]
    return (*scenes, *inst)

  def init(self, rng: jax.Array, batch: dict[str, jax.Array]) -> base.Variables:
    variables = super().init(rng, batch)
    x = jnp.zeros((1, self.num_instances * self.dim), jnp.float32)
    layer = self.layer.init(jax.random.fold_in(rng, 1), x)["params"]
    variables["params"] = {**variables["params"], "scene_instance": layer}
    return variables

  def instances(self, batch: dict[str, jax.Array], scene: str) -> jax.Array:
    """(N·K, s, s, 3): scene view `scene`'s K instance crops, image-major (an image's K crops
    stay in its BatchNorm group and on its device)."""
    stacked = jnp.stack([batch[spec.instance_view(scene, k)]
                         for k in range(self.num_instances)], axis=1)
    return stacked.reshape((-1, *stacked.shape[2:]))

  def loss(self, params: Any, state: base.MethodState, batch: dict[str, jax.Array],
           rng: jax.Array) -> base.LossOutput:
    scene_rng, inst_rng = jax.random.split(rng)
    (o1, o2), (z1, z2), stats = self.forward(params, state, [batch[s] for s in SCENES],
                                             scene_rng)
    st = state._replace(batch_stats=stats)
    # Instances: one pass each, view 1's through the online network, view 2's the target.
    online, online_stats = self.online(params, st, self.instances(batch, SCENES[0]))
    st = st._replace(batch_stats={"online": online_stats, "target": stats["target"]})
    target, target_stats = self.target(st, self.instances(batch, SCENES[1]), inst_rng)
    n, k = batch[SCENES[0]].shape[0], self.num_instances
    o = online["prediction"].reshape(n, k, -1)
    t = target["projection"].reshape(n, k, -1)
    instance = self.layer.apply({"params": params["scene_instance"]}, o.reshape(n, -1))
    out = univip_losses(o, t, o1["prediction"], o2["prediction"], z1, z2, instance,
                        eps=self.eps, n_iter=self.n_iter, byol_form=True)
    metrics = {"loss": out["total"], "loss_scene": out["scene"],
               "loss_scene_instance": out["scene_instance"], "loss_instance": out["instance"],
               "plan_diagonal": jnp.mean(jnp.trace(out["plan"], axis1=1, axis2=2)),
               "std_p": families.embedding_std(o1["prediction"]),
               "std_instance": families.embedding_std(o.reshape(n * k, -1))}
    if spec.PROPOSAL_FALLBACK in batch:
      metrics["proposal_fallbacks"] = jnp.mean(batch[spec.PROPOSAL_FALLBACK].astype(jnp.float32))
    new_stats = {"online": online_stats, "target": target_stats}
    return out["total"], base.StepOutput(batch_stats=new_stats, extra={}, metrics=metrics)


# ---------------------------------------------------------------------------------------------
# Parity with the reference vectors (METHODS.md §2).
# ---------------------------------------------------------------------------------------------


@parity.register("univip", marker_key="W_si")
def check_parity(r: Any, ck: parity.Checker) -> None:
  """UniVIP's three losses and the transport plan (`univip_case*.npz`, METHODS.md §2)."""
  kwargs = dict(eps=parity.scalar(r, "eps"), n_iter=int(np.asarray(r["n_iter"])),
                floor=parity.scalar(r, "marginal_floor"))

  @jax.jit
  def compute(o, t, p1, p2, z1, z2, kernel, bias):
    # The scene-instance layer: Linear over the instance-major concatenation.
    instance = o.reshape(o.shape[0], -1) @ kernel + bias
    views = (p1, p2, z1, z2)
    return (instance, univip_losses(o, t, *views, instance, **kwargs),
            univip_losses(o, t, *views, instance, byol_form=True, **kwargs))

  instance, out, byol = compute(
      *(parity.f32(r, key) for key in ("o", "t", "p1", "p2", "z1", "z2", "W_si", "b_si")))
  ck.close("I", instance, r["I"])
  for name, key in (("cos_ot", "cos_ot"), ("cost", "cost"), ("b_raw", "b_raw"),
                    ("a_raw", "a_raw"), ("row", "row_marginal"), ("col", "col_marginal"),
                    ("per_image", "loss_instance_per_image")):
    ck.close(key, out[name], r[key])
  ck.close("plan", out["plan"], r["plan"], atol=parity.PLAN_ATOL)
  for name in ("scene", "scene_instance", "instance"):
    ck.rel(f"loss_{name}", out[name], r[f"loss_{name}"], parity.LOSS_TOL)
    ck.rel(f"loss_{name}_byol", byol[name], r[f"loss_{name}_byol"], parity.LOSS_TOL)
  ck.rel("total", out["total"], r["total"], parity.LOSS_TOL)
  ck.rel("total_byol", byol["total"], r["total_byol"], parity.LOSS_TOL)
