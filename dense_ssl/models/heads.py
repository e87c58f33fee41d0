"""Projection heads (necks) on top of the backbone, named and initialised as the references.

* `MocoNeck`: MoCo-v2's `NonLinearNeckV1` (avgpool -> fc1 -> ReLU -> fc2).
* `DenseCLNeck`: DenseCL's neck, a global MLP branch and a dense 1x1-conv branch.
* `MLPHead`: Linear -> BN -> ReLU -> Linear, BYOL's projector/predictor.
* `ProjectionMLP`: MoCo v3's projector/predictor (bias-free Linear, BN, last BN without
  affine), also SimCLR's projector here.
* `DINOHead`: DINO's MLP, L2 normalisation and weight-normalised last layer (`WeightNormDense`).

Initialisation of the first three follows the official DenseCL/MoCo code (OpenSelfSup `_init_weights(...,
init_linear="kaiming")`): Linear layers Kaiming-normal with fan_in and ReLU gain and zero bias.
That code only touches Linear/BN layers, so the dense 1x1 convs keep PyTorch's default Conv2d
init (kaiming_uniform with a=sqrt(5), bias uniform in +-1/sqrt(fan_in)).

Heads compute in float32 unless a `dtype` is given: they are cheap, and the logits against a
65536-entry queue are sensitive to rounding of the embeddings.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssl.models import conv

# kaiming_normal_(mode="fan_in", nonlinearity="relu"): N(0, 2 / fan_in), untruncated.
linear_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# torch.nn.Conv2d.reset_parameters: kaiming_uniform_(a=sqrt(5)) = U(+-sqrt(1 / fan_in)).
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default bias init for Linear/Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / fan_in**0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
      key, shape, dtype, -bound, bound)


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
  return nn.Dense(features, kernel_init=linear_kernel_init, bias_init=nn.initializers.zeros,
                  dtype=dtype, name=name)


def _conv1x1(features: int, fan_in: int, name: str, dtype: Any, cpu_kernels: bool) -> nn.Conv:
  return nn.Conv(features, (1, 1), kernel_init=torch_conv_kernel_init,
                 bias_init=torch_bias_init(fan_in), dtype=dtype, name=name,
                 conv_general_dilated=(conv.conv_general_dilated if cpu_kernels
                                       else jax.lax.conv_general_dilated))


def _check_map(x: jax.Array, head: str) -> None:
  if x.ndim != 4:
    raise ValueError(f"{head} expects an NHWC feature map (N, H, W, C), got shape {x.shape}; "
                     "pass the backbone's C5 map, not pooled features.")


class MocoNeck(nn.Module):
  """MoCo-v2 neck: global average pool -> `fc1` -> ReLU -> `fc2`; (N,H,W,C) -> (N, dim)."""

  hidden: int
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    del train  # No BatchNorm or dropout; the argument keeps the heads interchangeable.
    _check_map(x, "MocoNeck")
    x = jnp.mean(jnp.asarray(x, self.dtype), axis=(1, 2))
    x = nn.relu(_dense(self.hidden, "fc1", self.dtype)(x))
    return _dense(self.dim, "fc2", self.dtype)(x)


class DenseCLNeck(nn.Module):
  """DenseCL neck: a global MLP on the pooled map and a per-cell 1x1-conv MLP on the map.

  Returns a dict with
    "global": (N, dim), avgpool -> `global_fc1` -> ReLU -> `global_fc2`;
    "dense_grid": (N, S*S, dim), `dense_conv1` -> ReLU -> `dense_conv2` per cell, row-major;
    "dense_pooled": (N, dim), the mean of the dense grid over cells (DenseCL's `avgpooled_x2`,
      the entry that goes into the dense queue).

  `cpu_kernels` computes the 1x1 convolutions as `dense_ssl.models.conv` does (the same
  values; faster on XLA:CPU).
  """

  hidden: int
  dim: int
  dtype: Any = jnp.float32
  cpu_kernels: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> dict[str, jax.Array]:
    del train  # No BatchNorm or dropout.
    _check_map(x, "DenseCLNeck")
    x = jnp.asarray(x, self.dtype)
    n, _, _, c = x.shape
    g = jnp.mean(x, axis=(1, 2))
    g = nn.relu(_dense(self.hidden, "global_fc1", self.dtype)(g))
    g = _dense(self.dim, "global_fc2", self.dtype)(g)
    d = nn.relu(_conv1x1(self.hidden, c, "dense_conv1", self.dtype, self.cpu_kernels)(x))
    d = _conv1x1(self.dim, self.hidden, "dense_conv2", self.dtype, self.cpu_kernels)(d)
    grid = d.reshape(n, -1, self.dim)
    return {"global": g, "dense_grid": grid, "dense_pooled": jnp.mean(grid, axis=1)}


class MLPHead(nn.Module):
  """Linear `fc1` -> BatchNorm `bn1` (optional) -> ReLU -> Linear `fc2` on (N, C) vectors.

  BYOL's projector and predictor (and UniVIP's). BatchNorm uses PyTorch's BatchNorm1d defaults
  (momentum 0.1 for the new statistics, eps 1e-5) and its statistics live in `batch_stats`.
  """

  hidden: int
  dim: int
  use_bn: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    if x.ndim != 2:
      raise ValueError(f"MLPHead expects pooled features (N, C), got shape {x.shape}; "
                       "average-pool a feature map over (H, W) first.")
    x = _dense(self.hidden, "fc1", self.dtype)(jnp.asarray(x, self.dtype))
    if self.use_bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, name="bn1")(x)
    x = nn.relu(x)
    return _dense(self.dim, "fc2", self.dtype)(x)


class ProjectionMLP(nn.Module):
  """MoCo v3's `_build_mlp` (also its SimCLR-style projector): `num_layers` bias-free Linear
  layers `fc{i}`, BatchNorm + ReLU between them, and a last BatchNorm without affine
  parameters (`last_bn`); (N, C) -> (N, dim).

  Linear layers keep PyTorch's default init (U(+-1/sqrt(fan_in))), as in MoCo v3, which
  re-initialises only the ViT. BatchNorm: PyTorch BatchNorm1d defaults (eps 1e-5, momentum 0.1).
  """

  num_layers: int
  hidden: int
  dim: int
  last_bn: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    if x.ndim != 2:
      raise ValueError(f"ProjectionMLP expects pooled features (N, C), got shape {x.shape}; "
                       "pass the class token.")
    x = jnp.asarray(x, self.dtype)
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(self.dim if last else self.hidden, use_bias=False,
                   kernel_init=torch_conv_kernel_init, dtype=self.dtype, name=f"fc{i}")(x)
      if not last or self.last_bn:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                         use_scale=not last, use_bias=not last, dtype=self.dtype,
                         name=f"bn{i}")(x)
      if not last:
        x = nn.relu(x)
    return x


class WeightNormDense(nn.Module):
  """`nn.utils.weight_norm(nn.Linear(in, out, bias=False))`: W = g · v / ||v|| per output unit.

  With `learn_scale=False` (DINO's `norm_last_layer=True`) g is fixed at 1, so the layer is the
  cosine of its input with `out` unit prototypes, scaled by the input's norm. `v` keeps
  PyTorch's default Linear init.
  """

  features: int
  learn_scale: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    v = self.param("kernel_v", torch_conv_kernel_init, (x.shape[-1], self.features))
    w = v / jnp.sqrt(jnp.sum(v * v, axis=0, keepdims=True))
    if self.learn_scale:
      w = w * self.param("scale_g", nn.initializers.ones, (self.features,))
    return x @ w


class DINOHead(nn.Module):
  """DINO's head: MLP (Linear `fc{i}` + exact GELU, `num_layers` layers ending at `bottleneck`),
  L2 normalisation, then the weight-normalised `last_layer` to `out_dim` logits.

  The MLP is initialised as DINO's (truncated normal std 0.02, zero bias); the last layer
  keeps PyTorch's default init, since DINO creates it after its init pass. Computes in
  float32: 65536-way softmaxes are sensitive to rounding.
  """

  out_dim: int
  hidden: int = 2048
  bottleneck: int = 256
  num_layers: int = 3
  norm_last_layer: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    del train  # No BatchNorm (DINO's use_bn_in_head=False for ViTs).
    x = jnp.asarray(x, jnp.float32)
    init = nn.initializers.truncated_normal(stddev=0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = nn.Dense(self.bottleneck if last else self.hidden, kernel_init=init,
                   bias_init=nn.initializers.zeros, name=f"fc{i}")(x)
      if not last:
        x = nn.gelu(x, approximate=False)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return WeightNormDense(self.out_dim, learn_scale=not self.norm_last_layer,
                           name="last_layer")(x)
