"""Backbones by name: `get_backbone("resnet50", dtype=jnp.bfloat16)` and `num_features(name)`.

ResNets (`resnet18|34|50|101`) return the C5 map (N, H/32, W/32, C); ViTs (`vit_*`) return the
tokens (N, 1 + K, D) and take the token options of `dense_ssl.models.vit.ViT`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from dense_ssl.models import resnet
from dense_ssl.models import vit


def names() -> list[str]:
  """The valid backbone names."""
  return sorted([*resnet.VARIANTS, *vit.VARIANTS])


def _check(name: str) -> None:
  if name not in resnet.VARIANTS and name not in vit.VARIANTS:
    raise ValueError(f"Unknown backbone {name!r} (config.model.name); valid names: "
                     f"{', '.join(names())}.")


def family(name: str) -> str:
  """The backbone's family: "resnet" (outputs a C5 map) or "vit" (outputs tokens)."""
  _check(name)
  return "vit" if name in vit.VARIANTS else "resnet"


def get_backbone(name: str, **kwargs: Any) -> nn.Module:
  """Builds the backbone `name`; kwargs go to the module (e.g. zero_init_residual, dtype)."""
  if family(name) == "vit":
    return vit.get(name, **kwargs)
  stage_sizes, block_cls = resnet.VARIANTS[name]
  return resnet.ResNet(stage_sizes=stage_sizes, block_cls=block_cls, **kwargs)


def num_features(name: str) -> int:
  """Channels of the backbone's output features (512 or 2048; D for a ViT), without init."""
  if family(name) == "vit":
    return vit.num_features(name)
  return resnet.num_features(name)
