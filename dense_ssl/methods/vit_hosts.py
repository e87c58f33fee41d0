"""What the ViT methods (MoCo v3, DINO, SimCLR) share: the encoder and the DILEMMA option.

* `Encoder`: the ViT, a head on its class token (MoCo v3's projector, SimCLR's projector,
  DINO's head), and, on the online side only, a predictor (MoCo v3) and DILEMMA's per-token
  head. Its params are {"backbone", "head", "predictor", "dilemma_head"}; a method names the
  online-only ones in `online_only`, so the target (EMA) holds backbone and head.
* `ViTHost`: a mixin in front of a family base class (`class MoCoV3(ViTHost,
  families.MomentumPair)`): ViT backbones only, the config checks of the option and of a fixed
  sin-cos position table, and `student_kwargs`, which draws one view's DILEMMA corruption (what
  the ViT gets as `keep_idx`/`pos_idx`) when `config.method.dilemma.enabled`.

Views of one size are stacked on axis 1 and flattened (`stack_views`): row b·V + v, so each
example's views stay on the device that holds the example, and one forward pass (one set of
BatchNorm statistics, as the references' concatenated crops) serves them all.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssl.methods import base, dilemma


class Encoder(nn.Module):
  """ViT -> class token -> `head`; online also `predictor` (on the head's output) and
  `dilemma_head` (on the patch tokens). Returns {"z", and online "q", "dilemma"}."""

  backbone: nn.Module
  head: nn.Module
  predictor: nn.Module | None = None
  dilemma_head: nn.Module | None = None

  def __call__(self, x: jax.Array, train: bool = True, *, online: bool = True,
               keep_idx: jax.Array | None = None,
               pos_idx: jax.Array | None = None) -> dict[str, jax.Array]:
    tokens = self.backbone(x, train, keep_idx=keep_idx, pos_idx=pos_idx)
    out = {"z": self.head(tokens[:, 0], train)}
    if online and self.predictor is not None:
      out["q"] = self.predictor(out["z"], train)
    if online and self.dilemma_head is not None:
      out["dilemma"] = self.dilemma_head(tokens[:, 1:])
    return out


def stack_views(batch: dict[str, jax.Array], names: Sequence[str]) -> jax.Array:
  """Views of one size (B, H, W, 3) each -> (B·V, H, W, 3), row b·V + v."""
  x = jnp.stack([batch[n] for n in names], axis=1)
  return x.reshape((-1,) + x.shape[2:])


def unstack(x: jax.Array, num_views: int) -> jax.Array:
  """(B·V, ...) -> (B, V, ...), the inverse of `stack_views`' row order."""
  return x.reshape((-1, num_views) + x.shape[1:])


def _matches_any(patterns: Sequence[str], path: str) -> bool:
  return any(re.search(p, path) for p in patterns)


class ViTHost:
  """Mixin of the ViT methods: config checks and DILEMMA's student corruption (module doc)."""

  families: ClassVar[tuple[str, ...]] = ("vit",)

  def __init__(self, config: Any, durations: Any = None):
    super().__init__(config, durations)  # type: ignore[call-arg]
    self.dilemma = dilemma.options(config)

  @classmethod
  def check_config(cls, config: Any, num_devices: int) -> None:
    super().check_config(config, num_devices)  # type: ignore[misc]
    dilemma.check_config(config)
    if config.model.get("pos_embed", "learned") == "sincos" and not _matches_any(
        tuple(config.optim.get("frozen", ())), "backbone/pos_embed"):
      raise ValueError("config.model.pos_embed='sincos' is a fixed table: add "
                       "'backbone/pos_embed' to config.optim.frozen (weight decay would "
                       "otherwise shrink it), or use config.model.pos_embed='learned'.")

  def dilemma_head(self) -> nn.Module | None:
    """DILEMMA's per-token head for the encoder, or None when the option is off."""
    return dilemma.Head() if self.dilemma.enabled else None

  def student_kwargs(self, rng: jax.Array, x: jax.Array
                     ) -> tuple[dict[str, jax.Array], jax.Array | None]:
    """(ViT token arguments, labels) of a student batch x (N, H, W, 3): DILEMMA's draw, or
    ({}, None) without it."""
    if not self.dilemma.enabled:
      return {}, None
    stride = self.backbone.stride  # type: ignore[attr-defined]
    num_tokens = (x.shape[1] // stride) * (x.shape[2] // stride)
    draw = dilemma.corruption(rng, x.shape[0], num_tokens, self.dilemma)
    return {"keep_idx": draw["keep_idx"], "pos_idx": draw["pos_idx"]}, draw["labels"]

  def dilemma_terms(self, logits: Sequence[jax.Array], labels: Sequence[jax.Array]
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """λ · mean over views of each view's BCE, and the averaged metrics (dilemma_acc, ...)."""
    per_view = [dilemma.head_loss(l, y)[1] for l, y in zip(logits, labels)]
    bce = jnp.mean(jnp.stack([m["bce"] for m in per_view]))
    return self.dilemma.lam * bce, dilemma.mean_metrics(per_view)


def views_of(method: base.Method, prefix: str) -> list[str]:
  """Names of the method's views that start with `prefix`, in declaration order."""
  return [v.name for v in method.views() if v.name.startswith(prefix)]
