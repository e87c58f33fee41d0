"""Backbones by name: `build(config.model)` returns a `Backbone` (module plus what tools need).

ResNets (`resnet18|34|50|101`) return the C5 map (N, H/32, W/32, C); ViTs (`vit_*`) return the
tokens (N, 1 + K, D) and take the token options of `dense_ssl.models.vit.ViT`. Methods build
their backbone here; evaluation, export and visualisation get it from the method
(`Method.backbone`), so they see the very module that was trained, ResNet or ViT.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssl.models import resnet
from dense_ssl.models import vit

FAMILIES = ("resnet", "vit")
POOLS = ("cls", "mean")


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


def stride(name: str) -> int:
  """Input pixels per output cell: 32 for a ResNet's C5 map, the patch size for a ViT."""
  return vit.VARIANTS[name][0] if family(name) == "vit" else resnet.STRIDE


def use_cpu_kernels() -> bool:
  """Whether modules should use `dense_ssl.models.conv`'s kernels: when JAX runs on the CPU."""
  return jax.default_backend() == "cpu"


def get_backbone(name: str, **kwargs: Any) -> nn.Module:
  """Builds the backbone `name`; kwargs go to the module (e.g. zero_init_residual, dtype).

  ResNets use `dense_ssl.models.conv`'s CPU kernels when JAX's default backend is the CPU
  (chosen here, once; accelerators never trace that code), unless `cpu_kernels` is given.
  """
  if family(name) == "vit":
    return vit.get(name, **kwargs)
  stage_sizes, block_cls = resnet.VARIANTS[name]
  kwargs.setdefault("cpu_kernels", use_cpu_kernels())
  return resnet.ResNet(stage_sizes=stage_sizes, block_cls=block_cls, **kwargs)


def num_features(name: str) -> int:
  """Channels of the backbone's output features (512 or 2048; D for a ViT), without init."""
  if family(name) == "vit":
    return vit.num_features(name)
  return resnet.num_features(name)


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A backbone module and what evaluation and export need to know of it.

  Attributes:
    name: `config.model.name`, e.g. "resnet50" or "vit_s16".
    module: the module as trained (its compute dtype may be bfloat16).
    pool: the image-level feature the probes read (`config.model.pool`): "cls", a ViT's class
      token (MoCo v3, DINO: their heads train it), or "mean", the mean of the final map (a
      ResNet's only option; for a ViT the mean patch token, BEiT's and ConMIM's protocol:
      their losses never train the class token). Default: "mean" for a ResNet, "cls" for a ViT.
  """
  name: str
  module: nn.Module
  pool: str = ""

  def __post_init__(self):
    allowed = POOLS if self.family == "vit" else ("mean",)  # A ResNet has no class token.
    if not self.pool:
      object.__setattr__(self, "pool", allowed[0])
    if self.pool not in allowed:
      raise ValueError(f"config.model.pool = {self.pool!r} for {self.name!r}; use one of "
                       f"{allowed} (a ResNet has no class token).")

  @property
  def family(self) -> str:
    return family(self.name)

  @property
  def stride(self) -> int:
    return stride(self.name)

  @property
  def num_features(self) -> int:
    if self.family == "resnet":
      return resnet.num_features(self.name, self.module.width)
    return num_features(self.name)

  def eval_module(self) -> nn.Module:
    """The same module computing in float32 (frozen-feature evaluation, export checks)."""
    return self.module.clone(dtype=jnp.float32)


# config.model keys that are not module arguments.
_NOT_MODULE_ARGS = ("name", "half_precision", "pool")


def build(model_cfg: Any) -> Backbone:
  """The backbone of `config.model`: `name`, `half_precision` (bfloat16 compute), `pool`
  (`Backbone.pool`) and the module's own options (e.g. `zero_init_residual` for ResNets;
  `layer_scale`, `use_mask_token` for ViTs), passed through by name."""
  name = model_cfg.name
  _check(name)
  items = model_cfg.items() if hasattr(model_cfg, "items") else vars(model_cfg).items()
  options = {k: v for k, v in items if k not in _NOT_MODULE_ARGS}
  module_cls = vit.ViT if family(name) == "vit" else resnet.ResNet
  fields = {f.name for f in dataclasses.fields(module_cls)}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ValueError(f"config.model has keys {unknown} that {name!r} ({module_cls.__name__}) "
                     f"does not take; its options: {', '.join(sorted(fields - {'parent', 'name'}))}.")
  dtype = jnp.bfloat16 if getattr(model_cfg, "half_precision", False) else jnp.float32
  return Backbone(name=name, module=get_backbone(name, dtype=dtype, **options),
                  pool=getattr(model_cfg, "pool", ""))
