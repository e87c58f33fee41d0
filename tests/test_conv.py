"""dense_ssl.models.conv: XLA:CPU-friendly gradients equal XLA's own, and PyTorch's on photos."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.transform
from jax import lax

from dense_ssl import export
from dense_ssl import models
from dense_ssl import xla_cpu
from dense_ssl.models import conv

NHWC = ("NHWC", "HWIO", "NHWC")


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _conv_loss(fn, strides, padding, cotangent):
  def loss(x, w):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    return jnp.sum(fn(x, w, strides, padding, dimension_numbers=dn) * cotangent)
  return loss


# (input NHWC, kernel HWIO, strides, padding): strided and unstrided 1x1 on odd sizes (rerouted on
# CPU), and the stem, 3x3 with asymmetric padding and 3x3 over 128 channels (XLA's own); then
# maps smaller than the kernel (rerouted on CPU: ResNet-18's last stage at 64 and 32 px, and a
# strided odd one).
SMALL_MAP_CASES = [
    ((2, 2, 2, 64), (3, 3, 64, 32), (1, 1), ((1, 1), (1, 1))),
    ((3, 1, 1, 32), (3, 3, 32, 16), (1, 1), ((1, 1), (1, 1))),
    ((2, 2, 3, 16), (3, 3, 16, 8), (2, 2), ((1, 1), (1, 2))),
]
CONV_CASES = SMALL_MAP_CASES + [
    ((2, 32, 32, 3), (7, 7, 3, 16), (2, 2), ((3, 3), (3, 3))),
    ((2, 15, 15, 24), (1, 1, 24, 40), (2, 2), ((0, 0), (0, 0))),
    ((3, 9, 9, 32), (1, 1, 32, 8), (1, 1), ((0, 0), (0, 0))),
    ((2, 16, 16, 8), (1, 1, 8, 24), (2, 2), ((0, 0), (0, 0))),
    ((2, 11, 13, 64), (3, 3, 64, 16), (1, 1), ((1, 1), (1, 1))),
    ((2, 11, 13, 8), (3, 3, 8, 12), (2, 2), ((1, 2), (0, 1))),
    ((2, 8, 8, 128), (3, 3, 128, 8), (1, 1), ((1, 1), (1, 1))),
]


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", CONV_CASES)
def test_conv_values_and_gradients_equal_xla(x_shape, w_shape, strides, padding):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape)
  w = jax.random.normal(kw, w_shape) * 0.1
  dn = lax.conv_dimension_numbers(x_shape, w_shape, NHWC)
  y_ref = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)
  y = conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)
  if (x_shape, w_shape, strides, padding) in SMALL_MAP_CASES:
    assert _rel(y, y_ref) < 1e-6  # a matrix product of the taps: another summation order
  else:
    np.testing.assert_array_equal(y, y_ref)  # the forward pass is XLA's own convolution
  g = jax.random.normal(kg, y.shape)
  grads_ref = jax.grad(_conv_loss(lax.conv_general_dilated, strides, padding, g), (0, 1))(x, w)
  grads = jax.jit(jax.grad(_conv_loss(conv.conv_general_dilated, strides, padding, g),
                           (0, 1)))(x, w)
  for got, want in zip(grads, grads_ref):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", CONV_CASES)
def test_cpu_lowering_reroutes_exactly_1x1_and_small_map_convolutions(x_shape, w_shape,
                                                                      strides, padding):
  x, w = jnp.ones(x_shape), jnp.ones(w_shape)
  g = jnp.ones((1,))
  grad = jax.jit(jax.grad(_conv_loss(conv.conv_general_dilated, strides, padding, g), (0, 1)))
  text = grad.lower(x, w).as_text()
  small_map = (x_shape, w_shape, strides, padding) in SMALL_MAP_CASES
  assert ("stablehlo.dot_general" in text) == (w_shape[:2] == (1, 1) or small_map)
  if small_map:  # no convolution left for XLA:CPU to swap, forward or backward
    assert " convolution(" not in grad.lower(x, w).compile().as_text()


def test_conv_bfloat16_gradient_keeps_the_kernel_dtype():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 16), jnp.bfloat16)
  w = (jax.random.normal(jax.random.key(2), (1, 1, 16, 8)) * 0.1).astype(jnp.bfloat16)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
  loss = lambda fn: (lambda w: jnp.sum(fn(x, w, (1, 1), ((0, 0), (0, 0)),
                                          dimension_numbers=dn).astype(jnp.float32) ** 2))
  got = jax.grad(loss(conv.conv_general_dilated))(w)
  want = jax.grad(loss(lax.conv_general_dilated))(w)
  assert got.dtype == jnp.bfloat16
  assert _rel(got, want) < 2e-2  # bfloat16 rounding of the summed products


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 16, 16, 8), (3, 3), (2, 2), ((1, 1), (1, 1))),   # ResNet's
    ((2, 15, 17, 4), (3, 3), (2, 2), ((1, 1), (1, 1))),   # odd sizes
    ((1, 8, 8, 3), (2, 2), (2, 2), ((0, 0), (0, 0))),
    ((1, 7, 9, 5), (3, 3), (1, 1), ((1, 1), (1, 1))),
    ((1, 10, 10, 2), (3, 2), (2, 3), ((0, 1), (1, 0))),
])
def test_max_pool_equals_flax_including_ties(shape, window, strides, padding):
  # ReLU'd values: most windows hold several zeros, so ties are common, and the gradient must
  # go to the first maximal element as select_and_scatter (and PyTorch) send it.
  x = jnp.maximum(jax.random.normal(jax.random.key(3), shape), 0.0)
  x = x.at[:, ::2].set(jnp.round(x[:, ::2]))  # exact ties between positive values too
  ref = lambda v: nn.max_pool(v, window, strides=strides, padding=padding)
  new = lambda v: conv.max_pool(v, window, strides, padding)
  np.testing.assert_array_equal(new(x), ref(x))
  g = jax.random.normal(jax.random.key(4), ref(x).shape)
  want = jax.grad(lambda v: jnp.sum(ref(v) * g))(x)
  got = jax.jit(jax.grad(lambda v: jnp.sum(new(v) * g)))(x)
  # Overlapping windows add into one element in another order: equal up to float rounding;
  # a tie sent to the wrong element would differ by a whole cotangent entry.
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _photos(size: int) -> np.ndarray:
  photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
  resized = [skimage.transform.resize(p, (size, size), anti_aliasing=True) for p in photos]
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  return ((np.stack(resized) - mean) / std).astype(np.float32)


@pytest.mark.parametrize("options", ["xla_defaults", "xla_cpu_options"])
def test_resnet18_gradients_match_pytorch_on_photos(options):
  """The whole backbone's gradients (train-mode BN) against torchvision-layout PyTorch.

  PyTorch runs in float64, the exact reference: its float32 CPU gradients of this deep,
  small-batch product were measured up to 30% off its own float64 ones at the stem, while
  ours (float32) stay within 1e-5 of them, compiled with XLA's defaults or with the options
  that training uses (`dense_ssl.xla_cpu`).
  """
  torch = pytest.importorskip("torch")
  from benchmarks import peer_torch  # pylint: disable=g-import-not-at-top
  x = _photos(96)
  net = models.get_backbone("resnet18")
  variables = net.init(jax.random.key(0), x)
  cotangent = np.array(jax.random.normal(jax.random.key(5), (3, 3, 3, 512)), np.float32)

  def loss(params):
    y, _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                     mutable=["batch_stats"])
    return jnp.sum(y * cotangent)

  compiler_options = xla_cpu.compiler_options() if options == "xla_cpu_options" else None
  value, grads = jax.jit(jax.value_and_grad(loss), compiler_options=compiler_options)(
      variables["params"])

  peer = peer_torch.ResNet("resnet18").double()
  state = export.to_torchvision(variables["params"], variables["batch_stats"])
  peer.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
  peer.train()
  out = peer(torch.from_numpy(x.transpose(0, 3, 1, 2)).double())
  torch_loss = (out * torch.from_numpy(cotangent.transpose(0, 3, 1, 2)).double()).sum()
  torch_loss.backward()
  assert _rel(value, torch_loss.item()) < 1e-4
  torch_grads = {k: p.grad.numpy() for k, p in peer.named_parameters()}
  flat = export.to_torchvision(grads, variables["batch_stats"])
  checked = 0
  for name, grad in torch_grads.items():
    assert _rel(flat[name], grad) < 1e-4, name
    checked += 1
  assert checked == len([k for k in flat if k.endswith(("weight", "bias"))])
