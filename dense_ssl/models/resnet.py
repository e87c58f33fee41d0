"""ResNet-18/34/50/101 in flax.linen, layer for layer the torchvision architecture.

torchvision's ResNet is the backbone every dense SSL paper pretrains and every detection /
segmentation benchmark loads, so the module mirrors it exactly (see `dense_ssl.export`):

* stem: 7x7/2 conv (padding 3) -> BN -> ReLU -> 3x3/2 max pool (padding 1);
* stages `layer1..layer4` of `BasicBlock` (18/34) or `Bottleneck` (50/101) blocks; the first
  block of stages 2-4 has stride 2, placed on the 3x3 conv of the bottleneck (ResNet v1.5);
* a projection shortcut (1x1 conv with the block's stride + BN) where the shape changes;
* BatchNorm with PyTorch's defaults: running = 0.9 running + 0.1 batch, eps 1e-5;
* conv kernels He-normal with fan_out (torchvision's `kaiming_normal_(mode="fan_out")`), BN
  gamma 1 and beta 0, or gamma 0 on each block's last BN with `zero_init_residual`.

Explicit symmetric padding is used everywhere: 'SAME' pads (0, 1) for a stride-2 3x3 conv on an
even input where torch pads (1, 1), which shifts every feature by one pixel.

Parameters are float32; `dtype` is the computation dtype (bfloat16 on accelerators). BatchNorm
statistics are reduced in float32 either way (flax `force_float32_reductions`).

One deliberate difference from torch: the running variance is updated with the biased batch
variance (flax) where torch uses the unbiased one, a factor n / (n - 1) with n = batch x H x W
values per channel, i.e. below 0.1% for 32 images at 7x7.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssl.models import conv

# torchvision: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"), an untruncated
# normal with variance 2 / (out_channels * kh * kw).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# torch.nn.BatchNorm2d defaults (momentum=0.1 is the weight of the *new* statistics).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


# Input pixels per C5 cell.
STRIDE = 32


def _conv(features: int, kernel: int, strides: int, name: str, dtype: Any,
          cpu_kernels: bool) -> nn.Conv:
  """A bias-free conv with torch's symmetric padding of kernel // 2 on each side."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=conv_kernel_init, dtype=dtype, name=name,
                 conv_general_dilated=(conv.conv_general_dilated if cpu_kernels
                                       else jax.lax.conv_general_dilated))


def _norm(train: bool, name: str, dtype: Any, zero_scale: bool = False) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                      epsilon=BN_EPSILON, dtype=dtype,
                      scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
                      name=name)


def _shortcut(x: jax.Array, out_features: int, strides: int, train: bool,
              dtype: Any, cpu_kernels: bool) -> jax.Array:
  """Identity, or torchvision's `downsample` (1x1 conv + BN) when the shape changes."""
  if strides == 1 and x.shape[-1] == out_features:
    return x
  x = _conv(out_features, 1, strides, "downsample_conv", dtype, cpu_kernels)(x)
  return _norm(train, "downsample_bn", dtype)(x)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34); the stride sits on the first."""

  planes: int
  strides: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  cpu_kernels: bool = False

  expansion = 1  # Output channels = planes * expansion (not a dataclass field: unannotated).

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    conv_ = functools.partial(_conv, dtype=self.dtype, cpu_kernels=self.cpu_kernels)
    y = conv_(self.planes, 3, self.strides, "conv1")(x)
    y = nn.relu(_norm(train, "bn1", self.dtype)(y))
    y = conv_(self.planes, 3, 1, "conv2")(y)
    y = _norm(train, "bn2", self.dtype, zero_scale=self.zero_init_residual)(y)
    return nn.relu(y + _shortcut(x, self.planes, self.strides, train, self.dtype,
                                 self.cpu_kernels))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided, v1.5) -> 1x1 with 4x expansion (ResNet-50/101)."""

  planes: int
  strides: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  cpu_kernels: bool = False

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    out = self.planes * self.expansion
    conv_ = functools.partial(_conv, dtype=self.dtype, cpu_kernels=self.cpu_kernels)
    y = conv_(self.planes, 1, 1, "conv1")(x)
    y = nn.relu(_norm(train, "bn1", self.dtype)(y))
    y = conv_(self.planes, 3, self.strides, "conv2")(y)
    y = nn.relu(_norm(train, "bn2", self.dtype)(y))
    y = conv_(out, 1, 1, "conv3")(y)
    y = _norm(train, "bn3", self.dtype, zero_scale=self.zero_init_residual)(y)
    return nn.relu(y + _shortcut(x, out, self.strides, train, self.dtype, self.cpu_kernels))


class ResNet(nn.Module):
  """A torchvision-layout ResNet returning the C5 feature map.

  Submodule names are `conv1`, `bn1`, `layer{i}_{j}` (stage i, block j) and inside a block
  `conv{k}`, `bn{k}`, `downsample_conv`, `downsample_bn`, i.e. torchvision's names with the
  dots of `layer1.0` and `downsample.0/1` spelled out; `dense_ssl.export` maps them back.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
    block_cls: `BasicBlock` or `Bottleneck`.
    zero_init_residual: start each block's last BN with gamma 0 (each block = identity).
    dtype: computation dtype; parameters stay float32.
    cpu_kernels: use `dense_ssl.models.conv`'s convolution and pooling kernels, which XLA:CPU
      runs faster than its own (same values); `models.get_backbone` sets it on CPU hosts.
    width: channels of the stem and the first stage, doubled at each later stage (64 in
      torchvision and every paper; the CPU benchmark's 16 costs ~1/16 of the FLOPs and trains
      ~5x faster on 2 cores, benchmarks/RESULTS.md §4f). The parameter names are the same at
      any width, so the export's layout holds; only torchvision's own constructor assumes 64.
  """

  stage_sizes: Sequence[int]
  block_cls: type[BasicBlock] | type[Bottleneck]
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  cpu_kernels: bool = False
  width: int = 64

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    """Maps normalised images (N, H, W, 3) to the C5 map (N, H/32, W/32, C) in `dtype`.

    `train` selects batch statistics (and updates `batch_stats` when it is mutable) versus
    the running averages.
    """
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ResNet expects NHWC RGB images of shape (N, H, W, 3), got {x.shape}; "
                       "transpose NCHW inputs with x.transpose(0, 2, 3, 1).")
    x = jnp.asarray(x, self.dtype)
    x = _conv(self.width, 7, 2, "conv1", self.dtype, self.cpu_kernels)(x)
    x = nn.relu(_norm(train, "bn1", self.dtype)(x))
    pool = conv.max_pool if self.cpu_kernels else nn.max_pool
    x = pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(self.width * 2**i, strides=strides,
                           zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                           cpu_kernels=self.cpu_kernels, name=f"layer{i + 1}_{j}")(x, train)
    return x


# name -> (stage sizes, block); the depths of torchvision's resnet18/34/50/101.
VARIANTS: dict[str, tuple[tuple[int, ...], type[BasicBlock] | type[Bottleneck]]] = {
    "resnet18": ((2, 2, 2, 2), BasicBlock),
    "resnet34": ((3, 4, 6, 3), BasicBlock),
    "resnet50": ((3, 4, 6, 3), Bottleneck),
    "resnet101": ((3, 4, 23, 3), Bottleneck),
}


def num_features(name: str, width: int = 64) -> int:
  """Channels of the C5 map of the variant `name` (512 or 2048 at torchvision's width 64),
  without building it."""
  _, block = VARIANTS[name]
  return 8 * width * block.expansion
