"""Tests for dense_ssl.parity: the shipped vectors, plus self-generated cases of other sizes.

The generated DenseCL (with MoCo-v2 block) and HoughCL cases come from an independent float64
numpy reference written here (forward and hand-derived backward), with sizes unlike the shipped
ones (S = 5, other N, C, H, D, K, pointer wrap-around elsewhere), to show nothing in the
implementation depends on the shipped sizes.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_ssl import parity, queues
from dense_ssl.methods import densecl, houghcl, mocov2
from dense_ssl.models import heads

DATA = pathlib.Path(__file__).parent / "data" / "parity"
SHIPPED = sorted(DATA.glob("*.npz"))
LAYERS = ("global_fc1", "global_fc2", "dense_conv1", "dense_conv2")


def _l2n(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _l2n_backward(v, dy):
  """Gradient of v / ||v|| given the output gradient dy (norms are far above the epsilon)."""
  norm = np.linalg.norm(v, axis=-1, keepdims=True)
  y = v / norm
  return (dy - y * np.sum(y * dy, axis=-1, keepdims=True)) / norm


def _ce_with_grad(pos, neg, t):
  """Mean CE with the positive in column 0, and d loss / d (pos, neg) of the unscaled logits."""
  logits = np.concatenate([pos[:, None], neg], 1) / t
  mx = logits.max(1, keepdims=True)
  p = np.exp(logits - mx)
  p /= p.sum(1, keepdims=True)
  loss = np.mean(np.log(np.exp(logits - mx).sum(1)) + mx[:, 0] - logits[:, 0])
  d = p.copy()
  d[:, 0] -= 1.0
  d /= logits.shape[0] * t
  return loss, logits, d[:, 0], d[:, 1:]


def _enqueue(queue, ptr, keys):
  out = queue.copy()
  out[ptr:ptr + len(keys)] = keys
  return out, np.int32((ptr + len(keys)) % len(queue))


def _densecl_case(path, *, n=3, c=24, s=5, h=20, d=12, k=18, ptrs=(15, 6, 0), t=0.2, lam=0.4,
                  m=0.99, seed=7):
  """Writes a complete DenseCL + MoCo-v2 vector file (README.md format) from numpy float64."""
  rng = np.random.default_rng(seed)
  f32 = lambda *shape: rng.normal(size=shape).astype(np.float32)
  p = s * s
  x_q, x_k = f32(n, s, s, c), f32(n, s, s, c)
  shapes = {"global_fc1": ((c, h), (h,)), "global_fc2": ((h, d), (d,)),
            "dense_conv1": ((1, 1, c, h), (h,)), "dense_conv2": ((1, 1, h, d), (d,))}
  neck_q = {l: {"kernel": (f32(*ks) * np.sqrt(2.0 / np.prod(ks[:-1]))).astype(np.float32),
                "bias": (0.1 * f32(*bs)).astype(np.float32)} for l, (ks, bs) in shapes.items()}
  neck_k = {l: {a: (v + 0.01 * f32(*v.shape)).astype(np.float32) for a, v in leaves.items()}
            for l, leaves in neck_q.items()}
  queue_g, queue_d, queue_m = (_l2n(f32(k, d)).astype(np.float32) for _ in range(3))
  r = {"in/q_backbone": x_q, "in/k_backbone": x_k, "in/queue_global": queue_g,
       "in/queue_dense": queue_d, "mocov2/in/queue": queue_m,
       "in/queue_global_ptr": np.int32(ptrs[0]), "in/queue_dense_ptr": np.int32(ptrs[1]),
       "mocov2/in/queue_ptr": np.int32(ptrs[2]), "in/temperature": np.float64(t),
       "in/loss_lambda": np.float64(lam), "in/momentum": np.float64(m)}
  for l in LAYERS:
    for a in ("kernel", "bias"):
      r[f"in/neck_q/{l}/{a}"], r[f"in/neck_k/{l}/{a}"] = neck_q[l][a], neck_k[l][a]
  f64 = lambda tree: {l: {a: v.astype(np.float64) for a, v in lv.items()} for l, lv in tree.items()}
  pq = f64(neck_q)
  pk = {l: {a: m * f64(neck_k)[l][a] + (1 - m) * pq[l][a] for a in lv} for l, lv in pq.items()}
  for l in LAYERS:
    for a in ("kernel", "bias"):
      r[f"out/neck_k_updated/{l}/{a}"] = pk[l][a]

  def neck(params, x):
    flat = x.astype(np.float64).reshape(n, p, c)
    avg = flat.mean(1)
    h1 = avg @ params["global_fc1"]["kernel"] + params["global_fc1"]["bias"]
    g = np.maximum(h1, 0) @ params["global_fc2"]["kernel"] + params["global_fc2"]["bias"]
    u = flat @ params["dense_conv1"]["kernel"][0, 0] + params["dense_conv1"]["bias"]
    grid = np.maximum(u, 0) @ params["dense_conv2"]["kernel"][0, 0] + params["dense_conv2"]["bias"]
    return dict(flat=flat, avg=avg, h1=h1, g=g, u=u, grid=grid, pooled=grid.mean(1))

  fq, fk = neck(pq, x_q), neck(pk, x_k)
  for side, out in (("q", fq), ("k", fk)):
    r[f"out/{side}_neck/global"] = out["g"]
    r[f"out/{side}_neck/dense_grid"] = out["grid"]
    r[f"out/{side}_neck/dense_pooled"] = out["pooled"]
  q, kk = _l2n(fq["g"]), _l2n(fk["g"])
  qg, kg = _l2n(fq["grid"]), _l2n(fk["grid"])
  r.update({"out/q": q, "out/k": kk, "out/q_grid": qg, "out/k_grid": kg,
            "out/q2": _l2n(fq["pooled"]), "out/k2": _l2n(fk["pooled"])})
  sim = np.einsum("nic,njc->nij", _l2n(fq["flat"]), _l2n(fk["flat"]))
  top2 = np.sort(sim, -1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0]).min() > 1e-4, "pick another seed: near-tie in argmax"
  idx = sim.argmax(-1).astype(np.int32)
  kmatch = np.take_along_axis(kg, idx[..., None], 1)
  r.update({"out/backbone_sim": sim, "out/match_idx": idx, "out/k_grid_matched": kmatch})

  loss_g, lg, dpos_g, dneg_g = _ce_with_grad(np.sum(q * kk, 1), q @ queue_g.T, t)
  rows_q, rows_k = qg.reshape(-1, d), kmatch.reshape(-1, d)
  loss_d, ld, dpos_d, dneg_d = _ce_with_grad(np.sum(rows_q * rows_k, 1), rows_q @ queue_d.T, t)
  total = (1 - lam) * loss_g + lam * loss_d
  r.update({"out/global_logits": lg * t, "out/global_logits_scaled": lg,
            "out/dense_logits": ld * t, "out/dense_logits_scaled": ld,
            "out/loss_global_weighted": (1 - lam) * loss_g,
            "out/loss_dense_weighted": lam * loss_d})
  for prefix in ("out", "f64/out"):
    r.update({f"{prefix}/loss_global": loss_g, f"{prefix}/loss_dense": loss_d,
              f"{prefix}/loss_total": total})
  r["out/queue_global"], r["out/queue_global_ptr"] = _enqueue(queue_g, ptrs[0], kk)
  r["out/queue_dense"], r["out/queue_dense_ptr"] = _enqueue(queue_d, ptrs[1], r["out/k2"])
  r["out/enqueued_global"], r["out/enqueued_dense"] = kk, r["out/k2"]

  def backward(params, out, d_g, d_grid):
    """Gradients of the neck parameters and of the backbone map, given d/d(g) and d/d(grid)."""
    grads = {}
    r1 = np.maximum(out["h1"], 0)
    grads["global_fc2"] = {"kernel": r1.T @ d_g, "bias": d_g.sum(0)}
    dh1 = (d_g @ params["global_fc2"]["kernel"].T) * (out["h1"] > 0)
    grads["global_fc1"] = {"kernel": out["avg"].T @ dh1, "bias": dh1.sum(0)}
    dx = np.repeat((dh1 @ params["global_fc1"]["kernel"].T)[:, None] / p, p, axis=1)
    if d_grid is not None:
      ru = np.maximum(out["u"], 0)
      grads["dense_conv2"] = {"kernel": np.einsum("nph,npd->hd", ru, d_grid)[None, None],
                              "bias": d_grid.sum((0, 1))}
      du = (d_grid @ params["dense_conv2"]["kernel"][0, 0].T) * (out["u"] > 0)
      grads["dense_conv1"] = {"kernel": np.einsum("npc,nph->ch", out["flat"], du)[None, None],
                              "bias": du.sum((0, 1))}
      dx = dx + du @ params["dense_conv1"]["kernel"][0, 0].T
    return grads, dx.reshape(n, s, s, c)

  d_q = (1 - lam) * (dpos_g[:, None] * kk + dneg_g @ queue_g)
  d_rows = lam * (dpos_d[:, None] * rows_k + dneg_d @ queue_d)
  grads, dx = backward(pq, fq, _l2n_backward(fq["g"], d_q),
                       _l2n_backward(fq["grid"], d_rows.reshape(n, p, d)))
  for prefix in ("grad", "f64/grad"):
    r[f"{prefix}/q_backbone"] = dx
    for l in LAYERS:
      for a in ("kernel", "bias"):
        r[f"{prefix}/neck_q/{l}/{a}"] = grads[l][a]

  # MoCo-v2 block: fc1/fc2 = the global branch, its own queue.
  loss_m, lm, dpos_m, dneg_m = _ce_with_grad(np.sum(q * kk, 1), q @ queue_m.T, t)
  r.update({"mocov2/out/q_neck": fq["g"], "mocov2/out/k_neck": fk["g"], "mocov2/out/q": q,
            "mocov2/out/k": kk, "mocov2/out/logits": lm * t, "mocov2/out/logits_scaled": lm,
            "mocov2/out/loss": loss_m, "f64/mocov2/out/loss": loss_m,
            "mocov2/out/enqueued": kk})
  r["mocov2/out/queue"], r["mocov2/out/queue_ptr"] = _enqueue(queue_m, ptrs[2], kk)
  grads_m, dx_m = backward(pq, fq, _l2n_backward(fq["g"], dpos_m[:, None] * kk + dneg_m @ queue_m),
                           None)
  for prefix in ("mocov2/grad", "f64/mocov2/grad"):
    r[f"{prefix}/q_backbone"] = dx_m
    for l, name in (("global_fc1", "fc1"), ("global_fc2", "fc2")):
      for a in ("kernel", "bias"):
        r[f"{prefix}/neck_q/{name}/{a}"] = grads_m[l][a]
  np.savez(path, **r)


def _houghcl_case(path, *, n=3, s=5, c=20, d=12, k=40, t=0.2, seed=11):
  """Writes a HoughCL vector file (METHODS.md §1 format) from numpy float64."""
  rng = np.random.default_rng(seed)
  p, bins = s * s, (2 * s - 1) ** 2
  f1, f2 = _l2n(rng.normal(size=(n, p, c))), rng.normal(size=(n, p, c))
  # The last image: keys share a strong direction and some queries oppose it -> fallback rows.
  f2[-1, :, 0] = np.abs(f2[-1, :, 0]) + 3.0
  f2 = _l2n(f2)
  for i in (0, 7, 18):
    f1[-1, i] = _l2n(-np.eye(c)[0] + 0.05 * rng.normal(size=c))
  q, kk, queue = _l2n(rng.normal(size=(n, p, d))), _l2n(rng.normal(size=(n, p, d))), \
      _l2n(rng.normal(size=(k, d)))
  sim = np.einsum("nic,njc->nij", f1, f2)
  w = np.maximum(sim, 0)
  yi, xi = np.divmod(np.arange(p), s)
  offset_bin = ((yi[None] - yi[:, None] + s - 1) * (2 * s - 1)
                + xi[None] - xi[:, None] + s - 1).astype(np.int32)
  hough = np.zeros((n, bins))
  for b in range(n):
    np.add.at(hough[b], offset_bin, w[b])
  conf = w * hough[:, offset_bin]
  fallback = conf.max(-1) == 0
  densecl_match = sim.argmax(-1).astype(np.int32)
  match = np.where(fallback, densecl_match, conf.argmax(-1)).astype(np.int32)
  top2 = np.sort(conf, -1)[..., -2:]
  ambiguous = ~fallback & (top2[..., 1] - top2[..., 0] < 1e-4 * top2[..., 1])
  assert fallback[-1].sum() >= 2 and not fallback[:-1].any()

  def dense_loss(idx):
    km = np.take_along_axis(kk, idx[..., None], 1)
    logits = np.concatenate([np.sum(q * km, -1, keepdims=True), q @ queue.T], -1) / t
    mx = logits.max(-1, keepdims=True)
    ce = np.log(np.exp(logits - mx).sum(-1)) + mx[..., 0] - logits[..., 0]
    return logits, ce, ce.mean()

  logits, ce, loss = dense_loss(match)
  np.savez(path, S=np.int32(s), T=np.float64(t), f1=f1, f2=f2, q=q, k=kk, queue=queue, sim=sim,
           w=w, offset_bin=offset_bin, hough=hough, conf=conf, match=match,
           match_fallback=fallback, match_ambiguous=ambiguous, densecl_match=densecl_match,
           logits=logits, ce=ce, loss=loss, loss_with_densecl_match=dense_loss(densecl_match)[2],
           case=np.int32(2), seed=np.int64(seed))


def _houghcl_v2_case(path, *, n=4, s=5, c=18, power=3.0, side=3, kappa=3.0, mirror=True,
                     seed=5):
  """Writes a HoughCL revision-2 file (METHODS.md §1b keys) from a float64 numpy reference:
  votes accumulated pair by pair (np.add.at), the 2-D Gaussian applied as a padded sum of
  shifted copies."""
  rng = np.random.default_rng(seed)
  p, b = s * s, 2 * s - 1
  # Raw post-ReLU cells with a shared per-position component (what centring removes).
  pos = rng.normal(size=(1, p, c)) * 2.0
  f1 = np.maximum(rng.normal(size=(n, p, c)) + pos, 0)
  f2 = np.maximum(rng.normal(size=(n, p, c)) + pos, 0)
  h1, h2 = _l2n(f1), _l2n(f2)
  mu = 0.5 * (h1.mean(0) + h2.mean(0))
  g1, g2 = _l2n(h1 - mu), _l2n(h2 - mu)
  sim = np.einsum("nic,njc->nij", g1, g2)
  w = np.maximum(sim, 0) ** power
  yi, xi = np.divmod(np.arange(p), s)
  dy = yi[None] - yi[:, None] + s - 1
  families = [dy * b + (xi[None] - xi[:, None] + s - 1)]
  if mirror:
    families.append(dy * b + xi[:, None] + xi[None])
  t = np.arange(side) - side // 2
  sigma = side / (2 * 2.354)
  kern = np.exp(-(t[:, None] ** 2 + t[None] ** 2) / (2 * sigma ** 2))
  kern /= kern.sum()

  def smooth(space):  # (..., b, b) "same" correlation with zero padding
    half = side // 2
    padded = np.pad(space, [(0, 0)] * (space.ndim - 2) + [(half, half)] * 2)
    out = np.zeros_like(space)
    for u in range(side):
      for v in range(side):
        out += kern[u, v] * padded[..., u:u + b, v:v + b]
    return out

  w_mean = w.mean((1, 2))
  geo = np.zeros_like(w)
  for bins in families:
    hough, cnt = np.zeros((n, b * b)), np.zeros(b * b)
    for k in range(n):
      np.add.at(hough[k], bins, w[k])
    np.add.at(cnt, bins, 1.0)
    hs = smooth(hough.reshape(n, b, b)).reshape(n, -1)
    cs = smooth(cnt.reshape(b, b)).reshape(-1)
    hbar = (hs + kappa * w_mean[:, None]) / (cs + kappa)
    geo += hbar[:, bins]
  conf = w * geo
  fallback = conf.max(-1) == 0
  match = np.where(fallback, sim.argmax(-1), conf.argmax(-1)).astype(np.int32)
  top2 = np.sort(conf, -1)[..., -2:]
  assert np.all(top2[..., 1] - top2[..., 0] > 1e-4 * top2[..., 1]), "pick another seed"
  np.savez(path, S=np.int64(s), power=np.float64(power), smooth_side=np.int64(side),
           kappa=np.float64(kappa), mirror=np.bool_(mirror), f1=f1, f2=f2, sim=sim, w=w,
           conf=conf, match=match, match_fallback=fallback,
           identity_fraction=np.float64(np.mean(match == np.arange(p))), case=np.str_("gen"),
           seed=np.int64(seed))


def _dilemma_case(path, *, n=3, s=5, d=12, dp=6, drop=0.75, p=0.2, t=0.2, lam=0.7, seed=11):
  """Writes a DILEMMA vector file (METHODS.md §3 keys) from a float64 numpy reference."""
  rng = np.random.default_rng(seed)
  length = s * s
  keep = int(length * (1 - drop))
  patches = rng.normal(size=(2, n, length, d))
  pos_embed = rng.normal(size=(length, d))
  ids = np.argsort(rng.random((2, n, length)), axis=-1).astype(np.int32)
  labels = (rng.random((2, n, keep)) < p).astype(np.int32)
  labels[:, 0, 0] = 1  # at least one wrong token per view
  wrong = ids[..., length - keep:] if keep < length else ids[..., ::-1]
  kept = ids[..., :keep]
  input_pos = np.where(labels == 1, wrong, kept)
  tokens = np.take_along_axis(patches, kept[..., None], axis=2) + pos_embed[input_pos]
  w_head, b_head = rng.normal(size=(d, 1)) * 0.3, rng.normal(size=(1,)) * 0.1
  logits = (tokens @ w_head)[..., 0] + b_head[0]
  bce = np.mean(np.maximum(logits, 0) - logits * labels + np.log1p(np.exp(-np.abs(logits))),
                axis=(1, 2))
  q1, q2, k1, k2 = (rng.normal(size=(n, dp)) for _ in range(4))

  def ctr(q, k):
    q, k = _l2n(q), _l2n(k)
    z = q @ k.T / t
    mx = z.max(1, keepdims=True)
    return np.mean(np.log(np.exp(z - mx).sum(1)) + mx[:, 0] - np.diag(z)) * 2 * t

  c12, c21 = ctr(q1, k2), ctr(q2, k1)
  np.savez(path, S=np.int32(s), drop_rate=np.float64(drop), keep=np.int32(keep),
           dilemma_probability=np.float64(p), T=np.float64(t), lam=np.float64(lam),
           patches=patches, pos_embed=pos_embed, ids_shuffle=ids, labels=labels,
           wrong_pos=wrong.astype(np.int32), W_head=w_head, b_head=b_head, q1=q1, q2=q2, k1=k1,
           k2=k2, kept_pos=kept.astype(np.int32), input_pos=input_pos.astype(np.int32),
           tokens_in=tokens, logits=logits, bce=bce, bce_mean=bce.mean(), ctr_q1k2=c12,
           ctr_q2k1=c21, total=c12 + c21 + lam * bce.mean(), case=np.int32(2),
           seed=np.int64(seed))


def _assert_all_pass(rows):
  failed = [str(row) for row in rows if not row.passed]
  assert not failed, "\n".join(failed)


# ---------------------------------------------------------------------------------------------


def test_all_formats_are_shipped():
  names = {parity.detect_format(list(np.load(f).files)) for f in SHIPPED}
  assert names == {"densecl", "houghcl", "houghcl_v2", "univip", "dilemma", "conmim"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_vectors_pass(path):
  rows = parity.check_file(str(path))
  assert len(rows) >= 4
  _assert_all_pass(rows)


def test_generated_densecl_case_of_other_sizes_passes(tmp_path):
  path = tmp_path / "densecl_gen.npz"
  _densecl_case(path)
  rows = parity.check_file(str(path))
  names = {row.name for row in rows}
  assert {"out/match_idx", "grad/q_backbone", "mocov2/grad/neck_q/fc1/kernel",
          "out/queue_global rows not written"} <= names
  _assert_all_pass(rows)


def test_generated_houghcl_case_of_other_sizes_passes(tmp_path):
  path = tmp_path / "houghcl_gen.npz"
  _houghcl_case(path)
  _assert_all_pass(parity.check_file(str(path)))


@pytest.mark.parametrize("sizes", [dict(), dict(mirror=False, side=5, kappa=1.0, power=2.0),
                                   dict(n=2, s=6, c=9, seed=2)],
                         ids=["S5_mirror", "S5_side5", "S6_mirror"])
def test_generated_houghcl_v2_cases_of_other_sizes_pass(sizes, tmp_path):
  """Revision 2 with mirrored offsets, other S (odd and even), N, C and parameters."""
  path = tmp_path / "houghcl_v2_gen.npz"
  _houghcl_v2_case(path, **sizes)
  rows = parity.check_file(str(path))
  assert {"sim", "w", "conf", "match"} <= {r.name for r in rows}
  _assert_all_pass(rows)


def test_houghcl_v2_file_fails_when_the_match_is_wrong(tmp_path):
  r = dict(np.load(DATA / "houghcl_v2_case1.npz"))
  r["match"] = r["match"].copy()
  r["match"][1, 3] = (r["match"][1, 3] + 1) % r["match"].shape[1]
  np.savez(tmp_path / "bad.npz", **r)
  failed = {row.name for row in parity.check_file(str(tmp_path / "bad.npz")) if not row.passed}
  assert "match" in failed


@pytest.mark.parametrize("sizes", [dict(), dict(n=4, s=6, d=8, dp=5, drop=0.75, seed=3),
                                   dict(n=2, s=7, d=16, dp=4, drop=0.5, seed=5)],
                         ids=["S5", "S6", "S7_drop0.5"])
def test_generated_dilemma_cases_of_other_sizes_pass(sizes, tmp_path):
  """Other N, S (odd and even L), D, projection width, λ and drop rate than the shipped case,
  through the runner as `python -m dense_ssl.parity` uses it."""
  path = tmp_path / "dilemma_gen.npz"
  _dilemma_case(path, **sizes)
  rows = parity.check_file(str(path))
  assert {"wrong_pos (rule)", "input_pos", "tokens_in", "bce", "total"} <= {r.name for r in rows}
  _assert_all_pass(rows)
  assert parity.main([str(path)]) == 0


def test_cli_reports_a_corrupted_file(tmp_path, capsys):
  good = DATA / "houghcl_case1.npz"
  r = dict(np.load(good))
  r["match"] = r["match"].copy()
  r["match"][0, 0] = (r["match"][0, 0] + 1) % r["match"].shape[1]
  r["loss"] = r["loss"] * (1 + 1e-3)
  bad = tmp_path / "bad.npz"
  np.savez(bad, **r)
  assert parity.main([str(good)]) == 0
  assert parity.main([str(bad)]) == 1
  out = capsys.readouterr().out
  assert "FAIL  match " in out and "FAIL  loss " in out and "ALL PASS" in out


def test_detect_format_rejects_unknown_files():
  with pytest.raises(ValueError, match="format"):
    parity.detect_format(["foo", "bar"])


# ---------------------------------------------------------------------------------------------
# Stop-gradient: nothing flows into the key side, the queues or the matching.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("matcher", [densecl.argmax_matcher, houghcl.hough_matcher,
                                     houghcl.hough_v2_matcher])
def test_dense_head_has_no_gradient_through_keys_queues_or_matching(matcher):
  n, s, c, h, d, k = 2, 3, 8, 6, 4, 6
  rng = np.random.default_rng(0)
  x_q, x_k = (jnp.asarray(rng.normal(size=(n, s, s, c)), jnp.float32) for _ in range(2))
  neck = heads.DenseCLNeck(hidden=h, dim=d)
  params = neck.init(jax.random.key(0), x_q)["params"]
  q_out, k_out = neck.apply({"params": params}, x_q), neck.apply({"params": params}, x_k)
  qs = [queues.create(jax.random.key(i), k, d) for i in (1, 2)]

  def loss(q_map, q_out, k_map, k_out, buf_g, buf_d):
    queue_g = queues.Queue(buffer=buf_g, ptr=qs[0].ptr)
    queue_d = queues.Queue(buffer=buf_d, ptr=qs[1].ptr)
    return densecl.head_loss(q_map, q_out, k_map, k_out, queue_g, queue_d, temperature=0.2,
                             loss_lambda=0.5, matcher=matcher)[0]

  grads = jax.jit(jax.grad(loss, argnums=tuple(range(6))))(x_q, q_out, x_k, k_out, qs[0].buffer,
                                                  qs[1].buffer)
  g_qmap, g_qout, *constant = grads
  for leaf in jax.tree.leaves(constant) + [g_qmap]:  # q_map only feeds the matcher here
    np.testing.assert_array_equal(leaf, 0.0)
  assert float(jnp.abs(g_qout["global"]).sum()) > 0
  assert float(jnp.abs(g_qout["dense_grid"]).sum()) > 0
  np.testing.assert_array_equal(g_qout["dense_pooled"], 0.0)  # q2 is computed, never used


def test_moco_head_has_no_gradient_through_keys_or_queue():
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(4, 5)), jnp.float32) for _ in range(2))
  queue = queues.create(jax.random.key(0), 8, 5)

  def loss(q, k, buf):
    return mocov2.head_loss(q, k, queues.Queue(buffer=buf, ptr=queue.ptr), 0.2)[0]

  g_q, g_k, g_buf = jax.grad(loss, argnums=(0, 1, 2))(q, k, queue.buffer)
  np.testing.assert_array_equal(g_k, 0.0)
  np.testing.assert_array_equal(g_buf, 0.0)
  assert float(jnp.abs(g_q).sum()) > 0


def test_the_command_line_finds_every_checker():
  """`python -m dense_ssl.parity` runs this file as `__main__`; the checkers register in
  `dense_ssl.parity`, which the entry point must consult."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = subprocess.run([sys.executable, "-m", "dense_ssl.parity", *map(str, SHIPPED)],
                       cwd=DATA.parents[2], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert out.stdout.strip().endswith("ALL PASS")
