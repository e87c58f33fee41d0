"""Optimisers and schedules follow the recipes' formulas."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dense_ssl import optim


def _cfg(**kw):
  c = dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2, schedule="cosine",
           warmup_epochs=0.0, b1=0.9, b2=0.999)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def test_cosine_schedule_with_warmup():
  lr = optim.learning_rate_fn(_cfg(), total_steps=110, warmup_steps=10)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(lr(5), 0.05, rtol=1e-6)
  np.testing.assert_allclose(lr(10), 0.1, rtol=1e-6)
  np.testing.assert_allclose(lr(60), 0.05, rtol=1e-5)  # half-way through the cosine
  np.testing.assert_allclose(lr(110), 0.0, atol=1e-7)


def test_sgd_matches_torch_sgd_with_weight_decay():
  """torch.optim.SGD: g += wd*p; buf = m*buf + g; p -= lr*buf (MoCo/DenseCL)."""
  cfg = _cfg(schedule="constant")
  tx = optim.create_optimizer(cfg, optim.learning_rate_fn(cfg, 10, 0))
  p = {"w": jnp.array([1.0, -2.0])}
  state = tx.init(p)
  p_ref, buf = np.array([1.0, -2.0]), np.zeros(2)
  for g in ([0.5, 0.5], [-1.0, 2.0], [0.1, 0.0]):
    upd, state = tx.update({"w": jnp.array(g)}, state, p)
    p = optax.apply_updates(p, upd)
    buf = 0.9 * buf + (np.array(g) + 1e-2 * p_ref)
    p_ref = p_ref - 0.1 * buf
  np.testing.assert_allclose(p["w"], p_ref, rtol=1e-6)


@pytest.mark.parametrize("name", ["lars", "adamw"])
def test_other_optimisers_step(name):
  cfg = _cfg(name=name)
  tx = optim.create_optimizer(cfg, optim.learning_rate_fn(cfg, 10, 0))
  p = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  grads = jax.tree.map(jnp.ones_like, p)
  upd, _ = tx.update(grads, tx.init(p), p)
  assert float(jnp.abs(upd["dense"]["kernel"]).sum()) > 0



def test_unknown_names_are_reported():
  with pytest.raises(ValueError, match="valid choices: sgd, lars, adamw"):
    optim.create_optimizer(_cfg(name="adam"), optax.constant_schedule(0.1))
  with pytest.raises(ValueError, match="valid choices: cosine, constant"):
    optim.learning_rate_fn(_cfg(schedule="step"), 10, 0)
