"""The ViT methods (MoCo v3, DINO, SimCLR), with and without DILEMMA, on ViT-micro/8.

Losses against independent numpy computations (SimCLR's NT-Xent over the global batch, DINO's
pairwise cross-entropy, centre and temperature schedule); one real training step of every
method and option on the embedded photos, 1 device vs the 8 fake devices; a bitwise resume per
method with DILEMMA on; the optimiser hooks the recipes use (MoCo v3's frozen patch embedding
and position table, DINO's last layer held in epoch 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dense_ssl import checkpoint, config_errors, losses, sharding, train
from dense_ssl import methods as methods_lib
from dense_ssl.data import pipeline
from dense_ssl.methods import dilemma, dino

HOSTS = ("mocov3", "dino", "simclr")


def _config(method, variant="test", **overrides):
  return config_errors.override(config_errors.load_config(f"configs/{method}.py:{variant}"),
                                overrides)


# ---------------------------------------------------------------------------------------------
# Losses against numpy.
# ---------------------------------------------------------------------------------------------


def _np_nt_xent(z1, z2, t):
  """SimCLR's loss_a + loss_b written out row by row in float64."""
  h = [z / np.linalg.norm(z, axis=1, keepdims=True) for z in (z1.astype(np.float64),
                                                               z2.astype(np.float64))]
  n = len(z1)
  total = 0.0
  for a, b in ((0, 1), (1, 0)):
    for i in range(n):
      pos = h[a][i] @ h[b][i] / t
      negs = [h[a][i] @ h[b][j] / t for j in range(n) if j != i]
      negs += [h[a][i] @ h[a][j] / t for j in range(n) if j != i]
      logits = np.array([pos] + negs)
      total += (np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - pos) / n
  return total


def test_nt_xent_spans_the_global_batch_over_eight_devices():
  rng = np.random.default_rng(0)
  z1, z2 = (rng.normal(size=(16, 8)).astype(np.float32) for _ in range(2))
  mesh = Mesh(np.array(jax.devices()), ("data",), axis_types=(AxisType.Auto,))
  sharded = [jax.device_put(z, NamedSharding(mesh, P("data"))) for z in (z1, z2)]
  with jax.set_mesh(mesh):
    value = jax.jit(losses.nt_xent, static_argnums=2)(*sharded, 0.1)
  reference = _np_nt_xent(z1, z2, 0.1)
  np.testing.assert_allclose(float(value), reference, rtol=1e-5)
  # Negatives from one device's 2 examples only would give a much smaller loss.
  local = np.mean([_np_nt_xent(z1[i:i + 2], z2[i:i + 2], 0.1) for i in range(0, 16, 2)])
  assert local < reference - 1.0


def _np_dino(student, teacher, center, tt, ts):
  t = np.exp((teacher - center) / tt)
  t /= t.sum(-1, keepdims=True)
  s = student / ts
  log_s = s - s.max(-1, keepdims=True)
  log_s -= np.log(np.exp(log_s).sum(-1, keepdims=True))
  total, terms = 0.0, 0
  for iq in range(teacher.shape[1]):
    for v in range(student.shape[1]):
      if v == iq:
        continue
      total += np.mean(np.sum(-t[:, iq] * log_s[:, v], axis=-1))
      terms += 1
  return total / terms


def test_dino_loss_centre_and_teacher_temperature():
  rng = np.random.default_rng(1)
  student = rng.normal(size=(5, 4, 12)) * 3
  teacher = rng.normal(size=(5, 2, 12)) * 3
  center = rng.normal(size=12) * 0.1
  loss, aux = jax.jit(dino.dino_loss, static_argnums=4)(student, teacher, center, 0.05, 0.1)
  np.testing.assert_allclose(float(loss), _np_dino(student, teacher, center, 0.05, 0.1),
                             rtol=1e-5)
  np.testing.assert_allclose(np.sum(aux["teacher_probs"], -1), 1.0, rtol=1e-5)
  new = dino.update_center(jnp.asarray(center), jnp.asarray(teacher), 0.9)
  np.testing.assert_allclose(new, 0.9 * center + 0.1 * teacher.reshape(-1, 12).mean(0),
                             rtol=1e-5, atol=1e-6)
  # np.linspace(0.04, 0.07, 30) by epoch, then 0.07 (DINO's teacher_temp_schedule).
  epochs = np.arange(40)
  want = np.concatenate([np.linspace(0.04, 0.07, 30), np.full(10, 0.07)])
  np.testing.assert_allclose(dino.teacher_temperature(epochs, 0.04, 0.07, 30), want, rtol=1e-6)


