"""Per-group and shuffled BatchNorm (methods/families.apply_grouped) on 1 and 8 devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dense_ssl.methods import families


class _BNNet(nn.Module):

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Dense(4)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)


def _setup(batch=16):
  x = jax.random.normal(jax.random.key(0), (batch, 3)) * 3.0 + jnp.arange(batch)[:, None] / 4
  variables = _BNNet().init(jax.random.key(1), x[:2])
  return x, variables


def _mesh(n):
  return Mesh(np.array(jax.devices()[:n]), ("data",), axis_types=(AxisType.Auto,))


def _manual_groups(variables, x, groups, perm=None):
  """Reference: permute, run each group on its own, average stats, un-permute."""
  xs = x if perm is None else x[perm]
  outs, means = [], []
  for xi in np.split(np.asarray(xs), groups):
    o, upd = _BNNet().apply(variables, xi, mutable=["batch_stats"])
    outs.append(o)
    means.append(upd["batch_stats"])
  out = jnp.concatenate(outs)
  if perm is not None:
    out = out[jnp.argsort(perm)]
  return out, jax.tree.map(lambda *s: jnp.mean(jnp.stack(s), 0), *means)


@pytest.mark.parametrize("shuffle", [False, True])
def test_groups_match_reference_without_mesh(shuffle):
  x, variables = _setup()
  rng = jax.random.key(7) if shuffle else None
  out, stats = families.apply_grouped(_BNNet(), variables, x, groups=4, shuffle_rng=rng)
  perm = jax.random.permutation(rng, x.shape[0]) if shuffle else None
  ref_out, ref_stats = _manual_groups(variables, x, 4, perm)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats,
               ref_stats)


def test_one_and_eight_devices_agree_with_shuffle():
  x, variables = _setup()
  rng = jax.random.key(3)
  results = []
  for n in (1, 8):
    mesh = _mesh(n)
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    vs = jax.device_put(variables, NamedSharding(mesh, P()))
    f = jax.jit(lambda v, xx: families.apply_grouped(_BNNet(), v, xx, groups=8, shuffle_rng=rng))
    with jax.set_mesh(mesh):
      results.append(jax.device_get(f(vs, xs)))
  (o1, s1), (o8, s8) = results
  np.testing.assert_allclose(o1, o8, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s1, s8)
  # Per-group statistics differ from whole-batch (sync) statistics: grouping really happened.
  sync, _ = families.apply_grouped(_BNNet(), variables, x, groups=1)
  assert np.abs(np.asarray(sync) - o1).max() > 1e-3


def test_bad_group_counts_are_reported():
  x, variables = _setup(12)
  with pytest.raises(ValueError, match="not divisible into 5"):
    families.apply_grouped(_BNNet(), variables, x, groups=5)
  mesh = _mesh(8)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="multiple of 8"):
    families.apply_grouped(_BNNet(), variables, x[:12], groups=4)


def test_eval_mode_uses_running_statistics():
  x, variables = _setup()
  out, stats = families.apply_grouped(_BNNet(), variables, x, groups=4, train=False)
  ref = _BNNet().apply(variables, x, train=False)
  np.testing.assert_allclose(out, ref)
  assert stats is variables["batch_stats"]


def test_groups_stay_on_their_devices():
  """Without shuffling, the 8-device forward moves no activations: only the averaged
  statistics are reduced across devices (the sharding constraint keeps whole groups local)."""
  x, variables = _setup()
  mesh = _mesh(8)
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  vs = jax.device_put(variables, NamedSharding(mesh, P()))
  f = jax.jit(lambda v, xx: families.apply_grouped(_BNNet(), v, xx, groups=8))
  with jax.set_mesh(mesh):
    hlo = f.lower(vs, xs).compile().as_text()
  for op in ("all-gather", "all-to-all", "collective-permute"):
    assert op not in hlo, op
  assert "all-reduce" in hlo


class _TokenBN(nn.Module):
  """A module with a per-example argument (like a ViT's keep_idx): gathers, then BatchNorm."""

  @nn.compact
  def __call__(self, x, train=True, *, keep_idx=None):
    x = jnp.take_along_axis(x, keep_idx[..., None], axis=1).mean(axis=1)
    x = nn.Dense(4)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)


def test_batch_kwargs_are_permuted_and_grouped_with_the_inputs():
  x = jax.random.normal(jax.random.key(0), (16, 5, 3)) + jnp.arange(16)[:, None, None] / 4
  keep = jax.random.randint(jax.random.key(1), (16, 2), 0, 5)
  variables = _TokenBN().init(jax.random.key(2), x[:2], keep_idx=keep[:2])
  rng = jax.random.key(5)
  out, stats = families.apply_grouped(_TokenBN(), variables, x, groups=4, shuffle_rng=rng,
                                      batch_kwargs={"keep_idx": keep})
  perm = np.asarray(jax.random.permutation(rng, 16))
  outs, means = [], []
  for idx in np.split(perm, 4):
    o, upd = _TokenBN().apply(variables, x[idx], keep_idx=keep[idx], mutable=["batch_stats"])
    outs.append(o)
    means.append(upd["batch_stats"])
  ref = np.concatenate(outs)[np.argsort(perm)]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  ref_stats = jax.tree.map(lambda *s: jnp.mean(jnp.stack(s), 0), *means)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats,
               ref_stats)
  # One group: the argument passes straight through.
  whole, _ = families.apply_grouped(_TokenBN(), variables, x, groups=1,
                                    batch_kwargs={"keep_idx": keep})
  np.testing.assert_allclose(whole, _TokenBN().apply(variables, x, keep_idx=keep,
                                                     mutable=["batch_stats"])[0], rtol=1e-6)
