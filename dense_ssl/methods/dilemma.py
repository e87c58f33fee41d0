"""DILEMMA (Sameni et al., 2022): detect tokens given a wrong positional embedding.

Pure functions only for now (METHODS.md §3): sampling the corruption, applying it to the patch
tokens, the per-token head and the total loss, and their parity check. Sampling is split from
everything else so the parity vectors can inject their stored draws. The option on the ViT
methods built on them comes with those methods.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dense_ssl import losses, parity


def num_kept(num_tokens: int, drop_rate: float) -> int:
  """Tokens kept after dropping: floor(L·(1 - r)), as the official `int(L*(1-r))`."""
  if not 0.0 <= drop_rate < 1.0:
    raise ValueError(f"Token drop rate must be in [0, 1), got {drop_rate}.")
  return int(num_tokens * (1.0 - drop_rate))


def sample_corruption(rng: jax.Array, batch: int, num_tokens: int, drop_rate: float,
                      probability: float) -> dict[str, jax.Array]:
  """Draws one view's corruption: {"ids_shuffle" (N, L), "labels" (N, K), "wrong_pos" (N, K)}.

  ids_shuffle is a random permutation per image (argsort of uniform noise); labels are
  Bernoulli(`probability`), 1 = the token gets a wrong position; see `wrong_positions`.
  """
  keep = num_kept(num_tokens, drop_rate)
  rng_perm, rng_label = jax.random.split(rng)
  ids_shuffle = jnp.argsort(jax.random.uniform(rng_perm, (batch, num_tokens)), axis=1)
  ids_shuffle = ids_shuffle.astype(jnp.int32)
  labels = jax.random.bernoulli(rng_label, probability, (batch, keep)).astype(jnp.int32)
  return {"ids_shuffle": ids_shuffle, "labels": labels,
          "wrong_pos": wrong_positions(ids_shuffle, keep)}


def wrong_positions(ids_shuffle: jax.Array, keep: int) -> jax.Array:
  """The position each kept token gets when labelled wrong, (N, K).

  As in the official code they are not drawn independently: kept token k gets
  ids_shuffle[L-K+k], a dropped position whenever 2K <= L. With less dropping that rule would
  hand kept tokens their own or another kept position; we then use the reversed shuffle, the
  official choice for K = L (for odd L its middle token still keeps its own position).
  """
  num_tokens = ids_shuffle.shape[1]
  if 2 * keep <= num_tokens:
    return ids_shuffle[:, num_tokens - keep:]
  return ids_shuffle[:, ::-1][:, :keep]


def corrupt_tokens(patches: jax.Array, pos_embed: jax.Array, ids_shuffle: jax.Array,
                   labels: jax.Array, wrong_pos: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Keeps K tokens and gives the labelled ones a wrong positional embedding.

  Args:
    patches: (N, L, D) patch embeddings without positions.
    pos_embed: (L, D) positional embeddings (the cls token gets none).
    ids_shuffle: (N, L) permutation; its first K entries are the kept positions, in order.
    labels: (N, K) {0, 1}; 1 = wrong position.
    wrong_pos: (N, K) the position used where the label is 1.

  Returns (tokens (N, K, D), kept (N, K), input_pos (N, K)): content from the real position,
  positional embedding from `input_pos`.
  """
  keep = labels.shape[1]
  kept = ids_shuffle[:, :keep]
  input_pos = jnp.where(labels.astype(bool), wrong_pos, kept).astype(jnp.int32)
  content = jnp.take_along_axis(patches, kept[:, :, None], axis=1)
  return content + jnp.take(pos_embed, input_pos, axis=0), kept.astype(jnp.int32), input_pos


def head_logits(tokens: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """The per-token Linear(D, 1) head on the encoder's patch outputs: (N, K, D) -> (N, K)."""
  return (tokens @ kernel + bias)[..., 0]


def total_loss(q1: jax.Array, q2: jax.Array, k1: jax.Array, k2: jax.Array,
               logits: tuple[jax.Array, jax.Array], labels: tuple[jax.Array, jax.Array], *,
               temperature: float, lam: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ctr(q1, k2) + ctr(q2, k1) + λ·(bce_view1 + bce_view2)/2 (MoCo-v3 ctr with its 2T factor).

  q are the online outputs after the predictor, k the momentum outputs (the caller stops their
  gradient); `logits`/`labels` are per view, (N, K) each.
  """
  ctr_12 = losses.moco_v3_contrastive(q1, k2, temperature)
  ctr_21 = losses.moco_v3_contrastive(q2, k1, temperature)
  bce = jnp.stack([losses.bce_with_logits_mean(l, y) for l, y in zip(logits, labels)])
  total = ctr_12 + ctr_21 + lam * jnp.mean(bce)
  return total, {"ctr_q1k2": ctr_12, "ctr_q2k1": ctr_21, "bce": bce}


# ---------------------------------------------------------------------------------------------
# Parity with the reference vectors (METHODS.md §3).
# ---------------------------------------------------------------------------------------------


@parity.register("dilemma", marker_key="ids_shuffle")
def check_parity(r: Any, ck: parity.Checker) -> None:
  """DILEMMA's corruption, head and total loss (`dilemma_case*.npz`, METHODS.md §3)."""
  keep = num_kept(r["patches"].shape[2], parity.scalar(r, "drop_rate"))
  ck.exact("keep", keep, r["keep"])
  temperature, lam = parity.scalar(r, "T"), parity.scalar(r, "lam")

  @jax.jit
  def compute(patches, pos_embed, ids, labels, wrong, kernel, bias, q1, q2, k1, k2):
    views = [corrupt_tokens(patches[v], pos_embed, ids[v], labels[v], wrong[v])
             for v in range(2)]
    tokens, kept, input_pos = (jnp.stack(x) for x in zip(*views))
    logits = jnp.stack([head_logits(tok, kernel, bias) for tok in tokens])
    total, aux = total_loss(q1, q2, k1, k2, tuple(logits), tuple(labels),
                                    temperature=temperature, lam=lam)
    rule = jnp.stack([wrong_positions(i, keep) for i in ids])
    return rule, tokens, kept, input_pos, logits, total, aux

  ints = [jnp.asarray(r[key], jnp.int32) for key in ("ids_shuffle", "labels", "wrong_pos")]
  rule, tokens, kept, input_pos, logits, total, aux = compute(
      parity.f32(r, "patches"), parity.f32(r, "pos_embed"), *ints,
      *(parity.f32(r, key) for key in ("W_head", "b_head", "q1", "q2", "k1", "k2")))
  ck.exact("wrong_pos (rule)", rule, r["wrong_pos"])
  ck.exact("kept_pos", kept, r["kept_pos"])
  ck.exact("input_pos", input_pos, r["input_pos"])
  ck.close("tokens_in", tokens, r["tokens_in"])
  ck.close("logits", logits, r["logits"])
  ck.rel("bce", aux["bce"], r["bce"], parity.LOSS_TOL)
  ck.rel("bce_mean", jnp.mean(aux["bce"]), r["bce_mean"], parity.LOSS_TOL)
  ck.rel("ctr_q1k2", aux["ctr_q1k2"], r["ctr_q1k2"], parity.LOSS_TOL)
  ck.rel("ctr_q2k1", aux["ctr_q2k1"], r["ctr_q2k1"], parity.LOSS_TOL)
  ck.rel("total", total, r["total"], parity.LOSS_TOL)
