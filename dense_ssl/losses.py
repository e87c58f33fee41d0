"""Loss kernels: pure functions of arrays. Callers apply `stop_gradient` to their targets.

The bottom level of the codebase: this module imports nothing of dense_ssl (tested), so every
method, matcher and tool can use it. A method's own composition of these kernels (DenseCL's
head, UniVIP's three terms, DILEMMA's total, ConMIM's patch InfoNCE) lives in its method file.

Conventions: embeddings on the last axis; `l2_normalize` is torch's F.normalize (eps 1e-12);
cross-entropies are computed in at least float32 whatever the compute dtype of the model.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps), as torch.nn.functional.normalize (the references' convention)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def at_least_f32(x: jax.Array) -> jax.Array:
  """At least float32 (bfloat16 activations are upcast; float64 stays when x64 is on)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ---------------------------------------------------------------------------------------------
# MoCo / DenseCL: InfoNCE against a queue, positive in column 0.
# ---------------------------------------------------------------------------------------------


def info_nce_per_row(q: jax.Array, k: jax.Array, queue: jax.Array,
                     temperature: float) -> tuple[jax.Array, jax.Array]:
  """Per-row CE of logits [q·k, q·queueᵀ] / T with the positive in column 0.

  Args:
    q, k: (R, D) normalised queries and their positive keys (row r pairs with row r).
    queue: (K, D) normalised negatives.
    temperature: T.

  Returns (ce (R,), logits (R, 1+K) already divided by T).
  """
  q, k, queue = at_least_f32(q), at_least_f32(k), at_least_f32(queue)
  pos = jnp.sum(q * k, axis=-1, keepdims=True)
  logits = jnp.concatenate([pos, q @ queue.T], axis=1) / temperature
  labels = jnp.zeros(logits.shape[0], jnp.int32)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels), logits


