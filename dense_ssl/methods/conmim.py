"""ConMIM (Yi et al., ICLR 2023): masked image modelling as intra-image patch contrast.

One crop of each image is seen twice: the student ViT sees it with only crop and flip, with
75 % of its patch embeddings replaced by a learned mask token; the teacher, the EMA of the
student (0.996 -> 1, cosine), sees the same crop unmasked with a stronger colour augmentation
(jitter, grey, blur, solarise). Both put every token through the same 3-layer projector
(BatchNorm, last BN without affine); cls is dropped. The loss is `patch_info_nce`: for each
masked position, CE over the L teacher tokens of the same image with the positive at that
position, τ = 0.1, pooled over the masked positions of the batch (METHODS.md §4).

Masks are drawn on device inside the step from the step's rng (`draw_mask`), so a step is a
function of (state, batch) and resume is bitwise, and 1 and 8 devices draw the same masks:
* "random" (the official `random_mps32`): ceil(ratio · B) of the B grid-aligned `block` x
  `block` squares of patches (block 2 on a ViT-/16: 32 px squares), the same count per image.
* "blockwise" (BEiT's `MaskingGenerator`): rectangles of area U(min_patches, remaining) and
  aspect ratio log-uniform in (min_aspect, 1 / min_aspect) at random places, each kept when it
  masks between 1 and `remaining` new patches, until ceil(ratio · L) patches are masked or
  10 rectangles in a row failed (so a few images may fall short, as BEiT's).

Config keys: `method.temperature`, `dim`, `hidden`, `mask` (kind, ratio, block, min_patches,
min_aspect) and MomentumPair's. The recipe (BEiT's ViT options, AdamW) is configs/conmim.py.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dense_ssl import ema, losses, models, parity
from dense_ssl.methods import base, families, vit_hosts
from dense_ssl.models import heads

MASK_KINDS = ("random", "blockwise")

def patch_info_nce(s: jax.Array, t: jax.Array, mask: jax.Array, temperature: float
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ConMIM's intra-image patch InfoNCE (METHODS.md §4).

  Args:
    s: (N, L, D) student token projections (masked image), raw.
    t: (N, L, D) teacher token projections (unmasked image), raw; the caller stops gradients.
    mask: (N, L) bool, True where the student's patch was masked.
    temperature: τ (0.1).

  For every masked position i, CE over the L teacher tokens of the same image with the positive
  at i. The loss is the pooled mean over all masked positions of the batch (not the mean of
  per-image means). Returns (loss, {"logits" (N, L, L) scaled, "ce" (N, L) at every position}).
  """
  logits = jnp.einsum("nid,njd->nij", losses.l2_normalize(losses.at_least_f32(s)), losses.l2_normalize(losses.at_least_f32(t)))
  logits = logits / temperature
  labels = jnp.broadcast_to(jnp.arange(logits.shape[1], dtype=jnp.int32), logits.shape[:2])
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  weights = mask.astype(ce.dtype)
  loss = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return loss, {"logits": logits, "ce": ce}


# ---------------------------------------------------------------------------------------------
# Token masks, drawn on device.
# ---------------------------------------------------------------------------------------------


def mask_count(ratio: float, units: int) -> int:
  """ceil(ratio · units), robust to float rounding (0.75 · 196 is 147 exactly)."""
  return int(math.ceil(ratio * units - 1e-9))


def random_mask(rng: jax.Array, n: int, grid: int, ratio: float, block: int = 1) -> jax.Array:
  """(n, grid²) bool, row-major: ceil(ratio · (grid/block)²) random block x block squares."""
  if block < 1 or grid % block:
    raise ValueError(f"config.method.mask.block={block} must divide the token grid side "
                     f"{grid} (image size / patch size).")
  side = grid // block
  count = mask_count(ratio, side * side)
  ranks = jnp.argsort(jnp.argsort(jax.random.uniform(rng, (n, side * side)), axis=1), axis=1)
  coarse = (ranks < count).reshape(n, side, side)
  return jnp.repeat(jnp.repeat(coarse, block, axis=1), block, axis=2).reshape(n, -1)


