"""DenseCL (Wang et al., CVPR 2021): MoCo-v2 plus a dense contrastive term.

Each query cell's positive is the key cell chosen by a matcher on the L2-normalised backbone
(C5) maps; the dense InfoNCE runs over all N·S² cells against a dense queue that receives the
pooled dense key k2. L = (1-λ)·L_global + λ·L_dense. The exact step, with the reference's
pitfalls, is in shared/parity/README.md; `check_parity` runs it on the reference vectors.
HoughCL (houghcl.py) only swaps the matcher.

Config keys: `method.loss_lambda`, `method.dense_chunk`, and MoCo-v2's.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssl import ema, losses, matchers, parity, queues
from dense_ssl.methods import base, families, mocov2
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
  sg, l2n = jax.lax.stop_gradient, losses.l2_normalize
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
  aux = {"q": q, "k": k, "q_grid": q_grid, "k_grid": k_grid, "f_q": sg(f_q), "f_k": sg(f_k),
         "q2": l2n(f32(q_out["dense_pooled"])), "k2": k2, "sim": sim, "match": match,
         "k_grid_matched": dense["k_grid_matched"], "logits_global": logits_global,
         "logits_dense": dense["logits"], "loss_global": loss_global, "loss_dense": loss_dense,
         # Enqueue after the logits, global queue first (pitfall 7).
         "queue": queues.enqueue(queue, k), "dense_queue": queues.enqueue(dense_queue, k2)}
  return loss, aux


def correspondence_metrics(match: jax.Array, batch: dict[str, jax.Array], grid: int,
                           query: str = "view1", key: str = "view2") -> dict[str, jax.Array]:
  """The matcher's accuracy against geometry (`matchers.geometric`) and its chance level.

  `query` and `key` name the two views; their grids must be the backbone's S x S cells.
  """
  needed = (f"{query}_coords", f"{key}_coords", f"{key}_box", f"{query}_valid")
  for name in needed:
    if name not in batch:
      raise KeyError(f"Dense methods need batch[{name!r}] (the correspondence grids of "
                     f"dense_ssl.data.views) to score their matcher; declare the views with "
                     f"a grid.")
  if batch[needed[0]].shape[1:3] != (grid, grid):
    raise ValueError(f"The correspondence grids are {batch[needed[0]].shape[1:3]} but the "
                     f"backbone map is {grid}x{grid}; the grids must use S = size // stride.")
  gt, valid = matchers.geometric(*(batch[k] for k in needed))
  return {"corr_acc": matchers.correspondence_accuracy(match, gt, valid, grid, tolerance=1),
          "corr_acc_exact": matchers.correspondence_accuracy(match, gt, valid, grid,
                                                             tolerance=0),
          "corr_acc_chance": matchers.chance_accuracy(gt, valid, grid, tolerance=1)}


@base.register("densecl")
class DenseCL(mocov2.TwoViewQueueMethod):
  """DenseCL: `DenseCLNeck`, a global and a dense queue, argmax matching on C5 features."""

  matcher: Matcher = staticmethod(argmax_matcher)
  queue_names = ("queue", "dense_queue")

  def __init__(self, config: Any, durations: Any = None):
    self.loss_lambda = float(config.method.loss_lambda)
    self.dense_chunk = int(config.method.dense_chunk)
    super().__init__(config, durations)

  @classmethod
  def check_config(cls, config: Any, num_devices: int) -> None:
    super().check_config(config, num_devices)
    lam = config.method.loss_lambda
    if not 0.0 <= lam <= 1.0:
      raise ValueError(f"config.method.loss_lambda={lam} must be in [0, 1].")

  def comparison_metrics(self, f_q: jax.Array, f_k: jax.Array, match: jax.Array,
                         batch: dict[str, jax.Array], grid: int) -> dict[str, jax.Array]:
    """Extra `train/` metrics scoring other matchers on the step's normalised C5 cells (none
    here; HoughCL scores DenseCL's argmax beside its own match)."""
    del f_q, f_k, match, batch, grid
    return {}

  def make_neck(self) -> nn.Module:
    return heads.DenseCLNeck(hidden=self.hidden, dim=self.dim,
                             cpu_kernels=getattr(self.backbone.module, "cpu_kernels", False))

  def loss(self, params: Any, state: base.MethodState, batch: dict[str, jax.Array],
           rng: jax.Array) -> base.LossOutput:
    (q_map, q_out), (k_map, k_out), stats = self.encode(params, state, batch, rng)
    loss, aux = head_loss(q_map, q_out, k_map, k_out, state.extra["queue"],
                          state.extra["dense_queue"], temperature=self.temperature,
                          loss_lambda=self.loss_lambda, matcher=self.matcher,
                          dense_chunk=self.dense_chunk)
    metrics = {"loss": loss, "loss_global": aux["loss_global"],
               "loss_dense": aux["loss_dense"], "std_q": families.embedding_std(aux["q"])}
    metrics.update(correspondence_metrics(aux["match"], batch, q_map.shape[1]))
    metrics.update(self.comparison_metrics(aux["f_q"], aux["f_k"], aux["match"], batch,
                                           q_map.shape[1]))
    extra = {"queue": aux["queue"], "dense_queue": aux["dense_queue"]}
    return loss, base.StepOutput(batch_stats=stats, extra=extra, metrics=metrics)


