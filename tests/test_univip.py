"""UniVIP's loss functions (methods/univip.py): the transport-weighted instance term."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dense_ssl.methods import univip


def test_ot_instance_loss_uses_the_plan_as_a_constant():
  rng = np.random.default_rng(2)
  o, t = (jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32) for _ in range(2))
  row = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 4)), jnp.float32))
  col = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 4)), jnp.float32))
  loss, aux = univip.ot_instance_loss(o, t, row, col, eps=0.1, n_iter=50)
  np.testing.assert_allclose(aux["plan"].sum(1), col, rtol=1e-5)
  np.testing.assert_allclose(loss, -jnp.mean(jnp.sum(aux["plan"] * aux["cos_ot"], (1, 2))),
                             rtol=1e-6)
  # Gradient: exactly that of -Σ P·cos with P frozen.
  plan = aux["plan"]
  frozen = lambda x: -jnp.mean(jnp.sum(plan * univip.ot_instance_loss(x, t, row, col)[1][
      "cos_ot"], (1, 2)))
  np.testing.assert_allclose(jax.grad(lambda x: univip.ot_instance_loss(x, t, row, col)[0])(o),
                             jax.grad(frozen)(o), rtol=1e-5, atol=1e-7)
  byol, _ = univip.ot_instance_loss(o, t, row, col, byol_form=True)
  np.testing.assert_allclose(byol, 2 + 2 * loss, rtol=1e-5)  # Σ P = 1


# ---------------------------------------------------------------------------------------------
# Parity: the shipped vectors and cases of other sizes made here by a float64 reference.
# ---------------------------------------------------------------------------------------------

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

from dense_ssl import config_errors, methods, parity  # noqa: E402
from dense_ssl.data import spec  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "tests", "data", "parity", "univip_case1.npz")


def _logsumexp(x, axis):
  peak = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(peak, axis) + np.log(np.sum(np.exp(x - peak), axis=axis))


def _reference_case(n, k, d, seed):
  """A univip_*.npz case computed in float64 numpy from METHODS.md §2's equations."""
  rng = np.random.default_rng(seed)
  o, t = rng.normal(size=(n, k, d)), rng.normal(size=(n, k, d))
  p1, p2, z1, z2 = (rng.normal(size=(n, d)) for _ in range(4))
  # Make one weight per side clamp to zero, as in the shipped cases.
  o[:, 0] = -np.abs(o[:, 0]) * np.sign((z1 + z2)[:, None, :]).squeeze(1)
  t[:, 0] = -np.abs(t[:, 0]) * np.sign((p1 + p2)[:, None, :]).squeeze(1)
  w_si, b_si = rng.normal(size=(k * d, d)) / np.sqrt(k * d), rng.normal(size=(d,)) * 0.1
  eps, n_iter, floor = 0.1, 50, 1e-8
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  cos_ot = np.einsum("nmd,nld->nml", unit(o), unit(t))
  cost = 1.0 - cos_ot
  b_raw = np.maximum(np.einsum("nmd,nd->nm", o, (z1 + z2) / 2), 0.0)
  a_raw = np.maximum(np.einsum("nld,nd->nl", t, (p1 + p2) / 2), 0.0)
  row = (b_raw + floor) / np.sum(b_raw + floor, -1, keepdims=True)
  col = (a_raw + floor) / np.sum(a_raw + floor, -1, keepdims=True)
  kl, f, g = -cost / eps, np.zeros((n, k)), np.zeros((n, k))
  for _ in range(n_iter):
    f = np.log(row) - _logsumexp(kl + g[:, None, :], 2)
    g = np.log(col) - _logsumexp(kl + f[:, :, None], 1)
  plan = np.exp(kl + f[:, :, None] + g[:, None, :])
  inst = o.reshape(n, k * d) @ w_si + b_si
  cos = lambda a, b: np.sum(unit(a) * unit(b), -1)
  scene = np.mean(-cos(p1, z2)) + np.mean(-cos(p2, z1))
  si = np.mean(-cos(inst, z1)) + np.mean(-cos(inst, z2))
  per_image = np.sum(-plan * cos_ot, axis=(1, 2))
  ii = np.mean(per_image)
  byol = lambda paper, terms: 2 * terms + 2 * paper
  return dict(eps=eps, n_iter=n_iter, marginal_floor=floor, o=o, t=t, p1=p1, p2=p2, z1=z1,
              z2=z2, W_si=w_si, b_si=b_si, cos_ot=cos_ot, cost=cost, plan=plan, b_raw=b_raw,
              a_raw=a_raw, row_marginal=row, col_marginal=col, I=inst,
              loss_instance_per_image=per_image, loss_scene=scene, loss_scene_instance=si,
              loss_instance=ii, total=scene + si + ii, loss_scene_byol=byol(scene, 2),
              loss_scene_instance_byol=byol(si, 2),
              loss_instance_byol=np.mean(np.sum(plan * (2 - 2 * cos_ot), (1, 2))),
              total_byol=byol(scene, 2) + byol(si, 2) + np.mean(np.sum(plan * (2 - 2 * cos_ot),
                                                                        (1, 2))))


