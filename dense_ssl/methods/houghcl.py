"""HoughCL (Lee et al., 2021): DenseCL whose positives come from Hough voting over grid offsets.

Everything but the matcher is DenseCL's (see densecl.py); the matcher, its fallback rule and
the project's reconstruction of the method are in matchers.hough_voting and METHODS.md §1.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from dense_ssl import matchers, parity
from dense_ssl.methods import base, densecl


def hough_matcher(f_q: jax.Array, f_k: jax.Array, grid: int) -> tuple[jax.Array, jax.Array]:
  """The Hough-voted key cell of each query cell, and the raw similarity."""
  result = matchers.hough_voting(f_q, f_k, grid)
  return result.match, result.sim


@base.register("houghcl")
class HoughCL(densecl.DenseCL):
  """DenseCL with `hough_matcher`."""

  matcher: densecl.Matcher = staticmethod(hough_matcher)


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