# ---------------------------------------------------------------------------------------------
# Parity with the reference vectors of the official code (shared/parity/README.md).
# ---------------------------------------------------------------------------------------------

DENSECL_LAYERS = ("global_fc1", "global_fc2", "dense_conv1", "dense_conv2")


def _moco_params(tree: dict) -> dict:
  """MoCo-v2's fc1/fc2 are DenseCL's global branch in these vectors (README, MoCo-v2 block)."""
  return {"fc1": tree["global_fc1"], "fc2": tree["global_fc2"]}


def _densecl_step(r: Any, chunk: int) -> Callable[..., dict[str, Any]]:
  """The whole DenseCL (+ MoCo-v2) step on the vectors' inputs, as one compiled function."""
  temperature, lam, momentum = (parity.scalar(r, k) for k in ("in/temperature", "in/loss_lambda",
                                                         "in/momentum"))
  hidden = r["in/neck_q/global_fc1/kernel"].shape[1]
  dim = r["in/neck_q/global_fc2/kernel"].shape[1]
  neck = heads.DenseCLNeck(hidden=hidden, dim=dim)
  moco_neck = heads.MocoNeck(hidden=hidden, dim=dim)

  def step(neck_q, neck_k, x_q, x_k, queue, dense_queue, moco_queue):
    # Momentum update first; the key forward uses the updated parameters (pitfall 4).
    neck_k = ema.update(neck_k, neck_q, momentum)
    k_out = neck.apply({"params": neck_k}, x_k)

    def objective(params, x, dense_chunk):
      q_out = neck.apply({"params": params}, x)
      loss, aux = head_loss(x, q_out, x_k, k_out, queue, dense_queue,
                                    temperature=temperature, loss_lambda=lam,
                                    dense_chunk=dense_chunk)
      return loss, (q_out, aux)

    grad_fn = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)
    out = {"neck_k": neck_k, "k_out": k_out, "plain": grad_fn(neck_q, x_q, 0),
           "chunked": grad_fn(neck_q, x_q, chunk)}
    if moco_queue is not None:
      k_embed = moco_neck.apply({"params": _moco_params(neck_k)}, x_k)

      def moco_objective(params, x):
        q_embed = moco_neck.apply({"params": params}, x)
        loss, aux = mocov2.head_loss(q_embed, k_embed, moco_queue, temperature)
        return loss, (q_embed, aux)

      out["k_embed"] = k_embed
      out["moco"] = jax.value_and_grad(moco_objective, argnums=(0, 1), has_aux=True)(
          _moco_params(neck_q), x_q)
    return out

  return jax.jit(step)


