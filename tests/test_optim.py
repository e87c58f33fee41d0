"""Optimisers, schedules and the optimiser hooks follow the recipes' formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks.common import AttrDict
from dense_ssl import optim

TEN = optim.Durations(total_steps=10, steps_per_epoch=5, warmup_steps=0)


def _cfg(**kw):
  c = dict(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2, schedule="cosine",
           warmup_epochs=0.0, b1=0.9, b2=0.999, base_batch_size=0, weight_decay_end=-1.0,
           clip_grad_norm=0.0, no_decay=(), frozen=(), freeze_early=(), freeze_early_epochs=0.0)
  c.update(kw)
  return AttrDict(c)


def _tx(cfg, params, durations=TEN):
  return optim.create_optimizer(cfg, optim.learning_rate_fn(cfg, durations.total_steps, 0),
                                params, durations)


def _steps(tx, params, grads_seq):
  state = tx.init(params)
  for grads in grads_seq:
    upd, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, upd)
  return params


def test_cosine_schedule_with_warmup():
  lr = optim.learning_rate_fn(_cfg(), total_steps=110, warmup_steps=10)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(lr(5), 0.05, rtol=1e-6)
  np.testing.assert_allclose(lr(10), 0.1, rtol=1e-6)
  np.testing.assert_allclose(lr(60), 0.05, rtol=1e-5)  # half-way through the cosine
  np.testing.assert_allclose(lr(110), 0.0, atol=1e-7)


def test_learning_rate_scales_with_the_batch():
  """MoCo-v3 / BYOL: lr x batch / 256."""
  cfg = _cfg(schedule="constant", lr=1.5e-4, base_batch_size=256)
  np.testing.assert_allclose(optim.learning_rate_fn(cfg, 10, 0, batch_size=1024)(3), 6e-4)
  np.testing.assert_allclose(optim.peak_lr(_cfg(lr=0.3), 4096), 0.3)  # no scaling by default


def test_sgd_matches_torch_sgd_with_weight_decay():
  """torch.optim.SGD: g += wd*p; buf = m*buf + g; p -= lr*buf (MoCo/DenseCL)."""
  cfg = _cfg(schedule="constant")
  p = {"w": jnp.array([1.0, -2.0])}
  tx = _tx(cfg, p)
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
  p = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  tx = _tx(cfg, p)
  grads = jax.tree.map(jnp.ones_like, p)
  upd, _ = tx.update(grads, tx.init(p), p)
  assert float(jnp.abs(upd["dense"]["kernel"]).sum()) > 0


def test_adamw_matches_torch_adamw():
  """torch.optim.AdamW: p -= lr*wd*p; m, v moments; p -= lr * m_hat / (sqrt(v_hat) + eps)."""
  cfg = _cfg(name="adamw", schedule="constant", lr=0.01, weight_decay=0.1, b2=0.98)
  p = {"w": jnp.array([1.0, -2.0, 0.5])}
  grads = [jnp.array(g) for g in ([0.5, 0.5, -1.0], [-1.0, 2.0, 0.0], [0.1, 0.0, 0.3])]
  got = _steps(_tx(cfg, p), p, [{"w": g} for g in grads])["w"]
  w, m, v = np.array([1.0, -2.0, 0.5]), np.zeros(3), np.zeros(3)
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g)
    m, v = 0.9 * m + 0.1 * g, 0.98 * v + 0.02 * g * g
    update = (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.98**t)) + 1e-8)
    w = w - 0.01 * (update + 0.1 * w)  # torch decays p first: the same expression
  np.testing.assert_allclose(got, w, rtol=1e-4)


def test_no_decay_labels_skip_weight_decay_and_lars_adaptation():
  """BYOL's LARS: biases and BatchNorm parameters get neither decay nor the trust ratio."""
  params = {"fc": {"kernel": jnp.full((3, 3), 2.0), "bias": jnp.full((3,), 2.0)},
            "bn": {"scale": jnp.full((3,), 2.0)}}
  labels = optim.param_labels(_cfg(no_decay=(r"bias$", r"scale$")), params)
  assert labels == {"fc": {"kernel": "train", "bias": "no_decay"}, "bn": {"scale": "no_decay"}}
  zero = jax.tree.map(jnp.zeros_like, params)
  for name in ("sgd", "lars", "adamw"):
    cfg = _cfg(name=name, schedule="constant", weight_decay=0.5, no_decay=(r"bias$", r"scale$"))
    moved = _steps(_tx(cfg, params), params, [zero])
    # With a zero gradient only weight decay moves a parameter.
    assert float(jnp.abs(moved["fc"]["kernel"] - 2.0).max()) > 1e-5, name
    np.testing.assert_array_equal(moved["fc"]["bias"], params["fc"]["bias"])
    np.testing.assert_array_equal(moved["bn"]["scale"], params["bn"]["scale"])
  # LARS: an excluded parameter's update is lr * momentum-SGD, not scaled by its trust ratio.
  cfg = _cfg(name="lars", schedule="constant", lr=0.1, weight_decay=0.0, no_decay=(r"bias$",))
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.01), params)
  moved = _steps(_tx(cfg, params), params, [grads])
  np.testing.assert_allclose(moved["fc"]["bias"], 2.0 - 0.1 * 0.01, rtol=1e-6)