def test_dilemma_corruption_is_what_corrupt_tokens_applies():
  opts = dilemma.Options(enabled=True)
  draw = dilemma.corruption(jax.random.key(0), 64, 49, opts)
  assert draw["keep_idx"].shape == draw["pos_idx"].shape == (64, 12)  # floor(49 * 0.25)
  labels = np.asarray(draw["labels"])
  assert 0.1 < labels.mean() < 0.3
  keep, pos = np.asarray(draw["keep_idx"]), np.asarray(draw["pos_idx"])
  np.testing.assert_array_equal(keep == pos, labels == 0)  # wrong exactly where labelled
  # Wrong positions are dropped ones (2K <= L): never a kept token's position.
  assert not any(set(pos[i][labels[i] == 1]) & set(keep[i]) for i in range(64))
  patches = jax.random.normal(jax.random.key(1), (64, 49, 4))
  table = jax.random.normal(jax.random.key(2), (49, 4))
  sample = dilemma.sample_corruption(jax.random.key(0), 64, 49, 0.75, 0.2)
  tokens, kept, input_pos = dilemma.corrupt_tokens(patches, table, **sample)
  np.testing.assert_array_equal(kept, keep)
  np.testing.assert_array_equal(input_pos, pos)
  np.testing.assert_allclose(tokens, jnp.take_along_axis(patches, kept[..., None], 1)
                             + table[input_pos], rtol=1e-6)


def test_dilemma_head_loss_metrics():
  logits = jnp.array([[3.0, -2.0, 1.0, -1.0]])
  labels = jnp.array([[1, 0, 0, 0]])
  bce, m = dilemma.head_loss(logits, labels)
  np.testing.assert_allclose(bce, losses.bce_with_logits_mean(logits, labels), rtol=1e-6)
  assert float(m["acc"]) == 0.75 and float(m["acc_wrong"]) == 1.0
  np.testing.assert_allclose(m["acc_right"], 2 / 3, rtol=1e-6)


@pytest.mark.parametrize("override,expected", [
    ({"model.name": "resnet18"}, "cannot be used by method 'mocov3'"),
    ({"optim.frozen": ("backbone/patch_embed",)}, "add 'backbone/pos_embed' to config.optim"),
    ({"method.dilemma.drop_rate": 1.0}, "dilemma.drop_rate=1.0 must be in"),
    ({"method.dilemma.probability": 0.0}, "dilemma.probability=0.0 must be in"),
])
def test_bad_configs_fail_before_compiling(override, expected):
  config = _config("mocov3", "test,dilemma", **override)
  with pytest.raises(ValueError, match=expected):
    train.check_config(config, jax.device_count())


def test_recipes():
  mocov3 = _config("mocov3", "default")
  assert (mocov3.model.name, mocov3.model.pos_embed, mocov3.batch_size) == ("vit_s16", "sincos",
                                                                          1024)
  assert (mocov3.optim.name, mocov3.optim.lr, mocov3.optim.weight_decay) == ("adamw", 1.5e-4, 0.1)
  assert (mocov3.method.temperature, mocov3.method.momentum) == (0.2, 0.99)
  assert not mocov3.method.dilemma.enabled
  on = _config("mocov3", "dilemma").method.dilemma
  assert (on.enabled, on.drop_rate, on.probability, on.lam) == (True, 0.75, 0.2, 1.0)
  d = _config("dino", "default")
  views = methods_lib.create(d).views()
  assert [v.size for v in views] == [224] * 2 + [96] * 10
  assert [v.preset for v in views[:3]] == ["dino_global1", "dino_global2", "dino_local"]
  assert (d.optim.clip_grad_norm, d.optim.weight_decay, d.optim.weight_decay_end) == (3.0, 0.04,
                                                                                      0.4)
  s = _config("simclr", "default")
  assert (s.optim.name, s.method.temperature) == ("lars", 0.1)


# ---------------------------------------------------------------------------------------------
# A real step on 1 and 8 devices.
# ---------------------------------------------------------------------------------------------


# One step program for every test of a host and variant: SGD (Adam's first step is about
# sign(g), which float noise flips on tiny gradients; SGD's update is linear in the gradient)
# and schedules that do not depend on the run's length, so the step compiled for the 8-device
# comparison is the one the resume runs load from the session's compilation cache.
STEP = {"optim.name": "sgd", "optim.lr": 0.1, "optim.schedule": "constant",
        "optim.weight_decay_end": -1.0, "checkpoint_every_steps": 1}


def _step_config(method, variant, **overrides):
  schedule = {} if method == "simclr" else {"method.momentum_schedule": "constant"}
  return _config(method, variant, **STEP, **schedule, **overrides)


def _one_step(config, mesh, batch):
  built = train.build(config, mesh, num_examples=64)
  init = jax.device_get(built.state.params)
  with jax.set_mesh(mesh):
    new_state, metrics = built.step(built.state, sharding.to_global(batch, mesh))
  update = jax.tree.map(lambda n, o: n - o, jax.device_get(new_state.params), init)
  return update, jax.device_get(new_state.extra), jax.device_get(metrics)


