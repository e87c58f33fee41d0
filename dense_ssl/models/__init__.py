"""Backbones by name: `get_backbone("resnet50", dtype=jnp.bfloat16)` and `num_features(name)`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from dense_ssl.models import resnet


def names() -> list[str]:
  """The valid backbone names."""
  return sorted(resnet.VARIANTS)


def _check(name: str) -> None:
  if name not in resnet.VARIANTS:
    raise ValueError(f"Unknown backbone {name!r} (config.model.name); valid names: "
                     f"{', '.join(names())}.")


def get_backbone(name: str, **kwargs: Any) -> nn.Module:
  """Builds the backbone `name`; kwargs go to the module (zero_init_residual, dtype)."""
  _check(name)
  stage_sizes, block_cls = resnet.VARIANTS[name]
  return resnet.ResNet(stage_sizes=stage_sizes, block_cls=block_cls, **kwargs)


def num_features(name: str) -> int:
  """Channels of the backbone's output feature map (512 or 2048), without initialising it."""
  _check(name)
  return resnet.num_features(name)
