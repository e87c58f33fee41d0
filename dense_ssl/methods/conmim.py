"""ConMIM (Yi et al., ICLR 2023): masked image modelling as intra-image patch contrast.

The objective as a pure function of the student's and the teacher's token projections
(METHODS.md §4), and its parity check with the teacher's EMA schedule. The ViT method built on
it comes with it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dense_ssl import ema, losses, parity

def patch_info_nce(s: jax.Array, t: jax.Array, mask: jax.Array, temperature: float
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ConMIM's intra-image patch InfoNCE (METHODS.md §4).

  Args:
    s: (N, L, D) student token projections (masked image), raw.
    t: (N, L, D) teacher token projections (unmasked image), raw; the caller stops gradients.
    mask: (N, L) bool, True where the student's patch was masked.
    temperature: τ (0.1).

  For every masked position i, CE over the L teacher tokens of the same image with the positive
  at i. The loss is the pooled mean over all masked positions of the batch (not the mean of
  per-image means). Returns (loss, {"logits" (N, L, L) scaled, "ce" (N, L) at every position}).
  """
  logits = jnp.einsum("nid,njd->nij", losses.l2_normalize(losses.at_least_f32(s)), losses.l2_normalize(losses.at_least_f32(t)))
  logits = logits / temperature
  labels = jnp.broadcast_to(jnp.arange(logits.shape[1], dtype=jnp.int32), logits.shape[:2])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  weights = mask.astype(ce.dtype)
  loss = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return loss, {"logits": logits, "ce": ce}


# ---------------------------------------------------------------------------------------------
# Parity with the reference vectors (METHODS.md §4).
# ---------------------------------------------------------------------------------------------


@parity.register("conmim", marker_key="ema_momentum")
def check_parity(r: Any, ck: parity.Checker) -> None:
  """ConMIM's patch InfoNCE and EMA momentum schedule (`conmim_case*.npz`, METHODS.md §4)."""
  tau, base = parity.scalar(r, "tau"), parity.scalar(r, "ema_base")
  total_steps = int(np.asarray(r["ema_total_steps"]))

  @jax.jit
  def compute(s, t, mask, steps):
    return (patch_info_nce(s, t, mask, tau),
            ema.momentum_at(steps, total_steps, base, "cosine"))

  (loss, aux), momentum = compute(parity.f32(r, "s"), parity.f32(r, "t"), jnp.asarray(r["mask"], bool),
                                  jnp.asarray(r["ema_steps"], jnp.int32))
  ck.close("logits", aux["logits"], r["logits"])
  ck.close("ce", aux["ce"], r["ce"])
  ck.rel("loss", loss, r["loss"], parity.LOSS_TOL)
  ck.rel("ema_momentum", momentum, r["ema_momentum"], parity.MOMENTUM_TOL)
