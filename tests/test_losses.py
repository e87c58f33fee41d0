"""Tests for dense_ssl.losses against float64 numpy formulas and structural properties."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_ssl import losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unit(rng, *shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_info_nce(q, k, queue, t):
  logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue.T], 1) / t
  mx = logits.max(1)
  return np.mean(mx + np.log(np.exp(logits - mx[:, None]).sum(1)) - logits[:, 0])


def _case(rows=24, size=20, dim=8, seed=0):
  rng = np.random.default_rng(seed)
  return _unit(rng, rows, dim), _unit(rng, rows, dim), _unit(rng, size, dim)


def test_info_nce_queue_matches_the_float64_formula_and_returns_scaled_logits():
  q, k, queue = _case()
  loss, logits = losses.info_nce_queue(*(jnp.asarray(x, jnp.float32) for x in (q, k, queue)),
                                       0.2, return_logits=True)
  np.testing.assert_allclose(loss, _np_info_nce(q, k, queue, 0.2), rtol=1e-6)
  assert logits.shape == (24, 21)
  np.testing.assert_allclose(logits[:, 0], np.sum(q * k, 1) / 0.2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits[:, 1:], q @ queue.T / 0.2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 7, 64])  # many chunks, a divisor, a remainder, one
def test_dense_info_nce_equals_the_plain_loss_in_value_and_gradient(chunk):
  q, k, queue = (jnp.asarray(x, jnp.float32) for x in _case())
  plain = lambda *a: losses.info_nce_queue(*a, 0.2)
  light = jax.jit(lambda *a: losses.dense_info_nce(*a, 0.2, chunk))
  np.testing.assert_allclose(light(q, k, queue), plain(q, k, queue), rtol=1e-6)
  g_plain = jax.grad(plain, argnums=(0, 1, 2))(q, k, queue)
  g_light = jax.jit(jax.grad(light, argnums=(0, 1, 2)))(q, k, queue)
  for a, b in zip(g_light, g_plain):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_dense_info_nce_scales_the_incoming_cotangent():
  q, k, queue = (jnp.asarray(x, jnp.float32) for x in _case())
  g1 = jax.grad(lambda x: losses.dense_info_nce(x, k, queue, 0.2, 6))(q)
  g3 = jax.grad(lambda x: 3.0 * losses.dense_info_nce(x, k, queue, 0.2, 6))(q)
  np.testing.assert_allclose(g3, 3.0 * g1, rtol=1e-5, atol=1e-7)


def _np_info_nce_grad_q(q, k, queue, t):
  logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue.T], 1) / t
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  keys = np.concatenate([k[:, None], np.broadcast_to(queue, (len(q),) + queue.shape)], 1)
  return (np.einsum("rj,rjd->rd", probs, keys) - k) / (t * len(q))


@pytest.mark.parametrize("scale,temperature,shifted", [(1.0, 0.2, True), (2.0, 0.2, True),
                                                        (30.0, 0.05, False)])
def test_dense_info_nce_is_exact_whatever_the_bound_on_the_logits(scale, temperature, shifted):
  # The log-sum-exp is shifted by |q|·max|queue|/T when that is within log(eps / (K·tiny))
  # (~58 here) of every positive logit, and takes the running-max scan otherwise: scaled rows at
  # a small T put the bound thousands above, where every shifted term would be zero in float32.
  q, k, queue = _case(rows=24, size=40, dim=8, seed=3)
  q, queue = q * scale, queue * scale
  above_pos = (np.linalg.norm(q, axis=1) * np.linalg.norm(queue, axis=1).max()
               - np.sum(q * k, 1)) / temperature
  info = np.finfo(np.float32)
  assert (above_pos.max() <= np.log(info.eps / (len(queue) * info.tiny))) == shifted
  args = [jnp.asarray(x, jnp.float32) for x in (q, k, queue)]
  loss, grad = jax.jit(jax.value_and_grad(
      lambda *a: losses.dense_info_nce(*a, temperature, 16)))(*args)
  np.testing.assert_allclose(loss, _np_info_nce(q, k, queue, temperature), rtol=2e-6)
  want = _np_info_nce_grad_q(q, k, queue, temperature)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def _count(jaxpr, name):
  """How many equations named `name` run at the top level of a jaxpr (not inside cond/scan)."""
  return sum(eqn.primitive.name == name for eqn in jaxpr.eqns)


def test_dense_info_nce_reads_the_queue_in_the_backward_only_for_its_gradient():
  q, k, queue = (jnp.asarray(x, jnp.float32) for x in _case())
  fn = lambda *a: losses.dense_info_nce(*a, 0.2, 6)
  # The forward's scan over the queue (shifted or running-max) runs inside a cond and yields
  # the gradient with respect to q and k; only the queue's gradient needs a scan of its own.
  wrt_rows = jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(q, k, queue).jaxpr
  wrt_all = jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2)))(q, k, queue).jaxpr
  assert _count(wrt_rows, "cond") == _count(wrt_all, "cond") == 1
  assert (_count(wrt_rows, "scan"), _count(wrt_all, "scan")) == (0, 1)


def _all_shapes(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield tuple(getattr(var.aval, "shape", ()))
    for param in eqn.params.values():
      subs = param if isinstance(param, (list, tuple)) else [param]
      for sub in subs:
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          yield from _all_shapes(getattr(inner, "jaxpr", inner))


def test_dense_info_nce_never_materialises_the_full_logits():
  rows, size, chunk, dim = 40, 96, 16, 8
  q, k, queue = (jnp.asarray(x, jnp.float32) for x in _case(rows, size, dim))
  fn = jax.value_and_grad(lambda x: losses.dense_info_nce(x, k, queue, 0.2, chunk))
  biggest = max(int(np.prod(s)) for s in _all_shapes(jax.make_jaxpr(fn)(q).jaxpr))
  # Chunk logits (R, c), the queue and its gradient (K, D), the rows (R, D): never (R, K).
  assert biggest <= max(rows * chunk, size * dim, rows * dim) < rows * size
  plain = jax.value_and_grad(lambda x: losses.info_nce_queue(x, k, queue, 0.2))
  assert max(int(np.prod(s)) for s in _all_shapes(jax.make_jaxpr(plain)(q).jaxpr)) >= rows * size


def test_dense_info_nce_rejects_mismatched_shapes():
  q, k, queue = (jnp.asarray(x, jnp.float32) for x in _case())
  with pytest.raises(ValueError, match="queue"):
    losses.dense_info_nce(q, k[:3], queue, 0.2, 4)


def test_cosine_terms():
  rng = np.random.default_rng(1)
  p, z = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  cos = np.sum(p * z, 1) / np.linalg.norm(p, axis=1) / np.linalg.norm(z, axis=1)
  np.testing.assert_allclose(losses.negative_cosine(p, z), -cos.mean(), rtol=1e-5)
  np.testing.assert_allclose(losses.byol_regression(p, z), np.mean(2 - 2 * cos), rtol=1e-5)
  # Scale invariance, and -1 for aligned vectors.
  np.testing.assert_allclose(losses.negative_cosine(3 * p, 0.5 * z), -cos.mean(), rtol=1e-5)
  assert float(losses.negative_cosine(p, 2 * p)) == pytest.approx(-1.0, abs=1e-6)


def test_moco_v3_contrastive_is_cross_entropy_times_2t():
  rng = np.random.default_rng(3)
  q, k = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
  qn, kn = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, k))
  logits = qn @ kn.T / 0.2
  mx = logits.max(1)
  ce = np.mean(mx + np.log(np.exp(logits - mx[:, None]).sum(1)) - np.diag(logits))
  np.testing.assert_allclose(losses.moco_v3_contrastive(q, k, 0.2), ce * 0.4, rtol=1e-5)


def test_bce_with_logits_mean():
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(3, 5)) * 4, rng.integers(0, 2, size=(3, 5))
  expected = np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
  np.testing.assert_allclose(losses.bce_with_logits_mean(x, y), expected, rtol=1e-5)


def test_l2_normalize_matches_torch_convention():
  v = jnp.array([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(losses.l2_normalize(v), [[0.6, 0.8], [0.0, 0.0]])


def test_losses_imports_nothing_of_dense_ssl():
  """The bottom level: `import dense_ssl.losses` loads no method, model or data module."""
  code = ("import sys, dense_ssl.losses; "
          "print(sorted(m for m in sys.modules if m.startswith('dense_ssl')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT)
  assert out.stdout.split() == ["['dense_ssl',", "'dense_ssl.losses']"], out.stdout