def blockwise_mask(rng: jax.Array, n: int, grid: int, ratio: float, min_patches: int = 16,
                   min_aspect: float = 0.3, max_failures: int = 10) -> jax.Array:
  """(n, grid²) bool, row-major: BEiT's block-wise masking (module doc), per image."""
  target = mask_count(ratio, grid * grid)
  rows, cols = jnp.meshgrid(jnp.arange(grid), jnp.arange(grid), indexing="ij")
  log_aspect = (math.log(min_aspect), math.log(1.0 / min_aspect))

  def one(key):
    def attempt(carry):
      mask, count, failures, key = carry
      key, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
      remaining = (target - count).astype(jnp.float32)
      low = jnp.minimum(float(min_patches), remaining)
      area = jax.random.uniform(k_area, (), minval=low, maxval=remaining)
      aspect = jnp.exp(jax.random.uniform(k_aspect, (), minval=log_aspect[0],
                                          maxval=log_aspect[1]))
      h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
      w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
      top = jnp.floor(jax.random.uniform(k_top, ()) * (grid - h + 1)).astype(jnp.int32)
      left = jnp.floor(jax.random.uniform(k_left, ()) * (grid - w + 1)).astype(jnp.int32)
      rect = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
      new = jnp.sum(rect & ~mask)
      ok = (h < grid) & (w < grid) & (new > 0) & (new <= target - count)
      return (jnp.where(ok, mask | rect, mask), count + jnp.where(ok, new, 0),
              jnp.where(ok, 0, failures + 1), key)

    def going(carry):
      _, count, failures, _ = carry
      return (count < target) & (failures < max_failures)

    init = (jnp.zeros((grid, grid), bool), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
            key)
    return jax.lax.while_loop(going, attempt, init)[0].reshape(-1)

  return jax.vmap(one)(jax.random.split(rng, n))


class Encoder(nn.Module):
  """ViT (the mask token replaces masked patches) -> `projector` on every token -> drop cls.

  Stochastic depth runs on the online side only: the teacher is a fixed function of its
  parameters, as an EMA teacher in eval mode (its projector's BatchNorm still uses the batch's
  statistics, as MomentumPair's targets do). Returns {"z": (N, L, dim)}.
  """

  backbone: nn.Module
  projector: nn.Module

  def __call__(self, x: jax.Array, train: bool = True, *, online: bool = True,
               mask: jax.Array | None = None) -> dict[str, jax.Array]:
    tokens = self.backbone(x, train and online, mask=mask)
    n, length, width = tokens.shape
    z = self.projector(tokens.reshape(n * length, width), train)
    return {"z": z.reshape(n, length, -1)[:, 1:]}


