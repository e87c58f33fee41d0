"""Convolution and max-pooling kernels for XLA:CPU, which runs these forms fast.

Measured on a 2-core AVX2 CPU (jax 0.10.2, 2026-12-01), with the compiler options of
`dense_ssl.xla_cpu` (convolutions by XLA's own Eigen kernels, not YNNPACK): XLA's weight
gradient of a 1x1 convolution first transposes its input to a batch-minor layout, copies that
ran at ~0.2 GB/s inside a ResNet-50/224 batch-8 backward (~0.9 s of thread time in a ~3 s
step); a 3x3 or 7x7 convolution's own weight gradient is as fast as any built from input taps
(1.2-4x faster than those), and max-pooling's `select_and_scatter` gradient is ~4x slower than
the scatter below. So, for CPU runs (`dense_ssl.models.get_backbone` selects these kernels once,
when JAX's default backend is the CPU; a ResNet built for an accelerator never traces them):

* the weight gradient of a 1x1 convolution is one matrix product of the (strided) input,
  flattened to (pixels, channels), with the output gradient; a stride-1 1x1 convolution's
  forward pass and input gradient are such products too (fwd+bwd per layer at batch 8: 1.2x
  faster for DenseCL's 2048->2048 neck, up to 1.9x for ResNet-50's 64->256; a whole
  ResNet-50/224 step did not change measurably, 0.96x +- 0.2);
* a convolution whose input map is smaller than its kernel (3x3 on 2x2 or 1x1 maps: the last
  stage of a ResNet at 64 or 32 px) is one matrix product of its concatenated input taps,
  forward and backward (XLA:CPU swaps such a convolution's operands into a form that ran ~15x
  slower than the whole layer should; measured on the AVX-512 host of 2026-12-01);
* max-pooling's gradient goes to the first maximal element of each window (PyTorch's and
  `select_and_scatter`'s choice) through strided pads of the output gradient.

Other convolutions go to XLA's own operation. Values and gradients are the same as XLA's up
to float summation order (tests/test_conv.py). (Inside `shard_map`, a custom VJP must return
gradients of its inputs' exact varying type; the trainer does not use `shard_map` around models.)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")

Padding = tuple[tuple[int, int], ...]


def _taps(x: jax.Array, kernel: tuple[int, int], strides: tuple[int, int], padding: Padding,
          out_hw: tuple[int, int], fill: float = 0.0) -> list[jax.Array]:
  """The input values each kernel tap (i, j) meets, as (N, Ho, Wo, C) arrays, row-major taps;
  `padding` adds `fill`."""
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=fill)
  n, _, _, c = x.shape
  (ho, wo), (sh, sw) = out_hw, strides
  return [lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                    (1, sh, sw, 1))
          for i in range(kernel[0]) for j in range(kernel[1])]


def _plain_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int],
                precision: Any) -> jax.Array:
  return lax.conv_general_dilated(x, w, strides, ((0, 0), (0, 0)), dimension_numbers=_NHWC,
                                  precision=precision)


def _channel_matmul(x: jax.Array, w: jax.Array, precision: Any) -> jax.Array:
  """(..., cin) @ (cin, cout) as one 2-D product over all pixels."""
  y = jnp.matmul(x.reshape(-1, w.shape[0]), w, precision=precision)
  return y.reshape(*x.shape[:-1], w.shape[1])


def _pointwise_forward(x, w, strides, precision):
  if strides == (1, 1):
    return _channel_matmul(x, w[0, 0], precision)
  return _plain_conv(x, w, strides, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _pointwise_conv(x, w, strides, precision):
  return _pointwise_forward(x, w, strides, precision)


def _pointwise_fwd(x, w, strides, precision):
  return _pointwise_forward(x, w, strides, precision), (x, w)


def _pointwise_bwd(strides, precision, residuals, g):
  x, w = residuals
  if strides == (1, 1):
    dx = _channel_matmul(g, w[0, 0].T, precision)
  else:
    _, input_vjp = jax.vjp(lambda v: _plain_conv(v, w, strides, precision), x)
    (dx,) = input_vjp(g)
  cin, cout = w.shape[2:]
  # Measured: without it XLA fuses the recomputation of x's elementwise producers (BatchNorm,
  # ReLU) into the matmul's operand copy, ~10% more per ResNet-50 backward.
  x = lax.optimization_barrier(x)
  x = x[:, ::strides[0], ::strides[1]] if strides != (1, 1) else x
  # (pixels, cin)^T (pixels, cout): a 2-D product; the same einsum over (n, h, w) measured up
  # to 3x slower (XLA:CPU copies its operands first).
  dw = jnp.matmul(x.reshape(-1, cin).T, g.reshape(-1, cout), precision=precision,
                  preferred_element_type=jnp.float32)
  return dx, dw.reshape(w.shape).astype(w.dtype)


_pointwise_conv.defvjp(_pointwise_fwd, _pointwise_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """`lax.conv_general_dilated`, with 1x1 convolutions as matrix products on CPU (see above).

  A drop-in for `flax.linen.Conv(conv_general_dilated=...)`. Only plain 2-D NHWC/HWIO
  convolutions (no dilation or groups) are rerouted: 1x1 ones without padding, and those whose
  input map is smaller than the kernel (`_im2col_conv`); anything else is XLA's.
  """
  plain = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides, padding=padding,
      lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
  if lhs.ndim != 4 or rhs.ndim != 4 or isinstance(padding, str):
    return plain(lhs, rhs)
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  given = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  simple = (given == nhwc and feature_group_count == 1 and batch_group_count == 1
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and preferred_element_type in (None, lhs.dtype) and lhs.dtype == rhs.dtype)
  pointwise = (simple and rhs.shape[:2] == (1, 1)
               and all(int(p) == 0 for pair in padding for p in pair))
  small_map = simple and (lhs.shape[1] < rhs.shape[0] or lhs.shape[2] < rhs.shape[1])
  strides = tuple(int(s) for s in window_strides)
  if pointwise:
    fast = lambda x, w: _pointwise_conv(x, w, strides, precision)
  elif small_map:
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    fast = lambda x, w: _im2col_conv(x, w, strides, pads, precision)
  else:
    return plain(lhs, rhs)
  return fast(lhs, rhs)


def _im2col_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Padding,
                 precision: Any) -> jax.Array:
  """A convolution as one matrix product of the concatenated input taps with the kernel.

  For maps smaller than the kernel (ResNet-18's last stage at 64 px: 3x3 kernels on 2x2 maps)
  XLA:CPU swaps the convolution's operands into a form that ran at ~3 GFLOP/s (47 ms for one
  512->512 layer at batch 8, where the 96 px model's whole forward takes 23 ms); the taps of
  such a map are tiny, and autodiff of slices and one product needs no convolution at all.
  """
  kh, kw, cin, cout = w.shape
  ho = (x.shape[1] + sum(padding[0]) - kh) // strides[0] + 1
  wo = (x.shape[2] + sum(padding[1]) - kw) // strides[1] + 1
  taps = jnp.concatenate(_taps(x, (kh, kw), strides, padding, (ho, wo)), axis=-1)
  return _channel_matmul(taps, w.reshape(kh * kw * cin, cout), precision)


# ------------------------------------------------------------------------------ max pooling ---


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_first_max(x, window, strides, padding):
  return _plain_max_pool(x, window, strides, padding)


def _plain_max_pool(x, window, strides, padding):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),
                           ((0, 0), *padding, (0, 0)))


def _pool_fwd(x, window, strides, padding):
  return _plain_max_pool(x, window, strides, padding), x


def _pool_bwd(window, strides, padding, x, g):
  n, h, w, c = x.shape
  (ho, wo), (sh, sw) = g.shape[1:3], strides
  # -inf padding never wins a window that holds a real element (every window does here).
  taps = _taps(x, window, strides, padding, (ho, wo), fill=-jnp.inf)
  # The first maximal tap of each window in row-major order, found from the taps alone:
  # comparing with the forward output instead breaks when XLA recomputes the input in another
  # fusion with different rounding (measured: a ResNet's stem gradient 30% off under jit).
  best, first = taps[0], jnp.zeros(g.shape, jnp.int32)
  for index, tap in enumerate(taps[1:], start=1):
    better = tap > best
    best, first = jnp.where(better, tap, best), jnp.where(better, index, first)
  # Padded-input rows split into `sh` phases (row r = a * sh + phase); tap i of output row o
  # reads row o * sh + i, i.e. phase i % sh at a = o + i // sh. So each tap's gradient is a
  # shifted add into one phase array, and interleaving the phases gives the input gradient.
  rows, cols = -(-(h + sum(padding[0])) // sh), -(-(w + sum(padding[1])) // sw)
  phases = {}
  for index in range(len(taps)):
    i, j = divmod(index, window[1])
    oi, oj = i // sh, j // sw
    part = jnp.pad(jnp.where(first == index, g, jnp.zeros((), g.dtype)),
                   ((0, 0), (oi, rows - oi - ho), (oj, cols - oj - wo), (0, 0)))
    key = (i % sh, j % sw)
    phases[key] = phases[key] + part if key in phases else part
  zeros = jnp.zeros((n, rows, cols, c), g.dtype)
  grid = jnp.stack([jnp.stack([phases.get((a, b), zeros) for b in range(sw)], axis=3)
                    for a in range(sh)], axis=2)  # (n, rows, sh, cols, sw, c)
  dxp = grid.reshape(n, rows * sh, cols * sw, c)
  top, left = padding[0][0], padding[1][0]
  return (lax.slice(dxp, (0, top, left, 0), (n, top + h, left + w, c)),)


_max_pool_first_max.defvjp(_pool_fwd, _pool_bwd)


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """NHWC max-pooling (padding with -inf, as `flax.linen.max_pool`) with the scatter gradient."""
  window, strides = tuple(window), tuple(strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _max_pool_first_max(x, window, strides, padding)
