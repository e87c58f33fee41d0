"""DILEMMA (Sameni et al., 2022): detect tokens given a wrong positional embedding.

The definition is METHODS.md §3: the student (online) encoder sees a sparse view, K =
floor(L·(1 - r)) of its L patch tokens kept, a fraction p of them carrying another position's
embedding, and a per-token Linear head learns which ones (BCE); the momentum/teacher encoder
sees the full, uncorrupted view. Here are the pure functions (sampling the corruption, applying
it, the head logits, MoCo v3's total) with their parity check, sampling split from the rest so
the vectors can inject their stored draws, and the option every ViT host shares
(`config.method.dilemma`, see `Options`): `corruption` draws what the host passes to the ViT
(`keep_idx`, `pos_idx`), `Head` is the per-token classifier (online-only params
"dilemma_head"), `head_loss` the BCE with its position-detection accuracies.

Unlike the released code (METHODS.md: it drops the corruption before the encoder), the
student's ViT really gets the kept tokens with the wrong positions (`models.vit.ViT` applies
`keep_idx`/`pos_idx` after the patch embedding, exactly `corrupt_tokens`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dense_ssl import losses, parity
from dense_ssl.models import heads


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
  """The position each kept token gets when labelled wrong, (N, K): METHODS.md §3's rule.

  As in the official code they are not drawn independently: kept token k gets
  ids_shuffle[L-K+k], a dropped position whenever 2K <= L (the project's r = 0.75), and for
  K < L never the token's own position. With nothing dropped (K = L) that would be the
  identity; the official code then uses the reversed shuffle, and so do we (for odd L its
  middle token keeps its own position while labelled wrong, a quirk METHODS.md notes).
  """
  num_tokens = ids_shuffle.shape[1]
  if keep < num_tokens:
    return ids_shuffle[:, num_tokens - keep:]
  return ids_shuffle[:, ::-1]


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
# The option of the ViT hosts (MoCo v3, DINO, SimCLR): `config.method.dilemma`.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Options:
  """`config.method.dilemma`: `enabled`, `drop_rate` r (0.75), `probability` p of a wrong
  position per kept token (0.2), `lam` λ, the weight of the mean per-view BCE (1.0)."""
  enabled: bool = False
  drop_rate: float = 0.75
  probability: float = 0.2
  lam: float = 1.0


def options(config: Any) -> Options:
  """The method's DILEMMA options (disabled when `config.method` has no `dilemma` block)."""
  block = config.method.get("dilemma", None) if hasattr(config.method, "get") else None
  if block is None:
    return Options()
  values = dict(block.items()) if hasattr(block, "items") else dict(block)
  unknown = sorted(set(values) - {f.name for f in dataclasses.fields(Options)})
  if unknown:
    raise ValueError(f"config.method.dilemma has unknown keys {unknown}; valid: enabled, "
                     f"drop_rate, probability, lam.")
  return Options(enabled=bool(values.get("enabled", False)),
                 drop_rate=float(values.get("drop_rate", 0.75)),
                 probability=float(values.get("probability", 0.2)),
                 lam=float(values.get("lam", 1.0)))


def check_config(config: Any) -> None:
  """The DILEMMA options' ranges (called by every host's `check_config`)."""
  o = options(config)
  if not o.enabled:
    return
  if not 0.0 <= o.drop_rate < 1.0:
    raise ValueError(f"config.method.dilemma.drop_rate={o.drop_rate} must be in [0, 1).")
  if not 0.0 < o.probability < 1.0:
    raise ValueError(f"config.method.dilemma.probability={o.probability} must be in (0, 1).")
  if o.lam < 0:
    raise ValueError(f"config.method.dilemma.lam={o.lam} must be >= 0.")


def corruption(rng: jax.Array, batch: int, num_tokens: int, opts: Options
               ) -> dict[str, jax.Array]:
  """One view's draw as the ViT takes it: {"keep_idx", "pos_idx", "labels"}, each (N, K).

  keep_idx are the real positions of the kept tokens (shuffle order), pos_idx the positions
  whose embeddings they get (wrong where labels == 1), as `corrupt_tokens` computes them.
  """
  draw = sample_corruption(rng, batch, num_tokens, opts.drop_rate, opts.probability)
  keep = draw["labels"].shape[1]
  kept = draw["ids_shuffle"][:, :keep]
  pos = jnp.where(draw["labels"].astype(bool), draw["wrong_pos"], kept)
  return {"keep_idx": kept, "pos_idx": pos.astype(jnp.int32), "labels": draw["labels"]}


class Head(nn.Module):
  """The per-token Linear(D, 1) with bias, PyTorch's default init (DILEMMA's `dilemma_head`):
  patch tokens (N, K, D) -> logits (N, K), in float32."""

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    width = tokens.shape[-1]
    kernel = self.param("kernel", heads.torch_conv_kernel_init, (width, 1))
    bias = self.param("bias", heads.torch_bias_init(width), (1,))
    return head_logits(losses.at_least_f32(tokens), kernel, bias)


def head_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """BCE of one view's position detection and its metrics.

  Returns (bce, {"bce", "acc" (all kept tokens), "acc_wrong" (recall on the relabelled
  tokens), "acc_right" (on the others)}); predicting "right" everywhere scores acc = 1 - p.
  """
  labels = labels.astype(jnp.float32)
  bce = losses.bce_with_logits_mean(logits, labels)
  hit = ((logits > 0).astype(jnp.float32) == labels).astype(jnp.float32)
  wrong = jnp.sum(labels)
  right = jnp.sum(1.0 - labels)
  return bce, {"bce": bce, "acc": jnp.mean(hit),
               "acc_wrong": jnp.sum(hit * labels) / jnp.maximum(wrong, 1.0),
               "acc_right": jnp.sum(hit * (1.0 - labels)) / jnp.maximum(right, 1.0)}


def mean_metrics(per_view: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
  """The views' metrics averaged, prefixed "dilemma_" (logged as train/dilemma_acc, ...)."""
  return {f"dilemma_{k}": jnp.mean(jnp.stack([m[k] for m in per_view])) for k in per_view[0]}


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
