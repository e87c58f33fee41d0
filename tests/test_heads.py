"""Tests for dense_ssl.models.heads: names, shapes, init, and the DenseCL/MoCo-v2 parity vectors."""

from __future__ import annotations

import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_ssl.models import heads

PARITY = pathlib.Path(__file__).parent / "data" / "parity" / "densecl_A.npz"
KEY = jax.random.key(0, impl="rbg")


@pytest.fixture(scope="module")
def case():
  return dict(np.load(PARITY))


# The key view's forward uses the momentum-updated key parameters (README of the vectors).
PARAMS = {"q": "in/neck_q/", "k": "out/neck_k_updated/"}


def neck_params(case: dict, prefix: str) -> dict:
  flat = {tuple(k[len(prefix):].split("/")): v for k, v in case.items() if k.startswith(prefix)}
  return flax.traverse_util.unflatten_dict(flat)


def test_densecl_neck_names_and_shapes_match_the_parity_vectors(case):
  x = case["in/q_backbone"]
  n, s, _, c = x.shape
  dim = case["out/q_neck/global"].shape[-1]
  hidden = case["in/neck_q/global_fc1/kernel"].shape[1]
  neck = heads.DenseCLNeck(hidden=hidden, dim=dim)
  out, variables = neck.init_with_output(KEY, x)
  expected = jax.tree.map(np.shape, neck_params(case, "in/neck_q/"))
  assert jax.tree.map(np.shape, variables["params"]) == expected
  assert set(variables) == {"params"}
  assert out["global"].shape == (n, dim)
  assert out["dense_grid"].shape == (n, s * s, dim)
  assert out["dense_pooled"].shape == (n, dim)


@pytest.mark.parametrize("view", ["q", "k"])
def test_densecl_neck_reproduces_the_official_forward(case, view):
  params = neck_params(case, PARAMS[view])
  neck = heads.DenseCLNeck(hidden=params["global_fc1"]["kernel"].shape[1],
                           dim=params["global_fc2"]["kernel"].shape[1])
  out = neck.apply({"params": params}, case[f"in/{view}_backbone"])
  for name in ("global", "dense_grid", "dense_pooled"):
    np.testing.assert_allclose(out[name], case[f"out/{view}_neck/{name}"], rtol=1e-5, atol=1e-5,
                               err_msg=name)
  # The pooled dense output is the mean of the grid over cells, not the global branch.
  np.testing.assert_allclose(out["dense_pooled"], out["dense_grid"].mean(axis=1), rtol=1e-6,
                             atol=1e-6)
  assert not np.allclose(out["dense_pooled"], out["global"], atol=1e-2)


def test_dense_grid_is_row_major(case):
  params = neck_params(case, "in/neck_q/")
  neck = heads.DenseCLNeck(hidden=params["global_fc1"]["kernel"].shape[1],
                           dim=params["global_fc2"]["kernel"].shape[1])
  x = case["in/q_backbone"]
  s = x.shape[1]
  grid = neck.apply({"params": params}, x)["dense_grid"]
  # Cell p = h * S + w must be the neck applied to x[:, h, w] alone.
  h, w = 2, 5
  single = neck.apply({"params": params}, x[:, h:h + 1, w:w + 1])["dense_grid"][:, 0]
  np.testing.assert_allclose(grid[:, h * s + w], single, rtol=1e-5, atol=1e-5)


def test_moco_neck_reproduces_the_official_forward(case):
  # In the vectors MoCo-v2's fc1/fc2 reuse the DenseCL global branch's parameters.
  for view in ("q", "k"):
    p = neck_params(case, PARAMS[view])
    params = {"fc1": p["global_fc1"], "fc2": p["global_fc2"]}
    neck = heads.MocoNeck(hidden=p["global_fc1"]["kernel"].shape[1],
                          dim=p["global_fc2"]["kernel"].shape[1])
    init = neck.init(KEY, case[f"in/{view}_backbone"])["params"]
    assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, params)
    out = neck.apply({"params": params}, case[f"in/{view}_backbone"])
    np.testing.assert_allclose(out, case[f"mocov2/out/{view}_neck"], rtol=1e-5, atol=1e-5)


def test_init_follows_the_official_code():
  c, hidden, dim = 256, 512, 128
  params = heads.DenseCLNeck(hidden=hidden, dim=dim).init(KEY, jnp.zeros((1, 2, 2, c)))["params"]
  # Linear: kaiming_normal_(fan_in, relu): std sqrt(2 / fan_in), zero bias.
  for name, fan_in in (("global_fc1", c), ("global_fc2", hidden)):
    k = np.asarray(params[name]["kernel"])
    assert abs(k.std() / np.sqrt(2.0 / fan_in) - 1) < 0.05, name
    np.testing.assert_array_equal(params[name]["bias"], 0.0)
  # Conv2d default: kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in)); bias U(+-1/sqrt(fan_in)).
  for name, fan_in in (("dense_conv1", c), ("dense_conv2", hidden)):
    bound = 1.0 / np.sqrt(fan_in)
    k = np.asarray(params[name]["kernel"])
    b = np.asarray(params[name]["bias"])
    assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound, name
    assert abs(k.std() / (bound / np.sqrt(3.0)) - 1) < 0.05, name
    assert np.abs(b).max() <= bound and b.std() > 0.4 * bound, name


def test_mlp_head_batchnorm_and_names():
  head = heads.MLPHead(hidden=32, dim=8)
  x = jax.random.normal(jax.random.key(1), (16, 24)) * 3.0 + 1.0
  variables = head.init(KEY, x)
  assert set(variables["params"]) == {"fc1", "bn1", "fc2"}
  out, upd = head.apply(variables, x, mutable=["batch_stats"])
  assert out.shape == (16, 8)
  h = x @ variables["params"]["fc1"]["kernel"] + variables["params"]["fc1"]["bias"]
  np.testing.assert_allclose(upd["batch_stats"]["bn1"]["mean"], 0.1 * h.mean(axis=0),
                             rtol=1e-4, atol=1e-5)
  # Eval mode uses the running statistics, so a single example is independent of the batch.
  new = {**variables, **upd}
  np.testing.assert_allclose(head.apply(new, x[:1], train=False),
                             head.apply(new, x, train=False)[:1], rtol=1e-5, atol=1e-5)
  plain = heads.MLPHead(hidden=32, dim=8, use_bn=False).init(KEY, x)
  assert set(plain) == {"params"} and set(plain["params"]) == {"fc1", "fc2"}


def test_heads_compute_in_float32_unless_told(case):
  x = jnp.asarray(case["in/q_backbone"], jnp.bfloat16)
  neck = heads.DenseCLNeck(hidden=8, dim=4)
  out, variables = neck.init_with_output(KEY, x)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(out))
  out16 = heads.DenseCLNeck(hidden=8, dim=4, dtype=jnp.bfloat16).apply(variables, x)
  assert all(v.dtype == jnp.bfloat16 for v in jax.tree.leaves(out16))
  assert heads.MocoNeck(hidden=8, dim=4).init_with_output(KEY, x)[0].dtype == jnp.float32


def test_bad_input_ranks_are_named():
  with pytest.raises(ValueError, match="NHWC"):
    heads.DenseCLNeck(hidden=8, dim=4).init(KEY, jnp.zeros((2, 16)))
  with pytest.raises(ValueError, match="NHWC"):
    heads.MocoNeck(hidden=8, dim=4).init(KEY, jnp.zeros((2, 16)))
  with pytest.raises(ValueError, match=r"\(N, C\)"):
    heads.MLPHead(hidden=8, dim=4).init(KEY, jnp.zeros((2, 3, 3, 16)))