@parity.register("densecl", marker_key="in/q_backbone")
def check_parity(r: Any, ck: parity.Checker) -> None:
  """The DenseCL step (and MoCo-v2 block) of a `densecl_*.npz` file (shared/parity/README.md)."""
  temperature, lam = parity.scalar(r, "in/temperature"), parity.scalar(r, "in/loss_lambda")
  queue, dense_queue = parity.queue(r, "in/queue_global"), parity.queue(r, "in/queue_dense")
  moco_queue = parity.queue(r, "mocov2/in/queue") if "mocov2/in/queue" in r else None
  size = queue.buffer.shape[0]
  chunk = size // 3 + 1 if size > 2 else 1  # a chunk that does not divide K: padded last chunk
  out = _densecl_step(r, chunk)(
      parity.tree(r, "in/neck_q", DENSECL_LAYERS), parity.tree(r, "in/neck_k", DENSECL_LAYERS),
      parity.f32(r, "in/q_backbone"), parity.f32(r, "in/k_backbone"), queue, dense_queue, moco_queue)
  parity.check_tree(ck, "out/neck_k_updated", out["neck_k"], r, parity.MOMENTUM_TOL)

  (loss, (q_out, aux)), (g_neck, g_x) = out["plain"]
  for side, neck_out in (("q", q_out), ("k", out["k_out"])):
    for name in ("global", "dense_grid", "dense_pooled"):
      ck.rel(f"out/{side}_neck/{name}", neck_out[name], r[f"out/{side}_neck/{name}"], parity.LOSS_TOL)
  for name in ("q", "k", "q_grid", "k_grid", "q2", "k2", "k_grid_matched"):
    ck.rel(f"out/{name}", aux[name], r[f"out/{name}"], parity.LOSS_TOL)
  ck.rel("out/backbone_sim", aux["sim"], r["out/backbone_sim"], parity.LOSS_TOL)
  ck.exact("out/match_idx", aux["match"], r["out/match_idx"])
  for name, logits in (("global", aux["logits_global"]), ("dense", aux["logits_dense"])):
    ck.rel(f"out/{name}_logits", logits * temperature, r[f"out/{name}_logits"], parity.LOSS_TOL)
    ck.rel(f"out/{name}_logits_scaled", logits, r[f"out/{name}_logits_scaled"], parity.LOSS_TOL)
  weighted = {"global": (1 - lam) * aux["loss_global"], "dense": lam * aux["loss_dense"]}
  for name in ("global", "dense"):
    for ref in ("out", "f64/out"):
      ck.rel(f"{ref}/loss_{name}", aux[f"loss_{name}"], r[f"{ref}/loss_{name}"], parity.LOSS_TOL)
    ck.rel(f"out/loss_{name}_weighted", weighted[name], r[f"out/loss_{name}_weighted"],
           parity.LOSS_TOL)
  for ref in ("out", "f64/out"):
    ck.rel(f"{ref}/loss_total", loss, r[f"{ref}/loss_total"], parity.LOSS_TOL)
  ck.queue("out/queue_global", queue, aux["queue"], r["out/queue_global"],
           r["out/queue_global_ptr"], r["out/enqueued_global"])
  ck.queue("out/queue_dense", dense_queue, aux["dense_queue"], r["out/queue_dense"],
           r["out/queue_dense_ptr"], r["out/enqueued_dense"])
  for ref in ("grad", "f64/grad"):
    ck.rel(f"{ref}/q_backbone", g_x, r[f"{ref}/q_backbone"], parity.GRAD_TOL)
    parity.check_tree(ck, f"{ref}/neck_q", g_neck, r, parity.GRAD_TOL)

  # The memory-light dense loss (custom VJP over queue chunks) on the same step.
  (loss_c, (_, aux_c)), (g_neck_c, g_x_c) = out["chunked"]
  tag = f" [dense_chunk={chunk}]"
  ck.rel("out/loss_dense" + tag, aux_c["loss_dense"], r["out/loss_dense"], parity.LOSS_TOL)
  ck.rel("out/loss_total" + tag, loss_c, r["out/loss_total"], parity.LOSS_TOL)
  ck.rel("grad/q_backbone" + tag, g_x_c, r["grad/q_backbone"], parity.GRAD_TOL)
  for layer, leaves in g_neck_c.items():
    for leaf, value in leaves.items():
      key = f"grad/neck_q/{layer}/{leaf}"
      ck.rel(key + tag, value, r[key], parity.GRAD_TOL)

  if moco_queue is None:
    return
  (loss, (q_embed, aux)), (g_neck, g_x) = out["moco"]
  ck.rel("mocov2/out/q_neck", q_embed, r["mocov2/out/q_neck"], parity.LOSS_TOL)
  ck.rel("mocov2/out/k_neck", out["k_embed"], r["mocov2/out/k_neck"], parity.LOSS_TOL)
  ck.rel("mocov2/out/q", aux["q"], r["mocov2/out/q"], parity.LOSS_TOL)
  ck.rel("mocov2/out/k", aux["k"], r["mocov2/out/k"], parity.LOSS_TOL)
  ck.rel("mocov2/out/logits", aux["logits"] * temperature, r["mocov2/out/logits"], parity.LOSS_TOL)
  ck.rel("mocov2/out/logits_scaled", aux["logits"], r["mocov2/out/logits_scaled"], parity.LOSS_TOL)
  for ref in ("mocov2/out", "f64/mocov2/out"):
    ck.rel(f"{ref}/loss", loss, r[f"{ref}/loss"], parity.LOSS_TOL)
  ck.queue("mocov2/out/queue", moco_queue, aux["queue"], r["mocov2/out/queue"],
           r["mocov2/out/queue_ptr"], r["mocov2/out/enqueued"])
  for ref in ("mocov2/grad", "f64/mocov2/grad"):
    ck.rel(f"{ref}/q_backbone", g_x, r[f"{ref}/q_backbone"], parity.GRAD_TOL)
    parity.check_tree(ck, f"{ref}/neck_q", g_neck, r, parity.GRAD_TOL)
