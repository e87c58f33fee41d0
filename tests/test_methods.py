"""One jitted loss + grad step per method (MoCo-v2, DenseCL, HoughCL) on a tiny ResNet-18.

96 px images give a 3x3 C5 grid; batch 8; queues of 16. Compilation dominates the run time, so
each method is initialised and compiled once (module fixtures) and the tests share the result.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common
from dense_ssl import methods, queues

BATCH, SIZE, QUEUE, DIM = 8, 96, 16, 8
GRID = SIZE // 32


def _config(name, *, bn="shuffle", bn_groups=2, dense_chunk=0, half_precision=False,
            model="resnet18"):
  # The recipe of configs/<name>.py (rebuilt without ml_collections where it is missing, as on
  # the accelerator machines) at the test's sizes.
  config = common.bench_config(name, model=model, image_size=SIZE, batch=BATCH,
                               half_precision=half_precision, queue=QUEUE, bn=bn,
                               bn_groups=bn_groups, hidden=16, dim=DIM, dense_chunk=dense_chunk)
  return config


def _cell_centres(box, flip):
  y0, x0, y1, x1 = box
  centres = (np.arange(GRID) + 0.5) / GRID
  xs = x0 + centres * (x1 - x0)
  ys = y0 + centres * (y1 - y0)
  return np.stack(np.meshgrid(ys, xs[::-1] if flip else xs, indexing="ij"), -1)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  box1 = np.tile([0.0, 0.0, 1.0, 1.0], (BATCH, 1))
  box2 = np.tile([0.0, 0.25, 0.75, 1.0], (BATCH, 1))
  flip2 = np.arange(BATCH) % 2 == 1
  coords = lambda boxes, flips: np.stack([_cell_centres(b, f) for b, f in zip(boxes, flips)])
  views = rng.normal(size=(2, BATCH, SIZE, SIZE, 3)).astype(np.float32)
  arrays = dict(view1=views[0], view2=views[1],
                view1_coords=coords(box1, [False] * BATCH), view2_coords=coords(box2, flip2),
                view1_valid=np.ones((BATCH, GRID, GRID), bool),
                view2_valid=np.ones((BATCH, GRID, GRID), bool), view1_box=box1, view2_box=box2,
                view1_flip=np.zeros(BATCH, bool), view2_flip=flip2)
  return {k: jnp.asarray(v, jnp.float32 if v.dtype == np.float64 else v.dtype)
          for k, v in arrays.items()}


def _state(variables, target=None):
  return methods.MethodState(step=jnp.zeros((), jnp.int32),
                             target_params=variables["target_params"] if target is None
                             else target,
                             batch_stats=variables["batch_stats"], extra=variables["extra"])


def _step(method, variables, batch):
  """Loss, updates, metrics and the gradients w.r.t. params AND target params."""

  def loss_fn(params, target):
    return method.loss(params, _state(variables, target), batch, jax.random.key(2))

  fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
  (loss, out), (grads, target_grads) = fn(variables["params"], variables["target_params"])
  updates = {"batch_stats": out.batch_stats, "extra": out.extra}
  return dict(state=_state(variables), loss=loss, updates=updates, metrics=out.metrics,
              grads=grads, target_grads=target_grads)


def _init_key():
  # The "rbg" generator compiles the many initialisers about twice as fast as threefry.
  return jax.random.key(0, impl="rbg")


@pytest.fixture(scope="module")
def moco(batch):
  method = methods.create(_config("mocov2"))
  variables = jax.jit(method.init)(_init_key(), batch)
  return dict(method=method, variables=variables, **_step(method, variables, batch))


@pytest.fixture(scope="module")
def dense(batch):
  method = methods.create(_config("densecl"))
  variables = jax.jit(method.init)(_init_key(), batch)
  return dict(method=method, variables=variables, **_step(method, variables, batch))


@pytest.fixture(scope="module")
def hough(batch, dense):
  # Same parameter structure as DenseCL; the dense loss here takes the chunked path.
  method = methods.create(_config("houghcl", dense_chunk=5))
  return dict(method=method, variables=dense["variables"],
              **_step(method, dense["variables"], batch))


def _numpy(tree):
  # Checks run in numpy: eager jnp ops would compile once per leaf shape.
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(params=["moco", "dense", "hough"])
def run(request):
  return request.getfixturevalue(request.param)


def test_registered():
  assert {"mocov2", "densecl", "houghcl"} <= set(methods.names())


def test_init_gives_identical_online_and_target_encoders(run):
  v = run["variables"]
  assert set(v["params"]) == {"backbone", "neck"}
  for a, b in zip(_numpy(v["params"]), _numpy(v["target_params"])):
    np.testing.assert_array_equal(a, b)
  assert set(v["batch_stats"]) == {"online", "target"}
  for name, queue in v["extra"].items():
    assert queue.buffer.shape == (QUEUE, DIM) and int(queue.ptr) == 0, name


def test_loss_and_gradients_are_finite_and_reach_every_parameter(run):
  assert np.isfinite(float(run["loss"]))
  assert all(np.all(np.isfinite(g)) for g in _numpy(run["grads"]))
  assert all(np.any(g != 0) for g in _numpy(run["grads"]["neck"]))
  assert sum(float(np.sum(g**2)) for g in _numpy(run["grads"]["backbone"])) > 0


def test_target_receives_no_gradient(run):
  for g in _numpy(run["target_grads"]):
    np.testing.assert_array_equal(g, 0.0)


def test_queues_advance_by_the_batch_and_keep_other_rows(run):
  old, new = run["variables"]["extra"], run["updates"]["extra"]
  assert set(new) == set(old)
  for name in old:
    assert int(new[name].ptr) == BATCH % QUEUE
    np.testing.assert_array_equal(new[name].buffer[BATCH:], old[name].buffer[BATCH:])
    np.testing.assert_allclose(np.linalg.norm(new[name].buffer[:BATCH], axis=1), 1.0,
                               rtol=1e-5)
    assert not np.allclose(new[name].buffer[:BATCH], old[name].buffer[:BATCH])


def test_both_encoders_update_their_own_batch_statistics(run):
  old, new = run["variables"]["batch_stats"], run["updates"]["batch_stats"]
  for side in ("online", "target"):
    assert jax.tree.structure(new[side]) == jax.tree.structure(old[side])
    assert any(not np.allclose(a, b) for a, b in zip(_numpy(new[side]), _numpy(old[side])))
  online, target = (_numpy(new[s]) for s in ("online", "target"))
  assert any(not np.allclose(a, b) for a, b in zip(online, target))


def test_metrics(run):
  metrics = run["metrics"]
  assert float(metrics["loss"]) == pytest.approx(float(run["loss"]))
  assert 0 < float(metrics["std_q"]) <= 1
  if "dense_queue" not in run["variables"]["extra"]:
    return
  assert float(metrics["loss"]) == pytest.approx(
      0.5 * float(metrics["loss_global"]) + 0.5 * float(metrics["loss_dense"]), rel=1e-5)
  for key in ("corr_acc", "corr_acc_exact", "corr_acc_chance"):
    assert 0 <= float(metrics[key]) <= 1, key
  assert float(metrics["corr_acc_exact"]) <= float(metrics["corr_acc"])
  assert 0 < float(metrics["corr_acc_chance"]) < 1


def test_chunked_dense_loss_matches_the_materialised_one(hough, batch):
  plain = methods.create(_config("houghcl", dense_chunk=0))
  loss, out = jax.jit(plain.loss)(hough["variables"]["params"], hough["state"], batch,
                                  jax.random.key(2))
  metrics = out.metrics
  np.testing.assert_allclose(loss, hough["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["loss_dense"], hough["metrics"]["loss_dense"], rtol=1e-5)


def _forward(config, variables, batch):
  method = methods.create(config)
  return float(jax.jit(method.loss)(variables["params"], _state(variables), batch,
                                    jax.random.key(2))[0])


def test_shuffle_bn_changes_the_loss_only_with_several_groups(moco, batch):
  v = moco["variables"]
  # bn_groups=1: one BatchNorm group over the whole batch, so the permutation cannot matter.
  one_shuffled = _forward(_config("mocov2", bn="shuffle", bn_groups=1), v, batch)
  one_plain = _forward(_config("mocov2", bn="none", bn_groups=1), v, batch)
  np.testing.assert_allclose(one_shuffled, one_plain, rtol=1e-6)
  # bn_groups=2: shuffling the key batch changes which images share statistics.
  two_plain = _forward(_config("mocov2", bn="none", bn_groups=2), v, batch)
  assert abs(float(moco["loss"]) - two_plain) > 1e-4
  assert abs(one_plain - two_plain) > 1e-4


def test_bad_config_values_are_rejected():
  config = _config("mocov2", bn="ghost")
  with pytest.raises(ValueError, match="config.method.bn"):
    methods.base.method_class(config).check_config(config, 1)
  with pytest.raises(ValueError, match="config.model.name"):
    methods.create(_config("mocov2", model="resnet7"))


def test_half_precision_runs_the_backbone_in_bfloat16_and_the_heads_in_float32():
  method = methods.create(_config("densecl", half_precision=True))
  assert method.encoder.backbone.dtype == jnp.bfloat16
  # The objective upcasts bfloat16 maps and neck outputs: a float32 loss close to the f32 one.
  rng = np.random.default_rng(0)
  maps = [jnp.asarray(rng.normal(size=(2, 3, 3, 6)), jnp.float32) for _ in range(2)]
  outs = [{"global": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32),
           "dense_grid": jnp.asarray(rng.normal(size=(2, 9, 4)), jnp.float32),
           "dense_pooled": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)} for _ in range(2)]
  qs = [queues.create(jax.random.key(i), 4, 4) for i in range(2)]
  half = lambda tree: jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)
  kwargs = dict(temperature=0.2, loss_lambda=0.5)
  full, _ = methods.densecl.head_loss(maps[0], outs[0], maps[1], outs[1], *qs, **kwargs)
  low, aux = methods.densecl.head_loss(half(maps[0]), half(outs[0]), half(maps[1]),
                                       half(outs[1]), *qs, **kwargs)
  assert low.dtype == jnp.float32 and aux["queue"].buffer.dtype == jnp.float32
  np.testing.assert_allclose(low, full, rtol=2e-2)


def test_houghcl_reports_its_match_beside_densecl_argmax_and_revision_1(hough):
  metrics = hough["metrics"]
  for name in ("corr_acc", "corr_acc_exact", "corr_acc_argmax", "corr_acc_argmax_exact",
               "corr_acc_hough_v1", "corr_acc_hough_v1_exact", "identity_share"):
    assert 0.0 <= float(metrics[name]) <= 1.0, name


def test_houghcl_matcher_follows_the_config():
  config = _config("houghcl")
  assert config.method.hough_revision == 2  # revision 2 (METHODS.md §1b) is the default
  method = methods.create(config)
  assert method.matcher.keywords["params"] == methods.houghcl.matchers.HoughParams()
  config.method.hough_revision, config.method.hough_mirror = 2, True
  config.method.hough_kappa = 1.0
  params = methods.create(config).matcher.keywords["params"]
  assert params.mirror and params.kappa == 1.0
  config.method.hough_revision = 1
  assert methods.create(config).matcher is methods.houghcl.hough_matcher
  for key, value, message in (("hough_revision", 3, "hough_revision"),
                              ("hough_smooth_side", 2, "hough_smooth_side"),
                              ("hough_kappa", -1.0, "hough_kappa")):
    bad = _config("houghcl")
    bad.method[key] = value
    with pytest.raises(ValueError, match=message):
      methods.base.method_class(bad).check_config(bad, 1)
