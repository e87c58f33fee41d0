"""BYOL (methods/byol.py, configs/byol.py): loss and EMA against float64 references written
here, the method's parameter split and gradients, LARS's exclusions, training through main."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_ssl import config_errors, ema, optim
from dense_ssl.methods import byol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ref_loss_and_grad(p1, p2, z1, z2):
  """float64 numpy: L = mean(2 - 2cos(p1, z2)) + mean(2 - 2cos(p2, z1)) and dL/dp1."""
  def term(p, z):
    pn, zn = np.linalg.norm(p, axis=1, keepdims=True), np.linalg.norm(z, axis=1, keepdims=True)
    cos = np.sum(p * z, axis=1, keepdims=True) / (pn * zn)
    # d cos / dp = z / (|p||z|) - cos p / |p|²
    grad = -2.0 * (z / (pn * zn) - cos * p / pn**2) / len(p)
    return np.mean(2.0 - 2.0 * cos), grad
  a, grad = term(p1, z2)
  b, _ = term(p2, z1)
  return a + b, grad


def test_head_loss_and_gradient_match_a_float64_reference():
  rng = np.random.default_rng(0)
  p1, p2, z1, z2 = (rng.normal(size=(6, 5)) for _ in range(4))
  ref, ref_grad = _ref_loss_and_grad(p1, p2, z1, z2)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  loss, (g_p1, g_z2) = jax.value_and_grad(byol.head_loss, argnums=(0, 3))(
      f32(p1), f32(p2), f32(z1), f32(z2))
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  np.testing.assert_allclose(g_p1, ref_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(g_z2, 0.0)  # the target side is a constant


def test_cosine_ema_matches_a_float64_reference():
  total, base = 40, 0.99
  rng = np.random.default_rng(1)
  target = {"w": rng.normal(size=(3, 4))}
  online = {"w": rng.normal(size=(3, 4)), "predictor": rng.normal(size=(2,))}
  for step in (0, 7, 20, 39, 40):
    m_ref = 1.0 - (1.0 - base) * (np.cos(np.pi * step / total) + 1.0) / 2.0
    m = ema.momentum_at(step, total, base, "cosine")
    np.testing.assert_allclose(m, m_ref, rtol=0, atol=1e-7)
    new = ema.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), target),
                     jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), online), m)
    assert set(new) == {"w"}  # the online-only predictor has no target copy
    np.testing.assert_allclose(new["w"], m_ref * target["w"] + (1 - m_ref) * online["w"],
                               rtol=1e-6, atol=1e-6)
  assert float(ema.momentum_at(0, total, base, "cosine")) == pytest.approx(0.99)


def _config(**overrides):
  base = {"model.name": "resnet18", "data.image_size": 32, "batch_size": 8, "method.hidden": 16,
          "method.dim": 8}
  return config_errors.override(config_errors.load_config("configs/byol.py:test"),
                                {**base, **overrides})


@pytest.fixture(scope="module")
def tiny(tiny_method):
  t = tiny_method(_config(), batch_size=8, size=32)
  swapped = {"view1": t["batch"]["view2"], "view2": t["batch"]["view1"]}
  (t["loss_swapped"], _), _ = t["loss_and_grads"](t["variables"]["params"],
                                                  t["variables"]["target_params"], swapped)
  return t


def test_views_are_byol_asymmetric_presets(tiny):
  views = tiny["method"].views()
  assert [(v.name, v.preset, v.scale) for v in views] == [
      ("view1", "byol1", (0.08, 1.0)), ("view2", "byol2", (0.08, 1.0))]
  presets = config_errors.load_config("configs/byol.py").augment.presets
  assert (presets.byol1.blur_prob, presets.byol1.solarize_prob) == (1.0, 0.0)
  assert (presets.byol2.blur_prob, presets.byol2.solarize_prob) == (0.1, 0.2)


def test_target_is_the_online_network_without_its_predictor(tiny):
  v = tiny["variables"]
  assert set(v["params"]) == {"backbone", "projector", "predictor"}
  assert set(v["target_params"]) == {"backbone", "projector"}
  for a, b in zip(jax.tree.leaves(v["target_params"]["projector"]),
                  jax.tree.leaves(v["params"]["projector"])):
    np.testing.assert_array_equal(a, b)
  shapes = jax.tree.map(np.shape, v["params"]["predictor"])
  assert shapes["fc1"]["kernel"] == (8, 16) and shapes["fc2"]["kernel"] == (16, 8)


def test_loss_is_symmetric_finite_and_reaches_every_parameter(tiny):
  assert 0.0 < float(tiny["loss"]) <= 8.0  # two terms of 2 - 2cos in [0, 4]
  np.testing.assert_allclose(tiny["loss"], tiny["loss_swapped"], rtol=1e-5)
  grads = [np.asarray(g) for g in jax.tree.leaves(tiny["grads"])]
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert all(np.any(g != 0) for g in jax.tree.leaves(tiny["grads"]["predictor"]))
  assert all(np.any(g != 0) for g in jax.tree.leaves(tiny["grads"]["projector"]))
  for g in jax.tree.leaves(tiny["target_grads"]):
    np.testing.assert_array_equal(g, 0.0)
  metrics = tiny["out"].metrics
  assert float(metrics["loss"]) == pytest.approx(float(tiny["loss"]))
  assert 0 < float(metrics["std_p"]) <= 1 and 0 < float(metrics["std_z"]) <= 1


def test_lars_excludes_biases_and_batchnorm_from_decay_and_adaptation(tiny):
  config = config_errors.load_config("configs/byol.py")
  assert (config.optim.name, config.optim.weight_decay, config.optim.warmup_epochs) == (
      "lars", 1.5e-6, 10.0)
  assert optim.peak_lr(config.optim, config.batch_size) == pytest.approx(0.2 * 4096 / 256)
  params = tiny["variables"]["params"]
  labels = optim.param_labels(config.optim, params)
  flat = jax.tree_util.tree_flatten_with_path(labels)[0]
  for path, label in flat:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    excluded = name.endswith("bias") or name.endswith("scale")
    assert label == (optim.NO_DECAY if excluded else optim.TRAIN), name
  # One LARS step from zero momentum: an excluded leaf moves by lr * grad exactly (no trust
  # ratio, no decay); a kernel by lr * trust ratio * (grad + wd * w).
  lr = 0.5
  tx = optim.create_optimizer(config.optim, lambda step: lr, params,
                              optim.Durations(10, 1, 0))
  grads = tiny["grads"]
  updates, _ = tx.update(grads, tx.init(params), params)
  bias_u = updates["projector"]["fc1"]["bias"]
  np.testing.assert_allclose(bias_u, -lr * grads["projector"]["fc1"]["bias"], rtol=1e-6)
  w, g = params["projector"]["fc1"]["kernel"], grads["projector"]["fc1"]["kernel"]
  g_wd = g + 1.5e-6 * w
  ratio = 1e-3 * np.linalg.norm(w) / np.linalg.norm(g_wd)
  np.testing.assert_allclose(updates["projector"]["fc1"]["kernel"], -lr * ratio * g_wd,
                             rtol=1e-4)


def test_test_config_trains_through_main_on_8_devices(tmp_path):
  cmd = [sys.executable, "-m", "dense_ssl.main", "--config=configs/byol.py:test",
         f"--workdir={tmp_path}", "--config.total_steps=2"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "over 8 devices" in out.stderr
  assert "train/std_p=" in out.stderr and "train/loss=" in out.stderr
  assert sorted(os.listdir(tmp_path / "export")) == ["backbone_detectron2.pkl",
                                                     "backbone_torchvision.pth"]


def test_evaluation_and_export_reach_the_online_backbone(tiny):
  method, v = tiny["method"], tiny["variables"]
  got = method.backbone_variables(v["params"], v["batch_stats"])
  assert got["params"] is v["params"]["backbone"]
  assert got["batch_stats"] is v["batch_stats"]["online"]["backbone"]
  from dense_ssl import export  # pylint: disable=g-import-not-at-top
  assert export.FORMATS[method.backbone.family] == ("torchvision", "detectron2")
