"""Checks this implementation against reference vector files (shared/parity/*.md).

    python -m dense_ssl.parity tests/data/parity/*.npz

The format is detected from the keys: DenseCL (with its MoCo-v2 block), HoughCL, UniVIP,
DILEMMA, ConMIM. The stored inputs go through the real code path in float32 (the neck modules,
the head-level objectives, the matchers, the queues, the EMA), and every stored output is
compared with its documented tolerance. Prints one row per quantity with
rel = max|a - ref| / max|ref| (or the mismatch count for integers) and exits non-zero on any
failure. `check_file(path)` returns the rows. Needs neither TensorFlow nor ml_collections.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dense_ssl import ema, losses, matchers, queues
from dense_ssl.methods import densecl, dilemma, mocov2
from dense_ssl.models import heads

# Documented tolerances (parity/README.md for DenseCL/MoCo-v2, METHODS.md for the others).
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
QUEUE_TOL = 1e-5
MOMENTUM_TOL = 1e-6
RTOL, ATOL = 1e-5, 1e-5
PLAN_ATOL = 1e-6

DENSECL_LAYERS = ("global_fc1", "global_fc2", "dense_conv1", "dense_conv2")


@dataclasses.dataclass(frozen=True)
class Result:
  """One compared quantity: `error` is rel for floats, the mismatch count for integers."""
  file: str
  name: str
  error: float
  rule: str
  passed: bool

  def __str__(self) -> str:
    return f"  {'PASS' if self.passed else 'FAIL'}  {self.name:<50} {self.error:10.3g}  {self.rule}"


def rel_error(value: Any, ref: Any) -> float:
  """max|a - ref| / max|ref| over the array (absolute when ref is all zeros)."""
  value, ref = np.asarray(value, np.float64), np.asarray(ref, np.float64)
  if value.shape != ref.shape:
    return float("inf")
  diff = float(np.max(np.abs(value - ref))) if ref.size else 0.0
  scale = float(np.max(np.abs(ref))) if ref.size else 0.0
  return diff / scale if scale > 0 else diff


class _Checker:
  """Collects comparison rows for one file."""

  def __init__(self, path: str):
    self.path = path
    self.rows: list[Result] = []

  def _add(self, name: str, error: float, rule: str, passed: bool) -> None:
    self.rows.append(Result(self.path, name, float(error), rule, bool(passed)))

  def rel(self, name: str, value: Any, ref: Any, tol: float) -> None:
    err = rel_error(value, ref)
    self._add(name, err, f"rel <= {tol:g}", err <= tol)

  def close(self, name: str, value: Any, ref: Any, rtol: float = RTOL, atol: float = ATOL,
            rows: np.ndarray | None = None) -> None:
    """|a - ref| <= atol + rtol·|ref| everywhere (optionally only on the selected rows)."""
    value, ref = np.asarray(value, np.float64), np.asarray(ref, np.float64)
    ok = value.shape == ref.shape
    if ok:
      within = np.abs(value - ref) <= atol + rtol * np.abs(ref)
      ok = bool(np.all(within if rows is None else within[rows]))
    self._add(name, rel_error(value, ref), f"allclose(rtol={rtol:g}, atol={atol:g})", ok)

  def exact(self, name: str, value: Any, ref: Any, rows: np.ndarray | None = None) -> None:
    value, ref = np.asarray(value), np.asarray(ref)
    if value.shape != ref.shape:
      self._add(name, float("inf"), "exact (shape mismatch)", False)
      return
    wrong = value != ref
    if rows is not None:
      wrong = wrong[rows]
    self._add(name, int(np.sum(wrong)), "exact (mismatches)", not np.any(wrong))

  def queue(self, name: str, before: queues.Queue, after: queues.Queue, ref: Any,
            ref_ptr: Any, enqueued_ref: Any) -> None:
    """Queue contents, pointer, the rows written, and bit-identity of the rows not written."""
    old, new, ref = (np.asarray(x) for x in (before.buffer, after.buffer, ref))
    start, n = int(before.ptr), np.asarray(enqueued_ref).shape[0]
    self.rel(name, new, ref, QUEUE_TOL)
    self.exact(f"{name}_ptr", after.ptr, ref_ptr)
    self.rel(f"{name} rows written", new[start:start + n], enqueued_ref, QUEUE_TOL)
    untouched = np.ones(old.shape[0], bool)
    untouched[start:start + n] = False
    same = (np.array_equal(new[untouched], old[untouched])
            and np.array_equal(new[untouched], ref[untouched]))
    self._add(f"{name} rows not written", 0 if same else 1, "bit-identical", same)


def _f32(r: Any, key: str) -> jax.Array:
  return jnp.asarray(np.asarray(r[key]), jnp.float32)


def _scalar(r: Any, key: str) -> float:
  return float(np.asarray(r[key]))


def _queue(r: Any, key: str) -> queues.Queue:
  return queues.Queue(buffer=_f32(r, key), ptr=jnp.asarray(np.asarray(r[key + "_ptr"]), jnp.int32))


def _tree(r: Any, prefix: str, layers: Sequence[str]) -> dict[str, dict[str, jax.Array]]:
  return {l: {p: _f32(r, f"{prefix}/{l}/{p}") for p in ("kernel", "bias")} for l in layers}


def _check_tree(ck: _Checker, prefix: str, tree: dict, r: Any, tol: float,
                rename: Callable[[str], str] = lambda l: l) -> None:
  for layer, leaves in tree.items():
    for leaf, value in leaves.items():
      key = f"{prefix}/{rename(layer)}/{leaf}"
      ck.rel(key, value, r[key], tol)


# ---------------------------------------------------------------------------------------------
# DenseCL and its MoCo-v2 block (parity/README.md).
# ---------------------------------------------------------------------------------------------


def _moco_params(tree: dict) -> dict:
  """MoCo-v2's fc1/fc2 are DenseCL's global branch in these vectors (README, MoCo-v2 block)."""
  return {"fc1": tree["global_fc1"], "fc2": tree["global_fc2"]}


def _densecl_step(r: Any, chunk: int) -> Callable[..., dict[str, Any]]:
  """The whole DenseCL (+ MoCo-v2) step on the vectors' inputs, as one compiled function."""
  temperature, lam, momentum = (_scalar(r, k) for k in ("in/temperature", "in/loss_lambda",
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
      loss, aux = densecl.head_loss(x, q_out, x_k, k_out, queue, dense_queue,
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


def _check_densecl(r: Any, ck: _Checker) -> None:
  temperature, lam = _scalar(r, "in/temperature"), _scalar(r, "in/loss_lambda")
  queue, dense_queue = _queue(r, "in/queue_global"), _queue(r, "in/queue_dense")
  moco_queue = _queue(r, "mocov2/in/queue") if "mocov2/in/queue" in r else None
  size = queue.buffer.shape[0]
  chunk = size // 3 + 1 if size > 2 else 1  # a chunk that does not divide K: padded last chunk
  out = _densecl_step(r, chunk)(
      _tree(r, "in/neck_q", DENSECL_LAYERS), _tree(r, "in/neck_k", DENSECL_LAYERS),
      _f32(r, "in/q_backbone"), _f32(r, "in/k_backbone"), queue, dense_queue, moco_queue)
  _check_tree(ck, "out/neck_k_updated", out["neck_k"], r, MOMENTUM_TOL)

  (loss, (q_out, aux)), (g_neck, g_x) = out["plain"]
  for side, neck_out in (("q", q_out), ("k", out["k_out"])):
    for name in ("global", "dense_grid", "dense_pooled"):
      ck.rel(f"out/{side}_neck/{name}", neck_out[name], r[f"out/{side}_neck/{name}"], LOSS_TOL)
  for name in ("q", "k", "q_grid", "k_grid", "q2", "k2", "k_grid_matched"):
    ck.rel(f"out/{name}", aux[name], r[f"out/{name}"], LOSS_TOL)
  ck.rel("out/backbone_sim", aux["sim"], r["out/backbone_sim"], LOSS_TOL)
  ck.exact("out/match_idx", aux["match"], r["out/match_idx"])
  for name, logits in (("global", aux["logits_global"]), ("dense", aux["logits_dense"])):
    ck.rel(f"out/{name}_logits", logits * temperature, r[f"out/{name}_logits"], LOSS_TOL)
    ck.rel(f"out/{name}_logits_scaled", logits, r[f"out/{name}_logits_scaled"], LOSS_TOL)
  weighted = {"global": (1 - lam) * aux["loss_global"], "dense": lam * aux["loss_dense"]}
  for name in ("global", "dense"):
    for ref in ("out", "f64/out"):
      ck.rel(f"{ref}/loss_{name}", aux[f"loss_{name}"], r[f"{ref}/loss_{name}"], LOSS_TOL)
    ck.rel(f"out/loss_{name}_weighted", weighted[name], r[f"out/loss_{name}_weighted"],
           LOSS_TOL)
  for ref in ("out", "f64/out"):
    ck.rel(f"{ref}/loss_total", loss, r[f"{ref}/loss_total"], LOSS_TOL)
  ck.queue("out/queue_global", queue, aux["queue"], r["out/queue_global"],
           r["out/queue_global_ptr"], r["out/enqueued_global"])
  ck.queue("out/queue_dense", dense_queue, aux["dense_queue"], r["out/queue_dense"],
           r["out/queue_dense_ptr"], r["out/enqueued_dense"])
  for ref in ("grad", "f64/grad"):
    ck.rel(f"{ref}/q_backbone", g_x, r[f"{ref}/q_backbone"], GRAD_TOL)
    _check_tree(ck, f"{ref}/neck_q", g_neck, r, GRAD_TOL)

  # The memory-light dense loss (custom VJP over queue chunks) on the same step.
  (loss_c, (_, aux_c)), (g_neck_c, g_x_c) = out["chunked"]
  tag = f" [dense_chunk={chunk}]"
  ck.rel("out/loss_dense" + tag, aux_c["loss_dense"], r["out/loss_dense"], LOSS_TOL)
  ck.rel("out/loss_total" + tag, loss_c, r["out/loss_total"], LOSS_TOL)
  ck.rel("grad/q_backbone" + tag, g_x_c, r["grad/q_backbone"], GRAD_TOL)
  for layer, leaves in g_neck_c.items():
    for leaf, value in leaves.items():
      key = f"grad/neck_q/{layer}/{leaf}"
      ck.rel(key + tag, value, r[key], GRAD_TOL)

  if moco_queue is None:
    return
  (loss, (q_embed, aux)), (g_neck, g_x) = out["moco"]
  ck.rel("mocov2/out/q_neck", q_embed, r["mocov2/out/q_neck"], LOSS_TOL)
  ck.rel("mocov2/out/k_neck", out["k_embed"], r["mocov2/out/k_neck"], LOSS_TOL)
  ck.rel("mocov2/out/q", aux["q"], r["mocov2/out/q"], LOSS_TOL)
  ck.rel("mocov2/out/k", aux["k"], r["mocov2/out/k"], LOSS_TOL)
  ck.rel("mocov2/out/logits", aux["logits"] * temperature, r["mocov2/out/logits"], LOSS_TOL)
  ck.rel("mocov2/out/logits_scaled", aux["logits"], r["mocov2/out/logits_scaled"], LOSS_TOL)
  for ref in ("mocov2/out", "f64/mocov2/out"):
    ck.rel(f"{ref}/loss", loss, r[f"{ref}/loss"], LOSS_TOL)
  ck.queue("mocov2/out/queue", moco_queue, aux["queue"], r["mocov2/out/queue"],
           r["mocov2/out/queue_ptr"], r["mocov2/out/enqueued"])
  for ref in ("mocov2/grad", "f64/mocov2/grad"):
    ck.rel(f"{ref}/q_backbone", g_x, r[f"{ref}/q_backbone"], GRAD_TOL)
    _check_tree(ck, f"{ref}/neck_q", g_neck, r, GRAD_TOL)


# ---------------------------------------------------------------------------------------------
# METHODS.md: HoughCL, UniVIP, DILEMMA, ConMIM.
# ---------------------------------------------------------------------------------------------


def _check_houghcl(r: Any, ck: _Checker) -> None:
  grid, temperature = int(np.asarray(r["S"])), _scalar(r, "T")
  chunk = max(1, r["queue"].shape[0] // 3 + 1)

  @jax.jit
  def compute(f1, f2, q, k, queue):
    hough = matchers.hough_voting(f1, f2, grid)
    plain_match, _ = densecl.argmax_matcher(f1, f2, grid)
    loss, aux = densecl.dense_term(q, k, hough.match, queue, temperature)
    loss_chunked, _ = densecl.dense_term(q, k, hough.match, queue, temperature, chunk)
    loss_plain_match, _ = densecl.dense_term(q, k, plain_match, queue, temperature)
    return hough, plain_match, loss, aux, loss_chunked, loss_plain_match

  hough, plain_match, loss, aux, loss_chunked, loss_plain_match = compute(
      *(_f32(r, key) for key in ("f1", "f2", "q", "k", "queue")))
  ck.exact("offset_bin", matchers.offset_bins(grid), r["offset_bin"])
  for name in ("sim", "w", "hough", "conf"):
    ck.close(name, getattr(hough, name), r[name])
  clear = ~np.asarray(r["match_ambiguous"], bool)
  ck.exact("match", hough.match, r["match"], rows=clear)
  ck.exact("match_fallback", hough.fallback, r["match_fallback"], rows=clear)
  ck.exact("densecl_match", plain_match, r["densecl_match"])
  ck.close("logits", aux["logits"].reshape(r["logits"].shape), r["logits"])
  ck.close("ce", aux["ce"].reshape(r["ce"].shape), r["ce"])
  ck.rel("loss", loss, r["loss"], LOSS_TOL)
  ck.rel(f"loss [dense_chunk={chunk}]", loss_chunked, r["loss"], LOSS_TOL)
  ck.rel("loss_with_densecl_match", loss_plain_match, r["loss_with_densecl_match"], LOSS_TOL)


def _check_univip(r: Any, ck: _Checker) -> None:
  kwargs = dict(eps=_scalar(r, "eps"), n_iter=int(np.asarray(r["n_iter"])),
                floor=_scalar(r, "marginal_floor"))

  @jax.jit
  def compute(o, t, p1, p2, z1, z2, kernel, bias):
    # The scene-instance layer: Linear over the instance-major concatenation.
    instance = o.reshape(o.shape[0], -1) @ kernel + bias
    views = (p1, p2, z1, z2)
    return (instance, losses.univip_losses(o, t, *views, instance, **kwargs),
            losses.univip_losses(o, t, *views, instance, byol_form=True, **kwargs))

  instance, out, byol = compute(
      *(_f32(r, key) for key in ("o", "t", "p1", "p2", "z1", "z2", "W_si", "b_si")))
  ck.close("I", instance, r["I"])
  for name, key in (("cos_ot", "cos_ot"), ("cost", "cost"), ("b_raw", "b_raw"),
                    ("a_raw", "a_raw"), ("row", "row_marginal"), ("col", "col_marginal"),
                    ("per_image", "loss_instance_per_image")):
    ck.close(key, out[name], r[key])
  ck.close("plan", out["plan"], r["plan"], atol=PLAN_ATOL)
  for name in ("scene", "scene_instance", "instance"):
    ck.rel(f"loss_{name}", out[name], r[f"loss_{name}"], LOSS_TOL)
    ck.rel(f"loss_{name}_byol", byol[name], r[f"loss_{name}_byol"], LOSS_TOL)
  ck.rel("total", out["total"], r["total"], LOSS_TOL)
  ck.rel("total_byol", byol["total"], r["total_byol"], LOSS_TOL)


def _check_dilemma(r: Any, ck: _Checker) -> None:
  keep = dilemma.num_kept(r["patches"].shape[2], _scalar(r, "drop_rate"))
  ck.exact("keep", keep, r["keep"])
  temperature, lam = _scalar(r, "T"), _scalar(r, "lam")

  @jax.jit
  def compute(patches, pos_embed, ids, labels, wrong, kernel, bias, q1, q2, k1, k2):
    views = [dilemma.corrupt_tokens(patches[v], pos_embed, ids[v], labels[v], wrong[v])
             for v in range(2)]
    tokens, kept, input_pos = (jnp.stack(x) for x in zip(*views))
    logits = jnp.stack([dilemma.head_logits(tok, kernel, bias) for tok in tokens])
    total, aux = dilemma.total_loss(q1, q2, k1, k2, tuple(logits), tuple(labels),
                                    temperature=temperature, lam=lam)
    rule = jnp.stack([dilemma.wrong_positions(i, keep) for i in ids])
    return rule, tokens, kept, input_pos, logits, total, aux

  ints = [jnp.asarray(r[key], jnp.int32) for key in ("ids_shuffle", "labels", "wrong_pos")]
  rule, tokens, kept, input_pos, logits, total, aux = compute(
      _f32(r, "patches"), _f32(r, "pos_embed"), *ints,
      *(_f32(r, key) for key in ("W_head", "b_head", "q1", "q2", "k1", "k2")))
  ck.exact("wrong_pos (rule)", rule, r["wrong_pos"])
  ck.exact("kept_pos", kept, r["kept_pos"])
  ck.exact("input_pos", input_pos, r["input_pos"])
  ck.close("tokens_in", tokens, r["tokens_in"])
  ck.close("logits", logits, r["logits"])
  ck.rel("bce", aux["bce"], r["bce"], LOSS_TOL)
  ck.rel("bce_mean", jnp.mean(aux["bce"]), r["bce_mean"], LOSS_TOL)
  ck.rel("ctr_q1k2", aux["ctr_q1k2"], r["ctr_q1k2"], LOSS_TOL)
  ck.rel("ctr_q2k1", aux["ctr_q2k1"], r["ctr_q2k1"], LOSS_TOL)
  ck.rel("total", total, r["total"], LOSS_TOL)


def _check_conmim(r: Any, ck: _Checker) -> None:
  tau, base = _scalar(r, "tau"), _scalar(r, "ema_base")
  total_steps = int(np.asarray(r["ema_total_steps"]))

  @jax.jit
  def compute(s, t, mask, steps):
    return (losses.patch_info_nce(s, t, mask, tau),
            ema.momentum_at(steps, total_steps, base, "cosine"))

  (loss, aux), momentum = compute(_f32(r, "s"), _f32(r, "t"), jnp.asarray(r["mask"], bool),
                                  jnp.asarray(r["ema_steps"], jnp.int32))
  ck.close("logits", aux["logits"], r["logits"])
  ck.close("ce", aux["ce"], r["ce"])
  ck.rel("loss", loss, r["loss"], LOSS_TOL)
  ck.rel("ema_momentum", momentum, r["ema_momentum"], MOMENTUM_TOL)


# ---------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------

_FORMATS: dict[str, tuple[str, Callable[[Any, _Checker], None]]] = {
    # format: (a key only that format has, checker)
    "densecl": ("in/q_backbone", _check_densecl),
    "houghcl": ("offset_bin", _check_houghcl),
    "univip": ("W_si", _check_univip),
    "dilemma": ("ids_shuffle", _check_dilemma),
    "conmim": ("ema_momentum", _check_conmim),
}


def detect_format(keys: Sequence[str]) -> str:
  """The vector format of a file from its keys."""
  found = [name for name, (key, _) in _FORMATS.items() if key in keys]
  if len(found) != 1:
    raise ValueError(f"Cannot tell the parity format from keys {sorted(keys)[:8]}...; expected "
                     f"exactly one of {', '.join(k for k, _ in _FORMATS.values())}.")
  return found[0]


def check_file(path: str) -> list[Result]:
  """Runs the implementation on the file's inputs and compares every stored output."""
  with np.load(path) as r:
    data = {k: r[k] for k in r.files}
  ck = _Checker(str(path))
  # Full float32 matmuls: accelerators would otherwise round to TF32/bf16 passes.
  with jax.default_matmul_precision("highest"):
    _FORMATS[detect_format(list(data))][1](data, ck)
  return ck.rows


def main(argv: Sequence[str]) -> int:
  if not argv:
    print("usage: python -m dense_ssl.parity FILE.npz [FILE.npz ...]", file=sys.stderr)
    return 2
  failed = 0
  for path in argv:
    with np.load(path) as r:
      fmt = detect_format(r.files)
    rows = check_file(path)
    bad = [row for row in rows if not row.passed]
    failed += len(bad)
    print(f"== {path} ({fmt}): {len(rows) - len(bad)}/{len(rows)} passed")
    for row in rows:
      print(row)
  print("ALL PASS" if not failed else f"{failed} FAILED")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