@pytest.mark.parametrize("n,k,d", [(3, 4, 5), (7, 4, 33), (2, 6, 16)])
def test_parity_on_cases_of_other_sizes(tmp_path, n, k, d):
  path = str(tmp_path / f"univip_n{n}_k{k}_d{d}.npz")
  np.savez(path, **_reference_case(n, k, d, seed=n * 100 + k))
  rows = parity.check_file(path)
  failed = [str(r) for r in rows if not r.passed]
  assert not failed, "\n".join(failed)
  assert {"plan", "total_byol", "loss_instance", "I"} <= {r.name for r in rows}


def test_the_reference_of_this_file_reproduces_the_shipped_vectors():
  """The float64 reference above is the one METHODS.md defines: it gives the shipped file's
  plan and losses from the shipped inputs (so the generated cases test the same thing)."""
  with np.load(SHIPPED) as r:
    o, t = r["o"], r["t"]
    ref = dict(r)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  cost = 1.0 - np.einsum("nmd,nld->nml", unit(o), unit(t))
  b_raw = np.maximum(np.einsum("nmd,nd->nm", o, (ref["z1"] + ref["z2"]) / 2), 0.0)
  a_raw = np.maximum(np.einsum("nld,nd->nl", t, (ref["p1"] + ref["p2"]) / 2), 0.0)
  row = (b_raw + 1e-8) / np.sum(b_raw + 1e-8, -1, keepdims=True)
  col = (a_raw + 1e-8) / np.sum(a_raw + 1e-8, -1, keepdims=True)
  kl, f, g = -cost / 0.1, np.zeros(row.shape), np.zeros(col.shape)
  for _ in range(50):
    f = np.log(row) - _logsumexp(kl + g[:, None, :], 2)
    g = np.log(col) - _logsumexp(kl + f[:, :, None], 1)
  np.testing.assert_allclose(np.exp(kl + f[:, :, None] + g[:, None, :]), ref["plan"], atol=1e-9)


