"""UniVIP (Li et al., CVPR 2022): scene-scene, scene-instance and instance-instance losses.

The three objectives as pure functions of the online and target embeddings (METHODS.md §2),
with the instance term weighted by an entropic optimal-transport plan, and their parity check.
The method on BYOL built on them comes with it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dense_ssl import losses, matchers, parity

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
