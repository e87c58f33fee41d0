"""Convolution and max-pooling with gradients that XLA:CPU computes fast; XLA's own elsewhere.

Measured on a 2-core CPU (jax 0.10.2, ResNet-50 shapes at 224 px, batch 8): XLA:CPU lowers the
weight gradient of a strided 1x1 convolution to a kernel-dilated convolution that runs ~18x
slower than the forward pass, of an unstrided 1x1 convolution ~5x, of the 7x7 stem ~15x, and
max-pooling's `select_and_scatter` gradient ~20x slower than the pooling; a 64-channel 3x3
convolution's weight gradient at batch 64 on 24 px maps ~26x. These account for most of a
ResNet's backward pass on CPU. Here, only when lowering for CPU (`lax.platform_dependent`):

* the weight gradient of a 1x1 convolution, or of one with few input columns (the stem, 3x3
  over 64 channels), is one matrix product of the (strided) input taps with the output
  gradient;
* max-pooling's gradient goes to the first maximal element of each window (PyTorch's and
  `select_and_scatter`'s choice) through strided pads of the output gradient.

Forward passes, input gradients and every other backend use XLA's operations unchanged. Values
and gradients are the same up to float summation order (tests/test_conv.py). Inside
`shard_map`, pass weights cast to the inputs' varying axes (`lax.pcast(..., to="varying")`,
as methods/base.py does): a custom VJP must return gradients of its inputs' exact type.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")
# Input channels x kernel taps up to which a k x k convolution also takes the matmul weight
# gradient: the stem (3 x 49) and 3x3 convolutions over 64 channels (XLA:CPU's own gradient of
# those measured 3-4x slower at batch 32-64 on 24-32 px maps, on par at batch 8 on 56 px); with
# 128+ channels XLA's own is as fast or faster.
_MAX_TAP_COLUMNS = 576

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


def _plain_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Padding,
                precision: Any) -> jax.Array:
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_matmul_wgrad(x, w, strides, padding, precision):
  return _plain_conv(x, w, strides, padding, precision)


def _conv_fwd(x, w, strides, padding, precision):
  return _plain_conv(x, w, strides, padding, precision), (x, w)


def _conv_bwd(strides, padding, precision, residuals, g):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda v: _plain_conv(v, w, strides, padding, precision), x)
  (dx,) = input_vjp(g)
  kh, kw, cin, cout = w.shape
  # Measured: without it XLA fuses the recomputation of x's elementwise producers (BatchNorm,
  # residual adds) into the transposing copies of the taps, ~1 s more per ResNet-50 step.
  x = lax.optimization_barrier(x)
  taps = _taps(x, (kh, kw), strides, padding, g.shape[1:3])
  columns = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  dw = jnp.einsum("nhwc,nhwd->cd", columns, g, precision=precision,
                  preferred_element_type=jnp.float32)
  return dx, dw.reshape(kh, kw, cin, cout).astype(w.dtype)


_conv_matmul_wgrad.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1,
                         batch_group_count: int = 1, precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """`lax.conv_general_dilated`, with the matmul weight gradient on CPU where it pays.

  A drop-in for `flax.linen.Conv(conv_general_dilated=...)`. Only plain 2-D NHWC/HWIO
  convolutions (explicit non-negative padding, no dilation or groups) whose kernel is 1x1 or
  has at most `_MAX_TAP_COLUMNS` input columns are rerouted; anything else is XLA's.
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
  kh, kw, cin, _ = rhs.shape
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  simple = (given == nhwc and feature_group_count == 1 and batch_group_count == 1
            and all(d == 1 for d in (lhs_dilation or (1, 1)))
            and all(d == 1 for d in (rhs_dilation or (1, 1)))
            and all(p >= 0 for pair in padding for p in pair)
            and preferred_element_type in (None, lhs.dtype) and lhs.dtype == rhs.dtype)
  if not simple or not (kh == kw == 1 or kh * kw * cin <= _MAX_TAP_COLUMNS):
    return plain(lhs, rhs)
  strides = tuple(int(s) for s in window_strides)
  fast = lambda x, w: _conv_matmul_wgrad(x, w, strides, padding, precision)
  return lax.platform_dependent(lhs, rhs, cpu=fast, default=plain)


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
  """NHWC max-pooling (padding with -inf, as `flax.linen.max_pool`); the fast gradient on CPU."""
  window, strides = tuple(window), tuple(strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  fast = lambda v: _max_pool_first_max(v, window, strides, padding)
  plain = lambda v: _plain_max_pool(v, window, strides, padding)
  return lax.platform_dependent(x, cpu=fast, default=plain)
