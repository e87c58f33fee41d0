"""DenseCL (Wang et al., CVPR 2021): MoCo-v2 plus a dense contrastive term.

Each query cell's positive is the key cell chosen by a matcher on the L2-normalised backbone
(C5) maps; the dense InfoNCE runs over all N·S² cells against a dense queue that receives the
pooled dense key k2. L = (1-λ)·L_global + λ·L_dense. The exact step, with the reference's
pitfalls, is in shared/parity/README.md. HoughCL (houghcl.py) only swaps the matcher.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssl import losses, matchers, queues
from dense_ssl.methods import base, mocov2
from dense_ssl.models import heads

# (f_query, f_key (N, S², C) normalised backbone features, S) -> (match (N, S²) int32, sim).
Matcher = Callable[[jax.Array, jax.Array, int], tuple[jax.Array, jax.Array]]


def argmax_matcher(f_q: jax.Array, f_k: jax.Array, grid: int) -> tuple[jax.Array, jax.Array]:
  """DenseCL's rule: the most similar key cell."""
  del grid
  return matchers.argmax_similarity(f_q, f_k)


def dense_term(q_grid: jax.Array, k_grid: jax.Array, match: jax.Array, dense_queue: jax.Array,
               temperature: float, dense_chunk: int = 0) -> tuple[jax.Array, dict[str, Any]]:
  """The dense InfoNCE over all N·S² query cells, each paired with its matched key cell.

  Args:
    q_grid, k_grid: (N, S², D) normalised dense embeddings (k_grid without gradient).
    match: (N, S²) int32 key cell of each query cell.
    dense_queue: (K, D) normalised negatives.
    temperature: T.
    dense_chunk: > 0 uses the memory-light chunked loss (no logits); 0 materialises them.

  Returns (loss, {"k_grid_matched", "logits" (N·S², 1+K) scaled or None, "ce" or None}).
  """
  k_matched = jnp.take_along_axis(k_grid, match[:, :, None], axis=1)
  rows_q = q_grid.reshape(-1, q_grid.shape[-1])
  rows_k = k_matched.reshape(-1, q_grid.shape[-1])
  if dense_chunk > 0:
    loss = losses.dense_info_nce(rows_q, rows_k, dense_queue, temperature, dense_chunk)
    return loss, {"k_grid_matched": k_matched, "logits": None, "ce": None}
  ce, logits = losses.info_nce_per_row(rows_q, rows_k, dense_queue, temperature)
  return jnp.mean(ce), {"k_grid_matched": k_matched, "logits": logits, "ce": ce}


def head_loss(q_map: jax.Array, q_out: dict[str, jax.Array], k_map: jax.Array,
              k_out: dict[str, jax.Array], queue: queues.Queue, dense_queue: queues.Queue, *,
              temperature: float, loss_lambda: float, matcher: Matcher = argmax_matcher,
              dense_chunk: int = 0) -> tuple[jax.Array, dict[str, Any]]:
  """DenseCL's objective given both views' C5 maps and `DenseCLNeck` outputs.

  Args:
    q_map, k_map: (N, S, S, C) backbone maps of the query (view1) and key (view2).
    q_out, k_out: neck outputs {"global" (N, D), "dense_grid" (N, S², D), "dense_pooled"}.
    queue, dense_queue: the queues before this step.
    temperature, loss_lambda: T and λ.
    matcher: chooses each query cell's key cell from the normalised backbone features.
    dense_chunk: > 0 computes the dense term with the memory-light chunked loss.

  Returns (loss, aux): aux holds the normalised embeddings, the match and similarity, the
  logits (the dense ones only when materialised), both unweighted terms and the new queues.
  The key side and the queues are stop-gradient'ed here; no gradient flows through the
  matching.
  """
  sg, l2n = jax.lax.stop_gradient, base.l2_normalize
  f32 = lambda x: x.astype(jnp.float32)
  n, height, width, channels = q_map.shape
  if height != width or k_map.shape != q_map.shape:
    raise ValueError(f"DenseCL needs square query and key maps of one shape, got {q_map.shape} "
                     f"and {k_map.shape}; use square crops whose side is a multiple of 32.")
  q, k = l2n(f32(q_out["global"])), sg(l2n(f32(k_out["global"])))
  q_grid, k_grid = l2n(f32(q_out["dense_grid"])), sg(l2n(f32(k_out["dense_grid"])))
  k2 = sg(l2n(f32(k_out["dense_pooled"])))

  f_q = l2n(f32(q_map).reshape(n, height * width, channels))
  f_k = l2n(f32(k_map).reshape(n, height * width, channels))
  match, sim = matcher(sg(f_q), sg(f_k), height)

  loss_global, logits_global = losses.info_nce_queue(q, k, sg(queue.buffer), temperature,
                                                     return_logits=True)
  loss_dense, dense = dense_term(q_grid, k_grid, match, sg(dense_queue.buffer), temperature,
                                 dense_chunk)
  loss = (1.0 - loss_lambda) * loss_global + loss_lambda * loss_dense
  aux = {"q": q, "k": k, "q_grid": q_grid, "k_grid": k_grid,
         "q2": l2n(f32(q_out["dense_pooled"])), "k2": k2, "sim": sim, "match": match,
         "k_grid_matched": dense["k_grid_matched"], "logits_global": logits_global,
         "logits_dense": dense["logits"], "loss_global": loss_global, "loss_dense": loss_dense,
         # Enqueue after the logits, global queue first (pitfall 7).
         "queue": queues.enqueue(queue, k), "dense_queue": queues.enqueue(dense_queue, k2)}
  return loss, aux