def info_nce_queue(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float, *,
                   return_logits: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
  """MoCo's loss: mean over rows of CE([q·k, q·queueᵀ]/T, label 0).

  Materialises the (R, 1+K) logits; see `dense_info_nce` for the memory-light equivalent.
  Returns the loss, and the scaled logits when `return_logits`.
  """
  ce, logits = info_nce_per_row(q, k, queue, temperature)
  loss = jnp.mean(ce)
  return (loss, logits) if return_logits else loss


def _queue_chunks(queue: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """(K, D) -> (n, c, D) chunks plus a (n, c) validity mask; the last chunk is zero-padded."""
  size, dim = queue.shape
  chunk = size if chunk_size <= 0 else min(chunk_size, size)
  n = -(-size // chunk)
  padded = jnp.pad(queue, ((0, n * chunk - size), (0, 0)))
  valid = (jnp.arange(n * chunk) < size).reshape(n, chunk)
  return padded.reshape(n, chunk, dim), valid


def _chunk_logits(q, chunk, valid, temperature):
  logits = (q @ chunk.T) / temperature
  return jnp.where(valid[None, :], logits, -jnp.inf)


def _scan_queue(q, chunks, valid, temperature, start_max, start_sum, with_mean, online):
  """Σ_j exp(logit_j - m) per row over the queue, and Σ_j exp(logit_j - m)·queue_j if asked.

  `online` keeps m the running maximum (rescaling what was summed when it grows); otherwise m
  stays `start_max`, which must bound every logit, and the max pass over each chunk is skipped.
  """
  acc = jnp.zeros((q.shape[0], chunks.shape[-1] if with_mean else 0), q.dtype)

  def body(carry, xs):
    run_max, run_sum, acc = carry
    logits = _chunk_logits(q, *xs, temperature)
    new_max = jnp.maximum(run_max, logits.max(axis=1)) if online else run_max
    rescale = jnp.exp(run_max - new_max)
    weights = jnp.exp(logits - new_max[:, None])
    run_sum = run_sum * rescale + weights.sum(axis=1)
    if with_mean:
      acc = acc * rescale[:, None] + weights @ xs[0]
    return (new_max, run_sum, acc), None

  (run_max, run_sum, acc), _ = jax.lax.scan(body, (start_max, start_sum, acc), (chunks, valid))
  return run_max + jnp.log(run_sum), acc / run_sum[:, None]


def _dense_stats(q, k, queue, temperature, chunk_size, with_mean):
  """Positive logit, log-sum-exp over [pos, queue] per row, and (`with_mean`) the softmax-
  weighted mean of the queue rows, one queue chunk at a time."""
  pos = jnp.sum(q * k, axis=-1) / temperature
  chunks, valid = _queue_chunks(queue, chunk_size)
  scan = functools.partial(_scan_queue, q, chunks, valid, temperature, with_mean=with_mean)
  # |q·x| <= |q|·max|x| bounds every logit of a row, so exp never overflows with that shift and
  # the per-chunk max pass is not needed. For unit-norm rows the bound is within 2/T of the
  # positive logit; when it is so far above it that the shifted sum could fall to where float32
  # loses the small terms (unnormalised inputs, tiny T), the running-max scan is used instead.
  bound = jnp.linalg.norm(q, axis=-1) * jnp.sqrt(jnp.max(jnp.sum(queue * queue, axis=-1)))
  shift = jnp.maximum(bound / temperature, pos)
  # A row's sum is at least its positive's term exp(pos - shift); while that stays above
  # K·tiny/eps, what float32 flushes to zero cannot move the sum. Checked before the scan, so
  # only one of the two scans runs (and holds chunk buffers).
  info = jnp.finfo(q.dtype)
  margin = math.log(info.eps / (queue.shape[0] * info.tiny))
  lse, mean = jax.lax.cond(jnp.all(shift - pos <= margin),
                           lambda: scan(shift, jnp.exp(pos - shift), online=False),
                           lambda: scan(pos, jnp.ones_like(pos), online=True))
  return pos, lse, mean


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _dense_info_nce(q, k, queue, temperature, chunk_size):
  pos, lse, _ = _dense_stats(q, k, queue, temperature, chunk_size, with_mean=False)
  return jnp.mean(lse - pos)


def _dense_info_nce_fwd(q, k, queue, temperature, chunk_size):
  # With symbolic zeros each array arrives as CustomVJPPrimal(value, perturbed). The gradient
  # with respect to q is a softmax-weighted mean of the keys, summed in the same pass as the
  # log-sum-exp; only a queue that needs a gradient costs a second pass in the backward.
  keep_queue = queue.perturbed
  q, k, queue = q.value, k.value, queue.value
  pos, lse, mean = _dense_stats(q, k, queue, temperature, chunk_size, with_mean=True)
  return jnp.mean(lse - pos), (q, k, queue if keep_queue else None, pos, lse, mean)


def _dense_info_nce_bwd(temperature, chunk_size, residuals, g):
  # d/dlogit_j of (lse - pos) is softmax_j - [j == 0], and logit_j = q·key_j / T.
  q, k, queue, pos, lse, mean = residuals
  scale = g / (q.shape[0] * temperature)
  pos_coef = (jnp.exp(pos - lse) - 1.0) * scale
  dq = scale * mean + pos_coef[:, None] * k
  if queue is None:
    return dq, pos_coef[:, None] * q, None
  chunks, valid = _queue_chunks(queue, chunk_size)

  def body(_, xs):
    probs = jnp.exp(_chunk_logits(q, *xs, temperature) - lse[:, None]) * scale
    return None, probs.T @ q

  _, dqueue = jax.lax.scan(body, None, (chunks, valid))
  return dq, pos_coef[:, None] * q, dqueue.reshape(-1, queue.shape[1])[:queue.shape[0]]


_dense_info_nce.defvjp(_dense_info_nce_fwd, _dense_info_nce_bwd, symbolic_zeros=True)


def dense_info_nce(q: jax.Array, k: jax.Array, queue: jax.Array, temperature: float,
                   chunk_size: int) -> jax.Array:
  """`info_nce_queue(q, k, queue, T)` without materialising the (R, K) logits.

  For DenseCL's R = N·S² rows against a 65536-row queue the logits would dominate memory
  (and, on CPU, time). The queue is visited in chunks of `chunk_size` rows with a log-sum-exp
  shifted by a bound on the logits; the same pass sums the softmax-weighted queue rows, which
  is the gradient with respect to q, so a step that differentiates q (and k) reads the queue
  once and does the plain formula's two matmuls with nothing recomputed. A gradient with
  respect to the queue costs one more pass in the backward. K need not be a multiple of `chunk_size` (the last
  chunk is padded and masked); `chunk_size <= 0` means one chunk. Same value and gradients as
  the plain formula, to float rounding.
  """
  if q.ndim != 2 or q.shape != k.shape or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
    raise ValueError(f"dense_info_nce needs q, k of shape (R, D) and a queue (K, D); got "
                     f"{q.shape}, {k.shape}, {queue.shape}.")
  return _dense_info_nce(at_least_f32(q), at_least_f32(k), at_least_f32(queue),
                         float(temperature), int(chunk_size))


# ---------------------------------------------------------------------------------------------
# BYOL / UniVIP: negative cosine terms.
# ---------------------------------------------------------------------------------------------


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """cos(a, b) along the last axis, with F.normalize's epsilon."""
  return jnp.sum(l2_normalize(at_least_f32(a)) * l2_normalize(at_least_f32(b)), axis=-1)


def negative_cosine(p: jax.Array, z: jax.Array) -> jax.Array:
  """UniVIP's paper form: mean over the batch of -cos(p, z)."""
  return -jnp.mean(cosine_similarity(p, z))


def byol_regression(p: jax.Array, z: jax.Array) -> jax.Array:
  """BYOL's form: mean over the batch of ||l2n(p) - l2n(z)||² = 2 - 2·cos(p, z)."""
  return jnp.mean(2.0 - 2.0 * cosine_similarity(p, z))


# ---------------------------------------------------------------------------------------------
# MoCo-v3 / DILEMMA.
# ---------------------------------------------------------------------------------------------


def moco_v3_contrastive(q: jax.Array, k: jax.Array, temperature: float) -> jax.Array:
  """MoCo-v3's ctr(q, k) = CE(l2n(q)·l2n(k)ᵀ / T, arange(N)) · 2T.

  `k` is the whole global batch of keys in the same order as `q` (under jit the batch is one
  global array, so this is the all-gathered form with labels offset by rank·N).
  """
  logits = l2_normalize(at_least_f32(q)) @ l2_normalize(at_least_f32(k)).T / temperature
  labels = jnp.arange(logits.shape[0], dtype=jnp.int32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.mean(ce) * (2.0 * temperature)


def bce_with_logits_mean(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean binary cross-entropy with logits over all entries (torch's BCEWithLogitsLoss)."""
  logits = at_least_f32(logits)
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(logits.dtype)))


# ---------------------------------------------------------------------------------------------
# SimCLR.
# ---------------------------------------------------------------------------------------------


def nt_xent(z1: jax.Array, z2: jax.Array, temperature: float) -> jax.Array:
  """SimCLR's NT-Xent as its official `add_contrastive_loss`: loss_a + loss_b.

  Row i of view 1 has the positive z2[i] and the 2N - 2 negatives z1[j], z2[j] (j != i), and
  symmetrically; each direction is the mean CE over its N rows, and the two are summed (so
  the value is twice the mean over all 2N rows). `z1`, `z2` (N, D) are the whole global batch:
  under jit that is every device's and process's examples (the official code all-gathers).
  """
  h1, h2 = l2_normalize(at_least_f32(z1)), l2_normalize(at_least_f32(z2))
  n = h1.shape[0]
  self_mask = jnp.eye(n, dtype=bool)
  same = lambda a: jnp.where(self_mask, -jnp.inf, a @ a.T / temperature)
  cross = h1 @ h2.T / temperature
  labels = jnp.arange(n, dtype=jnp.int32)
  ce = optax.softmax_cross_entropy_with_integer_labels
  loss_a = jnp.mean(ce(jnp.concatenate([cross, same(h1)], axis=1), labels))
  loss_b = jnp.mean(ce(jnp.concatenate([cross.T, same(h2)], axis=1), labels))
  return loss_a + loss_b
