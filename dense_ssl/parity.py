"""Checks this implementation against reference vector files (shared/parity/*.md).

    python -m dense_ssl.parity tests/data/parity/*.npz

This module is the runner and the comparison rules; each method's checker lives in its own
file (`dense_ssl/methods/<method>.py`) and registers the vector format it reads with
`register(format, marker_key)`. The format of a file is detected from its keys (the marker key
only that format has). A checker puts the stored inputs through the real code path in float32
(the neck modules, the head-level objectives, the matchers, the queues, the EMA) and compares
every stored output with its documented tolerance. Prints one row per quantity with
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

from dense_ssl import queues

# Documented tolerances (parity/README.md for DenseCL/MoCo-v2, METHODS.md for the others).
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
QUEUE_TOL = 1e-5
MOMENTUM_TOL = 1e-6
RTOL, ATOL = 1e-5, 1e-5
PLAN_ATOL = 1e-6


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


class Checker:
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


def f32(r: Any, key: str) -> jax.Array:
  return jnp.asarray(np.asarray(r[key]), jnp.float32)


def scalar(r: Any, key: str) -> float:
  return float(np.asarray(r[key]))


def queue(r: Any, key: str) -> queues.Queue:
  return queues.Queue(buffer=f32(r, key), ptr=jnp.asarray(np.asarray(r[key + "_ptr"]), jnp.int32))


def tree(r: Any, prefix: str, layers: Sequence[str]) -> dict[str, dict[str, jax.Array]]:
  return {l: {p: f32(r, f"{prefix}/{l}/{p}") for p in ("kernel", "bias")} for l in layers}


def check_tree(ck: Checker, prefix: str, tree: dict, r: Any, tol: float,
                rename: Callable[[str], str] = lambda l: l) -> None:
  for layer, leaves in tree.items():
    for leaf, value in leaves.items():
      key = f"{prefix}/{rename(layer)}/{leaf}"
      ck.rel(key, value, r[key], tol)


# ---------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------

CheckerFn = Callable[[Any, Checker], None]
# format -> (a key only that format has, checker); filled by the method modules.
_FORMATS: dict[str, tuple[str, CheckerFn]] = {}


def register(fmt: str, marker_key: str) -> Callable[[CheckerFn], CheckerFn]:
  """Decorator: `fn(vectors, checker)` checks files of format `fmt`, told apart by `marker_key`."""

  def wrap(fn: CheckerFn) -> CheckerFn:
    if fmt in _FORMATS:
      raise ValueError(f"Parity format {fmt!r} is registered twice.")
    _FORMATS[fmt] = (marker_key, fn)
    return fn

  return wrap


def formats() -> dict[str, str]:
  """{format: marker key} of every registered checker (importing the methods registers them)."""
  import dense_ssl.methods  # pylint: disable=g-import-not-at-top,unused-import
  return {name: key for name, (key, _) in _FORMATS.items()}


def detect_format(keys: Sequence[str]) -> str:
  """The vector format of a file from its keys."""
  markers = formats()
  found = [name for name, key in markers.items() if key in keys]
  if len(found) != 1:
    raise ValueError(f"Cannot tell the parity format from keys {sorted(keys)[:8]}...; expected "
                     f"exactly one of {', '.join(markers.values())}.")
  return found[0]


def check_file(path: str) -> list[Result]:
  """Runs the implementation on the file's inputs and compares every stored output."""
  with np.load(path) as r:
    data = {k: r[k] for k in r.files}
  ck = Checker(str(path))
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
  # The methods register their checkers in the module `dense_ssl.parity`, not in `__main__`.
  from dense_ssl import parity as _registered  # pylint: disable=g-import-not-at-top
  sys.exit(_registered.main(sys.argv[1:]))
