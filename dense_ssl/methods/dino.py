"""DINO (Caron et al., ICCV 2021): self-distillation with multi-crop, with DILEMMA as an option.

The student (ViT -> class token -> DINO head: 3-layer GELU MLP to a 256-d bottleneck, L2
normalisation, weight-normalised last layer to K logits) sees 2 global crops and
`local_crops` small ones; the teacher (the student's EMA) sees the 2 global crops. For every
pair (teacher crop i, student crop v != i): CE(softmax((t_i - c)/τ_t), log_softmax(s_v/τ_s)),
averaged over the batch and then over the pairs (`dino_loss`). The centre c is `extra` state:
c ← 0.9·c + 0.1·mean of the teacher logits over the global batch and both global crops,
after the loss (DINO's `update_center`). τ_t warms up linearly from `warmup_teacher_temp` to
`teacher_temp` over `warmup_teacher_temp_epochs`, per epoch (`teacher_temperature`); τ_s = 0.1.

Crops of one size share one forward pass (rows b·V + v), as DINO's MultiCropWrapper runs each
resolution once. The ViT's position table is initialised on the global crops' grid and
interpolated for the local ones (models/vit.py).

With `config.method.dilemma.enabled` every student crop is sparse and partly mislocated (its
own draw) and the loss adds λ · mean over crops of their BCE; the teacher sees the full global
crops. The paper applies DILEMMA to DINO without detail; corrupting the local crops too is
this project's choice ("the student's patch tokens").

Config keys: `method.out_dim`, `hidden`, `bottleneck`, `norm_last_layer`, `local_crops`,
`local_size`, `global_scale`, `local_scale`, `teacher_temp`, `warmup_teacher_temp`,
`warmup_teacher_temp_epochs`, `student_temp`, `center_momentum`, `dilemma`, and
MomentumPair's. The optimiser side (last layer frozen in epoch 1, per-tensor clipping at 3,
weight decay 0.04 -> 0.4) is configs/dino.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dense_ssl.methods import base, families, vit_hosts
from dense_ssl.models import heads

GLOBAL_VIEWS = ("global1", "global2")


def dino_loss(student: jax.Array, teacher: jax.Array, center: jax.Array,
              teacher_temp: jax.Array | float, student_temp: float
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DINO's cross-entropy between teacher and student crops (the official `DINOLoss`).

  Args:
    student: (N, Vs, K) student logits; its first Vt crops are the teacher's crops.
    teacher: (N, Vt, K) teacher logits (the caller stops their gradient).
    center: (K,) the centre before this step.
    teacher_temp, student_temp: τ_t, τ_s.

  Returns (loss, {"teacher_probs" (N, Vt, K), "ce" (Vt, Vs) per-pair mean CE}): the loss is
  the mean of ce over the pairs with v != i.
  """
  student = student.astype(jnp.float32)
  t = jax.nn.softmax((teacher.astype(jnp.float32) - center) / teacher_temp, axis=-1)
  log_s = jax.nn.log_softmax(student / student_temp, axis=-1)
  ce = -jnp.einsum("nik,nvk->iv", t, log_s) / student.shape[0]
  pairs = 1.0 - jnp.eye(teacher.shape[1], student.shape[1], dtype=jnp.float32)
  return jnp.sum(ce * pairs) / jnp.sum(pairs), {"teacher_probs": t, "ce": ce}


def update_center(center: jax.Array, teacher: jax.Array, momentum: float) -> jax.Array:
  """c ← m·c + (1 - m)·mean of the teacher logits over every example and crop (N, Vt, K)."""
  batch_center = jnp.mean(teacher.astype(jnp.float32).reshape(-1, teacher.shape[-1]), axis=0)
  return center * momentum + batch_center * (1.0 - momentum)


def teacher_temperature(epoch: jax.Array, warmup: float, final: float,
                        warmup_epochs: int) -> jax.Array:
  """DINO's schedule: np.linspace(warmup, final, warmup_epochs) by epoch, then `final`."""
  epoch = jnp.asarray(epoch, jnp.float32)
  if warmup_epochs <= 0:
    return jnp.asarray(final, jnp.float32)
  ramp = warmup + (final - warmup) * epoch / max(warmup_epochs - 1, 1)
  return jnp.where(epoch < warmup_epochs, ramp, final).astype(jnp.float32)


