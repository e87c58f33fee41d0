"""Tests for dense_ssl.models.resnet and the backbone registry."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform

from dense_ssl import models
from dense_ssl.models import resnet

# RBG keys: resnet18's init compiles in about a third of the time threefry needs on CPU.
KEY = jax.random.key(0, impl="rbg")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def photos(size: int) -> np.ndarray:
  """Two real photos (astronaut, coffee), resized and ImageNet-normalised, NHWC float32."""
  out = []
  for img in (skimage.data.astronaut(), skimage.data.coffee()):
    img = skimage.transform.resize(img, (size, size), anti_aliasing=True)
    out.append((img.astype(np.float32) - IMAGENET_MEAN) / IMAGENET_STD)
  return np.stack(out)


@pytest.fixture(scope="module")
def r18():
  model = models.get_backbone("resnet18")
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 64, 64, 3)), train=False))(
      KEY)
  return model, variables


def test_resnet50_matches_torchvision_parameter_count():
  # torchvision's resnet50 has 25,557,032 parameters, of which the fc layer has 2048*1000+1000.
  shapes = jax.eval_shape(lambda: models.get_backbone("resnet50").init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
  count = sum(x.size for x in jax.tree.leaves(shapes["params"]))
  assert count == 25_557_032 - (2048 * 1000 + 1000)
  # Running mean and variance for every BN scale.
  assert (sum(x.size for x in jax.tree.leaves(shapes["batch_stats"])) ==
          2 * sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(shapes["params"])
                  if p[-1].key == "scale"))


@pytest.mark.parametrize("name,size,channels", [
    ("resnet18", 64, 512), ("resnet34", 96, 512), ("resnet50", 224, 2048),
    ("resnet101", 160, 2048), ("resnet50", 100, 2048)])
def test_output_shape_and_stride(name, size, channels):
  model = models.get_backbone(name)
  x = jnp.zeros((2, size, size, 3))
  shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False))
  out = shapes[0]
  # torch: every stride-2 layer maps H to floor((H - 1) / 2) + 1, i.e. ceil(H / 2).
  side = size
  for _ in range(5):
    side = (side - 1) // 2 + 1
  assert out.shape == (2, side, side, channels)
  assert models.num_features(name) == channels


def test_stage_structure_follows_torchvision():
  shapes = jax.eval_shape(lambda: models.get_backbone("resnet50").init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))["params"]
  blocks = [k for k in shapes if k.startswith("layer")]
  assert len(blocks) == 3 + 4 + 6 + 3
  # Stride on the 3x3 conv (v1.5): conv2 is 3x3 and every stage's first block projects.
  for stage, planes in zip(range(1, 5), (64, 128, 256, 512)):
    first = shapes[f"layer{stage}_0"]
    assert first["conv2"]["kernel"].shape == (3, 3, planes, planes)
    assert first["downsample_conv"]["kernel"].shape[-1] == 4 * planes
    assert "downsample_conv" not in shapes[f"layer{stage}_1"]
  r18 = jax.eval_shape(lambda: models.get_backbone("resnet18").init(
      jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))["params"]
  # Basic blocks keep the width in stage 1, so torchvision has no downsample there.
  assert "downsample_conv" not in r18["layer1_0"]
  assert "downsample_conv" in r18["layer2_0"]


def test_init_statistics(r18):
  _, variables = r18
  params = variables["params"]
  k = np.asarray(params["layer3_1"]["conv1"]["kernel"])  # (3, 3, 256, 256)
  fan_out = 3 * 3 * 256
  assert abs(k.std() / np.sqrt(2.0 / fan_out) - 1) < 0.02
  assert abs(k.mean()) < 0.1 * k.std()
  # Untruncated normal: some draws beyond two standard deviations, as kaiming_normal_.
  assert np.mean(np.abs(k) > 2 * k.std()) > 0.03
  np.testing.assert_array_equal(params["bn1"]["scale"], 1.0)
  np.testing.assert_array_equal(params["bn1"]["bias"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["bn1"]["var"], 1.0)


def test_train_mode_updates_running_stats_like_torch(r18):
  model, variables = r18
  x = jnp.asarray(photos(64))
  (out, inter), upd = jax.jit(lambda v, x: model.apply(
      v, x, train=True, mutable=["batch_stats", "intermediates"],
      capture_intermediates=lambda m, _: m.name == "conv1" and m.scope.path == ("conv1",)))(
          variables, x)
  del out
  stem = np.asarray(upd["intermediates"]["conv1"]["__call__"][0], np.float64)
  new = upd["batch_stats"]["bn1"]
  # torch BatchNorm2d(momentum=0.1): running = 0.9 * running + 0.1 * batch statistic, starting
  # from mean 0 and var 1. (torch would use the unbiased variance; see the module docstring.)
  np.testing.assert_allclose(new["mean"], 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 + 0.1 * stem.var(axis=(0, 1, 2)), rtol=1e-4)
  assert set(upd["batch_stats"]) == set(variables["batch_stats"])


def test_eval_mode_is_per_example_and_train_mode_is_not(r18):
  model, variables = r18
  x = jnp.asarray(photos(64))
  apply = jax.jit(lambda v, x, train: model.apply(v, x, train=train, mutable=["batch_stats"])[0],
                  static_argnums=2)
  # Eval: running statistics, so one image's features do not depend on the rest of the batch.
  both = apply(variables, x, False)
  np.testing.assert_allclose(apply(variables, x[:1], False)[0], both[0], rtol=1e-5, atol=1e-5)
  # Train: batch statistics, so they do.
  both_train = apply(variables, x, True)
  assert not np.allclose(both_train[0], both[0], atol=1e-3)
  assert not np.allclose(apply(variables, jnp.concatenate([x[:1], x[:1]]), True)[0],
                         both_train[0], atol=1e-3)


def test_zero_init_residual_makes_blocks_identity():
  model = models.get_backbone("resnet18", zero_init_residual=True)
  x = jnp.asarray(photos(64))
  run = jax.jit(lambda k, x: model.init_with_output(
      k, x, train=False, capture_intermediates=lambda m, _: m.name and m.name.startswith("layer")))
  _, variables = run(jax.random.fold_in(KEY, 1), x)
  params, inter = variables["params"], variables["intermediates"]
  for name, block in params.items():
    if name.startswith("layer"):
      np.testing.assert_array_equal(block["bn2"]["scale"], 0.0)
      np.testing.assert_array_equal(block["bn1"]["scale"], 1.0)
  # layer1_1 has an identity shortcut and a zeroed residual branch; its input (the output of
  # layer1_0) is post-ReLU, so relu(0 + x) == x.
  block_in = inter["layer1_0"]["__call__"][0]
  block_out = inter["layer1_1"]["__call__"][0]
  np.testing.assert_array_equal(block_out, block_in)
  assert float(jnp.abs(block_in).max()) > 0


def test_bfloat16_compute_with_float32_params(r18):
  model, variables = r18
  model16 = models.get_backbone("resnet18", dtype=jnp.bfloat16)
  x = jnp.asarray(photos(64))
  out32 = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  (out16, upd) = jax.jit(lambda v, x: model16.apply(v, x, train=True,
                                                     mutable=["batch_stats"]))(variables, x)
  assert out16.dtype == jnp.bfloat16
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(upd["batch_stats"]))
  params16 = jax.eval_shape(lambda: model16.init(jax.random.key(0), x, train=False))["params"]
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params16))
  out16_eval = jax.jit(lambda v, x: model16.apply(v, x, train=False))(variables, x)
  rel = jnp.linalg.norm(out16_eval.astype(jnp.float32) - out32) / jnp.linalg.norm(out32)
  assert float(rel) < 0.05, rel


def test_rejects_nchw_and_unknown_names():
  with pytest.raises(ValueError, match="NHWC"):
    jax.eval_shape(lambda: models.get_backbone("resnet18").init(
        jax.random.key(0), jnp.zeros((1, 3, 64, 64)), train=False))
  with pytest.raises(ValueError, match="resnet101, resnet18, resnet34, resnet50"):
    models.get_backbone("resnet152")
  with pytest.raises(ValueError, match="valid names"):
    models.num_features("vgg16")
  assert set(resnet.VARIANTS) <= set(models.names())


def test_width_scales_every_stage_and_keeps_the_layout():
  x = jnp.zeros((1, 64, 64, 3))
  shapes = {w: jax.eval_shape(lambda w=w: models.get_backbone("resnet18", width=w).init(
      jax.random.key(0), x, train=False)) for w in (64, 16)}
  paths = lambda t: {jax.tree_util.keystr(p): v.shape
                     for p, v in jax.tree_util.tree_leaves_with_path(t)}
  full, narrow = paths(shapes[64]), paths(shapes[16])
  assert full.keys() == narrow.keys()  # the same names: export's key map holds at any width
  for key, shape in full.items():
    # Every channel count shrinks 4x; the stem's 3 input channels stay.
    expect = tuple(d // 4 if d >= 64 else d for d in shape)
    assert narrow[key] == expect, key
  # config.model.width reaches the module, and the backbone knows its feature size.
  backbone = models.build(types.SimpleNamespace(name="resnet18", width=16))
  assert backbone.num_features == 128 == resnet.num_features("resnet18", 16)
  out = backbone.module.init_with_output(jax.random.key(0), x, train=False)[0]
  assert out.shape == (1, 2, 2, 128)
