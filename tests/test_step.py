"""The train step on 1 and 8 fake CPU devices, with jax, flax and optax only.

tests/test_train.py checks the same through the whole trainer (configs, tf.data pipeline, clu);
this module needs none of those, so it also runs where only the jax stack is installed: on the
newest jax in CI (.ci/run, tests/jax_only.txt) and on the lent GPU machine
(benchmarks/device_check.sh). The config is configs/densecl.py's `test` sizes, built by
benchmarks/common.py without ml_collections; the batch is the benchmarks' synthetic one.
"""

import jax
import numpy as np
import pytest

from benchmarks import common, step
from dense_ssl import sharding

BATCH = 16


def _config(method):
  spec = step.StepSpec(method, model="resnet18", size=64, batch=BATCH, queue=64, hidden=64,
                       dim=16, bn="shuffle", bn_groups=8, devices=8)
  return spec.config()


def _one_step(config, mesh):
  """One step of the trainer's own builder (`train.build`) on the benchmarks' synthetic batch."""
  built = common.import_trainer().build(config, mesh, num_examples=10 * BATCH)
  init = jax.device_get(built.state.params)
  batch = step.synthetic_batch(built.batch_spec, mesh)
  with jax.set_mesh(mesh):
    new_state, metrics = built.step(built.state, batch)
  update = jax.tree.map(lambda n, o: n - o, jax.device_get(new_state.params), init)
  return new_state, update, jax.device_get(metrics)


@pytest.mark.parametrize("method", ["densecl"])
def test_one_and_eight_devices_give_the_same_step(method):
  """Tolerances as tests/test_train.py's version of this test (float32 reduction order)."""
  assert jax.device_count() == 8  # conftest.py
  config = _config(method)
  s1, u1, m1 = _one_step(config, step.make_mesh(1))
  s8, u8, m8 = _one_step(config, sharding.create_mesh())
  assert int(s8.step) == 1 and m8["train/finite"] == 1.0
  for key in ("train/loss", "train/lr", "train/grad_norm", "train/param_norm",
              "train/update_norm", "train/corr_acc"):
    assert np.isfinite(m8[key]), key
  np.testing.assert_allclose(m1["train/loss"], m8["train/loss"], rtol=1e-5)
  leaves1, leaves8 = jax.tree.leaves(u1), jax.tree.leaves(u8)
  assert sum(float(np.abs(a).max()) > 0 for a in leaves8) > 0.9 * len(leaves8)
  for a, b in zip(leaves1, leaves8):
    assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(a) + 1e-12
  for a, b in zip(jax.tree.leaves(jax.device_get(s1.extra)),
                  jax.tree.leaves(jax.device_get(s8.extra))):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
