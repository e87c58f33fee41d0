"""ConMIM's loss (methods/conmim.py): the intra-image patch InfoNCE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dense_ssl.methods import conmim


def test_patch_info_nce_pools_over_masked_positions_only():
  rng = np.random.default_rng(5)
  s, t = (jnp.asarray(rng.normal(size=(2, 6, 4)), jnp.float32) for _ in range(2))
  mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]], bool)
  loss, aux = conmim.patch_info_nce(s, t, mask, 0.1)
  ce = np.asarray(aux["ce"])
  pooled = ce[np.asarray(mask)].mean()
  per_image = np.mean([ce[n][np.asarray(mask[n])].mean() for n in range(2)])
  np.testing.assert_allclose(loss, pooled, rtol=1e-6)
  assert abs(pooled - per_image) > 1e-4  # the two reductions differ for unequal counts
  # The student's unmasked tokens do not enter the loss; the teacher's (negatives) do.
  g_s = jax.grad(lambda x: conmim.patch_info_nce(x, t, mask, 0.1)[0])(s)
  np.testing.assert_array_equal(np.asarray(g_s)[~np.asarray(mask)], 0.0)
  g_t = jax.grad(lambda x: conmim.patch_info_nce(s, x, mask, 0.1)[0])(t)
  assert np.all(np.abs(np.asarray(g_t)[~np.asarray(mask)]).sum(-1) > 0)