@base.register("conmim")
class ConMIM(vit_hosts.ViTHost, families.MomentumPair):
  """ConMIM: masked student, EMA teacher on the strongly augmented full crop (module doc)."""

  def __init__(self, config: Any, durations: Any = None):
    super().__init__(config, durations)
    m = config.method
    self.temperature = float(m.temperature)
    self.mask_cfg = m.mask
    self.encoder = Encoder(backbone=self.backbone.module,
                           projector=heads.ProjectionMLP(3, int(m.hidden), int(m.dim)))

  @classmethod
  def check_config(cls, config: Any, num_devices: int) -> None:
    super().check_config(config, num_devices)
    mask = config.method.mask
    if mask.kind not in MASK_KINDS:
      raise ValueError(f"Unknown config.method.mask.kind={mask.kind!r}; valid choices: "
                       f"{', '.join(MASK_KINDS)}.")
    if not 0.0 < mask.ratio < 1.0:
      raise ValueError(f"config.method.mask.ratio={mask.ratio} must be in (0, 1): ConMIM "
                       "needs masked positions and unmasked context.")
    if not config.model.get("use_mask_token", False):
      raise ValueError("ConMIM replaces masked patches by a learned mask token: set "
                       "config.model.use_mask_token=True.")
    if config.method.dilemma.enabled:
      raise ValueError("config.method.dilemma.enabled: DILEMMA's corruption is for the "
                       "contrastive ViT methods, not ConMIM; set it to False.")
    grid = config.data.image_size // models.stride(config.model.name)
    if mask.kind == "random" and (mask.block < 1 or grid % mask.block):
      raise ValueError(f"config.method.mask.block={mask.block} must divide the token grid "
                       f"side {grid} (config.data.image_size / patch size).")

  def views(self) -> tuple[base.ViewSpec, ...]:
    """One crop: "student" (plain preset, masked on device) and "teacher" (same crop and
    flip, strong preset)."""
    d = self.config.data
    common = dict(size=int(d.image_size), scale=tuple(d.crop_scale), ratio=tuple(d.crop_ratio),
                  flip=bool(d.flip))
    return (base.ViewSpec("student", preset="conmim_student", **common),
            base.ViewSpec("teacher", preset="conmim_teacher", same_crop_as="student", **common))

  def draw_mask(self, rng: jax.Array, n: int, grid: int) -> jax.Array:
    """(n, grid²) bool masks of `config.method.mask` (module doc)."""
    m = self.mask_cfg
    if m.kind == "random":
      return random_mask(rng, n, grid, float(m.ratio), int(m.block))
    return blockwise_mask(rng, n, grid, float(m.ratio), int(m.min_patches),
                          float(m.min_aspect))

  def loss(self, params: Any, state: base.MethodState, batch: dict[str, jax.Array],
           rng: jax.Array) -> base.LossOutput:
    mask_rng, drop_rng, target_rng = jax.random.split(rng, 3)
    student = batch["student"]
    grid = student.shape[1] // self.backbone.stride
    mask = self.draw_mask(mask_rng, student.shape[0], grid)
    s, online_stats = self.online(params, state, student, batch_kwargs={"mask": mask},
                                  rngs={"dropout": drop_rng})
    t, target_stats = self.target(state, batch["teacher"], target_rng)
    loss, aux = patch_info_nce(s["z"], t["z"], mask, self.temperature)
    hit = jnp.argmax(aux["logits"], axis=-1) == jnp.arange(mask.shape[1])
    weights = mask.astype(jnp.float32)
    metrics = {"loss": loss, "std_s": families.embedding_std(s["z"].reshape(-1, s["z"].shape[-1])),
               "patch_acc": jnp.sum(hit * weights) / jnp.maximum(jnp.sum(weights), 1.0),
               "mask_ratio": jnp.mean(weights)}
    stats = {"online": online_stats, "target": target_stats}
    return loss, base.StepOutput(batch_stats=stats, extra=state.extra, metrics=metrics)


# ---------------------------------------------------------------------------------------------
# Parity with the reference vectors (METHODS.md §4).
# ---------------------------------------------------------------------------------------------


@parity.register("conmim", marker_key="ema_momentum")
def check_parity(r: Any, ck: parity.Checker) -> None:
  """ConMIM's patch InfoNCE and EMA momentum schedule (`conmim_case*.npz`, METHODS.md §4)."""
  tau, base = parity.scalar(r, "tau"), parity.scalar(r, "ema_base")
  total_steps = int(np.asarray(r["ema_total_steps"]))

  @jax.jit
  def compute(s, t, mask, steps):
    return (patch_info_nce(s, t, mask, tau),
            ema.momentum_at(steps, total_steps, base, "cosine"))

  (loss, aux), momentum = compute(parity.f32(r, "s"), parity.f32(r, "t"), jnp.asarray(r["mask"], bool),
                                  jnp.asarray(r["ema_steps"], jnp.int32))
  ck.close("logits", aux["logits"], r["logits"])
  ck.close("ce", aux["ce"], r["ce"])
  ck.rel("loss", loss, r["loss"], parity.LOSS_TOL)
  ck.rel("ema_momentum", momentum, r["ema_momentum"], parity.MOMENTUM_TOL)