@base.register("dino")
class DINO(vit_hosts.ViTHost, families.MomentumPair):
  """DINO: multi-crop student, global-crop teacher, centring and sharpening."""

  online_only = ("dilemma_head",)

  def __init__(self, config: Any, durations: Any = None):
    super().__init__(config, durations)
    m = config.method
    self.out_dim = int(m.out_dim)
    self.local_crops, self.local_size = int(m.local_crops), int(m.local_size)
    self.student_temp, self.center_momentum = float(m.student_temp), float(m.center_momentum)
    self.temps = (float(m.warmup_teacher_temp), float(m.teacher_temp),
                  int(m.warmup_teacher_temp_epochs))
    head = heads.DINOHead(self.out_dim, hidden=int(m.hidden), bottleneck=int(m.bottleneck),
                          norm_last_layer=bool(m.norm_last_layer))
    self.encoder = vit_hosts.Encoder(backbone=self.backbone.module, head=head,
                                     dilemma_head=self.dilemma_head())

  @classmethod
  def check_config(cls, config: Any, num_devices: int) -> None:
    super().check_config(config, num_devices)
    m = config.method
    if m.local_crops < 0:
      raise ValueError(f"config.method.local_crops={m.local_crops} must be >= 0.")
    if not 0.0 <= m.center_momentum < 1.0:
      raise ValueError(f"config.method.center_momentum={m.center_momentum} must be in [0, 1).")

  def views(self) -> tuple[base.ViewSpec, ...]:
    """2 global crops (presets dino_global1/2) and the local crops (preset dino_local)."""
    d, m = self.config.data, self.config.method
    common = dict(ratio=tuple(d.crop_ratio), flip=bool(d.flip))
    out = [base.ViewSpec(name, int(d.image_size), scale=tuple(m.global_scale),
                         preset=f"dino_{name}", **common) for name in GLOBAL_VIEWS]
    out += [base.ViewSpec(f"local{i + 1}", self.local_size, scale=tuple(m.local_scale),
                          preset="dino_local", **common) for i in range(self.local_crops)]
    return tuple(out)

  def init_extra(self, rng: jax.Array) -> dict[str, jax.Array]:
    del rng
    return {"center": jnp.zeros((self.out_dim,), jnp.float32)}

  def teacher_temp(self, step: jax.Array) -> jax.Array:
    epoch = step // self.durations.steps_per_epoch
    return teacher_temperature(epoch, *self.temps)

  def _student(self, params: Any, state: base.MethodState, x: jax.Array, num_views: int,
               rng: jax.Array) -> tuple[jax.Array, Any, list[tuple[jax.Array, jax.Array]]]:
    """(logits (N, V, K), online batch_stats, per crop (dilemma logits, labels), [] without)."""
    kwargs, labels = self.student_kwargs(rng, x)
    out, stats = self.online(params, state, x, batch_kwargs=kwargs)
    crops = []
    if labels is not None:
      logits, labels = (vit_hosts.unstack(a, num_views) for a in (out["dilemma"], labels))
      crops = [(logits[:, v], labels[:, v]) for v in range(num_views)]
    return vit_hosts.unstack(out["z"], num_views), stats, crops

  def loss(self, params: Any, state: base.MethodState, batch: dict[str, jax.Array],
           rng: jax.Array) -> base.LossOutput:
    target_rng, global_rng, local_rng = jax.random.split(rng, 3)
    globals_ = vit_hosts.stack_views(batch, GLOBAL_VIEWS)
    teacher, target_stats = self.target(state, globals_, target_rng)
    teacher = vit_hosts.unstack(teacher["z"], len(GLOBAL_VIEWS))

    student, online_stats, dilemma = self._student(params, state, globals_, len(GLOBAL_VIEWS),
                                                   global_rng)
    students, dilemmas = [student], list(dilemma)
    local_names = [f"local{i + 1}" for i in range(self.local_crops)]
    if local_names:
      local_state = state._replace(batch_stats={**state.batch_stats, "online": online_stats})
      local, online_stats, dilemma = self._student(
          params, local_state, vit_hosts.stack_views(batch, local_names), len(local_names),
          local_rng)
      students.append(local)
      dilemmas += dilemma

    center = state.extra["center"]
    temp = self.teacher_temp(state.step)
    loss, aux = dino_loss(jnp.concatenate(students, axis=1), teacher, center, temp,
                          self.student_temp)
    probs = aux["teacher_probs"]
    entropy = -jnp.mean(jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))
    metrics = {"dino": loss, "teacher_temp": temp, "teacher_entropy": entropy,
               "teacher_max_prob": jnp.mean(jnp.max(probs, axis=-1)),
               "center_norm": jnp.linalg.norm(center)}
    if self.dilemma.enabled:
      extra_loss, dilemma_metrics = self.dilemma_terms([d[0] for d in dilemmas],
                                                       [d[1] for d in dilemmas])
      loss = loss + extra_loss
      metrics.update(dilemma_metrics)
    metrics["loss"] = loss
    extra = {"center": update_center(center, teacher, self.center_momentum)}
    stats = {"online": online_stats, "target": target_stats}
    return loss, base.StepOutput(batch_stats=stats, extra=extra, metrics=metrics)