# With DILEMMA the host's own loss runs in full beside DILEMMA's, so every host is checked
# with it on; without it once (SimCLR: its negatives span the global batch), which keeps the
# module's compile time (two programs per case) in CI's budget.
@pytest.mark.parametrize("method,variant", [(m, "test,dilemma") for m in HOSTS]
                         + [("simclr", "test")])
def test_one_and_eight_devices_give_the_same_step(method, variant):
  """Every host with DILEMMA, and SimCLR without, trains a step on the demo photos; the sharded
  step computes what the 1-device step computes (SimCLR's negatives, MoCo v3's keys, DINO's
  centre and DILEMMA's draws included)."""
  config = _step_config(method, variant, total_steps=3)
  views = methods_lib.create(config).views()
  batch = next(pipeline.create_iterator(config.data, views=views,
                                        global_batch_size=config.batch_size, seed=0))
  one = Mesh(np.array(jax.devices()[:1]), ("data",), axis_types=(AxisType.Auto,))
  u1, e1, m1 = _one_step(config, one, batch)
  u8, e8, m8 = _one_step(config, sharding.create_mesh(), batch)
  assert jax.device_count() == 8
  assert m1["train/finite"] == 1.0
  np.testing.assert_allclose(m1["train/loss"], m8["train/loss"], rtol=1e-5)
  for key in (k for k in m1 if "dilemma" in k):
    np.testing.assert_allclose(m1[key], m8[key], rtol=1e-5)
  assert ("train/dilemma_acc" in m1) == ("dilemma" in variant)
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u8)):
    assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(a) + 1e-7
  for a, b in zip(jax.tree.leaves(e1), jax.tree.leaves(e8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  changed = [np.any(u != 0) for u in jax.tree.leaves(u1)]
  assert sum(changed) >= 0.8 * len(changed)
  if method == "mocov3":  # MoCo v3's frozen patch embedding and sin-cos table never move
    for name in ("patch_embed", "pos_embed"):
      assert all(np.all(u == 0) for u in jax.tree.leaves(u1["backbone"][name])), name
  if method == "dino":
    assert np.any(e1["center"] != 0)


@pytest.mark.parametrize("method", HOSTS)
def test_resume_with_dilemma_is_bitwise_equal_to_an_uninterrupted_run(method, tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.run(_step_config(method, "test,dilemma", total_steps=3), straight)
  train.run(_step_config(method, "test,dilemma", total_steps=1), resumed)
  state = train.run(_step_config(method, "test,dilemma", total_steps=3), resumed)
  assert int(state.step) == 3
  a, b = checkpoint.load_raw(straight)[1], checkpoint.load_raw(resumed)[1]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_optimiser_hooks_of_the_recipes():
  """DINO's last layer is held for freeze_early_epochs and clipped per tensor; MoCo v3's
  patch embedding and position table never move; on the methods' real parameter paths."""
  from dense_ssl import optim  # pylint: disable=g-import-not-at-top
  config = _config("dino", "test", **{"optim.freeze_early_epochs": 0.5})
  durations = optim.Durations(total_steps=8, steps_per_epoch=4, warmup_steps=0)
  method = methods_lib.create(config, durations)
  batch = {k: np.zeros((2, *s[1:]), d) for k, (s, d) in
           methods_lib.base.spec.batch_shapes(method.views(), 2).items()}
  params = jax.eval_shape(method.init, jax.random.key(0), batch)["params"]
  params = jax.tree.map(lambda a: np.ones(a.shape, a.dtype), params)
  tx = optim.create_optimizer(config.optim, lambda step: 1e-3, params, durations)
  grads = jax.tree.map(lambda p: np.full(p.shape, 100.0, p.dtype), params)
  opt_state = tx.init(params)
  moved = []
  for _ in range(3):  # freeze_early_epochs=0.5 of 4 steps per epoch: steps 0 and 1 held
    updates, opt_state = tx.update(grads, opt_state, params)
    moved.append(np.any(np.asarray(updates["head"]["last_layer"]["kernel_v"]) != 0))
  assert moved == [False, False, True]
  assert np.any(np.asarray(updates["head"]["fc0"]["kernel"]) != 0)
  # Per-tensor clipping at 3: every clipped tensor's (pre-Adam) norm is 3, whatever its size.
  clipped, _ = optim.clip_per_tensor(3.0).update(grads, None)
  norms = [float(np.linalg.norm(np.asarray(g))) for g in jax.tree.leaves(clipped)]
  np.testing.assert_allclose(norms, 3.0, rtol=1e-5)

  labels = optim.param_labels(_config("mocov3", "test").optim,
                              {"backbone": {"patch_embed": {"kernel": 0}, "pos_embed": 0,
                                            "block0": {"norm1": {"scale": 0}}}})
  assert labels == {"backbone": {"patch_embed": {"kernel": optim.FROZEN},
                                 "pos_embed": optim.FROZEN,
                                 "block0": {"norm1": {"scale": optim.TRAIN}}}}
