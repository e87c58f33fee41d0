"""dense_ssl.xla_cpu: the CPU compiler options reach XLA and change no result."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssl import models, xla_cpu
from dense_ssl.models import conv
from dense_ssl.parity import rel_error


def test_options_only_for_cpu_and_only_when_the_user_has_not_chosen(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert xla_cpu.compiler_options("cpu") == {xla_cpu.OPTION: xla_cpu.YNN_FUSION_TYPES}
  assert xla_cpu.compiler_options("gpu") is None
  assert xla_cpu.compiler_options("tpu") is None
  monkeypatch.setenv("XLA_FLAGS", f"--{xla_cpu.OPTION}=")
  assert xla_cpu.compiler_options("cpu") is None


def _convolutions_in_and_out_of_ynn(hlo: str) -> tuple[int, int]:
  """(convolutions inside YNNPACK fusions, all convolutions) of compiled HLO text."""
  ynn_bodies = set(re.findall(r"%ynn_fusion[\w.]* = .*calls=%([\w.\-]+)", hlo))
  inside = sum(c.count(" convolution(") for c in hlo.split("\n\n")
               if c.strip().split(" ")[0].lstrip("%") in ynn_bodies)
  return inside, hlo.count(" convolution(")


def test_resnet_convolutions_leave_ynnpack_and_reductions_stay(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  net = models.get_backbone("resnet18")
  # 96 px: every map is at least its kernel's size, so models/conv.py leaves all 20 of
  # ResNet-18's convolutions (its 1x1 ones are strided) to XLA; at 64 px it computes layer4's
  # 3x3 ones on 2x2 maps as matrix products.
  x = jnp.ones((2, 96, 96, 3))
  variables = net.init(jax.random.key(1), x)
  forward = lambda p: net.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                                mutable=["batch_stats"])[0]
  default = jax.jit(forward).lower(variables["params"]).compile().as_text()
  tuned = jax.jit(forward, compiler_options=xla_cpu.compiler_options("cpu")).lower(
      variables["params"]).compile().as_text()
  inside, total = _convolutions_in_and_out_of_ynn(default)
  assert total == 20 and inside > 0  # jaxlib's default hands convolutions to YNNPACK
  inside, total = _convolutions_in_and_out_of_ynn(tuned)
  assert total == 20 and inside == 0
  assert "%ynn_fusion" in tuned  # the BatchNorm reductions still are YNNPACK's


def _resnet_loss(net, variables, x):
  """params -> (a scalar loss of the C5 map, the map), train-mode BatchNorm."""
  def loss(params):
    y, _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                     mutable=["batch_stats"])
    # float32 at least; the float64 reference keeps its own precision.
    return jnp.mean(y.astype(jnp.promote_types(y.dtype, jnp.float32)) ** 2), y
  return loss


def test_resnet_forward_and_loss_equal_under_the_options(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  net = models.get_backbone("resnet18")
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = net.init(jax.random.key(1), x)
  fn = _resnet_loss(net, variables, x)
  l0, y0 = jax.jit(fn)(variables["params"])
  l1, y1 = jax.jit(fn, compiler_options=xla_cpu.compiler_options("cpu"))(variables["params"])
  # Different convolution kernels sum in a different order: float rounding only, through 17
  # layers of train-mode BatchNorm.
  assert rel_error(y1, y0) < 1e-4 and rel_error(l1, l0) < 1e-5


def test_resnet_gradients_under_the_options_are_float32_rounding_of_float64(monkeypatch):
  """Each compile path's gradients against a float64 run of the same network.

  With ReLU and max-pooling, float32 ResNet gradients of tiny batches are not a smooth
  function of rounding: a pre-activation or pooling input within rounding of zero or of its
  window's maximum decides where a gradient goes, and on a 2-core AVX-512 host single leaves
  differed from float64 by 5% (options, batch 2 at 64 px) or 10% (XLA's defaults, batch 8 at
  96 px), whichever path happened to decide differently. With those two decisions smoothed
  (GELU, average pooling) both paths agree with float64 to ~2e-5, which is what shows that the
  options change rounding and nothing else.
  """
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setattr(nn, "relu", jax.nn.gelu)
  monkeypatch.setattr(conv, "max_pool", lambda x, window, strides, padding: nn.avg_pool(
      x, window, strides=strides, padding=padding))
  with jax.enable_x64(True):
    net32, net64 = models.get_backbone("resnet18"), models.get_backbone("resnet18",
                                                                        dtype=jnp.float64)
    for batch, size in ((2, 64), (8, 96)):
      x = jax.random.normal(jax.random.key(0), (batch, size, size, 3), jnp.float32)
      variables = net32.init(jax.random.key(1), x)
      (_, y_ref), g_ref = jax.jit(jax.value_and_grad(
          _resnet_loss(net64, variables, x.astype(jnp.float64)), has_aux=True))(
              jax.tree.map(lambda a: a.astype(jnp.float64), variables["params"]))
      assert y_ref.dtype == jnp.float64
      fn = jax.value_and_grad(_resnet_loss(net32, variables, x), has_aux=True)
      for options in (None, xla_cpu.compiler_options("cpu")):
        (_, y), g = jax.jit(fn, compiler_options=options)(variables["params"])
        assert rel_error(y, y_ref) < 1e-4, (batch, size, options)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
          assert rel_error(a, b) < 1e-4, (batch, size, options)