def test_parity_command_passes_on_the_shipped_and_a_generated_file(tmp_path):
  path = str(tmp_path / "univip_case2.npz")
  np.savez(path, **_reference_case(9, 4, 12, seed=9))
  out = subprocess.run([sys.executable, "-m", "dense_ssl.parity", SHIPPED, path], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
  assert "FAIL" not in out.stdout and out.stdout.count("PASS") >= 2 * 17


# ---------------------------------------------------------------------------------------------
# The method on a tiny ResNet-18.
# ---------------------------------------------------------------------------------------------


def _config(**overrides):
  base = {"batch_size": 8, "method.hidden": 16, "method.dim": 8, "data.image_size": 32}
  return config_errors.override(config_errors.load_config("configs/univip.py:test"),
                                {**base, **overrides})


@pytest.fixture(scope="module")
def tiny(tiny_method):
  return tiny_method(_config(), batch_size=8,
                     extra={spec.PROPOSAL_FALLBACK: jnp.asarray(np.arange(8) < 2)})


def test_views_sampler_and_parameters(tiny):
  method, v = tiny["method"], tiny["variables"]
  names = [(x.name, x.size, x.preset) for x in method.views()]
  assert names == [("view1", 32, "byol1"), ("view2", 32, "byol2"),
                   ("view1_inst0", 32, "byol1"), ("view1_inst1", 32, "byol1"),
                   ("view2_inst0", 32, "byol2"), ("view2_inst1", 32, "byol2")]
  assert method.crop_sampler == "overlap_proposals"
  assert set(v["params"]) == {"backbone", "projector", "predictor", "scene_instance"}
  assert set(v["target_params"]) == {"backbone", "projector"}
  assert v["params"]["scene_instance"]["kernel"].shape == (2 * 8, 8)


def test_loss_terms_gradients_and_metrics(tiny):
  m = {k: float(x) for k, x in tiny["out"].metrics.items()}
  assert m["loss"] == pytest.approx(float(tiny["loss"]))
  assert m["loss"] == pytest.approx(m["loss_scene"] + m["loss_scene_instance"] +
                                    m["loss_instance"], rel=1e-5)
  for key in ("loss_scene", "loss_scene_instance"):  # two terms of 2 - 2cos each
    assert 0.0 < m[key] <= 8.0, key
  assert 0.0 < m["loss_instance"] <= 4.0  # Σ P (2 - 2cos) with Σ P = 1
  assert 0.0 <= m["plan_diagonal"] <= 1.0 + 1e-5
  assert m["proposal_fallbacks"] == pytest.approx(0.25)
  grads = tiny["grads"]
  for name in ("predictor", "projector", "scene_instance", "backbone"):
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads[name])]
    assert all(np.all(np.isfinite(g)) for g in leaves), name
    assert sum(float(np.sum(g**2)) for g in leaves) > 0, name
  for g in jax.tree.leaves(tiny["target_grads"]):
    np.testing.assert_array_equal(g, 0.0)


def test_univip_config_checks():
  config = _config(**{"data.proposals": ""})
  with pytest.raises(ValueError, match="config.data.proposals"):
    methods.base.method_class(config).check_config(config, 8)
  default = config_errors.load_config("configs/univip.py")
  assert (default.model.name, default.batch_size, default.total_epochs,
          default.optim.warmup_epochs, default.data.source) == ("resnet50", 512, 800.0, 4.0,
                                                                "coco2017")
  assert (default.method.num_instances, default.method.instance_size, default.method.sinkhorn_eps,
          default.method.sinkhorn_iters, default.data.proposal_min_side) == (4, 96, 0.1, 50, 64.0)


def test_test_config_trains_through_main_on_8_devices(tmp_path):
  cmd = [sys.executable, "-m", "dense_ssl.main", "--config=configs/univip.py:test",
         f"--workdir={tmp_path}", "--config.total_steps=2"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "over 8 devices" in out.stderr
  for key in ("train/loss_instance=", "train/plan_diagonal=", "train/proposal_fallbacks="):
    assert key in out.stderr, key
  assert sorted(os.listdir(tmp_path / "export")) == ["backbone_detectron2.pkl",
                                                     "backbone_torchvision.pth"]


def test_instance_term_benchmark_measures_sinkhorn_and_the_ot_loss():
  from benchmarks import univip_step  # pylint: disable=g-import-not-at-top
  out = univip_step.instance_term_seconds(4, 4, 8, repeats=1, iters=1)
  for name in ("sinkhorn", "ot_loss"):
    assert out[f"{name}_s"] > 0 and out[f"{name}_flops"] > 0, out
