"""HoughCL (Lee et al., 2021): DenseCL whose positives come from Hough voting over grid offsets.

Everything but the matcher is DenseCL's (see densecl.py). The matcher is revision 2 of the
project's reconstruction (METHODS.md §1b, `matchers.hough_voting_v2`: centred cells, cubed
votes, smoothed mean vote per offset bin); revision 1 (§1, `matchers.hough_voting`) stays
selectable for comparison with `config.method.hough_revision=1`.

Config keys: `method.hough_revision` (1 or 2), and for revision 2 `method.hough_power` (p),
`method.hough_smooth_side` (odd side of the Gaussian over the Hough space, 1 = none),
`method.hough_kappa` (κ, shrinkage of each bin's mean vote toward the image's), and
`method.hough_mirror` (also vote for mirrored offsets, for independently flipped views); plus
DenseCL's. Besides `train/corr_acc*` (its own match), a HoughCL step reports
`train/corr_acc_argmax*` (DenseCL's argmax on the same cells), `train/corr_acc_hough_v1*`
when running revision 2, and `train/identity_share` (matches equal to the identity).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dense_ssl import matchers, parity
from dense_ssl.methods import base, densecl

REVISIONS = (1, 2)


def hough_matcher(f_q: jax.Array, f_k: jax.Array, grid: int) -> tuple[jax.Array, jax.Array]:
  """Revision 1 (METHODS.md §1): the Hough-voted key cell of each query cell, and the sim."""
  result = matchers.hough_voting(f_q, f_k, grid)
  return result.match, result.sim


def hough_v2_matcher(f_q: jax.Array, f_k: jax.Array, grid: int,
                     params: matchers.HoughParams = matchers.HoughParams()
                     ) -> tuple[jax.Array, jax.Array]:
  """Revision 2 (METHODS.md §1b): the match, and the centred similarity it was made from."""
  result = matchers.hough_voting_v2(f_q, f_k, grid, params)
  return result.match, result.sim


def hough_params(method_config: Any) -> matchers.HoughParams:
  """Revision 2's parameters from `config.method` (the defaults of §1b where a key is absent)."""
  default = matchers.HoughParams()
  get = lambda key, value: method_config.get(f"hough_{key}", value)
  return matchers.HoughParams(power=float(get("power", default.power)),
                              smooth_side=int(get("smooth_side", default.smooth_side)),
                              kappa=float(get("kappa", default.kappa)),
                              mirror=bool(get("mirror", default.mirror)))


def make_matcher(method_config: Any) -> densecl.Matcher:
  """The matcher `config.method` selects: revision 2 (default) with its parameters, or 1."""
  revision = int(method_config.get("hough_revision", 2))
  if revision not in REVISIONS:
    raise ValueError(f"config.method.hough_revision={revision} is not a HoughCL matcher "
                     f"revision; valid choices: 1 (METHODS.md §1), 2 (§1b, the default).")
  if revision == 1:
    return hough_matcher
  return functools.partial(hough_v2_matcher, params=hough_params(method_config))


@base.register("houghcl")
class HoughCL(densecl.DenseCL):
  """DenseCL with the Hough matcher that `config.method.hough_*` describes."""

  matcher: densecl.Matcher = staticmethod(hough_v2_matcher)

  def __init__(self, config: Any, durations: Any = None):
    super().__init__(config, durations)
    self.revision = int(config.method.get("hough_revision", 2))
    self.matcher = make_matcher(config.method)

  @classmethod
  def check_config(cls, config: Any, num_devices: int) -> None:
    super().check_config(config, num_devices)
    make_matcher(config.method)
    p = hough_params(config.method)
    if p.power <= 0 or p.kappa < 0:
      raise ValueError(f"config.method.hough_power={p.power} must be > 0 and "
                       f"config.method.hough_kappa={p.kappa} >= 0 (METHODS.md §1b: 3 and 3).")
    matchers.gaussian_smoothing(3, p.smooth_side)  # raises for an even or non-positive side

  def comparison_metrics(self, f_q: jax.Array, f_k: jax.Array, match: jax.Array,
                         batch: dict[str, jax.Array], grid: int) -> dict[str, jax.Array]:
    """DenseCL's argmax (and revision 1 under revision 2) scored on the same cells, and the
    share of identity matches, so the matcher's gain over them is visible while training."""
    others = {"argmax": densecl.argmax_matcher(f_q, f_k, grid)[0]}
    if self.revision == 2:
      others["hough_v1"] = hough_matcher(f_q, f_k, grid)[0]
    out = {}
    for name, other in others.items():
      metrics = densecl.correspondence_metrics(other, batch, grid)
      out[f"corr_acc_{name}"] = metrics["corr_acc"]
      out[f"corr_acc_{name}_exact"] = metrics["corr_acc_exact"]
    out["identity_share"] = identity_share(match)
    return out


