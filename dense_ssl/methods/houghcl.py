"""HoughCL (Lee et al., 2021): DenseCL whose positives come from Hough voting over grid offsets.

Everything but the matcher is DenseCL's (see densecl.py); the matcher, its fallback rule and
the project's reconstruction of the method are in matchers.hough_voting and METHODS.md §1.
"""

from __future__ import annotations

import jax

from dense_ssl import matchers
from dense_ssl.methods import base, densecl


def hough_matcher(f_q: jax.Array, f_k: jax.Array, grid: int) -> tuple[jax.Array, jax.Array]:
  """The Hough-voted key cell of each query cell, and the raw similarity."""
  result = matchers.hough_voting(f_q, f_k, grid)
  return result.match, result.sim


@base.register("houghcl")
class HoughCL(densecl.DenseCL):
  """DenseCL with `hough_matcher`."""

  matcher: densecl.Matcher = staticmethod(hough_matcher)