def correspondence_metrics(match: jax.Array, batch: dict[str, jax.Array],
                           grid: int) -> dict[str, jax.Array]:
  """The matcher's accuracy against geometry (`matchers.geometric`) and its chance level."""
  for key in ("coords1", "coords2", "box2", "valid1"):
    if key not in batch:
      raise KeyError(f"Dense methods need batch[{key!r}] (the correspondence grids of "
                     f"dense_ssl.data.views) to score their matcher.")
  if batch["coords1"].shape[1:3] != (grid, grid):
    raise ValueError(f"The correspondence grids are {batch['coords1'].shape[1:3]} but the "
                     f"backbone map is {grid}x{grid}; the grids must use S = image_size // 32.")
  gt, valid = matchers.geometric(batch["coords1"], batch["coords2"], batch["box2"],
                                 batch["valid1"])
  return {"corr_acc": matchers.correspondence_accuracy(match, gt, valid, grid, tolerance=1),
          "corr_acc_exact": matchers.correspondence_accuracy(match, gt, valid, grid,
                                                             tolerance=0),
          "corr_acc_chance": matchers.chance_accuracy(gt, valid, grid, tolerance=1)}


@base.register("densecl")
class DenseCL(mocov2.TwoEncoderMethod):
  """DenseCL: `DenseCLNeck`, a global and a dense queue, argmax matching on C5 features."""

  matcher: Matcher = staticmethod(argmax_matcher)

  def __init__(self, config: Any):
    super().__init__(config)
    self.loss_lambda = float(config.method.loss_lambda)
    self.dense_chunk = int(config.method.dense_chunk)
    if not 0.0 <= self.loss_lambda <= 1.0:
      raise ValueError(f"config.method.loss_lambda={self.loss_lambda} must be in [0, 1].")

  def make_neck(self) -> nn.Module:
    return heads.DenseCLNeck(hidden=self.hidden, dim=self.dim)

  def init_extra(self, rng: jax.Array) -> dict[str, queues.Queue]:
    global_rng, dense_rng = jax.random.split(rng)
    return {"queue": queues.create(global_rng, self.queue_size, self.dim),
            "dense_queue": queues.create(dense_rng, self.queue_size, self.dim)}

  def loss(self, params: Any, state: Any, batch: dict[str, jax.Array],
           rng: jax.Array) -> base.LossOutput:
    (q_map, q_out), (k_map, k_out), stats = self.encode(params, state, batch, rng)
    loss, aux = head_loss(q_map, q_out, k_map, k_out, state.extra["queue"],
                          state.extra["dense_queue"], temperature=self.temperature,
                          loss_lambda=self.loss_lambda, matcher=self.matcher,
                          dense_chunk=self.dense_chunk)
    metrics = {"loss": loss, "loss_global": aux["loss_global"],
               "loss_dense": aux["loss_dense"], "std_q": mocov2.embedding_std(aux["q"])}
    metrics.update(correspondence_metrics(aux["match"], batch, q_map.shape[1]))
    extra = {"queue": aux["queue"], "dense_queue": aux["dense_queue"]}
    return loss, ({"batch_stats": stats, "extra": extra}, metrics)
