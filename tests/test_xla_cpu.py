"""dense_ssl.xla_cpu: the CPU compiler options reach XLA and change no result."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from dense_ssl import models, xla_cpu
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
  x = jnp.ones((8, 64, 64, 3))
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


def test_resnet_forward_and_gradients_equal_under_the_options(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  net = models.get_backbone("resnet18")
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  variables = net.init(jax.random.key(1), x)

  def loss(params):
    y, _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                     mutable=["batch_stats"])
    return jnp.mean(y ** 2), y

  fn = jax.value_and_grad(loss, has_aux=True)
  (l0, y0), g0 = jax.jit(fn)(variables["params"])
  (l1, y1), g1 = jax.jit(fn, compiler_options=xla_cpu.compiler_options("cpu"))(
      variables["params"])
  # Different convolution kernels sum in a different order: float rounding only, through 17
  # layers of train-mode BatchNorm.
  assert rel_error(y1, y0) < 1e-4 and rel_error(l1, l0) < 1e-5
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    assert rel_error(a, b) < 1e-4