def test_frozen_parameters_never_move_and_count_in_no_norm():
  params = {"patch_embed": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.ones((2, 2))}}
  grads = {"patch_embed": {"kernel": jnp.full((2, 2), 100.0)},
           "head": {"kernel": jnp.full((2, 2), 0.3)}}
  cfg = _cfg(name="adamw", weight_decay=0.1, frozen=(r"^patch_embed/",), clip_grad_norm=1.0)
  moved = _steps(_tx(cfg, params), params, [grads, grads])
  np.testing.assert_array_equal(moved["patch_embed"]["kernel"], 1.0)
  assert float(jnp.abs(moved["head"]["kernel"] - 1.0).max()) > 0
  # Clipping sees the head's gradient only (norm 0.6 < 1: unclipped), so plain SGD moves by
  # exactly lr x gradient.
  sgd = _cfg(schedule="constant", momentum=0.0, weight_decay=0.0, frozen=(r"^patch_embed/",),
             clip_grad_norm=1.0)
  moved = _steps(_tx(sgd, params), params, [grads])
  np.testing.assert_allclose(moved["head"]["kernel"], 1.0 - 0.1 * 0.3, rtol=1e-6)


def test_gradient_clipping_by_global_norm():
  params = {"a": jnp.zeros(3), "b": jnp.zeros(4)}
  grads = {"a": jnp.full(3, 3.0), "b": jnp.full(4, 4.0)}  # norm sqrt(27 + 64)
  cfg = _cfg(schedule="constant", lr=1.0, momentum=0.0, weight_decay=0.0, clip_grad_norm=3.0)
  moved = _steps(_tx(cfg, params), params, [grads])
  norm = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(moved))))
  np.testing.assert_allclose(norm, 3.0, rtol=1e-5)


def test_freeze_early_holds_a_layer_for_its_epochs():
  """DINO: the last layer does not move during epoch 1 (5 steps here), then trains."""
  params = {"last_layer": {"kernel": jnp.ones(2)}, "mlp": {"kernel": jnp.ones(2)}}
  grads = jax.tree.map(jnp.ones_like, params)
  cfg = _cfg(schedule="constant", momentum=0.0, weight_decay=0.0, freeze_early=(r"last_layer",),
             freeze_early_epochs=1.0)
  tx = _tx(cfg, params)
  state, trace = tx.init(params), []
  for _ in range(7):
    upd, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, upd)
    trace.append((float(params["last_layer"]["kernel"][0]), float(params["mlp"]["kernel"][0])))
  assert [t[0] for t in trace[:5]] == [1.0] * 5
  np.testing.assert_allclose([t[0] for t in trace[5:]], [0.9, 0.8], rtol=1e-6)
  np.testing.assert_allclose(trace[4][1], 0.5, rtol=1e-6)  # the rest trained from step 0


def test_weight_decay_schedule_is_dino_cosine():
  """DINO: wd from 0.04 to 0.4 along a half cosine over the run."""
  cfg = _cfg(weight_decay=0.04, weight_decay_end=0.4)
  wd = optim.weight_decay_fn(cfg, total_steps=100)
  np.testing.assert_allclose([wd(0), wd(50), wd(100)], [0.04, 0.22, 0.4], rtol=1e-5)
  # In the optimiser: with a zero gradient and plain SGD, p_{t+1} = p_t (1 - lr wd(t)).
  sgd = _cfg(schedule="constant", momentum=0.0, lr=0.5, weight_decay=0.04, weight_decay_end=0.4)
  p = {"w": jnp.ones(1)}
  durations = optim.Durations(total_steps=2, steps_per_epoch=1, warmup_steps=0)
  moved = _steps(_tx(sgd, p, durations), p, [{"w": jnp.zeros(1)}] * 2)
  np.testing.assert_allclose(moved["w"], (1 - 0.5 * 0.04) * (1 - 0.5 * 0.22), rtol=1e-5)


def test_durations_come_from_exactly_one_key():
  c = AttrDict(dict(total_epochs=2.0, total_steps=0, batch_size=10,
                                     optim=dict(warmup_epochs=0.5)))
  assert optim.durations(c, num_examples=100) == (20, 10, 5)
  c.total_steps = 7
  with pytest.raises(ValueError, match="exactly one of config.total_epochs"):
    optim.durations(c, num_examples=100)


def test_unknown_names_are_reported():
  with pytest.raises(ValueError, match="valid choices: sgd, lars, adamw"):
    _tx(_cfg(name="adam"), {"w": jnp.ones(1)})
  with pytest.raises(ValueError, match="valid choices: cosine, constant"):
    optim.learning_rate_fn(_cfg(schedule="step"), 10, 0)
