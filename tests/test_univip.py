"""UniVIP's loss functions (methods/univip.py): the transport-weighted instance term."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dense_ssl.methods import univip


def test_ot_instance_loss_uses_the_plan_as_a_constant():
  rng = np.random.default_rng(2)
  o, t = (jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32) for _ in range(2))
  row = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 4)), jnp.float32))
  col = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 4)), jnp.float32))
  loss, aux = univip.ot_instance_loss(o, t, row, col, eps=0.1, n_iter=50)
  np.testing.assert_allclose(aux["plan"].sum(1), col, rtol=1e-5)
  np.testing.assert_allclose(loss, -jnp.mean(jnp.sum(aux["plan"] * aux["cos_ot"], (1, 2))),
                             rtol=1e-6)
  # Gradient: exactly that of -Σ P·cos with P frozen.
  plan = aux["plan"]
  frozen = lambda x: -jnp.mean(jnp.sum(plan * univip.ot_instance_loss(x, t, row, col)[1][
      "cos_ot"], (1, 2)))
  np.testing.assert_allclose(jax.grad(lambda x: univip.ot_instance_loss(x, t, row, col)[0])(o),
                             jax.grad(frozen)(o), rtol=1e-5, atol=1e-7)
  byol, _ = univip.ot_instance_loss(o, t, row, col, byol_form=True)
  np.testing.assert_allclose(byol, 2 + 2 * loss, rtol=1e-5)  # Σ P = 1