def identity_share(match: jax.Array) -> jax.Array:
  """Fraction of query cells matched to the key cell at the same grid position."""
  return jnp.mean(match == jnp.arange(match.shape[-1], dtype=match.dtype))


# ---------------------------------------------------------------------------------------------
# Parity (METHODS.md §1 and §1b).
# ---------------------------------------------------------------------------------------------


@parity.register("houghcl", marker_key="offset_bin")
def check_parity(r: Any, ck: parity.Checker) -> None:
  """Revision 1 of the HoughCL matcher and its dense loss (`houghcl_case*.npz`, METHODS.md §1)."""
  grid, temperature = int(np.asarray(r["S"])), parity.scalar(r, "T")
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
      *(parity.f32(r, key) for key in ("f1", "f2", "q", "k", "queue")))
  ck.exact("offset_bin", matchers.offset_bins(grid), r["offset_bin"])
  for name in ("sim", "w", "hough", "conf"):
    ck.close(name, getattr(hough, name), r[name])
  clear = ~np.asarray(r["match_ambiguous"], bool)
  ck.exact("match", hough.match, r["match"], rows=clear)
  ck.exact("match_fallback", hough.fallback, r["match_fallback"], rows=clear)
  ck.exact("densecl_match", plain_match, r["densecl_match"])
  ck.close("logits", aux["logits"].reshape(r["logits"].shape), r["logits"])
  ck.close("ce", aux["ce"].reshape(r["ce"].shape), r["ce"])
  ck.rel("loss", loss, r["loss"], parity.LOSS_TOL)
  ck.rel(f"loss [dense_chunk={chunk}]", loss_chunked, r["loss"], parity.LOSS_TOL)
  ck.rel("loss_with_densecl_match", loss_plain_match, r["loss_with_densecl_match"], parity.LOSS_TOL)


@parity.register("houghcl_v2", marker_key="kappa")
def check_parity_v2(r: Any, ck: parity.Checker) -> None:
  """Revision 2 of the HoughCL matcher (`houghcl_v2_case*.npz`, METHODS.md §1b): the stored
  raw cells through the method's own matcher, built from the file's parameters as
  `config.method.hough_*` would give them."""
  grid = int(np.asarray(r["S"]))
  params = hough_params({"hough_power": parity.scalar(r, "power"),
                         "hough_smooth_side": int(np.asarray(r["smooth_side"])),
                         "hough_kappa": parity.scalar(r, "kappa"),
                         "hough_mirror": bool(np.asarray(r["mirror"]))})
  out = jax.jit(lambda f1, f2: matchers.hough_voting_v2(f1, f2, grid, params))(
      parity.f32(r, "f1"), parity.f32(r, "f2"))
  for name in ("sim", "w", "conf"):
    if name in r:
      ck.close(name, getattr(out, name), r[name])
  ck.exact("match", out.match, r["match"])
  if "match_fallback" in r:
    ck.exact("match_fallback", out.fallback, r["match_fallback"])
  if "identity_fraction" in r:
    match = np.asarray(out.match)
    share = np.mean(match == np.arange(match.shape[-1]))
    ck.rel("identity_fraction", share, r["identity_fraction"], parity.LOSS_TOL)
