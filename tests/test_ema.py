"""Tests for dense_ssl.ema: the momentum update and its schedules."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_ssl import ema

CONMIM = pathlib.Path(__file__).parent / "data" / "parity" / "conmim_case1.npz"


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"backbone": {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3)), jnp.float32)}},
          "neck": {"fc": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}}


def test_update_is_the_momentum_average_leaf_by_leaf():
  target, online = _tree(0), _tree(1)
  out = ema.update(target, online, 0.9)
  for t, o, n in zip(jax.tree.leaves(target), jax.tree.leaves(online), jax.tree.leaves(out)):
    np.testing.assert_allclose(n, 0.9 * np.asarray(t) + 0.1 * np.asarray(o), rtol=1e-6)
  assert jax.tree.structure(out) == jax.tree.structure(target)


def test_update_extremes():
  target, online = _tree(0), _tree(1)
  for a, b in zip(jax.tree.leaves(ema.update(target, online, 1.0)), jax.tree.leaves(target)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(ema.update(target, online, 0.0)), jax.tree.leaves(online)):
    np.testing.assert_array_equal(a, b)


def test_update_ignores_online_only_entries_and_rejects_missing_ones():
  target, online = _tree(0), _tree(1)
  online_with_predictor = dict(online, predictor={"w": jnp.ones(3)})
  out = ema.update(target, online_with_predictor, 0.5)
  assert set(out) == {"backbone", "neck"}
  with pytest.raises(ValueError, match="no online counterpart"):
    ema.update(dict(target, extra={"w": jnp.ones(1)}), online, 0.5)


def test_update_accepts_a_traced_momentum():
  target, online = _tree(0), _tree(1)
  out = jax.jit(ema.update)(target, online, jnp.float32(0.99))
  expected = ema.update(target, online, 0.99)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_cosine_schedule_matches_the_conmim_reference():
  r = np.load(CONMIM)
  steps, total, base = r["ema_steps"], int(r["ema_total_steps"]), float(r["ema_base"])
  got = jax.jit(ema.momentum_at, static_argnums=(1, 2, 3))(jnp.asarray(steps), total, base,
                                                           "cosine")
  np.testing.assert_allclose(got, r["ema_momentum"], atol=1e-6, rtol=0)


def test_cosine_schedule_rises_from_base_to_one():
  steps = jnp.arange(0, 101)
  m = ema.momentum_at(steps, 100, 0.99, "cosine")
  assert float(m[0]) == pytest.approx(0.99)
  assert float(m[-1]) == pytest.approx(1.0)
  assert float(m[50]) == pytest.approx(0.995, abs=1e-6)
  assert np.all(np.diff(np.asarray(m)) >= 0)


def test_constant_schedule_and_errors():
  assert float(ema.momentum_at(123, 1000, 0.999, "constant")) == pytest.approx(0.999)
  with pytest.raises(ValueError, match="schedule"):
    ema.momentum_at(0, 10, 0.9, "linear")
  with pytest.raises(ValueError, match="total_steps"):
    ema.momentum_at(0, 0, 0.9, "cosine")
